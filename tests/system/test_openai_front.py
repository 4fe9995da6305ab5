"""The OpenAI-compatible front (`lmx front`), driven by the official `openai`
Python package, over real processes on loopback: admission (a simulated
device), a kvstore, a smollm2-135m worker and the front.

- /v1/models lists the worker's model.
- A chat, whole and streamed (chat.completion.chunk events, then [DONE]),
  answers exactly as the gRPC path does for the same conversation (greedy).
- Three agents resending their growing histories turn after turn, at once:
  from the second turn on each request continues the session that holds its
  history (prefix reuse): `usage.prompt_tokens_details.cached_tokens` says
  how much of the context was not computed again, /metrics counts the hits,
  and every answer equals the gRPC path's.
- /v1/completions with a growing raw prompt reuses its prefix too.
- Errors come in OpenAI's shape with the right status: an unknown model is
  404, a bad parameter 400 naming it.
- The surface agent frameworks rely on (issue 23): `models.retrieve`, the
  routes without /v1, `context_length_exceeded` for a prompt past the
  window, parameters lmx does not honour refused naming them, 16 stop
  strings, `system_fingerprint` and `x-request-id` (passed on to the worker),
  and several requests, whole and streamed, over one kept-alive connection;
  tools for a model whose template renders none are a 400 naming `tools`
  (tool calling itself: test_openai_tools.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

openai = pytest.importorskip("openai", reason="install the dev extras (pip install -e '.[dev]')")

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from lmx.v1 import worker_pb2 as wpb  # noqa: E402
from service.kvstore.support import kvstore_servers  # noqa: E402
from service.support import admission_servers  # noqa: E402
from service.worker.worker_support import (  # noqa: E402
    GENERATE_TIMEOUT_S,
    SHARED_MAX_CONTEXT,
    SMOLLM2,
    WorkerClient,
    WorkerProcess,
)
from services.common.launch import free_port  # noqa: E402

pytestmark = pytest.mark.timeout(600, func_only=True)

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 12
AGENTS = {
    "coder": ["Write a Python function that adds two numbers.", "Now add type hints.",
              "Add a docstring."],
    "reviewer": ["Is eval() on user input safe?", "What should I use instead?",
                 "Name one more risky builtin."],
    "writer": ["Write one sentence about the sea.", "Now one about the sky.",
               "And one about the mountains."],
}


class Front:
    def __init__(self, admission: str, kvstore: str, log_path: Path):
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.front", "--listen", f"127.0.0.1:{port}",
             "--admission", admission, "--kvstore", kvstore, "--log-format", "json"],
            cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, "the front exited at start"
            assert time.monotonic() < deadline, "the front did not serve within 30 s"
            time.sleep(0.1)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        finally:
            self._log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("front")
    with admission_servers(tmp) as start_admission, kvstore_servers(tmp) as start_kv:
        kvstore = start_kv()
        admission = start_admission("--device", "cpu:0=4GiB")
        worker = WorkerProcess(SMOLLM2, admission.address,
                               ("--max-context", str(SHARED_MAX_CONTEXT),
                                "--kvstore", kvstore.address), tmp / "worker.log")
        worker.launch().wait_ready()
        front = Front(admission.address, kvstore.address, tmp / "front.log")
        client = openai.OpenAI(base_url=front.base + "/v1", api_key="unused", max_retries=0,
                               timeout=GENERATE_TIMEOUT_S)
        try:
            yield front, client, worker
        finally:
            code = front.stop()
            worker.kill()
            assert code == 0, f"the front exited {code} on SIGTERM"


def grpc_chat(worker: WorkerProcess, turns: list[str], replies: list[str] | None = None
              ) -> list[str]:
    """The same conversation through the gRPC path, one session, a message per
    turn; the answers' text."""
    answers = []
    with WorkerClient(worker.address) as client:
        session = client.open()
        for turn in turns:
            result = client.generate(session, message=("user", turn), max_tokens=MAX_TOKENS)
            answers.append(result.text)
        client.close_session(session)
    return answers


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model=SMOLLM2, messages=messages, temperature=0,
                                          max_tokens=MAX_TOKENS, **kwargs)


def test_models_are_listed(stack):
    _, client, _ = stack
    assert [m.id for m in client.models.list().data] == [SMOLLM2]


def test_a_chat_whole_and_streamed_answers_as_the_grpc_path(stack):
    _, client, worker = stack
    turn = "Name three colors of the rainbow."
    want = grpc_chat(worker, [turn])[0]
    whole = chat(client, [{"role": "user", "content": turn}])
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.content == want
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    pieces, finishes, roles = [], [], []
    for part in chat(client, [{"role": "user", "content": turn}], stream=True):
        assert part.object == "chat.completion.chunk"
        for choice in part.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert roles == ["assistant"] and finishes == [whole.choices[0].finish_reason]
    assert "".join(pieces) == want


def test_three_agents_resending_their_histories_reuse_their_sessions(stack):
    front, client, worker = stack
    want = {name: grpc_chat(worker, turns) for name, turns in AGENTS.items()}

    def agent(name: str) -> tuple[list[str], list[int]]:
        messages, answers, cached = [], [], []
        for turn in AGENTS[name]:
            messages.append({"role": "user", "content": turn})
            reply = chat(client, list(messages))
            text = reply.choices[0].message.content
            answers.append(text)
            cached.append(reply.usage.prompt_tokens_details.cached_tokens)
            messages.append({"role": "assistant", "content": text})
        return answers, cached

    with ThreadPoolExecutor(len(AGENTS)) as pool:
        results = dict(zip(AGENTS, pool.map(agent, AGENTS)))
    for name, (answers, cached) in results.items():
        assert answers == want[name], f"{name}: the front answered differently from gRPC"
        assert cached[0] == 0, f"{name}: a first turn has nothing to reuse: {cached}"
        assert all(c > 0 for c in cached[1:]), f"{name}: later turns did not reuse: {cached}"
    status, text = front.get("/metrics")
    assert status == 200
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["lmx:prefix_cache_hits_total"] >= 2 * len(AGENTS), text
    assert values["lmx:prefix_reused_tokens_total"] > 0
    assert values['lmx:device_leased_bytes{device="cpu:0"}'] > 0, "the memory book is exported"
    assert values["lmx:generation_tokens_total"] >= 3 * len(AGENTS)
    assert values["lmx:kvstore_capacity_bytes"] > 0
    for counter in ("lmx:sessions_parked_total", "lmx:models_awake_total",
                    "lmx:reclaims_requested_total"):
        assert counter in values, f"{counter} missing from /metrics"


def test_completions_with_a_growing_prompt_reuse_its_prefix(stack):
    _, client, _ = stack
    prompt = "The sea is"
    first = client.completions.create(model=SMOLLM2, prompt=prompt, max_tokens=8,
                                      temperature=0)
    assert first.object == "text_completion" and first.choices[0].text
    longer = prompt + first.choices[0].text + " And the sky"
    second = client.completions.create(model=SMOLLM2, prompt=longer, max_tokens=8,
                                       temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    streamed = "".join(part.choices[0].text for part in client.completions.create(
        model=SMOLLM2, prompt=longer, max_tokens=8, temperature=0, stream=True)
        if part.choices)
    assert streamed == second.choices[0].text


def test_errors_come_in_openai_shape(stack):
    front, client, _ = stack
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404
    assert SMOLLM2 in missing.value.body["message"], missing.value.body
    with pytest.raises(openai.BadRequestError) as wrong:
        chat(client, [{"role": "user", "content": "hi"}], top_p=7)
    assert wrong.value.body["param"] == "top_p"
    status, body = front.get("/v1/nowhere")
    assert status == 404 and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_a_client_that_leaves_mid_stream_frees_its_turn(stack):
    """The client closes the connection after the first event: the front
    cancels the generation, the request no longer counts as running, and the
    next request is served."""
    front, client, _ = stack
    body = json.dumps({"model": SMOLLM2, "max_tokens": 200, "temperature": 0, "stream": True,
                       "messages": [{"role": "user", "content": "Count to one hundred."}]})
    request = urllib.request.Request(front.base + "/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    reply = urllib.request.urlopen(request, timeout=60)
    assert reply.readline().startswith(b"data: ")
    reply.close()

    def running() -> float:
        _, text = front.get("/metrics")
        return next(float(line.split()[1]) for line in text.splitlines()
                    if line.startswith("lmx:num_requests_running "))

    deadline = time.monotonic() + 20
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running() == 0, "the abandoned stream still counts as running"
    assert chat(client, [{"role": "user", "content": "Hello"}]).choices[0].message.content


def running(front) -> float:
    _, text = front.get("/metrics")
    return next(float(line.split()[1]) for line in text.splitlines()
                if line.startswith("lmx:num_requests_running "))


def test_a_client_that_leaves_before_a_whole_answer_cancels_it(stack):
    """A non-streamed request whose client closes the connection while the
    answer is being made (issue 19: it generated on for 600 s): the front
    cancels it within a moment, the worker stops generating, and a huge
    max_tokens is refused outright."""
    front, client, worker = stack
    body = json.dumps({"model": SMOLLM2, "max_tokens": SHARED_MAX_CONTEXT - 64,
                       "temperature": 0,
                       "messages": [{"role": "user", "content": "Count to one thousand."}]})
    host, port = front.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                      f"\r\n{body}").encode())
        deadline = time.monotonic() + 20
        while not running(front) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running(front) == 1
        time.sleep(0.5)
    left = time.monotonic()
    while running(front) and time.monotonic() < left + 10:
        time.sleep(0.1)
    assert running(front) == 0, "the abandoned request still counts as running"
    assert time.monotonic() - left < 5
    assert "generation_cancelled" in worker.log()
    with grpc.insecure_channel(worker.address) as channel:
        from lmx.v1 import worker_pb2_grpc
        status = worker_pb2_grpc.WorkerServiceStub(channel).GetStatus(
            wpb.GetStatusRequest(), timeout=10)
    assert not any(s.state == "generating" for s in status.sessions), status.sessions

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=SMOLLM2, max_tokens=1_000_000_000,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert "max_tokens" in str(err.value)


def test_memory_short_is_429_with_retry_after(stack, tmp_path):
    """A worker whose KV cannot grow (another holder took all the free
    memory, and this worker's priority, -1, is below every holder's, so none
    is asked to give any back) refuses after --kv-wait-s: the client gets 429
    with Retry-After, then, once the memory is back, an answer."""
    from lmx.v1 import admission_pb2 as apb
    from lmx.v1 import admission_pb2_grpc

    front, client, worker = stack
    short = WorkerProcess("synthetic:llama-tiny", worker.admission,
                          ("--max-context", "512", "--kv-chunk-bytes", "64KiB",
                           "--kv-wait-s", "1", "--kvstore", "none", "--priority", "-1"),
                          tmp_path / "short.log")
    short.launch().wait_ready()
    stub = admission_pb2_grpc.AdmissionServiceStub(grpc.insecure_channel(worker.admission))
    try:
        free = stub.Status(apb.StatusRequest(), timeout=10).devices[0].free_bytes
        lease = stub.Acquire(apb.AcquireRequest(
            holder=apb.Holder(name="test/blocker", pid=1), bytes=free, priority=10,
            purpose=apb.PURPOSE_OTHER, ttl_ms=60_000), timeout=10).lease
        long_prompt = "one two three four five six seven eight nine ten " * 30
        deadline = time.monotonic() + 20
        while "synthetic:llama-tiny" not in [m.id for m in client.models.list().data]:
            assert time.monotonic() < deadline, "the new worker never showed in /v1/models"
            time.sleep(0.2)
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model="synthetic:llama-tiny", prompt=long_prompt,
                                      max_tokens=4, temperature=0)
        assert refused.value.status_code == 429
        assert int(refused.value.response.headers["retry-after"]) >= 1
        stub.Release(apb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch), timeout=10)
        again = client.completions.create(model="synthetic:llama-tiny", prompt=long_prompt,
                                          max_tokens=4, temperature=0)
        assert again.usage.completion_tokens == 4
    finally:
        short.kill()


# ---- the OpenAI surface agent frameworks rely on (issue 23) -----------------

def bare_client(front: Front, **kwargs):
    return openai.OpenAI(base_url=front.base, api_key="unused", max_retries=0,
                         timeout=GENERATE_TIMEOUT_S, **kwargs)


def test_a_model_is_retrieved_and_the_routes_answer_without_v1(stack):
    front, client, _ = stack
    model = client.models.retrieve(SMOLLM2)
    assert model.id == SMOLLM2 and model.object == "model" and model.owned_by == "lmx"
    assert time.time() - 3600 < model.created <= time.time(), \
        "created: when the front first saw a worker serve it"
    assert [m.created for m in client.models.list().data if m.id == SMOLLM2] == [model.created]
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found"

    bare = bare_client(front)           # base URL without /v1, as for vLLM or llama.cpp
    assert bare.models.retrieve(SMOLLM2).created == model.created
    assert SMOLLM2 in [m.id for m in bare.models.list().data]
    reply = bare.chat.completions.create(model=SMOLLM2, temperature=0, max_tokens=4,
                                         messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content
    assert bare.completions.create(model=SMOLLM2, prompt="The sea is", max_tokens=4,
                                   temperature=0).choices[0].text


def test_tools_for_a_template_that_renders_none_are_400_naming_tools(stack):
    """This stack's worker keeps SmolLM2's own template, which renders no
    tools (tests/system/test_openai_tools.py runs one with
    deploy/templates/chatml-tools.jinja)."""
    _, client, _ = stack
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, [{"role": "user", "content": "Weather?"}], tools=[tool])
    assert refused.value.param == "tools", refused.value.body
    assert "chat-template" in refused.value.message


def test_a_prompt_past_the_window_is_context_length_exceeded(stack):
    """Clients that trim their history on overflow look for this code. The
    request id the client sent comes back, and the worker logged its refusal
    under it."""
    front, client, worker = stack
    long = "one two three four five six seven eight nine ten " * 120     # > 512 tokens
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=SMOLLM2, max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": long}],
                                       extra_headers={"x-request-id": "test-overflow-chat"})
    assert refused.value.code == "context_length_exceeded", refused.value.body
    assert refused.value.param == "messages" and refused.value.type == "invalid_request_error"
    assert refused.value.response.headers["x-request-id"] == "test-overflow-chat"
    with pytest.raises(openai.BadRequestError) as raw:
        client.completions.create(model=SMOLLM2, prompt=long, max_tokens=4)
    assert raw.value.code == "context_length_exceeded" and raw.value.param == "prompt"
    deadline = time.monotonic() + 10
    while "test-overflow-chat" not in worker.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "test-overflow-chat" in worker.log(), "the worker logs under the front's request id"
    # A short prompt still answers: nothing was left behind.
    assert chat(client, [{"role": "user", "content": "Hi"}]).choices[0].message.content


def test_parameters_are_honoured_or_refused_naming_them(stack):
    _, client, _ = stack
    hi = [{"role": "user", "content": "Hi"}]
    for kwargs, param, code in [
            ({"frequency_penalty": 2.5}, "frequency_penalty", "invalid_value"),
            ({"n": 2}, "n", "unsupported_value"),
            ({"logit_bias": {"1": 5}}, "logit_bias", "unsupported_value"),
            ({"extra_body": {"top_k": 5}}, "top_k", "unknown_parameter")]:
        with pytest.raises(openai.BadRequestError) as refused:
            chat(client, hi, **kwargs)
        assert (refused.value.param, refused.value.code) == (param, code), refused.value.body
        assert param in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=SMOLLM2, prompt="x", max_tokens=2, best_of=2)
    assert refused.value.param == "best_of"
    # Penalties are honoured: the answer repeats itself less.
    def complete(**kwargs):
        return client.completions.create(model=SMOLLM2, prompt="go go go go go go go go",
                                         max_tokens=MAX_TOKENS, temperature=0,
                                         **kwargs).choices[0].text

    # Greedy, SmolLM2 answers ".\n\nThe original code is:\n\n```"; penalised,
    # the second "\n\n" (a token it already wrote) loses to another.
    plain, penalised = complete(), complete(frequency_penalty=2.0, presence_penalty=1.0)
    assert penalised.count("\n\n") < plain.count("\n\n"), (plain, penalised)
    # Their neutral values and the harmless fields are accepted.
    reply = chat(client, hi, frequency_penalty=0, presence_penalty=0, n=1, user="agent-1",
                 metadata={"run": "test"}, store=False, stream_options=None)
    assert reply.choices[0].message.content


def test_sixteen_stop_strings_are_accepted(stack):
    _, client, _ = stack
    messages = [{"role": "user", "content": "Name three colors of the rainbow."}]
    want = chat(client, messages).choices[0].message.content
    words = want.split()
    assert len(words) >= 3, want
    word = words[len(words) // 2]
    stops = [f"@@never{i}@@" for i in range(15)] + [word]
    reply = chat(client, messages, stop=stops).choices[0]
    assert reply.finish_reason == "stop" and word not in reply.message.content
    assert len(reply.message.content) < len(want)


def test_answers_carry_a_system_fingerprint_and_a_request_id(stack):
    front, client, _ = stack
    hi = [{"role": "user", "content": "Hi"}]
    raw = client.chat.completions.with_raw_response.create(
        model=SMOLLM2, messages=hi, temperature=0, max_tokens=4)
    assert raw.headers["x-request-id"].startswith("req_")
    whole = raw.parse()
    assert whole.system_fingerprint and whole.system_fingerprint.startswith("lmx-")
    mine = client.chat.completions.with_raw_response.create(
        model=SMOLLM2, messages=hi, temperature=0, max_tokens=4, stream=True,
        extra_headers={"x-request-id": "agent-7-turn-1"})
    assert mine.headers["x-request-id"] == "agent-7-turn-1"
    chunks = list(mine.parse())
    assert chunks and all(c.system_fingerprint == whole.system_fingerprint for c in chunks)
    text = client.completions.create(model=SMOLLM2, prompt="The sea is", max_tokens=2,
                                     temperature=0)
    assert text.system_fingerprint == whole.system_fingerprint, "one model, one fingerprint"
    deadline = time.monotonic() + 10
    while "agent-7-turn-1" not in front.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "agent-7-turn-1" in front.log(), "the front logs the turn under the client's id"


def test_several_requests_share_one_kept_alive_connection(stack):
    """The official client (httpx) keeps its connection between requests:
    lists, whole answers, errors and streams go over one connection. (The
    sync client closes the response of a stream at its [DONE] without reading
    the chunked body's end, so httpx drops that connection after a stream;
    the async client reads it to the end and keeps it: both are checked.)"""
    front, _, _ = stack
    httpx = pytest.importorskip("httpx2")      # the official client's HTTP library
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    hi = [{"role": "user", "content": "Hi"}]

    def where(response) -> tuple:
        return response.extensions["network_stream"].get_extra_info("client_addr")

    client = openai.OpenAI(base_url=front.base + "/v1", api_key="unused", max_retries=0,
                           timeout=GENERATE_TIMEOUT_S,
                           http_client=openai.DefaultHttpxClient(limits=limits))
    used = []
    try:
        for _ in range(2):
            listed = client.models.with_raw_response.list()
            used.append(where(listed.http_response))
            whole = client.chat.completions.with_raw_response.create(
                model=SMOLLM2, messages=hi, temperature=0, max_tokens=4)
            assert whole.parse().choices[0].message.content
            used.append(where(whole.http_response))
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(model=SMOLLM2, messages=hi, top_p=7)
            used.append(where(refused.value.response))
        streamed = client.chat.completions.with_raw_response.create(
            model=SMOLLM2, messages=hi, temperature=0, max_tokens=4, stream=True)
        used.append(where(streamed.http_response))
        assert "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)
        assert len(used) == 7 and len(set(used)) == 1, f"one connection for all: {used}"
        assert client.models.list().data, "and the next request is served"
    finally:
        client.close()

    async def streams() -> list[tuple]:
        aclient = openai.AsyncOpenAI(base_url=front.base + "/v1", api_key="unused",
                                     max_retries=0, timeout=GENERATE_TIMEOUT_S,
                                     http_client=openai.DefaultAsyncHttpxClient(limits=limits))
        used = []
        try:
            for stream in (True, False, True, True, False):
                raw = await aclient.chat.completions.with_raw_response.create(
                    model=SMOLLM2, messages=hi, temperature=0, max_tokens=4, stream=stream)
                used.append(where(raw.http_response))
                if stream:
                    assert [c async for c in raw.parse()]
                else:
                    assert raw.parse().choices[0].message.content
        finally:
            await aclient.close()
        return used

    used = asyncio.run(streams())
    assert len(set(used)) == 1, f"streams and whole answers on one connection: {used}"
