"""The front's side of gRPC: which workers serve which model (admission's
worker registry), their sessions, and Generate (with the HTTP request's id as
`x-request-id` metadata, which the worker binds into its logs); and the one
place where a gRPC error becomes an OpenAI error (`api_error`)."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

import grpc
import structlog

from lmx.v1 import admission_pb2 as apb
from lmx.v1 import worker_pb2 as wpb
from lmx.v1 import worker_pb2_grpc
from services.admission.client import AdmissionClient, error_details
from services.common import transport
from services.common.interceptors import REQUEST_ID_KEY
from services.front.openai_api import ApiError, Call

log = structlog.get_logger(__name__)

#: The registry is read again after this long (a worker that started or
#: stopped shows up within it).
REGISTRY_TTL_S = 1.0
SERVING = (apb.WORKER_STATE_READY, apb.WORKER_STATE_ASLEEP)

#: gRPC status -> (HTTP status, OpenAI error type, OpenAI error code).
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "permission_denied"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "conflict_error", "conflict"),
    grpc.StatusCode.ABORTED: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}
#: The worker's fields that hold the prompt (engine.py refuses one that would
#: not fit the window: "the context would hold N tokens; ..."), and the
#: request fields OpenAI's clients know them by.
PROMPT_FIELDS = {"prompt": "prompt", "whole_prompt": "prompt", "message": "messages",
                 "conversation": "messages"}
OVER_WINDOW = re.compile(r"the context would hold \d+ tokens|context holds \d+ tokens")


def param_of(field: str) -> str | None:
    """The OpenAI request field a worker's field comes from: conversation.
    messages[2].role is messages[2].role, sampling.stop is stop, ...; None
    for fields the client did not send (a session id)."""
    head, _, rest = field.partition(".")
    if head == "sampling":
        # A grammar refused is a response_format's (a forced call's is the
        # front's own).
        return "response_format" if rest == "grammar" else rest or None
    if head == "conversation":
        if rest.startswith("messages"):
            return rest.replace(".tool_calls_json", ".tool_calls")
        return "tools" if rest == "tools_json" else "messages"
    if head in PROMPT_FIELDS:
        return PROMPT_FIELDS[head]
    return None


def context_exceeded(field: str, message: str) -> bool:
    """Whether a worker's INVALID_ARGUMENT says the request does not fit the
    model's window, for workers that do not give the reason
    CONTEXT_LENGTH_EXCEEDED (ErrorInfo) yet: a prompt too long (engine.py
    `_queue`) or max_tokens past the window (limits.py `check_max_tokens`)."""
    head = field.partition(".")[0]
    return (head in PROMPT_FIELDS or field == "sampling.max_tokens") and \
        OVER_WINDOW.search(message) is not None


def api_error(exc: grpc.aio.AioRpcError) -> ApiError:
    """A worker's or admission's refusal as OpenAI's clients expect it: 400
    `context_length_exceeded` for a request past the model's window, 429
    `rate_limit_exceeded` with Retry-After when memory is short, 400 naming
    the field for other bad input, ... The message names the field as the
    client sent it."""
    details = error_details(exc)
    status, kind, code = STATUS.get(details.code, (500, "server_error", "internal_error"))
    message = details.message or details.code.name
    param = param_of(details.field) if details.field else None
    if details.field and param and message.startswith(details.field + ":"):
        message = param + message[len(details.field):]
    if details.code == grpc.StatusCode.INVALID_ARGUMENT and (
            details.reason == "CONTEXT_LENGTH_EXCEEDED" or context_exceeded(details.field,
                                                                            message)):
        code = "context_length_exceeded"
        message += " (the model's maximum context length is exceeded: shorten the " + \
                   ("prompt" if param == "prompt" else "messages") + " or lower max_tokens)"
    elif details.code == grpc.StatusCode.FAILED_PRECONDITION and details.reason:
        code = details.reason.lower()
    retry = details.retry_after_s
    if retry is None and status in (429, 503):
        retry = 1.0
    return ApiError(status, message, type=kind, param=param, code=code,
                    retry_after_s=retry)


class Workers:
    def __init__(self, admission: str, timeout_s: float):
        self.admission = AdmissionClient(admission)
        self.timeout_s = timeout_s
        self._listed: list[apb.WorkerInfo] = []
        self._listed_at = 0.0
        self._first_seen: dict[str, int] = {}     # model -> Unix seconds
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        await self.admission.close()

    async def listed(self) -> list[apb.WorkerInfo]:
        if time.monotonic() - self._listed_at > REGISTRY_TTL_S:
            try:
                reply = await self.admission.stub.ListWorkers(apb.ListWorkersRequest(),
                                                              timeout=10)
            except grpc.aio.AioRpcError as exc:
                raise api_error(exc) from None
            self._listed = [w for w in reply.workers if w.state in SERVING]
            self._listed_at = time.monotonic()
            now = int(time.time())
            for worker in self._listed:
                self._first_seen.setdefault(worker.model, now)
        return self._listed

    async def models(self) -> dict[str, int]:
        """The models served, each with when this front first saw a worker
        serve it (Unix seconds: OpenAI's `created`)."""
        served = {w.model for w in await self.listed()}
        return {model: self._first_seen[model] for model in sorted(served)}

    async def serving(self, model: str) -> list[apb.WorkerInfo]:
        """The workers of `model`, fewest sessions first; 404 if none."""
        workers = [w for w in await self.listed() if w.model == model]
        if not workers:
            raise await self.not_found(model)
        return sorted(workers, key=lambda w: w.num_sessions)

    async def not_found(self, model: str) -> ApiError:
        known = ", ".join(await self.models()) or "none"
        return ApiError(404, f"The model {model!r} does not exist: no lmx worker serves it "
                             f"(served: {known})", param="model", code="model_not_found")

    def stub(self, address: str) -> worker_pb2_grpc.WorkerServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = transport.aio_channel(address)
        return worker_pb2_grpc.WorkerServiceStub(channel)

    async def open(self, address: str, model: str, request_id: str
                   ) -> wpb.OpenSessionResponse:
        try:
            return await self.stub(address).OpenSession(
                wpb.OpenSessionRequest(model=model), timeout=30,
                metadata=((REQUEST_ID_KEY, request_id),))
        except grpc.aio.AioRpcError as exc:
            raise api_error(exc) from None

    async def close_session(self, address: str, session_id: str, token: str) -> None:
        try:
            await self.stub(address).CloseSession(
                wpb.CloseSessionRequest(session_id=session_id, token=token), timeout=10)
        except grpc.aio.AioRpcError as exc:
            log.info("front_close_failed", worker=address, session_id=session_id,
                     code=exc.code().name)

    def generate(self, address: str, session_id: str, token: str, call: Call,
                 request_id: str, grammar: tuple[str, str] | None = None
                 ) -> AsyncIterator[wpb.GenerateResponse]:
        """The call's Generate; `grammar`: (kind, text) for constrained
        decoding (a response_format's schema, a forced call's grammar)."""
        s = call.sampling
        sampling = wpb.SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature,
                                      top_p=s.top_p, stop=list(s.stop),
                                      frequency_penalty=s.frequency_penalty,
                                      presence_penalty=s.presence_penalty)
        if s.seed is not None:
            sampling.seed = s.seed
        if grammar is not None:
            kind, text = grammar
            sampling.grammar.CopyFrom(wpb.Grammar(**{kind: text}))
        request = wpb.GenerateRequest(session_id=session_id, token=token, sampling=sampling)
        if call.kind == "chat":
            messages = [wpb.ChatMessage(role=m.role, content=m.content,
                                        tool_calls_json=m.tool_calls,
                                        tool_call_id=m.tool_call_id, name=m.name)
                        for m in call.messages]
            request.conversation.CopyFrom(wpb.Conversation(messages=messages,
                                                           tools_json=call.tools))
        else:
            request.whole_prompt = call.prompt
        return self.stub(address).Generate(request, timeout=self.timeout_s,
                                           metadata=((REQUEST_ID_KEY, request_id),))
