"""The generation engine on the CPU with the synthetic llama-tiny model (random
weights, the smollm2 tokenizer) and a local memory budget: outputs against
Hugging Face's own generate, continuous batching, endings, the context
window, KV growth and shrinking, cancellation and busy sessions.

No timing assertions: waits are bounded only to turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import threading
from collections.abc import Awaitable, Callable

import pytest
import torch
from transformers import GenerationConfig

from services.common.errors import Aborted, CapacityExhausted, FailedPrecondition, InvalidArgument
from services.worker.engine import (
    FINISH_CONTEXT,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_STOP_STRING,
    Delta,
    Engine,
    Failed,
    Finished,
    Request,
)
from services.worker.memory import FixedMemory
from services.worker.models import LoadedModel
from services.worker.sampling import SamplingParams
from services.worker.sessions import Session, SessionTable

GIB = 1 << 30
BLOCK = 16
BYTES_PER_TOKEN = 512              # llama-tiny in float32: 2 x 2 layers x 2 heads x 16 x 4
CHUNK_BYTES = 4 * BLOCK * BYTES_PER_TOKEN  # 4 blocks, 64 tokens per chunk
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
]


def run(loaded: LoadedModel, scenario: Callable[[Engine], Awaitable[object]], *,
        memory=None, timeout: float = 30.0, **kwargs):
    """Run `scenario` on a started engine, closing it whatever happens."""
    kwargs.setdefault("chunk_bytes", CHUNK_BYTES)

    async def main():
        engine = Engine(loaded, memory if memory is not None else FixedMemory(GIB), **kwargs)
        engine.start()
        try:
            return await asyncio.wait_for(scenario(engine), timeout)
        finally:
            await engine.close()

    return asyncio.run(main())


async def collect(engine: Engine, request: Request, on_delta: Callable[[], None] | None = None
                  ) -> tuple[list[Delta], Finished | Failed]:
    """Every event of a request, telling the engine each delta was delivered
    (and `on_delta`, as each arrives)."""
    deltas = []
    while True:
        event = await request.out.get()
        if not isinstance(event, Delta):
            return deltas, event
        if on_delta is not None:
            on_delta()
        deltas.append(event)
        engine.delivered(request, len(event.token_ids))


async def take(engine: Engine, request: Request, count: int) -> list[Delta]:
    """The request's first `count` deltas, each told delivered."""
    got = []
    while len(got) < count:
        event = await request.out.get()
        got.append(event)
        engine.delivered(request, len(event.token_ids))
    return got


def tokens_of(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def each_alone(prompts: list[list[int]], params: SamplingParams):
    """A scenario: each prompt generated alone, one after the other (the
    control for generations that run together)."""
    async def scenario(engine: Engine) -> list[list[int]]:
        outs = []
        for prompt in prompts:
            session = SessionTable().open()
            deltas, end = await collect(engine, engine.submit_tokens(session, params, prompt))
            assert isinstance(end, Finished), end
            outs.append(tokens_of(deltas))
            engine.drop_session(session)
        return outs
    return scenario


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


async def generate(engine: Engine, session: Session, prompt: str,
                   params: SamplingParams) -> tuple[list[Delta], Finished | Failed]:
    return await collect(engine, engine.submit(session, params, prompt=prompt))


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    async def poll():
        while not condition():
            await asyncio.sleep(0.01)
    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


def hf_greedy(loaded: LoadedModel, reference, ids: list[int], max_new: int) -> list[int]:
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new,
                              pad_token_id=loaded.tokenizer.pad_token_id or 0,
                              eos_token_id=sorted(loaded.eos_token_ids))
    with torch.inference_mode():
        out = reference.generate(torch.tensor([ids]), generation_config=config,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    new = out[0, len(ids):].tolist()
    for i, token in enumerate(new):
        if token in loaded.eos_token_ids:
            return new[: i + 1]
    return new


@pytest.fixture(scope="module")
def reference(tiny):
    """The same weights with Hugging Face's own attention (SDPA)."""
    model = copy.deepcopy(tiny.model)
    model.set_attn_implementation("sdpa")
    return model


# ---- (a) the engine computes what the model computes ------------------------
def test_greedy_output_equals_hf_generate(tiny, reference):
    num_new = 24

    async def scenario(engine):
        sessions = SessionTable()
        results = []
        for prompt in PROMPTS[:3]:
            session = sessions.open()
            deltas, end = await generate(engine, session, prompt,
                                         SamplingParams(max_tokens=num_new))
            results.append((prompt, list(session.tokens), deltas, end))
        # A second turn on the last session: the context so far plus new text.
        before = results[-1][1]
        deltas, end = await generate(engine, session, " and then",
                                     SamplingParams(max_tokens=num_new))
        return results, (before, deltas, end)

    results, (before, deltas2, end2) = run(tiny, scenario)
    for prompt, context, deltas, end in results:
        ids = tiny.tokenizer(prompt)["input_ids"]
        expected = hf_greedy(tiny, reference, ids, num_new)
        assert len(set(expected)) > 3, f"the reference output is degenerate: {expected}"
        assert isinstance(end, Finished), f"{prompt!r} ended with {end}"
        assert tokens_of(deltas) == expected, (
            f"{prompt!r}: engine gave {tokens_of(deltas)}, HF generate gave {expected}")
        assert context == ids + expected, f"{prompt!r}: session context is wrong"
        assert end.prompt_tokens == len(ids) and end.completion_tokens == len(expected), (
            f"{prompt!r}: token counts in {end}")
    ids = before + tiny.tokenizer(" and then", add_special_tokens=False)["input_ids"]
    expected = hf_greedy(tiny, reference, ids, num_new)
    assert tokens_of(deltas2) == expected, (
        f"second turn: engine gave {tokens_of(deltas2)}, HF generate on the whole context "
        f"gave {expected}")
    assert end2.context_tokens == len(ids) + len(expected), f"context_tokens in {end2}"


# ---- (b), (c) continuous batching -------------------------------------------
def alone_outputs(tiny, prompts, max_tokens) -> list[list[int]]:
    async def scenario(engine):
        sessions = SessionTable()
        outputs = []
        for prompt in prompts:
            deltas, end = await generate(engine, sessions.open(), prompt,
                                         SamplingParams(max_tokens=max_tokens))
            assert isinstance(end, Finished), f"{prompt!r} alone ended with {end}"
            outputs.append(tokens_of(deltas))
        return outputs

    return run(tiny, scenario)


@pytest.fixture(scope="module")
def alone(tiny):
    return alone_outputs(tiny, PROMPTS, 20)


def test_concurrent_sessions_match_each_alone(tiny, alone):
    async def scenario(engine):
        sessions = SessionTable()
        requests = [engine.submit(sessions.open(), SamplingParams(max_tokens=20), prompt=p)
                    for p in PROMPTS]
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
        return results, engine.stats()

    results, stats = run(tiny, scenario)
    for prompt, expected, (deltas, end) in zip(PROMPTS, alone, results):
        assert isinstance(end, Finished), f"{prompt!r} in a batch ended with {end}"
        assert tokens_of(deltas) == expected, (
            f"{prompt!r}: batched output {tokens_of(deltas)} differs from alone {expected}")
    assert stats.steps < 4 * 20, f"4 sessions x 20 tokens took {stats.steps} steps: not batched"


def test_sessions_joining_while_others_decode(tiny, alone):
    async def scenario(engine):
        sessions = SessionTable()
        first = engine.submit(sessions.open(), SamplingParams(max_tokens=20), prompt=PROMPTS[0])
        early = []
        while len(early) < 5:  # the first session is decoding
            event = await first.out.get()
            assert isinstance(event, Delta), f"the first session ended early: {event}"
            early.append(event)
            engine.delivered(first, 1)
        joined = [engine.submit(sessions.open(), SamplingParams(max_tokens=20), prompt=p)
                  for p in PROMPTS[1:3]]
        rest, *others = await asyncio.gather(collect(engine, first),
                                             *(collect(engine, r) for r in joined))
        later = engine.submit(sessions.open(), SamplingParams(max_tokens=20), prompt=PROMPTS[3])
        return early + rest[0], [o[0] for o in others] + [(await collect(engine, later))[0]]

    first, others = run(tiny, scenario)
    assert tokens_of(first) == alone[0], "the decoding session changed when others joined"
    for prompt, expected, deltas in zip(PROMPTS[1:], alone[1:], others):
        assert tokens_of(deltas) == expected, f"{prompt!r} joining a running batch changed"


# ---- (d) endings ---------------------------------------------------------------
def test_max_tokens_finishes_with_length(tiny, alone):
    async def scenario(engine):
        session = SessionTable().open()
        return session, *(await generate(engine, session, PROMPTS[0], SamplingParams(max_tokens=7)))

    session, deltas, end = run(tiny, scenario)
    assert isinstance(end, Finished) and end.reason == FINISH_LENGTH, f"ended with {end}"
    assert tokens_of(deltas) == alone[0][:7], f"7 tokens expected, got {tokens_of(deltas)}"
    assert all(len(d.token_ids) == 1 for d in deltas), "each delta should carry one token"
    assert end.completion_tokens == 7, f"completion_tokens in {end}"
    assert not session.busy, "the session should be idle after its request finished"


def stop_cases(tiny, alone) -> tuple[str, str, str]:
    """From the text of PROMPTS[1] alone: a stop string inside one delta's text and
    one spanning two deltas, and the full text."""
    pieces = [tiny.tokenizer.decode([t]) for t in alone[1]]
    full = tiny.tokenizer.decode(alone[1])
    assert "".join(pieces) == full, "the test needs a text without multi-byte characters"
    inside = next(p for p in pieces[3:] if len(p.strip()) >= 2).strip()[:2]
    index = next(i for i in range(3, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    spanning = pieces[index][-1] + pieces[index + 1][0]
    return full, inside, spanning


@pytest.mark.parametrize("kind", ["inside", "spanning"])
def test_stop_string_ends_and_is_not_in_the_text(tiny, alone, kind):
    full, inside, spanning = stop_cases(tiny, alone)
    stop = inside if kind == "inside" else spanning
    expected_text = full[: full.index(stop)]

    async def scenario(engine):
        session = SessionTable().open()
        params = SamplingParams(max_tokens=20, stop=("never-produced", stop))
        return session, *(await generate(engine, session, PROMPTS[1], params))

    session, deltas, end = run(tiny, scenario)
    assert isinstance(end, Finished) and end.reason == FINISH_STOP_STRING, (
        f"stop {stop!r} in {full!r}: ended with {end}")
    assert text_of(deltas) == expected_text, (
        f"stop {stop!r}: streamed text {text_of(deltas)!r}, expected {expected_text!r}")
    assert stop not in text_of(deltas), "the stop string must not be in the streamed text"


@pytest.mark.parametrize("ending", ["length", "eos"])
def test_text_held_for_a_possible_stop_string_is_sent_at_the_end(tiny, alone, ending):
    """The last token's text ends with the start of a stop string that never
    comes: the engine holds that end back, and must send it when the request
    ends for another reason (max_tokens, or the end-of-sequence token)."""
    pieces = [tiny.tokenizer.decode([t]) for t in alone[1]]
    last = next(i for i in range(6, len(pieces)) if pieces[i])
    stop = pieces[last][-1] + "\x00never"
    if ending == "length":
        loaded, max_tokens, num_tokens = tiny, last + 1, last + 1
    else:  # the token after `last` is taken for end-of-sequence
        loaded = dataclasses.replace(tiny, eos_token_ids=frozenset({alone[1][last + 1]}))
        max_tokens, num_tokens = 20, last + 2

    async def scenario(engine):
        session = SessionTable().open()
        params = SamplingParams(max_tokens=max_tokens, stop=(stop,))
        return await generate(engine, session, PROMPTS[1], params)

    deltas, end = run(loaded, scenario)
    expected_reason = FINISH_LENGTH if ending == "length" else FINISH_STOP
    assert isinstance(end, Finished) and end.reason == expected_reason, f"ended with {end}"
    assert len(deltas) == num_tokens, f"{num_tokens} tokens expected, got {len(deltas)}"
    expected = tiny.tokenizer.decode(alone[1][: last + 1])
    assert text_of(deltas) == expected, (
        f"text held back for stop {stop!r} was not sent at the end: {text_of(deltas)!r}, "
        f"expected {expected!r}")


# ---- (e) the context window ---------------------------------------------------------
def test_context_window(tiny64):
    async def scenario(engine):
        sessions = SessionTable()
        session = sessions.open()
        with pytest.raises(InvalidArgument) as too_long:
            engine.submit(session, SamplingParams(max_tokens=5), prompt="word " * 100)
        assert too_long.value.field == "prompt", f"should name 'prompt': {too_long.value.field}"
        assert session.tokens == [] and not session.busy, "a refused prompt changed the session"
        with pytest.raises(InvalidArgument):  # 64 tokens leave no room to generate
            engine.submit_tokens(session, SamplingParams(max_tokens=5), list(range(100, 164)))
        deltas, end = await collect(engine, engine.submit_tokens(
            session, SamplingParams(max_tokens=50), list(range(100, 160))))
        with pytest.raises(InvalidArgument):  # the context is full now
            engine.submit(session, SamplingParams(max_tokens=5), prompt=" more")
        return session, deltas, end, engine.pool.length(session.session_id)

    session, deltas, end, pool_length = run(tiny64, scenario)
    assert isinstance(end, Finished) and end.reason == FINISH_CONTEXT, f"ended with {end}"
    assert len(deltas) == 4 and end.context_tokens == 64, (
        f"60 prompt tokens + 4 generated fill the 64-token window: {len(deltas)} deltas, {end}")
    assert len(session.tokens) == 64 and pool_length <= 64, (
        f"context {len(session.tokens)} tokens, pool {pool_length}")


# ---- (f) KV growth refused ----------------------------------------------------------
def test_kv_growth_refused_fails_with_capacity_exhausted_and_rolls_back(tiny):
    async def scenario(engine):
        sessions = SessionTable()
        a = sessions.open()
        deltas, end = await collect(engine, engine.submit_tokens(
            a, SamplingParams(max_tokens=5), list(range(200, 230))))
        assert isinstance(end, Finished), f"the first session should fit one chunk: {end}"
        a_before = (list(a.tokens), engine.pool.length(a.session_id))
        b = sessions.open()
        b_end = (await collect(engine, engine.submit_tokens(
            b, SamplingParams(max_tokens=5), list(range(300, 340)))))[1]
        b_after = (list(b.tokens), engine.pool.length(b.session_id), b.busy)
        # A second turn for a that does not fit either: a keeps what it had.
        a_end = (await collect(engine, engine.submit_tokens(
            a, SamplingParams(max_tokens=5), list(range(400, 440)))))[1]
        a_after = (list(a.tokens), engine.pool.length(a.session_id), a.busy)
        # Still usable: a short turn that fits the chunk.
        ok_end = (await collect(engine, engine.submit_tokens(
            b, SamplingParams(max_tokens=2), [500, 501])))[1]
        return a_before, b_end, b_after, a_end, a_after, ok_end, engine.memory.granted()

    memory = FixedMemory(CHUNK_BYTES)  # room for exactly one chunk
    a_before, b_end, b_after, a_end, a_after, ok_end, granted = run(
        tiny, scenario, memory=memory, kv_wait_s=0.5)
    for name, end in (("a new session", b_end), ("a second turn", a_end)):
        assert isinstance(end, Failed) and isinstance(end.error, CapacityExhausted), (
            f"{name} needing a second chunk should fail with CapacityExhausted: {end}")
    assert b_after == ([], 0, False), f"the failed session should be as before: {b_after}"
    assert a_after == (*a_before, False), (
        f"the failed second turn should leave the first turn's context: {a_after} vs {a_before}")
    assert isinstance(ok_end, Finished), f"a request that fits should still work: {ok_end}"
    assert granted["kv"] <= CHUNK_BYTES, f"KV went beyond the budget: {granted}"


class StalledMemory(FixedMemory):
    """Grants the first chunk, then never answers a request for more."""

    async def set_kv_bytes(self, num_bytes: int, wait_s: float) -> None:
        if num_bytes > CHUNK_BYTES:
            await asyncio.Event().wait()
        await super().set_kv_bytes(num_bytes, wait_s)


def test_kv_growth_that_never_comes_fails_after_kv_wait_s(tiny):
    async def scenario(engine):
        sessions = SessionTable()
        a = sessions.open()
        await collect(engine, engine.submit_tokens(a, SamplingParams(max_tokens=2),
                                                   list(range(200, 250))))
        b = sessions.open()
        end = (await collect(engine, engine.submit_tokens(b, SamplingParams(max_tokens=2),
                                                          list(range(300, 340)))))[1]
        return end, list(b.tokens), engine.stats()

    end, b_tokens, stats = run(tiny, scenario, memory=StalledMemory(GIB), kv_wait_s=0.3)
    assert isinstance(end, Failed) and isinstance(end.error, CapacityExhausted), (
        f"a request waiting for KV past kv_wait_s should fail with CapacityExhausted: {end}")
    assert b_tokens == [], f"the failed request should leave its session empty: {b_tokens}"
    assert stats.num_waiting == 0 and stats.num_running == 0, (
        f"the request is still queued: {stats}")



def test_a_prompt_only_a_larger_pool_can_hold_does_not_hold_up_the_queue(tiny):
    """A prompt needing more blocks than the pool has in all waits for
    admission's grant (here never coming); a short prompt queued behind it
    runs meanwhile in the blocks free now, instead of waiting kv_wait_s
    behind it; the long one then fails with CapacityExhausted."""
    order = []

    async def scenario(engine):
        sessions = SessionTable()
        warm = sessions.open()   # the pool's first chunk (64 tokens), mostly free after
        await collect(engine, engine.submit_tokens(warm, SamplingParams(max_tokens=2),
                                                   list(range(200, 210))))
        long, short = sessions.open(), sessions.open()

        async def one(name, session, prompt):
            end = (await collect(engine, engine.submit_tokens(
                session, SamplingParams(max_tokens=3), prompt)))[1]
            order.append(name)
            return end

        long_task = asyncio.create_task(one("long", long, list(range(300, 500))))
        await asyncio.sleep(0)
        short_end = await one("short", short, list(range(600, 610)))
        return await long_task, short_end, list(long.tokens)

    long_end, short_end, long_tokens = run(tiny, scenario, memory=StalledMemory(GIB),
                                           kv_wait_s=3, spare_chunks=1)
    assert isinstance(short_end, Finished), f"the short prompt should finish: {short_end}"
    assert order == ["short", "long"], (
        f"the short prompt waited for the long one's growth (finished in order {order})")
    assert isinstance(long_end, Failed) and isinstance(long_end.error, CapacityExhausted), (
        f"the long prompt should fail with CapacityExhausted when no growth comes: {long_end}")
    assert long_tokens == [], f"the failed prompt should leave its session empty: {long_tokens}"


def test_generations_that_outgrow_the_kv_budget_together_are_preempted_not_failed(tiny):
    """Two generations that each fit alone but not together: when both wait
    for a block that cannot come, the newer gives its blocks back, waits,
    and is recomputed once the older is done (its idle KV released); both
    finish with the tokens each makes alone (greedy)."""
    prompts = [list(range(200, 230)), list(range(300, 330))]
    params = SamplingParams(max_tokens=60)

    async def together(engine):
        sessions = SessionTable()
        a, b = sessions.open(), sessions.open()

        def relieve(num_bytes):
            """What the worker does (pressure.py): an idle session's KV goes
            (parked), here dropped."""
            if not a.busy and engine.pool.length(a.session_id):
                engine.drop_session(a)
                return True
            return False

        engine.on_kv_short = relieve
        first = asyncio.create_task(collect(engine, engine.submit_tokens(a, params, prompts[0])))
        await asyncio.sleep(0)
        second = asyncio.create_task(collect(engine, engine.submit_tokens(b, params, prompts[1])))
        a_deltas, a_end = await first
        b_deltas, b_end = await second
        return (tokens_of(a_deltas), a_end), (tokens_of(b_deltas), b_end), engine.stats()

    budget = 2 * CHUNK_BYTES              # 8 blocks; each generation needs 6 (90 tokens)
    expected = run(tiny, each_alone(prompts, params), memory=FixedMemory(budget), kv_wait_s=20,
                   spare_chunks=0)
    (a_ids, a_end), (b_ids, b_end), stats = run(tiny, together, memory=FixedMemory(budget),
                                                kv_wait_s=20, spare_chunks=0)
    assert isinstance(a_end, Finished) and isinstance(b_end, Finished), (
        f"a generation was failed instead of preempted: {a_end}, {b_end}")
    assert stats.preemptions >= 1, f"nothing was preempted: {stats}"
    assert [a_ids, b_ids] == expected, "a preempted generation went on differently"


def test_the_kv_storage_grows_and_shrinks_only_on_the_compute_thread(tiny):
    """A step on the compute thread reads the storage's chunk list (decode
    graphs' address table): a chunk added meanwhile from the event loop left
    the table one chunk short, an illegal address on an H100 (issue 18). Every
    change to the storage happens on the compute thread, and the generations
    that grew and shrank it still make their own tokens."""
    prompts = [list(range(200, 230)), list(range(300, 390))]
    params = SamplingParams(max_tokens=40)
    threads = []

    async def grow_and_shrink(engine):
        storage = engine.storage
        for name in ("add_chunk", "remove_chunks"):
            original = getattr(storage, name)

            def record(*args, _original=original, _name=name):
                threads.append((_name, threading.current_thread().name))
                return _original(*args)

            setattr(storage, name, record)
        ids = []
        sessions = SessionTable()
        for prompt in prompts:
            session = sessions.open()
            ids.append(tokens_of((await collect(engine, engine.submit_tokens(
                session, params, prompt)))[0]))
            engine.drop_session(session)
        await engine.wait_settled()
        return ids, engine.storage.num_chunks, engine.pool.num_chunks

    expected = run(tiny, each_alone(prompts, params))
    ids, storage_chunks, pool_chunks = run(tiny, grow_and_shrink, spare_chunks=0)
    names = {name for name, _ in threads}
    assert names == {"add_chunk", "remove_chunks"}, f"the KV should have grown and shrunk: {threads}"
    elsewhere = [(name, thread) for name, thread in threads if not thread.startswith("lmx-compute")]
    assert not elsewhere, f"the storage changed off the compute thread: {elsewhere}"
    assert storage_chunks == pool_chunks, (
        f"storage and pool disagree: {storage_chunks} vs {pool_chunks} chunks")
    assert ids == expected, "a generation went on differently"


def test_paused_generations_hold_no_kv_and_go_on_exactly_after_resume(tiny):
    """Engine.pause: between two steps every generation stops (running ones
    preempted, a queued turn's context freed too), no step runs and every
    KV chunk goes back; after resume each finishes with its own tokens."""
    prompts = [list(range(200, 230)), list(range(300, 330))]
    params = SamplingParams(max_tokens=40)

    async def paused(engine):
        sessions = SessionTable()
        a, b = sessions.open(), sessions.open()
        first = engine.submit_tokens(a, params, prompts[0])
        second = engine.submit_tokens(b, params, prompts[1])
        got = {0: [], 1: []}
        for index, request in enumerate((first, second)):   # both under way
            event = await request.out.get()
            assert isinstance(event, Delta), event
            got[index].extend(event.token_ids)
            engine.delivered(request, len(event.token_ids))
        stopped = await engine.pause()
        steps = engine.stats().steps
        await engine.wait_settled()
        await asyncio.sleep(0.2)
        stats = engine.stats()
        held = (stats.steps == steps, stats.num_used_blocks, stats.kv_bytes)
        engine.resume()
        ends = []
        for index, request in enumerate((first, second)):
            deltas, end = await collect(engine, request)
            got[index].extend(tokens_of(deltas))
            ends.append(end)
        return stopped, held, got, ends

    expected = run(tiny, each_alone(prompts, params))
    stopped, held, got, ends = run(tiny, paused)
    assert stopped == 2, f"both generations should have been stopped: {stopped}"
    assert held == (True, 0, 0), f"paused: no step, no block, no KV chunk held: {held}"
    assert all(isinstance(end, Finished) for end in ends), ends
    assert [got[0], got[1]] == expected, "a paused generation went on differently"


# ---- (g) shrinking ------------------------------------------------------------
@pytest.mark.parametrize("order", ["first-to-last", "last-to-first"])
def test_closed_sessions_give_their_kv_chunks_back(tiny, order):
    async def scenario(engine):
        sessions = SessionTable()
        opened = [sessions.open() for _ in range(3)]
        for session in opened:  # 60 tokens each: one chunk each
            await collect(engine, engine.submit_tokens(session, SamplingParams(max_tokens=2),
                                                       list(range(1000, 1060))))
        grown = engine.memory.granted()["kv"]
        for session in (opened if order == "first-to-last" else opened[::-1]):
            engine.drop_session(sessions.close(session.session_id, session.token))
        await wait_until(lambda: engine.memory.granted()["kv"] == 0,
                         f"all KV went back (now {engine.memory.granted()['kv']} bytes, "
                         f"{engine.pool.num_chunks} chunks)")
        return grown, engine.pool.usage(), engine.storage.num_chunks

    grown, usage, storage_chunks = run(tiny, scenario)
    assert grown >= 3 * CHUNK_BYTES, f"3 sessions of 60 tokens should hold 3 chunks: {grown}"
    assert usage.num_chunks == 0 and storage_chunks == 0, (
        f"the pool and its tensors should be empty: {usage}, {storage_chunks} tensor chunks")


def test_closing_generating_sessions_gives_kv_back(tiny):
    async def scenario(engine):
        sessions = SessionTable()
        opened = [sessions.open() for _ in range(3)]
        requests = [engine.submit_tokens(s, SamplingParams(max_tokens=200), list(range(700, 760)))
                    for s in opened]
        for request in requests:
            await request.out.get()
        for session in opened[::-1]:
            engine.drop_session(sessions.close(session.session_id, session.token))
        await wait_until(lambda: engine.memory.granted()["kv"] == 0,
                         f"all KV went back (now {engine.memory.granted()['kv']} bytes)")
        return [r.done for r in requests]

    assert run(tiny, scenario) == [True] * 3, "dropped sessions' requests should be done"


def test_closing_a_session_mid_step_spares_the_others(tiny):
    """A session closed while a step that includes it runs: the chunks it held
    must not vanish under that step (the others in the batch would fail)."""
    async def scenario(engine):
        sessions = SessionTable()
        low, high = sessions.open(), sessions.open()
        a = engine.submit_tokens(low, SamplingParams(max_tokens=40), list(range(100, 110)))
        b = engine.submit_tokens(high, SamplingParams(max_tokens=40), list(range(100, 190)))
        await a.out.get()
        await b.out.get()  # both are decoding; b's blocks reach into higher chunks
        engine.drop_session(sessions.close(high.session_id, high.token))
        return await collect(engine, a)

    deltas, end = run(tiny, scenario, spare_chunks=0)
    assert isinstance(end, Finished), f"the other session's request failed: {end}"


# ---- (h) cancellation -------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 4])
def test_cancel_keeps_exactly_the_delivered_tokens(tiny, k):
    prompt_ids = list(range(600, 620))

    async def scenario(engine):
        session = SessionTable().open()
        request = engine.submit_tokens(session, SamplingParams(max_tokens=200), prompt_ids)
        got = await take(engine, request, k)
        engine.cancel(request)
        await wait_until(lambda: request.done, "the cancelled request ended")
        return session, tokens_of(got), request, engine.pool.length(session.session_id)

    session, delivered, request, pool_length = run(tiny, scenario)
    assert len(delivered) == k, f"{k} tokens should have been delivered: {delivered}"
    assert session.tokens == prompt_ids + delivered, (
        f"after cancel the context should be the prompt + the {k} delivered tokens, "
        f"has {len(session.tokens) - len(prompt_ids)} generated: "
        f"{session.tokens[len(prompt_ids):]}")
    assert pool_length <= len(prompt_ids) + k, f"the pool holds {pool_length} tokens' KV"
    assert not session.busy, "the session should be idle after cancel"


def test_next_turn_after_cancel_continues_the_kept_context(tiny, reference):
    prompt_ids = tiny.tokenizer(PROMPTS[2])["input_ids"]

    async def scenario(engine):
        session = SessionTable().open()
        request = engine.submit_tokens(session, SamplingParams(max_tokens=200), prompt_ids)
        await request.out.get()
        engine.delivered(request, 1)
        engine.cancel(request)
        await wait_until(lambda: request.done, "the cancelled request ended")
        kept = list(session.tokens)
        deltas, _ = await collect(engine, engine.submit_tokens(
            session, SamplingParams(max_tokens=8), [2064]))
        return kept, tokens_of(deltas)

    kept, next_turn = run(tiny, scenario)
    expected = hf_greedy(tiny, reference, kept + [2064], 8)
    assert next_turn == expected, f"after a cancel, the next turn gave {next_turn}, HF {expected}"


# ---- (i) busy sessions ---------------------------------------------------------------
def test_second_submit_on_a_generating_session_is_session_busy(tiny):
    async def scenario(engine):
        session = SessionTable().open()
        request = engine.submit(session, SamplingParams(max_tokens=5), prompt="Hello")
        for submit in (lambda: engine.submit(session, SamplingParams(), prompt="again"),
                       lambda: engine.submit_tokens(session, SamplingParams(), [5])):
            with pytest.raises(FailedPrecondition) as caught:
                submit()
            assert caught.value.reason == "SESSION_BUSY", f"reason: {caught.value.reason}"
        tokens_while_busy = list(session.tokens)
        deltas, end = await collect(engine, request)
        again = await generate(engine, session, " again", SamplingParams(max_tokens=2))
        return tokens_while_busy, deltas, end, again[1]

    tokens_while_busy, deltas, end, again = run(tiny, scenario)
    assert isinstance(end, Finished) and len(deltas) == 5, (
        f"the first request should be unaffected by the refused ones: {end}")
    assert isinstance(again, Finished), f"after it finished, the session takes requests: {again}"


def test_empty_input_is_refused(tiny):
    async def scenario(engine):
        session = SessionTable().open()
        with pytest.raises(InvalidArgument) as caught:
            engine.submit_tokens(session, SamplingParams(), [])
        return caught.value.field, session.busy

    field, busy = run(tiny, scenario)
    assert field == "token_ids" and not busy, f"empty token_ids: field {field}, busy {busy}"


# ---- (j) chat ---------------------------------------------------------------------
def test_chat_turns_render_and_reuse_the_context(tiny, reference):
    async def scenario(engine):
        session = SessionTable().open(system_prompt="Be brief.")
        first = await collect(engine, engine.submit(
            session, SamplingParams(max_tokens=6), message={"role": "user", "content": "Hi"}))
        after_first = (list(session.tokens), list(session.messages))
        second = await collect(engine, engine.submit(
            session, SamplingParams(max_tokens=6), message={"role": "user", "content": "More"}))
        return first, after_first, second, list(session.messages), list(session.tokens)

    first, (tokens1, messages1), second, messages2, tokens2 = run(tiny, scenario)
    text1 = text_of(first[0])
    assert messages1 == [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": text1}], f"messages: {messages1}"
    rendered = tiny.tokenizer.apply_chat_template(messages1[:2], tokenize=False,
                                                  add_generation_prompt=True)
    prompt_ids = tiny.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert tokens1[: len(prompt_ids)] == prompt_ids, "the first turn's context is not the rendering"
    assert tokens_of(first[0]) == hf_greedy(tiny, reference, prompt_ids, 6)[:6], (
        "the chat answer differs from HF generate on the rendered conversation")
    assert [m["role"] for m in messages2] == ["system", "user", "assistant", "user", "assistant"], (
        f"messages after two turns: {messages2}")
    assert tokens2[: len(prompt_ids)] == prompt_ids, (
        "the second turn should reuse the first turn's prefix")


def test_chat_on_a_model_without_a_template_is_invalid_argument(tiny):
    bare_tokenizer = copy.copy(tiny.tokenizer)
    bare_tokenizer.chat_template = None
    base = dataclasses.replace(tiny, tokenizer=bare_tokenizer, has_chat_template=False)
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")

    async def scenario(engine):
        sessions = SessionTable()
        session = sessions.open()
        with pytest.raises(InvalidArgument) as caught:
            engine.submit(session, SamplingParams(), message={"role": "user", "content": "Hi"})
        refused = (caught.value.field, list(session.tokens), list(session.messages), session.busy)
        templated = sessions.open(chat_template=template)
        deltas, end = await collect(engine, engine.submit(
            templated, SamplingParams(max_tokens=3), message={"role": "user", "content": "Hi"}))
        prompt = bare_tokenizer.decode(templated.tokens[: end.prompt_tokens])
        return refused, end, prompt

    (field, tokens, messages, busy), end, prompt = run(base, scenario)
    assert field == "message", f"the error should name 'message': {field}"
    assert (tokens, messages, busy) == ([], [], False), "a refused chat turn changed the session"
    assert isinstance(end, Finished), f"a session with its own template should chat: {end}"
    assert prompt == "user: Hi\nassistant:", f"the session's template was not used: {prompt!r}"


class LostMemory(FixedMemory):
    """A lease that is found gone when the engine next checks it (as after
    a SIGSTOP past its TTL)."""

    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self.stale = False
        self.confirms = 0

    def fresh(self) -> bool:
        return not self.stale

    async def confirm(self) -> bool:
        self.confirms += 1
        return False


def test_a_lost_lease_stops_the_engine_before_its_next_step(tiny):
    async def scenario(engine):
        session = SessionTable().open()
        request = engine.submit_tokens(session, SamplingParams(max_tokens=200), [5, 6, 7, 8])
        first = await request.out.get()
        engine.delivered(request, len(first.token_ids))
        steps = engine.stats().steps
        engine.memory.stale = True
        rest, end = await collect(engine, request)
        return first, rest, end, steps, engine.stats(), list(session.tokens)

    first, rest, end, steps, stats, tokens = run(tiny, scenario, memory=LostMemory(GIB))
    assert isinstance(end, Failed) and isinstance(end.error, Aborted), end
    assert end.error.reason == "LEASE_LOST" and end.error.retryable
    assert stats.steps <= steps + 1, (
        f"{stats.steps - steps} steps ran after the lease was found stale")
    assert stats.num_running == 0 and stats.num_waiting == 0
    received = list(first.token_ids) + tokens_of(rest)
    assert tokens == [5, 6, 7, 8, *received], (
        f"the session must keep exactly what its caller received: {tokens} vs {received}")


# ---- prefix reuse (stateless clients resend the whole history) -----------------
def test_a_resent_conversation_reuses_the_context_and_answers_as_a_fresh_session(tiny):
    """conversation=: the whole chat again, one more user turn at the end. The
    session keeps what the new rendering shares with its context (the earlier
    turns and the answer it gave) and computes only the new turn; the answer
    equals that of a fresh session given the same conversation."""
    params = SamplingParams(max_tokens=8)
    first = [{"role": "system", "content": "You are brief."},
             {"role": "user", "content": "Name a colour."}]

    async def scenario(engine):
        sessions = SessionTable()
        reused = sessions.open()
        deltas, end = await collect(engine, engine.submit(reused, params, conversation=first))
        answer = text_of(deltas)
        assert isinstance(end, Finished) and end.reused_tokens == 0
        second = [*first, {"role": "assistant", "content": answer},
                  {"role": "user", "content": "Another one."}]
        deltas, end = await collect(engine, engine.submit(reused, params, conversation=second))
        fresh = sessions.open()
        control, control_end = await collect(engine,
                                             engine.submit(fresh, params, conversation=second))
        # A different earlier turn: only the shared part is kept.
        other = [first[0], {"role": "user", "content": "Name an animal."}]
        _, diverged = await collect(engine, engine.submit(reused, params, conversation=other))
        return end, tokens_of(deltas), control_end, tokens_of(control), diverged

    end, got, control_end, want, diverged = run(tiny, scenario)
    assert end.reused_tokens > 0 and end.prompt_tokens < control_end.prompt_tokens, (
        f"the earlier turns were computed again: {end} vs {control_end}")
    assert end.reused_tokens + end.prompt_tokens == control_end.prompt_tokens
    assert got == want, "a reused context answered differently from a fresh one"
    assert 0 < diverged.reused_tokens < end.reused_tokens, diverged


def test_a_resent_whole_prompt_reuses_its_prefix(tiny):
    params = SamplingParams(max_tokens=6)

    async def scenario(engine):
        sessions = SessionTable()
        session = sessions.open()
        deltas, first = await collect(engine, engine.submit(session, params,
                                                            whole_prompt="Once upon a time"))
        longer = "Once upon a time" + text_of(deltas) + " and then"
        deltas, second = await collect(engine, engine.submit(session, params,
                                                             whole_prompt=longer))
        fresh = sessions.open()
        control, third = await collect(engine, engine.submit(fresh, params, whole_prompt=longer))
        return first, second, tokens_of(deltas), third, tokens_of(control)

    first, second, got, third, want = run(tiny, scenario)
    assert first.reused_tokens == 0 and second.reused_tokens > 0
    assert second.reused_tokens + second.prompt_tokens == third.prompt_tokens
    assert got == want


# ---- chunked prefill -------------------------------------------------------------
LONG_PROMPT = list(range(1000, 1150))      # 150 tokens: ten chunks of 16 at most


def spy_step_sizes(engine: Engine) -> list[int]:
    """The tokens each step computes (the real step runs)."""
    sizes: list[int] = []
    step = engine.runner.step

    def recorded(items):
        sizes.append(sum(len(item.tokens) for item in items))
        return step(items)

    engine.runner.step = recorded
    return sizes


def test_a_prompt_longer_than_a_step_is_computed_in_chunks_exactly(tiny, reference):
    params = SamplingParams(max_tokens=16)

    async def scenario(engine):
        sizes = spy_step_sizes(engine)
        session = SessionTable().open()
        deltas, end = await collect(engine, engine.submit_tokens(session, params, LONG_PROMPT))
        return tokens_of(deltas), end, engine.stats(), sizes

    got, end, stats, sizes = run(tiny, scenario, max_prefill_tokens=16)
    expected = hf_greedy(tiny, reference, LONG_PROMPT, 16)
    assert isinstance(end, Finished), end
    assert got == expected, f"chunked prefill gave {got}, HF generate on the whole prompt {expected}"
    assert max(sizes) <= 16, f"a step computed more than max_prefill_tokens: {sizes}"
    assert stats.prefill_chunks == -(-len(LONG_PROMPT) // 16) - 1, stats
    assert end.prompt_tokens == len(LONG_PROMPT)


def test_sessions_decode_between_the_chunks_of_a_long_prompt(tiny):
    """A long prompt arriving while another session decodes: the decoding
    session gets a token between every two chunks, and both generate what
    they generate alone."""
    params = SamplingParams(max_tokens=40)
    short = tiny.tokenizer(PROMPTS[1])["input_ids"]
    alone = run(tiny, each_alone([short, LONG_PROMPT], params), max_prefill_tokens=16)

    async def scenario(engine):
        sessions = SessionTable()
        arrivals: list[str] = []
        first = engine.submit_tokens(sessions.open(), params, short)
        head = []
        while len(head) < 2:
            head.append(await first.out.get())
            engine.delivered(first, 1)
        second = engine.submit_tokens(sessions.open(), params, LONG_PROMPT)
        (a, a_end), (b, b_end) = await asyncio.gather(
            collect(engine, first, lambda: arrivals.append("first")),
            collect(engine, second, lambda: arrivals.append("second")))
        return head + a, a_end, b, b_end, arrivals

    a, a_end, b, b_end, arrivals = run(tiny, scenario, max_prefill_tokens=16)
    assert isinstance(a_end, Finished) and isinstance(b_end, Finished), (a_end, b_end)
    during = arrivals.index("second")
    chunks = -(-len(LONG_PROMPT) // 16)
    assert arrivals[:during].count("first") >= chunks - 1, (
        f"the decoding session got {arrivals[:during].count('first')} tokens while a prompt of "
        f"{chunks} chunks was computed: {arrivals}")
    assert [tokens_of(a), tokens_of(b)] == alone, "a generation changed beside a chunked prompt"


def test_penalties_apply_to_what_the_answer_generated(tiny):
    """The answer's own counts reach each step: a negative frequency penalty
    makes llama-tiny repeat its first token, a positive one makes it repeat
    less than it does unpenalised (random weights repeat a little); a batch
    mixing penalised and plain rows gives each what it gives alone."""
    prompts = [list(range(200, 220)), list(range(300, 320))]
    plain = SamplingParams(max_tokens=40)
    fewer = SamplingParams(max_tokens=40, frequency_penalty=2.0)
    more = SamplingParams(max_tokens=40, frequency_penalty=-2.0)
    alone = {params: run(tiny, each_alone(prompts, params)) for params in (plain, fewer, more)}

    async def together(engine):
        sessions = SessionTable()
        tasks = [asyncio.create_task(collect(engine, engine.submit_tokens(
            sessions.open(), params, prompt)))
            for params, prompt in ((plain, prompts[0]), (fewer, prompts[1]))]
        return [tokens_of((await task)[0]) for task in tasks]

    mixed = run(tiny, together)
    distinct = {params: [len(set(out)) for out in outs] for params, outs in alone.items()}
    assert all(out == [out[0]] * len(out) for out in alone[more]), alone[more]
    assert all(f >= p for f, p in zip(distinct[fewer], distinct[plain])), distinct
    assert sum(distinct[fewer]) > sum(distinct[plain]), (
        f"the positive penalty changed nothing: {distinct}")
    assert mixed == [alone[plain][0], alone[fewer][1]]
