"""Memory pressure on one worker (llama-tiny, a real engine, the kvstore's
control plane in memory over a real shared-memory arena): idle sessions'
KV parked least recently used first, the model put to sleep and woken by
the next request, refusals (pinned, generating), the worker's own shortage
relieved by parking its idle sessions; and the weight stash's mechanics
(tensors really moved and freed, tied weights, outputs unchanged)."""

from __future__ import annotations

import asyncio
import secrets

import pytest
import torch

from services.common.errors import FailedPrecondition
from services.kvstore.arena import Arena
from services.worker.core import WorkerCore
from services.worker.engine import Engine
from services.worker.memory import FixedMemory
from services.worker.parking import Parking
from services.worker.pressure import PressureRelief
from services.worker.sampling import SamplingParams
from services.worker.sessions import SessionTable
from services.worker.sleep import WeightStash

from test_parking import FakeLink, ids_of  # noqa: E402 (same directory)

BASE = 64 << 20


@pytest.fixture
def arena(tmp_path):
    arena = Arena(tmp_path, f"p{secrets.token_hex(4)}", 1 << 20)
    yield arena
    arena.close()


def run_pressure(loaded, scenario, link, *, pinned=False, moves=False, chunk_bytes=1 << 14,
                 keep_bytes=0, residue=lambda: 0, min_awake_s=0.0, max_turn_s=300.0):
    async def main():
        memory = FixedMemory(1 << 30)
        await memory.acquire_base(BASE)
        engine = Engine(loaded, memory, chunk_bytes=chunk_bytes, spare_chunks=0)
        engine.start()
        sessions = SessionTable()
        parking = Parking(loaded, engine, sessions, link)
        activity = []
        pressure = PressureRelief(engine, sessions, parking, memory,
                                  WeightStash(loaded.model, loaded.device, moves=moves),
                                  base_bytes=BASE, keep_bytes=keep_bytes, residue=residue,
                                  pinned=pinned, min_awake_s=min_awake_s,
                                  on_activity=lambda *a: activity.append(a),
                                  max_turn_s=max_turn_s)
        parking.on_activity = lambda *a: activity.append(a)
        engine.on_kv_short = pressure.kv_short
        core = WorkerCore(loaded, engine, sessions, parking, pressure)
        try:
            return await asyncio.wait_for(scenario(core, pressure, memory, activity), 60)
        finally:
            if pressure.stash.asleep:
                pressure.stash.wake()
            await engine.close()

    return asyncio.run(main())


def test_idle_sessions_are_parked_least_recently_used_first(tiny, arena):
    async def scenario(core, pressure, memory, activity):
        a, b, c = (core.open_session().session for _ in range(3))
        for session in (a, b, c):              # a is the least recently used
            await ids_of(core, session, "one two three four five six " * 4)
        await core.engine.wait_settled()
        kv_before = memory.granted()["kv"]
        relief = await pressure.park_idle(1, "reclaim test")
        parked = [x[1] for x in activity if x[0] == "session_parked"]
        assert parked and parked == [a.session_id, b.session_id, c.session_id][:len(parked)], (
            "sessions must be parked least recently used first")
        assert relief.freed_bytes >= 1, f"nothing given back: {relief}"
        assert memory.granted()["kv"] == kv_before - relief.freed_bytes
        assert all(x[4] == "reclaim test" for x in activity)
        # everything idle is parked when asked for more than there is
        await pressure.park_idle(1 << 40, "all")
        assert all(s.parked_entry for s in (a, b, c))
        assert memory.granted().get("kv", 0) == 0, "all parked, yet KV is still leased"
        assert (await pressure.park_idle(1, "none")).detail == "no idle session to park"

    run_pressure(tiny, scenario, FakeLink(arena))


@pytest.mark.parametrize("moves", [False, True], ids=["cpu-lease-only", "tensors-moved"])
def test_sleep_and_wake_continue_exactly(tiny, arena, moves):
    async def scenario(core, pressure, memory, activity):
        control, slept = core.open_session().session, core.open_session().session
        assert await ids_of(core, control, "alpha beta gamma") == \
            await ids_of(core, slept, "alpha beta gamma")
        relief = await pressure.sleep("reclaim 7")
        assert pressure.state == "asleep", relief.detail
        assert memory.granted()["weights"] == 0 and memory.granted()["kv"] == 0, (
            f"an asleep worker still holds {memory.granted()}")
        assert relief.freed_bytes >= BASE and "asleep" in relief.detail
        assert control.parked_entry and slept.parked_entry, "sleep must park every session"
        kinds = [a[0] for a in activity]
        assert kinds.count("session_parked") == 2 and kinds[-1] == "model_asleep"
        # the next request wakes the model, restores its session, continues
        got = await ids_of(core, slept, " delta epsilon")
        assert pressure.state == "ready" and memory.granted()["weights"] == BASE
        assert "model_awake" in [a[0] for a in activity]
        assert got == await ids_of(core, control, " delta epsilon"), (
            "a session of a model that slept continued differently")

    run_pressure(tiny, scenario, FakeLink(arena), moves=moves)


def test_sleep_drains_generations_first_and_holds_new_requests(tiny, arena):
    async def scenario(core, pressure, memory, activity):
        running, other = core.open_session().session, core.open_session().session
        stream = core.generate(running.session_id, running.token,
                               SamplingParams(max_tokens=400), prompt="go on")
        await anext(stream)
        sleeping = asyncio.create_task(pressure.sleep("drain"))
        await asyncio.sleep(0.05)
        assert pressure.state == "draining" and not sleeping.done(), (
            "the model must not sleep while a session generates")
        later = asyncio.create_task(ids_of(core, other, "a new request", max_tokens=3))
        settled = asyncio.create_task(pressure.sleep_settled())
        await asyncio.sleep(0.05)
        assert not later.done(), "a new request should wait while the worker drains"
        assert not settled.done(), "sleep_settled must wait for the sleep under way"
        count = 1
        async for _ in stream:
            count += 1
        assert count > 1, "the generation in flight was cut short"
        relief = await sleeping
        await asyncio.wait_for(settled, 5)
        assert "asleep" in relief.detail and relief.freed_bytes > 0, relief
        assert await later, "the request held during the drain got no answer"
        assert pressure.state == "ready", "the held request did not wake the model"

    run_pressure(tiny, scenario, FakeLink(arena))


def test_within_its_quantum_a_draining_model_serves_new_turns_then_sleeps(tiny, arena):
    """--min-awake-s: asked to sleep soon after it woke, the model takes the
    next turns that arrive while it has work (an agent's back-to-back turns),
    and sleeps once it falls idle; a request after that waits and wakes it."""
    async def scenario(core, pressure, memory, activity):
        session = core.open_session().session
        stream = core.generate(session.session_id, session.token,
                               SamplingParams(max_tokens=40), prompt="go on")
        await anext(stream)
        sleeping = asyncio.create_task(pressure.sleep("quantum"))
        await asyncio.sleep(0.02)
        assert pressure.state == "draining"
        async for _ in stream:
            pass
        # the next turn follows at once: served, not held behind the sleep
        turns = 0
        for word in (" again", " and again"):
            got = await asyncio.wait_for(ids_of(core, session, word, max_tokens=3), 10)
            assert got and not sleeping.done(), "a turn within the quantum waited for the sleep"
            turns += 1
        assert pressure.state == "draining" and turns == 2
        relief = await asyncio.wait_for(sleeping, 10)      # idle: it sleeps now
        assert "asleep" in relief.detail and relief.freed_bytes > 0, relief
        assert pressure.state == "asleep"
        got = await ids_of(core, session, " once more", max_tokens=3)
        assert got and pressure.state == "ready"

    run_pressure(tiny, scenario, FakeLink(arena), min_awake_s=30.0)


def test_past_its_quantum_a_draining_model_holds_new_requests(tiny, arena):
    async def scenario(core, pressure, memory, activity):
        running, other = core.open_session().session, core.open_session().session
        stream = core.generate(running.session_id, running.token,
                               SamplingParams(max_tokens=400), prompt="go on")
        await anext(stream)
        await asyncio.sleep(0.3)                 # the quantum (0.2 s) is over
        sleeping = asyncio.create_task(pressure.sleep("drain"))
        await asyncio.sleep(0.05)
        later = asyncio.create_task(ids_of(core, other, "a new request", max_tokens=3))
        await asyncio.sleep(0.05)
        assert not later.done(), "past the quantum a new request must wait for the sleep"
        async for _ in stream:
            pass
        assert "asleep" in (await sleeping).detail
        assert await later and pressure.state == "ready"

    run_pressure(tiny, scenario, FakeLink(arena), min_awake_s=0.2)


def test_asked_to_sleep_while_waking_it_wakes_serves_its_quantum_then_sleeps(
        tiny, arena, monkeypatch):
    """An ask that arrives mid-wake is not answered "waking already, nothing
    freed" (the asker's KV would then queue behind its own wake): it is
    handled once awake, the woken request served first."""
    async def scenario(core, pressure, memory, activity):
        session = core.open_session().session
        await ids_of(core, session, "red green")
        assert "asleep" in (await pressure.sleep("first")).detail
        slow_wake = pressure.stash.wake

        def wake():
            import time
            time.sleep(0.3)
            return slow_wake()

        monkeypatch.setattr(pressure.stash, "wake", wake)
        request = asyncio.create_task(ids_of(core, session, " blue", max_tokens=5))
        await asyncio.sleep(0.1)
        assert pressure.state == "waking"
        settled = await asyncio.wait_for(pressure.settle_first("weights"), 10)
        assert settled is None and pressure.state == "ready", (
            f"an ask mid-wake must be handled once awake, not answered: {settled}")
        relief = await asyncio.wait_for(pressure.sleep("asked mid-wake"), 10)
        assert await request, "the request that woke the model was not served"
        assert "asleep" in relief.detail and relief.freed_bytes > 0, relief
        assert pressure.state == "asleep"

    run_pressure(tiny, scenario, FakeLink(arena), min_awake_s=5.0)


def test_for_a_higher_priority_generations_pause_the_model_sleeps_then_they_go_on(tiny, arena):
    """An urgent sleep (the memory is for a higher priority) does not wait
    for the generation in flight: it is paused between two steps, its KV
    given back, the model sleeps and its memory goes back at once; the
    model then asks for it again by itself (no new request needed), and the
    paused generation goes on to the same tokens as one never paused."""
    async def scenario(core, pressure, memory, activity):
        control, paused = core.open_session().session, core.open_session().session
        want = await ids_of(core, control, "tell me a long story", max_tokens=40)
        stream = core.generate(paused.session_id, paused.token, SamplingParams(max_tokens=40),
                               prompt="tell me a long story")
        got = list((await anext(stream)).token_ids)
        relief = await asyncio.wait_for(pressure.sleep("urgent", urgent=True), 10)
        assert "asleep" in relief.detail and relief.freed_bytes > 0, relief
        assert core.engine.stats().preemptions >= 1
        async for event in stream:                 # woken by itself, then on to the end
            if hasattr(event, "token_ids"):
                got.extend(event.token_ids)
        assert got == want, "a paused generation went on differently"
        assert pressure.state == "ready" and not core.engine.paused
        kinds = [a[0] for a in activity]
        assert kinds.count("model_asleep") == 1 and kinds.count("model_awake") == 1

    run_pressure(tiny, scenario, FakeLink(arena), moves=True)


def test_past_its_turn_a_generation_pauses_the_model_sleeps_then_it_goes_on(tiny, arena):
    """Asked to sleep for another model (not urgent), a model whose
    generation runs on past --max-turn-s pauses it between two steps and
    sleeps: the waiter gets the device within the turn, not when the
    generation ends. The generation then goes on to the same tokens."""
    async def scenario(core, pressure, memory, activity):
        # Long enough to outlast the turn on a fast machine (at 200 tokens it
        # could end before the turn did, and then nothing was paused).
        control, long_one = core.open_session().session, core.open_session().session
        want = await ids_of(core, control, "tell me a long story", max_tokens=600)
        stream = core.generate(long_one.session_id, long_one.token,
                               SamplingParams(max_tokens=600), prompt="tell me a long story")
        got = list((await anext(stream)).token_ids)
        started = asyncio.get_running_loop().time()
        relief = await asyncio.wait_for(pressure.sleep("another model"), 10)
        took = asyncio.get_running_loop().time() - started
        assert "asleep" in relief.detail and relief.freed_bytes > 0, relief
        assert 0.25 <= took < 5, took
        assert len(got) < 600
        async for event in stream:
            if hasattr(event, "token_ids"):
                got.extend(event.token_ids)
        assert got == want, "a generation paused at the end of its turn went on differently"
        assert pressure.state == "ready" and not core.engine.paused

    run_pressure(tiny, scenario, FakeLink(arena), moves=True, max_turn_s=0.25)


def test_a_pinned_model_never_sleeps(tiny, arena):
    async def pinned(core, pressure, memory, activity):
        relief = await pressure.sleep("pinned")
        assert relief.freed_bytes == 0 and "pinned" in relief.detail

    run_pressure(tiny, pinned, FakeLink(arena), pinned=True)


def test_a_request_during_sleep_waits_and_wakes_the_model(tiny, arena):
    async def scenario(core, pressure, memory, activity):
        session = core.open_session().session
        await ids_of(core, session, "red green")
        sleeping = asyncio.create_task(pressure.sleep("race"))
        await asyncio.sleep(0)            # the sleep has begun (state "sleeping")
        got = await ids_of(core, session, " blue")
        await sleeping
        assert got and pressure.state == "ready", "the request did not wake the model"

    run_pressure(tiny, scenario, FakeLink(arena))


def test_the_workers_own_shortage_parks_its_idle_sessions(tiny, arena):
    async def scenario(core, pressure, memory, activity):
        idle = core.open_session().session
        await ids_of(core, idle, "one two three four five six seven eight " * 6)
        memory.capacity_bytes = BASE + memory.granted()["kv"]   # no room to grow
        busy = core.open_session().session
        got = await ids_of(core, busy, "nine ten eleven twelve " * 12, max_tokens=4)
        assert got, "the new session got no answer"
        assert idle.parked_entry, "the idle session was not parked to make room"
        assert any(a[:2] == ("session_parked", idle.session_id) and a[4] == "kv short"
                   for a in activity)

    run_pressure(tiny, scenario, FakeLink(arena))


def test_the_stash_moves_and_frees_every_tensor_once(tiny):
    model = tiny.model
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    params = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    stash = WeightStash(model, tiny.device, moves=True)
    moved = stash.sleep()
    try:
        assert moved.num_bytes >= sum(p.numel() * p.element_size()
                                      for p in model.parameters()), "not every weight was moved"
        assert all(p.numel() == 0 for p in model.parameters()), "a weight was left in place"
        if "lm_head.weight" in params and "model.embed_tokens.weight" in params:
            assert params["lm_head.weight"] is params["model.embed_tokens.weight"]
    finally:
        stash.wake()
    after = model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items()), (
        "a weight or buffer changed through sleep and wake")
    assert stash.sleep().num_bytes == moved.num_bytes and stash.wake().num_bytes == moved.num_bytes


def test_asleep_keeps_what_stays_on_the_device_leased(tiny, arena):
    """On a GPU the CUDA context, and what the allocator still holds (cuBLAS's
    workspace), stay while the model sleeps: the weights lease shrinks to
    them (else admission would count them as foreign memory and the wake
    could never fit), and grows back on wake."""
    async def scenario(core, pressure, memory, activity):
        session = core.open_session().session
        await ids_of(core, session, "one two")
        await pressure.sleep("keep")
        assert memory.granted()["weights"] == (1 << 20) + (32 << 10), memory.granted()
        await ids_of(core, session, " three")
        assert memory.granted()["weights"] == BASE

    run_pressure(tiny, scenario, FakeLink(arena), keep_bytes=1 << 20, residue=lambda: 32 << 10)


def test_a_lost_lease_aborts_generations_and_gives_all_the_memory_up(tiny, arena):
    """Admission forgot a lease (it expired while the worker was frozen, or
    admission restarted): generations end with ABORTED, contexts are parked,
    the memory is released; the next request acquires it again and the
    session goes on from what its caller received."""
    from services.common.errors import Aborted
    from services.worker.engine import Delta

    async def scenario(core, pressure, memory, activity):
        running, idle = core.open_session().session, core.open_session().session
        await ids_of(core, idle, "an idle context")
        stream = core.generate(running.session_id, running.token,
                               SamplingParams(max_tokens=400), prompt="go on")
        received = list((await anext(stream)).token_ids)
        pressure.lease_lost("weights")
        with pytest.raises(Aborted) as ended:
            async for event in stream:
                assert isinstance(event, Delta), f"the generation finished: {event}"
                received += event.token_ids
        assert ended.value.reason == "LEASE_LOST" and ended.value.retryable
        await asyncio.wait_for(pressure._giving_up, 10)
        assert pressure.state == "asleep"
        assert memory.granted()["weights"] == 0 and memory.granted().get("kv", 0) == 0, (
            f"memory still held after the lease was lost: {memory.granted()}")
        assert idle.parked_entry and running.parked_entry, "the contexts were not parked"
        kept = list(running.tokens)
        assert kept[-len(received):] == received, "the session lost tokens its caller received"
        got = await ids_of(core, running, " and on", max_tokens=3)    # wakes, re-acquires
        assert got and pressure.state == "ready" and memory.granted()["weights"] == BASE
        assert running.tokens[:len(kept)] == kept

    run_pressure(tiny, scenario, FakeLink(arena))


def test_a_session_whose_turn_is_being_prepared_is_not_parked(tiny, arena):
    """The race a CI run of the demo hit (INTERNAL on a turn): memory
    pressure parked a session while its next turn was being tokenized, then
    freed the KV the turn was about to run on."""
    async def scenario(core, pressure, memory, activity):
        control, session = core.open_session().session, core.open_session().session
        for each in (control, session):
            await ids_of(core, each, "one two three")
        expected = await ids_of(core, control, " four five")
        preparing, go_on = asyncio.Event(), asyncio.Event()
        prepare = core.prompts.prepare

        async def slow_prepare(*args, **kwargs):
            preparing.set()
            await go_on.wait()
            return await prepare(*args, **kwargs)

        core.prompts.prepare = slow_prepare
        turn = asyncio.create_task(ids_of(core, session, " four five"))
        await preparing.wait()
        await pressure.park_idle(1 << 40, "reclaim while preparing")
        assert control.parked_entry, "the idle session was not parked"
        assert not session.parked_entry, "a session whose turn is being prepared was parked"
        with pytest.raises(FailedPrecondition) as caught:
            await core.park_session(session.session_id, session.token)
        assert caught.value.reason == "SESSION_BUSY", caught.value.reason
        go_on.set()
        assert await turn == expected, "the turn prepared beside the parks differs"

    run_pressure(tiny, scenario, FakeLink(arena))
