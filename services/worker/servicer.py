"""WorkerService over gRPC: protobuf <-> domain values, one core call per RPC."""

from __future__ import annotations

from collections.abc import Callable

from lmx.v1 import worker_pb2 as pb
from lmx.v1 import worker_pb2_grpc
from services.common.errors import InvalidArgument
from services.worker import limits
from services.worker.constraints import GrammarSpec
from services.worker.core import WorkerCore
from services.worker.engine import (
    FINISH_CONTEXT,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_STOP_STRING,
    Delta,
)
from services.worker.sampling import SamplingParams

FINISH_TO_PB = {
    FINISH_STOP: pb.FINISH_REASON_STOP,
    FINISH_LENGTH: pb.FINISH_REASON_LENGTH,
    FINISH_STOP_STRING: pb.FINISH_REASON_STOP_STRING,
    FINISH_CONTEXT: pb.FINISH_REASON_CONTEXT_WINDOW,
}


def sampling_from_pb(request: pb.GenerateRequest) -> SamplingParams:
    if not request.HasField("sampling"):
        raise InvalidArgument("sampling", "is required (at least sampling.max_tokens)")
    sampling = request.sampling
    return SamplingParams(
        max_tokens=sampling.max_tokens, temperature=sampling.temperature,
        top_p=sampling.top_p if sampling.top_p else 1.0, top_k=sampling.top_k,
        seed=sampling.seed if sampling.HasField("seed") else None, stop=tuple(sampling.stop),
        frequency_penalty=sampling.frequency_penalty, presence_penalty=sampling.presence_penalty)


def grammar_from_pb(request: pb.GenerateRequest) -> GrammarSpec | None:
    if not request.HasField("sampling") or not request.sampling.HasField("grammar"):
        return None
    grammar = request.sampling.grammar
    kind = grammar.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("sampling.grammar", "give json_schema or lark")
    return GrammarSpec(kind, getattr(grammar, kind))


def conversation_from_pb(conversation: pb.Conversation) -> dict:
    """The conversation as the chat template takes it: dicts, tool calls and
    tool definitions parsed from their JSON."""
    messages = []
    for index, m in enumerate(conversation.messages):
        message: dict = {"role": m.role, "content": m.content}
        calls = limits.check_tools_json(f"conversation.messages[{index}].tool_calls_json",
                                        m.tool_calls_json)
        if calls:
            message["tool_calls"] = calls
        if m.tool_call_id:
            limits.check_id(f"conversation.messages[{index}].tool_call_id", m.tool_call_id)
            message["tool_call_id"] = m.tool_call_id
        if m.name:
            limits.check_id(f"conversation.messages[{index}].name", m.name)
            message["name"] = m.name
        messages.append(message)
    tools = limits.check_tools_json("conversation.tools_json", conversation.tools_json)
    return {"conversation": messages, "tools": tools or None}


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, core: Callable[[], WorkerCore],
                 status: Callable[[], pb.GetStatusResponse]):
        self._core = core  # raises FailedPrecondition until the worker is ready
        self._status = status

    async def OpenSession(self, request: pb.OpenSessionRequest, context) -> pb.OpenSessionResponse:
        opened = self._core().open_session(request.model, request.chat_template or None,
                                        request.system_prompt)
        return pb.OpenSessionResponse(session_id=opened.session.session_id,
                                      token=opened.session.token, model=opened.model,
                                      max_context=opened.max_context, chat=opened.chat,
                                      tool_format=opened.tool_format)

    async def Generate(self, request: pb.GenerateRequest, context):
        params = sampling_from_pb(request)
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidArgument("input", "give a prompt, a message, a conversation or a "
                                           "whole_prompt")
        inputs = {
            "prompt": lambda: {"prompt": request.prompt},
            "message": lambda: {"message": {"role": request.message.role,
                                            "content": request.message.content}},
            "conversation": lambda: conversation_from_pb(request.conversation),
            "whole_prompt": lambda: {"whole_prompt": request.whole_prompt},
        }[which]()
        grammar = grammar_from_pb(request)
        async for event in self._core().generate(request.session_id, request.token, params,
                                              grammar=grammar, **inputs):
            if isinstance(event, Delta):
                yield pb.GenerateResponse(delta=pb.TokenDelta(text=event.text,
                                                              token_ids=event.token_ids))
            else:
                yield pb.GenerateResponse(finish=pb.GenerateFinish(
                    reason=FINISH_TO_PB[event.reason], prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    context_tokens=event.context_tokens, reused_tokens=event.reused_tokens))

    async def CloseSession(self, request: pb.CloseSessionRequest,
                           context) -> pb.CloseSessionResponse:
        freed = await self._core().close_session(request.session_id, request.token)
        return pb.CloseSessionResponse(freed_tokens=freed)

    async def ParkSession(self, request: pb.ParkSessionRequest,
                          context) -> pb.ParkSessionResponse:
        parked = await self._core().park_session(request.session_id, request.token)
        return pb.ParkSessionResponse(entry_id=parked.entry_id, parked_tokens=parked.num_tokens,
                                      freed_blocks=parked.freed_blocks)

    async def RestoreSession(self, request: pb.RestoreSessionRequest,
                             context) -> pb.RestoreSessionResponse:
        restored = await self._core().restore_session(request.entry_id, request.token)
        return pb.RestoreSessionResponse(session_id=restored.session.session_id,
                                         restored_tokens=restored.num_tokens)

    async def GetStatus(self, request: pb.GetStatusRequest, context) -> pb.GetStatusResponse:
        return self._status()
