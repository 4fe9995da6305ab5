"""WorkerCore: input checks with the offending field named, streaming, and a
caller that stops listening, over a real engine with llama-tiny."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

import pytest

from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.worker.core import WorkerCore
from services.worker.limits import (
    CONTEXT_LENGTH_EXCEEDED,
    MAX_CONVERSATION_MESSAGES,
    MAX_PROMPT_CHARS,
)
from services.worker.engine import Delta, Engine, Finished
from services.worker.memory import FixedMemory
from services.worker.models import LoadedModel
from services.worker.sampling import SamplingParams
from services.worker.sessions import SessionTable


def run(loaded: LoadedModel, scenario: Callable[[WorkerCore], Awaitable[object]]):
    async def main():
        engine = Engine(loaded, FixedMemory(1 << 30), chunk_bytes=1 << 16)
        engine.start()
        try:
            return await asyncio.wait_for(scenario(WorkerCore(loaded, engine, SessionTable())), 30)
        finally:
            await engine.close()

    return asyncio.run(main())


def test_open_session_checks_the_model(tiny):
    async def scenario(core):
        with pytest.raises(InvalidArgument) as caught:
            core.open_session(model="smollm2-135m")
        assert caught.value.field == "model", (
            f"a wrong model should name 'model': {caught.value.field}")
        assert len(core.sessions) == 0, "a refused open must not add a session"
        opened = core.open_session(model=tiny.name, system_prompt="Be brief.")
        unnamed = core.open_session()
        return opened, unnamed

    opened, unnamed = run(tiny, scenario)
    assert (opened.model, opened.max_context, opened.chat) == (tiny.name, tiny.max_context, True), (
        f"opened session: {opened}")
    assert opened.session.messages[0] == {"role": "system", "content": "Be brief."}, (
        f"the system prompt should open the conversation: {opened.session.messages}")
    assert unnamed.model == tiny.name, "an empty model name should mean this worker's model"


def test_system_prompt_needs_a_chat_template(tiny):
    base = dataclasses.replace(tiny, has_chat_template=False)

    async def scenario(core):
        with pytest.raises(InvalidArgument) as caught:
            core.open_session(system_prompt="Be brief.")
        plain = core.open_session()
        templated = core.open_session(chat_template="{{ messages }}", system_prompt="Be brief.")
        return caught.value.field, plain.chat, templated.chat

    field, plain_chat, templated_chat = run(base, scenario)
    assert field == "system_prompt", f"the error should name 'system_prompt': {field}"
    assert not plain_chat and templated_chat, (
        f"chat should be on only with a template: plain {plain_chat}, templated {templated_chat}")


async def first_event(stream):
    try:
        return await stream.__anext__()
    finally:
        await stream.aclose()


@pytest.mark.parametrize("inputs, field", [
    (dict(), "input"),
    (dict(prompt="hi", message={"role": "user", "content": "hi"}), "input"),
    (dict(prompt=""), "prompt"),
    (dict(prompt="x" * (MAX_PROMPT_CHARS + 1)), "prompt"),
    (dict(message={"role": "assistant", "content": "hi"}), "message.role"),
    (dict(message={"role": "system", "content": "hi"}), "message.role"),
    (dict(message={"content": "hi"}), "message.role"),
    (dict(message={"role": "user", "content": ""}), "message.content"),
    (dict(message={"role": "user"}), "message.content"),
    (dict(message={"role": "user", "content": "x" * (MAX_PROMPT_CHARS + 1)}), "message.content"),
    (dict(conversation=[{"role": "user", "content": "hi"}] * (MAX_CONVERSATION_MESSAGES + 1)),
     "conversation"),
    (dict(conversation=[]), "conversation"),
])
def test_generate_checks_its_input(tiny, inputs, field):
    async def scenario(core):
        session = core.open_session().session
        with pytest.raises(InvalidArgument) as caught:
            await first_event(core.generate(session.session_id, session.token,
                                            SamplingParams(max_tokens=2), **inputs))
        return caught.value.field, session

    got, session = run(tiny, scenario)
    assert got == field, f"{list(inputs)}: the error should name {field!r}, named {got!r}"
    assert session.tokens == [] and session.messages == [] and not session.busy, (
        "refused input must leave the session untouched")


def test_max_tokens_beyond_the_models_window_is_refused(tiny):
    async def scenario(core):
        session = core.open_session().session
        with pytest.raises(InvalidArgument) as caught:
            await first_event(core.generate(session.session_id, session.token,
                                            SamplingParams(max_tokens=10**9), prompt="hi"))
        fine = await first_event(core.generate(
            session.session_id, session.token,
            SamplingParams(max_tokens=core.loaded.max_context - 1), prompt="hi"))
        return caught.value, fine

    error, fine = run(tiny, scenario)
    assert error.field == "sampling.max_tokens" and "context" in error.message
    assert fine is not None


@pytest.mark.parametrize("make_input", [
    lambda n: dict(prompt="x" * n),
    lambda n: dict(whole_prompt="x" * n),
    lambda n: dict(message={"role": "user", "content": "x" * n}),
    lambda n: dict(conversation=[{"role": "user", "content": "x" * (n // 2)},
                                 {"role": "assistant", "content": "y"},
                                 {"role": "user", "content": "x" * (n // 2)}]),
])
def test_a_text_no_window_could_hold_is_refused_untokenized(tiny, make_input):
    calls = []

    class Counting:
        """The model's tokenizer, counting the calls that tokenize."""
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *args, **kwargs):
            calls.append(args)
            return self.inner(*args, **kwargs)

        def encode(self, *args, **kwargs):
            calls.append(args)
            return self.inner.encode(*args, **kwargs)

    loaded = dataclasses.replace(tiny, tokenizer=Counting(tiny.tokenizer), max_context=64)

    async def scenario(core):
        session = core.open_session().session
        with pytest.raises(InvalidArgument) as caught:
            await first_event(core.generate(session.session_id, session.token,
                                            SamplingParams(max_tokens=2),
                                            **make_input(core.window_chars + 2)))
        return caught.value, core.window_chars, session

    error, bound, session = run(loaded, scenario)
    assert error.reason == CONTEXT_LENGTH_EXCEEDED and "cannot fit" in error.message, error
    assert calls == [], f"the text was tokenized before it was refused: {len(calls)} call(s)"
    assert bound >= 64 * 4, f"the bound {bound} is below any real tokenizer's"
    assert session.tokens == [] and not session.busy


def test_generate_checks_the_session(tiny):
    async def scenario(core):
        session = core.open_session().session
        params = SamplingParams(max_tokens=2)
        with pytest.raises(NotFound):
            await first_event(core.generate("sess-unknown", session.token, params, prompt="hi"))
        with pytest.raises(PermissionDenied) as caught:
            await first_event(core.generate(session.session_id, "wrong", params, prompt="hi"))
        return caught.value.field

    assert run(tiny, scenario) == "token", "a wrong token should name 'token'"


def test_generate_streams_deltas_then_finish_and_close_frees(tiny):
    async def scenario(core):
        session = core.open_session().session
        events = [e async for e in core.generate(session.session_id, session.token,
                                                 SamplingParams(max_tokens=5), prompt="Hello")]
        context = len(session.tokens)
        pool = core.engine.pool.length(session.session_id)
        freed = await core.close_session(session.session_id, session.token)
        with pytest.raises(NotFound):
            await core.close_session(session.session_id, session.token)
        return events, context, pool, freed, core.engine.pool.length(session.session_id)

    events, context, pool, freed, after = run(tiny, scenario)
    assert all(isinstance(e, Delta) for e in events[:-1]) and isinstance(events[-1], Finished), (
        f"deltas then one finish expected: {events}")
    assert len(events) == 6 and events[-1].completion_tokens == 5, f"5 tokens asked: {events[-1]}"
    assert freed == pool > 0, f"close should report the {pool} tokens whose KV it freed: {freed}"
    assert context == pool + 1, "the pool holds all but the last sampled token"
    assert after == 0, "the closed session still holds KV"


@pytest.mark.parametrize("k", [1, 3])
def test_caller_that_stops_keeps_exactly_the_delivered_tokens(tiny, k):
    async def scenario(core):
        session = core.open_session().session
        stream = core.generate(session.session_id, session.token, SamplingParams(max_tokens=100),
                               prompt="Once upon a time")
        received = [await stream.__anext__() for _ in range(k)]
        before = len(session.tokens)
        await stream.aclose()
        while session.busy:  # the engine ends the request at its next step
            await asyncio.sleep(0.01)
        return session, received, before

    session, received, before = run(tiny, scenario)
    prompt_ids = tiny.tokenizer("Once upon a time")["input_ids"]
    delivered = [t for event in received for t in event.token_ids]
    assert len(delivered) == k, f"{k} deltas of one token each expected: {received}"
    assert session.tokens == prompt_ids + delivered, (
        f"after the caller stopped at {k} deltas, the context should hold the prompt and those "
        f"{k} tokens; it holds {len(session.tokens) - len(prompt_ids)} generated tokens "
        f"(the engine had generated {before - len(prompt_ids)})")


def test_chat_turn_after_a_stopped_answer_keeps_the_conversation(tiny):
    async def scenario(core):
        session = core.open_session().session
        stream = core.generate(session.session_id, session.token, SamplingParams(max_tokens=100),
                               message={"role": "user", "content": "Hi"})
        first = await stream.__anext__()
        await stream.aclose()
        while session.busy:
            await asyncio.sleep(0.01)
        messages = list(session.messages)
        events = [e async for e in core.generate(session.session_id, session.token,
                                                 SamplingParams(max_tokens=3),
                                                 message={"role": "user", "content": "More"})]
        return first, messages, events, list(session.messages)

    first, messages, events, after = run(tiny, scenario)
    assert messages == [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": first.text}], (
        f"a stopped answer should be kept as what was delivered: {messages}")
    assert isinstance(events[-1], Finished), f"the next turn should finish: {events[-1]}"
    assert [m["role"] for m in after] == ["user", "assistant", "user", "assistant"], (
        f"messages after the second turn: {after}")


def test_the_prompt_limit_is_a_setting(tiny):
    """--max-prompt-chars: a prompt or message over it is INVALID_ARGUMENT
    naming the field and the setting; at the limit it is taken."""
    from services.common.errors import ConfigError
    from services.worker.settings import WorkerSettings

    async def scenario(core):
        core.max_prompt_chars = 12
        session = core.open_session().session
        for kwargs, field in ((dict(prompt="x" * 13), "prompt"),
                              (dict(message={"role": "user", "content": "y" * 13}),
                               "message.content")):
            with pytest.raises(InvalidArgument) as caught:
                async for _ in core.generate(session.session_id, session.token,
                                             SamplingParams(max_tokens=1), **kwargs):
                    pass
            assert caught.value.field == field and "--max-prompt-chars" in caught.value.message
        async for _ in core.generate(session.session_id, session.token,
                                     SamplingParams(max_tokens=1), prompt="z" * 12):
            pass

    run(tiny, scenario)
    with pytest.raises(ConfigError):
        WorkerSettings(model="smollm2-135m", max_prompt_chars=0)
    with pytest.raises(ConfigError):
        WorkerSettings(model="smollm2-135m", max_message_bytes=100)


def test_deltas_that_queued_behind_a_slow_stream_go_as_one():
    """A stream behind the steps sends what queued up as one delta, in
    order, and the ending after it; a stream that keeps up, each as it is."""
    import asyncio

    from services.worker.core import _coalesce
    from services.worker.engine import Delta, Finished

    queue: asyncio.Queue = asyncio.Queue()
    for text, token in (("b", 2), ("c", 3)):
        queue.put_nowait(Delta(text, [token]))
    end = Finished("stop", 1, 3, 4, 0)
    queue.put_nowait(end)
    merged, later = _coalesce(Delta("a", [1]), queue)
    assert merged == Delta("abc", [1, 2, 3]) and later is end and queue.empty()
    alone = Delta("x", [9])
    assert _coalesce(alone, queue) == (alone, None)
