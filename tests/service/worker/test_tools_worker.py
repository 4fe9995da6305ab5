"""Tools through a real worker's gRPC (issue 23): a worker started with
--chat-template deploy/templates/chatml-tools.jinja renders a conversation's
tools and tool turns and answers; the shared smollm2 worker (its own
template renders no tools) refuses them naming conversation.tools_json."""

from __future__ import annotations

import json

import grpc
import pytest

from lmx.v1 import worker_pb2 as wpb

from .worker_support import REPO_ROOT, SHARED_MAX_CONTEXT, SMOLLM2, WorkerClient, rpc_error

pytestmark = pytest.mark.timeout(180, func_only=True)

TEMPLATE = REPO_ROOT / "deploy/templates/chatml-tools.jinja"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def request(session, tools: bool = True) -> wpb.GenerateRequest:
    conversation = wpb.Conversation(messages=[
        wpb.ChatMessage(role="user", content="What is the weather in Paris?"),
        wpb.ChatMessage(role="assistant", tool_calls_json=json.dumps([
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}])),
        wpb.ChatMessage(role="tool", tool_call_id="c1", name="get_weather",
                        content="18 C and sunny"),
    ], tools_json=json.dumps(TOOLS) if tools else "")
    return wpb.GenerateRequest(session_id=session.session_id, token=session.token,
                               conversation=conversation,
                               sampling=wpb.SamplingParams(max_tokens=8, temperature=0))


@pytest.fixture(scope="module")
def tools_worker(worker_fleet, worker_admission):
    return worker_fleet.ready("smollm2-tools", SMOLLM2, worker_admission.address,
                              "--max-context", str(SHARED_MAX_CONTEXT),
                              "--chat-template", str(TEMPLATE))


def test_a_worker_with_a_tools_template_answers_after_a_tool_turn(tools_worker):
    with WorkerClient(tools_worker.address) as client:
        session = client.open()
        assert session.reply.tool_format == "hermes", "the template writes <tool_call> blocks"
        replies = list(client.stub.Generate(request(session), timeout=120))
        finish = replies[-1].finish
        assert finish.completion_tokens > 0
        # The tools' definitions and the tool turn are in the prompt: far more
        # than the three short messages alone.
        assert finish.prompt_tokens > 150, finish
        error, details = rpc_error(client.stub.Generate, request(session, tools=False))
        assert details.field == "conversation.messages[1]", details


def test_a_worker_whose_template_has_no_tools_refuses_them(smollm2_worker):
    with WorkerClient(smollm2_worker.address) as client:
        session = client.open()
        assert session.reply.tool_format == "", "SmolLM2's own template renders no tools"
        error, details = rpc_error(client.stub.Generate, request(session))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details.field == "conversation.tools_json"
        assert "--chat-template" in details.message
