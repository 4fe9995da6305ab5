"""The asyncio broker over a simulated device: waiting, timeouts, cancellation,
Watch and the background loops. Real time, so every wait here is short."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

import pytest

from services.admission.broker import Broker
from services.admission.devices import DeviceMemory, SimulatedDevices, SimulatedDeviceSpec
from services.admission.ledger import EventKind, Holder, Ledger, Purpose, TtlLimits
from services.common.errors import CapacityExhausted, FailedPrecondition, InvalidArgument, NotFound

DEVICE = "cpu:0"
KV = Purpose.KV


def make_broker(total: int = 1000, cap: float = 0.5, **kwargs) -> Broker:
    """One simulated device of `total` bytes; budget = cap x total (500 by default)."""
    source = SimulatedDevices((SimulatedDeviceSpec(DEVICE, total),))
    ledger = Ledger(source.read({}), cap, TtlLimits(10.0, 0.1, 3600.0))
    kwargs.setdefault("sweep_interval_s", 0.02)
    return Broker(ledger, source, **kwargs)


def run(scenario: Callable[[Broker], Awaitable[None]], **kwargs) -> None:
    """Run `scenario` on a started broker, closing it whatever happens."""
    async def main() -> None:
        broker = make_broker(**kwargs)
        await broker.start()
        try:
            await asyncio.wait_for(scenario(broker), timeout=5)
        finally:
            await broker.close()

    asyncio.run(main())


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.005)


def holder(name: str) -> Holder:
    return Holder(f"agent/{name}", 100)


def test_waiting_acquire_is_granted_when_another_releases():
    async def scenario(broker: Broker) -> None:
        first = await broker.acquire(holder("first"), 400, KV)
        task = asyncio.create_task(broker.acquire(holder("second"), 300, KV, wait_s=5))
        await until(lambda: broker.ledger.waiters(), "the second request is queued")
        assert not task.done(), "300 bytes with 100 free must wait"
        broker.release(first.lease_id, first.epoch)
        second = await asyncio.wait_for(task, 1)
        assert (second.bytes, second.holder.name) == (300, "agent/second")
        assert broker.ledger.holds(second.lease_id)
        assert broker.ledger.waiters() == []

    run(scenario)


def test_wait_timeout_raises_capacity_exhausted_with_the_shortfall():
    async def scenario(broker: Broker) -> None:
        await broker.acquire(holder("first"), 400, KV, ttl_s=2.0)
        started = time.monotonic()
        with pytest.raises(CapacityExhausted) as err:
            await broker.acquire(holder("second"), 300, KV, wait_s=0.05)
        waited = time.monotonic() - started
        assert waited >= 0.04, f"gave up after {waited:.3f}s, before wait_s"
        short = err.value.shortfall
        assert (short.device, short.requested_bytes, short.free_bytes, short.missing_bytes) == (
            DEVICE, 300, 100, 200), f"wrong shortfall {short}"
        assert 1.5 < err.value.retry_after_s <= 2.0, (
            f"retry_after_s {err.value.retry_after_s} should be when the 2 s lease expires")
        assert err.value.retryable
        assert broker.ledger.waiters() == [], "a timed-out request must leave the queue"

    run(scenario)


def test_zero_wait_fails_at_once_and_max_wait_caps_the_wait():
    async def scenario(broker: Broker) -> None:
        await broker.acquire(holder("first"), 500, KV)
        started = time.monotonic()
        with pytest.raises(CapacityExhausted):
            await broker.acquire(holder("now"), 1, KV)
        with pytest.raises(CapacityExhausted):
            await broker.acquire(holder("patient"), 1, KV, wait_s=60)
        waited = time.monotonic() - started
        assert waited < 1.0, f"max_wait_s=0.05 must cap a 60 s wait, waited {waited:.2f}s"
        with pytest.raises(InvalidArgument) as err:
            await broker.acquire(holder("bad"), 1, KV, wait_s=-1)
        assert err.value.field == "wait_ms"

    run(scenario, max_wait_s=0.05)


def test_timed_out_waiter_is_reported_as_left_timed_out():
    async def scenario(broker: Broker) -> None:
        stream = broker.watch()
        first_event = asyncio.ensure_future(anext(stream))
        await until(lambda: broker.bus.num_subscribers == 1, "the watcher subscribed")
        first = await broker.acquire(holder("first"), 500, KV)
        with pytest.raises(CapacityExhausted):
            await broker.acquire(holder("second"), 10, KV, wait_s=0.02)
        seen = [(await first_event).event]
        while len(seen) < 4:
            seen.append((await asyncio.wait_for(anext(stream), 1)).event)
        assert [e.kind for e in seen] == [EventKind.GRANTED, EventKind.QUEUED,
                                          EventKind.RECLAIM_REQUESTED, EventKind.LEFT]
        ask = seen[2].detail
        assert (ask.lease.lease_id, ask.bytes, ask.for_holder) == (first.lease_id, 10,
                                                                   "agent/second"), (
            "the queued waiter should ask the holder of the full device for its 10 bytes")
        assert seen[3].reason == "timed_out"
        with pytest.raises(CapacityExhausted):
            await broker.acquire(holder("third"), 10, KV, wait_s=0)
        broker.release(first.lease_id, first.epoch)
        after = await asyncio.wait_for(anext(stream), 1)
        assert after.event.kind is EventKind.RELEASED, (
            f"a request with wait 0 never queues, so no QUEUED/LEFT; got {after.event.kind}")
        await stream.aclose()

    run(scenario)


def test_cancelled_waiting_acquire_leaves_the_queue():
    async def scenario(broker: Broker) -> None:
        first = await broker.acquire(holder("first"), 400, KV)
        task = asyncio.create_task(broker.acquire(holder("second"), 300, KV, wait_s=5))
        await until(lambda: broker.ledger.waiters(), "the second request is queued")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert broker.ledger.waiters() == [], "a cancelled request must leave the queue"
        broker.release(first.lease_id, first.epoch)
        assert broker.ledger.leases() == [], "nothing may be granted to a caller that left"

    run(scenario)


def test_grant_that_raced_a_cancellation_is_given_back():
    async def scenario(broker: Broker) -> None:
        first = await broker.acquire(holder("first"), 400, KV)
        task = asyncio.create_task(broker.acquire(holder("second"), 300, KV, wait_s=5))
        await until(lambda: broker.ledger.waiters(), "the second request is queued")
        # The release grants the waiter; the caller is cancelled before it resumes.
        broker.release(first.lease_id, first.epoch)
        assert broker.ledger.leased_bytes(DEVICE) == 300, "the release must grant the waiter"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert broker.ledger.leases() == [], "the grant nobody will use must be given back"
        assert broker.ledger.leased_bytes(DEVICE) == 0

    run(scenario)


def test_growth_that_raced_a_cancellation_is_undone():
    async def scenario(broker: Broker) -> None:
        mine = await broker.acquire(holder("mine"), 200, KV)
        other = await broker.acquire(holder("other"), 250, KV)
        task = asyncio.create_task(broker.resize(mine.lease_id, mine.epoch, 300, wait_s=5))
        await until(lambda: broker.ledger.waiters(), "the growth is queued")
        broker.release(other.lease_id, other.epoch)
        assert broker.ledger.lease(mine.lease_id).bytes == 300, "the release must grant the growth"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert broker.ledger.lease(mine.lease_id).bytes == 200, (
            "a growth whose caller left must be undone, keeping the lease")

    run(scenario)


def test_resize_waits_for_room_and_fails_when_the_lease_goes():
    async def scenario(broker: Broker) -> None:
        mine = await broker.acquire(holder("mine"), 200, KV)
        other = await broker.acquire(holder("other"), 250, KV)
        shrunk = await broker.resize(mine.lease_id, mine.epoch, 100)
        assert shrunk.bytes == 100
        task = asyncio.create_task(broker.resize(mine.lease_id, mine.epoch, 300, wait_s=5))
        await until(lambda: broker.ledger.waiters(), "the growth is queued")
        broker.release(other.lease_id, other.epoch)
        grown = await asyncio.wait_for(task, 1)
        assert (grown.lease_id, grown.bytes) == (mine.lease_id, 300)

        blocker = await broker.acquire(holder("blocker"), 200, KV)
        task = asyncio.create_task(broker.resize(mine.lease_id, mine.epoch, 400, wait_s=5))
        await until(lambda: broker.ledger.waiters(), "the second growth is queued")
        broker.release(mine.lease_id, mine.epoch)
        with pytest.raises(NotFound):
            await asyncio.wait_for(task, 1)
        assert broker.ledger.leases() == [broker.ledger.lease(blocker.lease_id)]

    run(scenario)


def test_watch_yields_events_in_order_and_ends_on_close():
    async def main() -> None:
        broker = make_broker()
        await broker.start()
        stream = broker.watch()
        first = asyncio.ensure_future(anext(stream))
        await until(lambda: broker.bus.num_subscribers == 1, "the watcher subscribed")
        lease = await broker.acquire(holder("a"), 100, KV)
        granted = await asyncio.wait_for(first, 1)
        assert granted.seq == 1 and granted.event.kind is EventKind.GRANTED
        assert granted.event.lease.lease_id == lease.lease_id
        broker.renew(lease.lease_id, lease.epoch)
        broker.release(lease.lease_id, lease.epoch)
        released = await asyncio.wait_for(anext(stream), 1)
        assert (released.seq, released.event.kind) == (2, EventKind.RELEASED), (
            "renew emits no event; the release comes next")
        await broker.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(stream), 1)
        assert broker.bus.num_subscribers == 0

    asyncio.run(main())


def test_expiry_sweep_expires_leases_and_serves_the_queue():
    async def scenario(broker: Broker) -> None:
        started = time.monotonic()
        short = await broker.acquire(holder("short"), 400, KV, ttl_s=0.2)
        waiting = asyncio.create_task(broker.acquire(holder("next"), 300, KV, wait_s=2))
        await until(lambda: not broker.ledger.holds(short.lease_id), "the lease expired", 2)
        elapsed = time.monotonic() - started
        assert elapsed >= 0.2, f"expired after {elapsed:.3f}s, before its 0.2 s TTL"
        nxt = await asyncio.wait_for(waiting, 1)
        assert nxt.bytes == 300, "the expiry must serve the queue"
        with pytest.raises(FailedPrecondition) as err:
            broker.renew(short.lease_id, short.epoch)
        assert err.value.reason == "LEASE_EXPIRED"

    run(scenario)


def test_renewed_lease_outlives_its_ttl():
    async def scenario(broker: Broker) -> None:
        lease = await broker.acquire(holder("kept"), 100, KV, ttl_s=0.3)
        for _ in range(8):
            await asyncio.sleep(0.05)
            broker.renew(lease.lease_id, lease.epoch)
        assert broker.ledger.holds(lease.lease_id), "a lease renewed within its TTL must live"

    run(scenario)


def test_snapshot_shows_devices_leases_and_waiters():
    async def scenario(broker: Broker) -> None:
        lease = await broker.acquire(holder("a"), 400, KV)
        task = asyncio.create_task(broker.acquire(holder("b"), 300, KV, wait_s=5))
        await until(lambda: broker.ledger.waiters(), "b is queued")
        snap = broker.snapshot()
        assert [v.leased_bytes for v in snap.devices] == [400]
        assert [l.lease_id for l in snap.leases] == [lease.lease_id]
        assert [w.holder.name for w in snap.waiters] == ["agent/b"]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(scenario)


class FakeNvmlSource:
    """A device source that says it reads NVML, with foreign memory we move."""

    def __init__(self, total: int, foreign: int):
        self.total, self.foreign = total, foreign
        self.fail = False
        self.reads = 0

    def read(self, accounted_by_pid: Mapping[tuple[str, int], int]) -> list[DeviceMemory]:
        self.reads += 1
        if self.fail:
            raise RuntimeError("NVML went away")
        return [DeviceMemory("gpu:0", "Fake GPU", "GPU-1", self.total, self.foreign, "nvml")]

    def close(self) -> None:
        pass


def test_poll_loop_follows_foreign_memory_and_survives_read_errors():
    async def main() -> None:
        source = FakeNvmlSource(1000, foreign=400)
        ledger = Ledger(source.read({}), 0.5, TtlLimits(10.0, 0.1, 3600.0))
        broker = Broker(ledger, source, sweep_interval_s=0.02, poll_interval_s=0.02)
        await broker.start()
        try:
            assert ledger.budget_bytes("gpu:0") == 100
            waiting = asyncio.create_task(broker.acquire(holder("a"), 300, KV, wait_s=3))
            await until(lambda: ledger.waiters(), "a is queued")
            source.fail = True
            reads = source.reads
            await until(lambda: source.reads >= reads + 2, "the poll loop kept polling")
            assert ledger.budget_bytes("gpu:0") == 100, "a failed read keeps the last figures"
            source.fail, source.foreign = False, 100
            lease = await asyncio.wait_for(waiting, 2)
            assert lease.bytes == 300, "less foreign memory must serve the queue"
            assert ledger.budget_bytes("gpu:0") == 400
        finally:
            await broker.close()

    asyncio.run(main())


class ProcessNvmlSource:
    """NVML as the real source reads it: each process's usage is foreign
    beyond what the book accounts to that process."""

    def __init__(self, total: int, usage: dict[int, int]):
        self.total, self.usage = total, usage

    def read(self, accounted_by_pid: Mapping[tuple[str, int], int]) -> list[DeviceMemory]:
        foreign = sum(max(0, used - accounted_by_pid.get(("gpu:0", pid), 0))
                      for pid, used in self.usage.items())
        over = tuple((pid, used - accounted_by_pid[("gpu:0", pid)])
                     for pid, used in self.usage.items()
                     if accounted_by_pid.get(("gpu:0", pid), 0)
                     and used > accounted_by_pid[("gpu:0", pid)])
        return [DeviceMemory("gpu:0", "Fake GPU", "GPU-1", self.total, foreign, "nvml", over)]

    def close(self) -> None:
        pass


def test_a_waiters_own_context_is_not_counted_twice():
    """A worker's CUDA context exists before its first lease and is part of
    its ask: an ask that fits the budget with the context inside is granted."""
    async def main() -> None:
        source = ProcessNvmlSource(1000, usage={42: 300})   # the context, no lease yet
        ledger = Ledger(source.read({}), 0.5, TtlLimits(10.0, 0.1, 3600.0))
        assert ledger.budget_bytes("gpu:0") == 200, "before the ask, the context is foreign"
        broker = Broker(ledger, source, sweep_interval_s=0.02, poll_interval_s=0.02)
        await broker.start()
        try:
            lease = await asyncio.wait_for(
                broker.acquire(Holder("worker/m", 42), 450, KV, device="gpu:0", wait_s=3), 2)
            assert lease.bytes == 450
            await until(lambda: ledger.budget_bytes("gpu:0") == 500, "the lease covers it")
        finally:
            await broker.close()

    asyncio.run(main())


def test_a_holder_using_more_than_its_leases_is_reported_once_per_step():
    """The excess over a holder's leases counts as foreign (it is real
    memory) and is logged with the holder's name, once per 32 MiB step."""
    from structlog.testing import capture_logs

    mib = 1 << 20

    async def main() -> list[dict]:
        source = ProcessNvmlSource(8192 * mib, usage={42: 100 * mib})
        ledger = Ledger(source.read({}), 0.5, TtlLimits(10.0, 0.1, 3600.0))
        broker = Broker(ledger, source, sweep_interval_s=0.02, poll_interval_s=0.02)
        await broker.start()
        try:
            with capture_logs() as logs:
                await asyncio.wait_for(broker.acquire(Holder("worker/m", 42), 1000 * mib, KV,
                                                      device="gpu:0", wait_s=3), 2)
                source.usage[42] = 1100 * mib          # 100 MiB beyond its lease
                await until(lambda: any(e["event"] == "holders_over_lease" for e in logs),
                            "the excess is reported")
                await asyncio.sleep(0.1)               # more polls: no new line
        finally:
            await broker.close()
        return [e for e in logs if e["event"] == "holders_over_lease"]

    lines = asyncio.run(main())
    assert len(lines) == 1, f"one line per change, got {len(lines)}"
    assert lines[0]["processes"] == [{"pid": 42, "holder": "worker/m",
                                      "excess_bytes": 100 * mib}], lines[0]
