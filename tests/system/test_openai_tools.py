"""Tool calling through lmx's OpenAI front, with the official `openai` package
and an agent framework from PyPI (`openai-agents`), on a stack started by
`lmx up`: admission (a simulated device), a kvstore, a smollm2-135m worker
with `chat-template = deploy/templates/chatml-tools.jinja` (SmolLM2's own
template renders no tools), and the front. Greedy throughout.

SmolLM2-135M is too small to choose to call a tool by itself: where a test
needs a call, tool_choice forces it ("required" or a named function), and
the worker's constrained decoding (services/worker/constraints.py) keeps
the call's name among the tools and its arguments to their schema.

- A forced call, whole and streamed: the same call (name, JSON arguments),
  finish_reason "tool_calls", content null.
- A tool's result sent back: the model answers it, the request continues
  the session holding its history (cached tokens), /metrics counts calls.
- response_format json_schema: an answer the schema accepts.
- A prefill (a final assistant message): the answer continues it.
- openai-agents' function-tool agent, changed only in its base URL, model
  and model settings (tool_choice "required", stop at the `report` tool):
  a two-step task (get_weather, then report) ends with the report.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="install the dev extras (pip install -e '.[dev]')")
pytest.importorskip("llguidance")

TESTS_DIR = Path(__file__).resolve().parents[1]
for path in (TESTS_DIR, TESTS_DIR / "system"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from service.worker.worker_support import GENERATE_TIMEOUT_S, SMOLLM2  # noqa: E402
from test_stack import cache_dir, stack_file  # noqa: E402

pytestmark = pytest.mark.timeout(600, func_only=True)

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = REPO_ROOT / "deploy" / "templates" / "chatml-tools.jinja"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


class Stack:
    """`lmx up` with a stack file (test_stack.py's) of admission (a simulated
    device), a kvstore, the smollm2 worker with the tools template, and the
    front."""

    def __init__(self, tmp: Path):
        self.path, info = stack_file(tmp, SMOLLM2, "cpu:0=4GiB",
                                     f'max-context = 2048\nchat-template = "{TEMPLATE}"')
        self.base = f"http://127.0.0.1:{info['ports']['front']}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}
        self.env["LMX_STACK_DIR"] = str(tmp / "run")
        self.env["LMX_CACHE"] = cache_dir()
        self.log = open(tmp / "up.log", "wb")
        self.up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--stack",
                                    str(self.path)], cwd=REPO_ROOT, env=self.env,
                                   stdout=self.log, stderr=subprocess.STDOUT)
        state = tmp / "run" / "stack.json"
        deadline = time.monotonic() + 300
        while not (state.exists() and self.get("/v1/models")[1].count(SMOLLM2)):
            assert self.up.poll() is None, (tmp / "up.log").read_text()
            assert time.monotonic() < deadline, "lmx up was not ready in 300 s"
            time.sleep(0.2)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except (urllib.error.URLError, OSError) as exc:
            return getattr(exc, "code", 0), ""

    def down(self) -> int:
        result = subprocess.run([sys.executable, "-m", "services.cli", "down"], cwd=REPO_ROOT,
                                env=self.env, capture_output=True, text=True, timeout=120)
        try:
            self.up.wait(60)
        finally:
            self.log.close()
        return result.returncode


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    front = Stack(tmp_path_factory.mktemp("tools"))
    client = openai.OpenAI(base_url=front.base + "/v1", api_key="unused", max_retries=0,
                           timeout=GENERATE_TIMEOUT_S)
    try:
        yield front, client
    finally:
        assert front.down() == 0, "lmx down failed"


def create(client, messages, **kwargs):
    kwargs.setdefault("max_tokens", 60)
    return client.chat.completions.create(model=SMOLLM2, messages=messages, temperature=0,
                                          **kwargs)


def test_a_forced_call_whole_and_streamed(stack):
    _, client = stack
    for choice in ("required", NAMED):
        whole = create(client, ASK, tools=[WEATHER, ADD], tool_choice=choice).choices[0]
        assert whole.finish_reason == "tool_calls" and whole.message.content is None, whole
        (call,) = whole.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather", "the likeliest call of the two tools"
        arguments = json.loads(call.function.arguments)
        assert set(arguments) == {"city"} and isinstance(arguments["city"], str), arguments
        calls, finishes = {}, []
        for part in create(client, ASK, tools=[WEATHER, ADD], tool_choice=choice, stream=True):
            for c in part.choices:
                assert not c.delta.content, f"a forced call streams no content: {c.delta}"
                for delta in c.delta.tool_calls or ():
                    got = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                    got["name"] += delta.function.name or ""
                    got["arguments"] += delta.function.arguments or ""
                if c.finish_reason:
                    finishes.append(c.finish_reason)
        assert finishes == ["tool_calls"]
        assert calls == {0: {"name": "get_weather", "arguments": call.function.arguments}}


def test_a_tools_result_is_answered_in_the_same_session(stack):
    front, client = stack
    messages = list(ASK)
    first = create(client, messages, tools=[WEATHER], tool_choice=NAMED).choices[0].message
    messages.append(first.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": first.tool_calls[0].id,
                     "content": "Sunny, 21 C"})
    reply = create(client, messages, tools=[WEATHER], max_tokens=30)
    answer = reply.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    assert answer.message.content or answer.message.tool_calls
    assert reply.usage.prompt_tokens_details.cached_tokens > 0, (
        "the request with the tool's result should continue the session that made the call")
    status, metrics = front.get("/metrics")
    counted = [line for line in metrics.splitlines() if line.startswith("lmx:tool_calls_total")]
    assert status == 200 and counted and float(counted[0].split()[-1]) >= 1, counted


def test_response_format_json_schema(stack):
    _, client = stack
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    reply = create(client, [{"role": "user", "content": "Give me a person named Ann aged 30."}],
                   response_format={"type": "json_schema",
                                    "json_schema": {"name": "person", "schema": schema}})
    person = json.loads(reply.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int), person
    assert reply.choices[0].finish_reason == "stop"
    # json_object: any object. SmolLM2-135M nests objects until max_tokens
    # (finish_reason "length", as OpenAI's API says of a cut answer); what
    # it wrote is still JSON's start, and a finished one parses.
    free = create(client, [{"role": "user", "content": "Any JSON object."}],
                  response_format={"type": "json_object"}).choices[0]
    assert free.message.content.startswith("{")
    with pytest.raises(openai.BadRequestError) as refused:
        create(client, [{"role": "user", "content": "x"}], response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such"}}})
    assert refused.value.param == "response_format", refused.value.body
    if free.finish_reason == "stop":
        assert isinstance(json.loads(free.message.content), dict)
    else:
        assert free.finish_reason == "length"


def test_a_prefill_is_continued(stack):
    _, client = stack
    messages = [{"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "The answer is"}]
    whole = create(client, messages, max_tokens=8).choices[0].message.content
    streamed = "".join(part.choices[0].delta.content or ""
                       for part in create(client, messages, max_tokens=8, stream=True)
                       if part.choices)
    assert whole and whole == streamed
    assert not whole.lstrip().lower().startswith("the answer is"), (
        f"the answer started again instead of continuing: {whole!r}")


def test_an_openai_agents_function_tool_agent_runs_a_two_step_task(stack):
    """openai-agents' own function-tool example (Agent, @function_tool,
    Runner), changed in its base URL and model, and in its model settings:
    tool_choice "required" (SmolLM2-135M would not call by itself), kept
    after a call (reset_tool_choice False), the run ending at the `report`
    tool (StopAtTools)."""
    agents = pytest.importorskip("agents")
    from agents.agent import StopAtTools

    front, _ = stack
    agents.set_tracing_disabled(True)
    called = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        called.append(("get_weather", city))
        return f"The weather in {city} is sunny, 21 C."

    @agents.function_tool
    def report(summary: str) -> str:
        """Report the final answer to the user."""
        called.append(("report", summary))
        return summary

    client = openai.AsyncOpenAI(base_url=front.base + "/v1", api_key="unused", max_retries=0,
                                timeout=GENERATE_TIMEOUT_S)
    agent = agents.Agent(
        name="Assistant",
        instructions="You answer questions about the weather. Call get_weather, then report.",
        model=agents.OpenAIChatCompletionsModel(model=SMOLLM2, openai_client=client),
        model_settings=agents.ModelSettings(temperature=0, tool_choice="required",
                                            max_tokens=60),
        tools=[get_weather, report], reset_tool_choice=False,
        tool_use_behavior=StopAtTools(stop_at_tool_names=["report"]))
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Tokyo?",
                                           max_turns=4))
    assert [name for name, _ in called] == ["get_weather", "report"], called
    assert called[0][1] == "Tokyo"
    assert result.final_output == called[1][1] and "Tokyo" in result.final_output
