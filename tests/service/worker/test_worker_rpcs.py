"""WorkerService through a real worker process (SmolLM2-135M, float32 on the
CPU, its window cut to 512 tokens) registered with a real admission server:
sessions, bad input named by field, one generation per session at a time,
cancellation and deadlines that keep exactly the delivered tokens, and
multi-turn chat that reuses the conversation's prefix."""

from __future__ import annotations

import time

import grpc
import pytest

from lmx.v1 import admission_pb2 as apb
from lmx.v1 import worker_pb2 as wpb

from ..support import stub as admission_stub
from .worker_support import (
    RPC_TIMEOUT_S,
    SHARED_MAX_CONTEXT,
    SMOLLM2,
    Generation,
    Opened,
    WorkerClient,
    collect,
    generate_request,
    rpc_error,
)

pytestmark = pytest.mark.timeout(120, func_only=True)

#: A prompt whose greedy continuation goes on and on (no end-of-sequence soon).
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
SMOLLM2_WEIGHT_BYTES = 538_060_288


@pytest.fixture(scope="module")
def client(smollm2_worker):
    with WorkerClient(smollm2_worker.address) as client:
        yield client


@pytest.fixture(scope="module")
def bystander(client):
    """A session that must keep working whatever the other tests do."""
    session = client.open()
    yield session
    client.close_session(session)


def assert_still_serving(client: WorkerClient, bystander: Opened, after: str) -> None:
    try:
        result = client.generate(bystander, prompt=" ok", max_tokens=1, timeout=30)
    except grpc.RpcError as exc:
        raise AssertionError(f"after {after}, another session's Generate failed: "
                             f"{exc.code().name}: {exc.details()}") from None
    assert result.finish.completion_tokens == 1, (
        f"after {after}, another session's Generate gave {result!r}")


def context_before(result: Generation) -> int:
    """The session's context length before this turn."""
    finish = result.finish
    return finish.context_tokens - finish.prompt_tokens - finish.completion_tokens


# ---- sessions ------------------------------------------------------------------

def test_open_generate_close(client, smollm2_worker):
    session = client.open(model=SMOLLM2)
    reply = session.reply
    assert (reply.model, reply.max_context, reply.chat) == (SMOLLM2, SHARED_MAX_CONTEXT, True), (
        f"OpenSession answered {reply!r}: expected model {SMOLLM2}, max_context "
        f"{SHARED_MAX_CONTEXT} (--max-context), chat true")
    first = client.generate(session, prompt="The capital of France is", max_tokens=4)
    assert first.finish.completion_tokens == len(first.token_ids) == first.num_deltas > 0, (
        f"one delta per generated token expected: {first!r}")
    assert context_before(first) == 0, f"a new session's first turn: {first.finish!r}"
    second = client.generate(session, prompt=" and the capital of Spain is", max_tokens=3)
    assert context_before(second) == first.finish.context_tokens, (
        f"the second turn did not continue the first's context: first {first.finish!r}, "
        f"second {second.finish!r}")
    closed = client.close_session(session)
    # The last sampled token's KV is computed only when it is fed, next turn.
    assert closed.freed_tokens == second.finish.context_tokens - 1, (
        f"CloseSession freed {closed.freed_tokens} tokens of KV; the context held "
        f"{second.finish.context_tokens} tokens, all but the last with KV")
    _, details = rpc_error(client.stub.Generate, generate_request(session, prompt="again"))
    assert details.code == grpc.StatusCode.NOT_FOUND, (
        f"Generate on a closed session gave {details.code.name}: {details.message}")
    _, details = rpc_error(client.stub.CloseSession, wpb.CloseSessionRequest(
        session_id=session.session_id, token=session.token))
    assert details.code == grpc.StatusCode.NOT_FOUND, (
        f"closing a session twice gave {details.code.name}: {details.message}")


def test_the_worker_is_listed_ready_by_admission(client, smollm2_worker, worker_admission):
    with grpc.insecure_channel(worker_admission.address) as channel:
        workers = admission_stub(channel).ListWorkers(apb.ListWorkersRequest(model=SMOLLM2),
                                                      timeout=RPC_TIMEOUT_S).workers
    mine = [w for w in workers if w.address == smollm2_worker.address]
    assert len(mine) == 1, (f"admission's ListWorkers(model={SMOLLM2}) lists no (or several) "
                            f"worker at {smollm2_worker.address}: {list(workers)}")
    info = mine[0]
    assert info.state == apb.WORKER_STATE_READY, (
        f"the worker is listed as {apb.WorkerState.Name(info.state)}, not READY: {info!r}")
    assert (info.model, info.pid, info.device) == (SMOLLM2, smollm2_worker.proc.pid, "cpu:0"), (
        f"the worker's registration is wrong: {info!r} (pid {smollm2_worker.proc.pid})")
    assert info.worker_id == f"{SMOLLM2}@{smollm2_worker.address}", info.worker_id
    status = client.status()
    assert (status.model, status.dtype, status.state, status.max_context) == (
        SMOLLM2, "float32", "ready", SHARED_MAX_CONTEXT), f"GetStatus: {status!r}"
    assert status.weight_bytes == SMOLLM2_WEIGHT_BYTES, (
        f"GetStatus.weight_bytes {status.weight_bytes}, expected {SMOLLM2_WEIGHT_BYTES} "
        "(SmolLM2-135M in float32)")
    assert status.held_bytes <= status.leased_bytes, (
        f"the worker holds {status.held_bytes} bytes beyond its leases ({status.leased_bytes})")


# ---- bad input -----------------------------------------------------------------

def _long_prompt() -> str:
    # Well over the 512-token window, whatever the tokenizer does with it.
    return "lorem ipsum dolor sit amet " * 300


BAD_GENERATES = {
    # name: (how the request is spoiled, code, field named)
    "unknown session": (lambda r: setattr(r, "session_id", "sess-0000000000000000"),
                        grpc.StatusCode.NOT_FOUND, ""),
    "missing session id": (lambda r: setattr(r, "session_id", ""),
                           grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
    "wrong token": (lambda r: setattr(r, "token", r.token[:-1] + ("A" if r.token[-1] != "A"
                                                                   else "B")),
                    grpc.StatusCode.PERMISSION_DENIED, ""),
    "empty prompt": (lambda r: setattr(r, "prompt", ""),
                     grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    "missing input": (lambda r: r.ClearField("input"),
                      grpc.StatusCode.INVALID_ARGUMENT, "input"),
    "max_tokens 0": (lambda r: setattr(r.sampling, "max_tokens", 0),
                     grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    "max_tokens negative": (lambda r: setattr(r.sampling, "max_tokens", -5),
                            grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    "missing sampling": (lambda r: r.ClearField("sampling"),
                         grpc.StatusCode.INVALID_ARGUMENT, "sampling"),
    "negative temperature": (lambda r: setattr(r.sampling, "temperature", -1.0),
                             grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    "prompt longer than the window": (lambda r: setattr(r, "prompt", _long_prompt()),
                                      grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    "assistant message to answer": (
        lambda r: r.message.CopyFrom(wpb.ChatMessage(role="assistant", content="hi")),
        grpc.StatusCode.INVALID_ARGUMENT, "message.role"),
    "empty message": (lambda r: r.message.CopyFrom(wpb.ChatMessage(role="user", content="")),
                      grpc.StatusCode.INVALID_ARGUMENT, "message.content"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATES))
def test_bad_generate_is_refused_naming_the_field(case, client, bystander):
    spoil, code, field = BAD_GENERATES[case]
    session = client.open()
    try:
        warm = client.generate(session, prompt="Hello", max_tokens=1)
        request = generate_request(session, prompt="Tell me a story.", max_tokens=4)
        spoil(request)
        _, details = rpc_error(client.stub.Generate, request)
        assert details.code == code, (
            f"{case}: Generate gave {details.code.name} ({details.message}), expected {code.name}")
        assert details.field == field, (
            f"{case}: the error names field {details.field!r}, expected {field!r} "
            f"({details.message})")
        # The refused request changed nothing: the session goes on from where it was.
        after = client.generate(session, prompt=" world", max_tokens=1)
        assert context_before(after) == warm.finish.context_tokens, (
            f"{case}: the refused request changed the session's context from "
            f"{warm.finish.context_tokens} to {context_before(after)} tokens")
    finally:
        client.close_session(session)
    assert_still_serving(client, bystander, case)


def test_a_prompt_that_fills_the_window_is_refused_before_any_work(client, bystander):
    """The window counts the whole context: prompt tokens that fit alone are
    refused once the context has grown."""
    session = client.open()
    try:
        half = "lorem ipsum dolor sit amet " * 40
        first = client.generate(session, prompt=half, max_tokens=1)
        assert first.finish.context_tokens < SHARED_MAX_CONTEXT, first.finish
        steps = client.status().steps
        _, details = rpc_error(client.stub.Generate,
                               generate_request(session, prompt=half * 2, max_tokens=1))
        assert (details.code, details.field) == (grpc.StatusCode.INVALID_ARGUMENT, "prompt"), (
            f"a turn overflowing the window gave {details.code.name} on {details.field!r}: "
            f"{details.message}")
        assert str(SHARED_MAX_CONTEXT - 1) in details.message, (
            f"the refusal does not say how many tokens fit: {details.message}")
        assert client.status().steps == steps, "a refused prompt was computed anyway"
    finally:
        client.close_session(session)
    assert_still_serving(client, bystander, "a prompt that overflows the window")


@pytest.mark.parametrize("model", ["gemma3-270m", "no-such-model", "SMOLLM2-135M"])
def test_open_session_for_another_model_is_refused(model, client, bystander):
    _, details = rpc_error(client.stub.OpenSession, wpb.OpenSessionRequest(model=model))
    assert (details.code, details.field) == (grpc.StatusCode.INVALID_ARGUMENT, "model"), (
        f"OpenSession(model={model!r}) on a {SMOLLM2} worker gave {details.code.name} on "
        f"{details.field!r}: {details.message}")
    assert SMOLLM2 in details.message, f"the refusal does not say which model is served: " \
                                       f"{details.message}"
    assert_still_serving(client, bystander, f"OpenSession(model={model!r})")


def test_close_session_with_the_wrong_token_is_denied(client):
    session = client.open()
    _, details = rpc_error(client.stub.CloseSession, wpb.CloseSessionRequest(
        session_id=session.session_id, token="not-the-token"))
    assert details.code == grpc.StatusCode.PERMISSION_DENIED, (
        f"CloseSession with a wrong token gave {details.code.name}: {details.message}")
    client.close_session(session)  # the right token still works


# ---- one generation per session --------------------------------------------------

def test_a_second_concurrent_generate_on_a_session_is_refused(client, bystander):
    session = client.open()
    call = client.stub.Generate(generate_request(session, prompt=COUNTING, max_tokens=200),
                                timeout=60)
    try:
        first = next(call)
        assert first.WhichOneof("kind") == "delta", f"the first response is {first!r}"
        _, details = rpc_error(client.stub.Generate,
                               generate_request(session, prompt=" more", max_tokens=2))
        assert details.code == grpc.StatusCode.FAILED_PRECONDITION, (
            f"a second Generate while the session generates gave {details.code.name}: "
            f"{details.message}")
        assert details.reason == "SESSION_BUSY", f"ErrorInfo reason {details.reason!r}"
        assert_still_serving(client, bystander, "a refused concurrent Generate")
    finally:
        call.cancel()
        client.close_session(session)


# ---- cancellation and deadlines ---------------------------------------------------

def next_turn(client: WorkerClient, session: Opened, prompt: str,
              max_tokens: int) -> tuple[Generation, float]:
    """The next Generate on a session whose last call just ended early, and
    for how long the session was still refused as busy (it should not be: the
    worker ends a cancelled generation as soon as it hears of it)."""
    started = time.monotonic()
    while True:
        attempt = time.monotonic()
        try:
            return client.generate(session, prompt=prompt, max_tokens=max_tokens), \
                attempt - started
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or attempt - started > 5:
                raise
            time.sleep(0.005)


def check_kept_context(client: WorkerClient, prompt_tokens: int, received: list[int],
                       reference_ids: list[int], then: Generation, what: str) -> None:
    """After `what` cut a generation of COUNTING short: the next turn started
    from prompt + the delivered tokens, and those are the greedy tokens."""
    kept = context_before(then) - prompt_tokens
    num = min(len(received), len(reference_ids))
    assert received[:num] == reference_ids[:num], (
        f"{what}: the tokens received {received[:num]} are not the greedy continuation "
        f"{reference_ids[:num]}")
    # The server may have sent a token or two that were on their way (or in
    # the client's buffer) when the call ended; never fewer than were read.
    assert len(received) <= kept <= len(received) + 2, (
        f"{what}: the client read {len(received)} tokens, and the session kept {kept} "
        f"generated tokens in its context ({context_before(then)} in all, prompt "
        f"{prompt_tokens}): it must keep exactly what was delivered")
    # Replay: a session that generated exactly `kept` tokens and then got the
    # same turn must answer the same; so the context holds exactly those tokens.
    replay = client.open()
    try:
        client.generate(replay, prompt=COUNTING, max_tokens=kept)
        again = client.generate(replay, prompt=" 40, 41,", max_tokens=then.finish.completion_tokens)
    finally:
        client.close_session(replay)
    assert again.token_ids == then.token_ids and context_before(again) == context_before(then), (
        f"{what}: the turn after the cut answered {then.token_ids} from a context of "
        f"{context_before(then)} tokens; a session holding the prompt + the first {kept} "
        f"greedy tokens answers {again.token_ids} from {context_before(again)}")


@pytest.fixture(scope="module")
def counting_reference(client):
    """(prompt tokens, first 48 greedy tokens) of COUNTING on a fresh session."""
    session = client.open()
    try:
        result = client.generate(session, prompt=COUNTING, max_tokens=48)
    finally:
        client.close_session(session)
    assert result.reason == "FINISH_REASON_LENGTH", (
        f"COUNTING should keep counting for 48 tokens: {result!r}")
    return result.finish.prompt_tokens, result.token_ids


def test_cancel_keeps_exactly_the_delivered_tokens(client, bystander, counting_reference):
    prompt_tokens, reference_ids = counting_reference
    session = client.open()
    try:
        call = client.stub.Generate(generate_request(session, prompt=COUNTING, max_tokens=200),
                                    timeout=60)
        received = []
        for response in call:
            assert response.WhichOneof("kind") == "delta", f"unexpected {response!r}"
            received.extend(response.delta.token_ids)
            if len(received) >= 3:
                break
        call.cancel()
        try:
            rest = collect(call)
            raise AssertionError(f"the cancelled call went on: {rest!r}")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED, exc
        then, busy_for = next_turn(client, session, " 40, 41,", max_tokens=4)
        assert busy_for < 0.25, f"the session stayed busy {busy_for:.2f}s after the cancel"
        check_kept_context(client, prompt_tokens, received, reference_ids, then,
                           "cancelling after 3 deltas")
    finally:
        client.close_session(session)
    assert_still_serving(client, bystander, "a cancelled Generate")


def test_a_deadline_keeps_exactly_the_delivered_tokens(client, bystander, counting_reference):
    prompt_tokens, reference_ids = counting_reference
    session = client.open()
    try:
        received = []
        call = client.stub.Generate(generate_request(session, prompt=COUNTING, max_tokens=400),
                                    timeout=1.0)
        with pytest.raises(grpc.RpcError) as caught:
            for response in call:
                received.extend(response.delta.token_ids)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
        assert received, "no token arrived within the 1 s deadline"
        then, busy_for = next_turn(client, session, " 40, 41,", max_tokens=4)
        assert busy_for < 0.25, f"the session stayed busy {busy_for:.2f}s after the deadline"
        check_kept_context(client, prompt_tokens, received, reference_ids, then,
                           f"a deadline after {len(received)} deltas")
    finally:
        client.close_session(session)
    assert_still_serving(client, bystander, "a Generate past its deadline")


def test_closing_a_generating_session_ends_its_stream(client, bystander):
    session = client.open()
    call = client.stub.Generate(generate_request(session, prompt=COUNTING, max_tokens=300),
                                timeout=20)
    first = next(call)
    assert first.WhichOneof("kind") == "delta", first
    started = time.monotonic()
    client.close_session(session)
    with pytest.raises(grpc.RpcError) as caught:
        rest = collect(call)
        raise AssertionError(f"the stream of a closed session went on to {rest!r}")
    took = time.monotonic() - started
    assert caught.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED, (
        "closing a session left its Generate stream hanging until the deadline")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, (
        f"the stream of a closed session ended with {caught.value.code().name}: "
        f"{caught.value.details()}")
    assert took < 5, f"the stream of a closed session ended only after {took:.1f}s"
    assert_still_serving(client, bystander, "closing a generating session")


# ---- chat ----------------------------------------------------------------------

def test_multi_turn_chat_reuses_the_conversation_prefix(client, bystander):
    session = client.open(system_prompt="You are a concise assistant.")
    try:
        first = client.generate(session, message=("user", "What is the capital of France?"),
                                max_tokens=12)
        assert first.text.strip(), f"no answer to the first chat turn: {first!r}"
        second = client.generate(session, message=("user", "And what is the capital of Italy?"),
                                 max_tokens=12)
        assert second.text.strip() and second.finish.completion_tokens > 0, (
            f"no answer to the second chat turn: {second!r}")
        conversation = second.finish.context_tokens - second.finish.completion_tokens
        reused = conversation - second.finish.prompt_tokens
        assert reused >= first.finish.prompt_tokens, (
            f"turn 2 recomputed {second.finish.prompt_tokens} of the {conversation} tokens of "
            f"the rendered conversation; it should reuse at least turn 1's "
            f"{first.finish.prompt_tokens} input tokens")
        assert second.finish.prompt_tokens * 2 < conversation, (
            f"turn 2 computed {second.finish.prompt_tokens} tokens for a conversation of "
            f"{conversation}: the prefix is not being reused")
    finally:
        client.close_session(session)


def test_a_system_prompt_needs_a_chat_model(gemma3_worker):
    with WorkerClient(gemma3_worker.address) as client:
        _, details = rpc_error(client.stub.OpenSession,
                               wpb.OpenSessionRequest(system_prompt="Be brief."))
    assert (details.code, details.field) == (grpc.StatusCode.INVALID_ARGUMENT,
                                             "system_prompt"), (
        f"a system prompt on a base model gave {details.code.name} on {details.field!r}")
