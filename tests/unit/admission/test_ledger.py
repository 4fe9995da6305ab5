"""The lease ledger on its own: a fake clock, simulated devices, no asyncio."""

from __future__ import annotations

import pytest

from services.admission.devices import DeviceMemory
from services.admission.limits import MAX_NAME_CHARS
from services.admission.ledger import (
    EventKind,
    Holder,
    Lease,
    Ledger,
    Purpose,
    TtlLimits,
    Waiter,
)
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound

GPU0, GPU1 = "gpu:0", "gpu:1"


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def memory(device: str, total: int = 1000, foreign: int = 0) -> DeviceMemory:
    return DeviceMemory(device, "simulated", "", total, foreign, "simulated")


def make_ledger(*memories: DeviceMemory, cap: float = 0.5, clock: FakeClock | None = None,
                ttl: TtlLimits = TtlLimits(10.0, 0.1, 3600.0), epoch_start: int = 100) -> Ledger:
    """Default: one device gpu:0 of 1000 bytes, cap 0.5, so a budget of 500."""
    return Ledger(memories or (memory(GPU0),), cap, ttl, clock or FakeClock(), epoch_start)


def ask(ledger: Ledger, num_bytes: int, device: str | None = GPU0, *, name: str = "agent/a",
        pid: int = 1, priority: int = 0, ttl_s: float = 0.0, wait: bool = True) -> Waiter:
    return ledger.acquire(Holder(name, pid), num_bytes, Purpose.KV, device, priority, ttl_s,
                          wait=wait)


def granted(waiter: Waiter) -> Lease:
    assert waiter.error is None, f"waiter failed instead of being granted: {waiter.error}"
    assert waiter.lease is not None, f"waiter for {waiter.bytes} bytes was not granted"
    return waiter.lease


def kinds(ledger: Ledger) -> list[EventKind]:
    return [event.kind for event in ledger.drain_events()]


# ---- grants and the budget ------------------------------------------------

def test_grant_when_it_fits():
    ledger = make_ledger()
    waiter = ask(ledger, 300)
    lease = granted(waiter)
    assert (lease.device, lease.bytes, lease.purpose) == (GPU0, 300, Purpose.KV)
    assert lease.holder == Holder("agent/a", 1)
    assert ledger.leased_bytes(GPU0) == 300, "leased bytes must count the new lease"
    assert ledger.free_bytes(GPU0) == 200, "free = budget 500 - leased 300"
    assert ledger.waiters() == [], "a granted request must not stay queued"
    assert ledger.holds(lease.lease_id) and ledger.lease(lease.lease_id) == lease
    assert ledger.leases() == [lease]
    assert ledger.drain_settled() == [waiter], "an immediate grant is settled too"
    events = ledger.drain_events()
    assert [e.kind for e in events] == [EventKind.GRANTED]
    assert events[0].lease == lease and events[0].device == GPU0
    assert events[0].waited_s == 0.0


def test_budget_is_cap_fraction_of_total_minus_foreign():
    ledger = make_ledger(memory(GPU0, total=10_000, foreign=1_500), cap=0.9)
    assert ledger.cap_bytes(GPU0) == 9_000, "cap = 0.9 x 10000"
    assert ledger.budget_bytes(GPU0) == 7_500, "budget = cap 9000 - foreign 1500"
    assert ledger.free_bytes(GPU0) == 7_500
    (view,) = ledger.devices()
    assert (view.cap_bytes, view.budget_bytes, view.leased_bytes, view.free_bytes) == (
        9_000, 7_500, 0, 7_500), f"device view disagrees with the book: {view}"
    granted(ask(ledger, 7_500))
    assert ledger.free_bytes(GPU0) == 0
    one_more = ask(ledger, 1)
    assert one_more.lease is None, "a byte beyond the budget must wait"
    assert ledger.waiters() == [one_more]


def test_request_beyond_free_is_queued_and_granted_on_release():
    clock = FakeClock()
    ledger = make_ledger(clock=clock)
    first = granted(ask(ledger, 400, name="agent/first"))
    ledger.drain_settled()
    ledger.drain_events()
    second = ask(ledger, 200, name="agent/second")
    assert second.lease is None and second.error is None, "200 > 100 free: must wait"
    assert ledger.waiters() == [second]
    events = ledger.drain_events()
    assert [e.kind for e in events] == [EventKind.QUEUED]
    assert events[0].waiter is second
    assert ledger.drain_settled() == [], "a queued waiter is not settled"

    clock.advance(2.5)
    released = ledger.release(first.lease_id, first.epoch)
    assert released.lease_id == first.lease_id
    lease = granted(second)
    assert lease.bytes == 200 and lease.holder.name == "agent/second"
    assert ledger.leased_bytes(GPU0) == 200
    assert ledger.waiters() == []
    assert ledger.drain_settled() == [second]
    events = ledger.drain_events()
    assert [e.kind for e in events] == [EventKind.RELEASED, EventKind.GRANTED]
    assert events[1].waited_s == pytest.approx(2.5), "waited_s = time spent in the queue"


def test_queued_request_granted_when_a_lease_shrinks():
    ledger = make_ledger()
    first = granted(ask(ledger, 400))
    second = ask(ledger, 200)
    assert second.lease is None
    shrunk = ledger.resize(first.lease_id, first.epoch, 300)
    assert isinstance(shrunk, Lease) and shrunk.bytes == 300
    assert granted(second).bytes == 200, "the shrink freed exactly enough (300 + 200 = 500)"
    assert ledger.leased_bytes(GPU0) == 500


def test_queued_request_granted_when_a_lease_expires():
    clock = FakeClock()
    ledger = make_ledger(clock=clock)
    first = granted(ask(ledger, 400, ttl_s=1.0))
    second = ask(ledger, 200, ttl_s=5.0)
    assert second.lease is None
    clock.advance(1.0)
    expired = ledger.expire_due()
    assert [lease.lease_id for lease in expired] == [first.lease_id]
    assert granted(second).bytes == 200, "expiry must give the bytes to the queue"
    assert [k for k in kinds(ledger) if k is not EventKind.QUEUED][-2:] == [
        EventKind.EXPIRED, EventKind.GRANTED]


def test_request_without_wait_is_granted_or_left_out_of_the_queue():
    ledger = make_ledger()
    first = granted(ask(ledger, 400, wait=False))
    assert first.bytes == 400, "wait=False still grants what fits at once"
    ledger.drain_events()
    ledger.drain_settled()
    refused = ask(ledger, 200, wait=False)
    assert refused.lease is None and refused.error is None
    assert ledger.waiters() == [], "a request that may not wait must not be queued"
    assert ledger.drain_events() == [], "no QUEUED event for a request that never waited"
    ledger.release(first.lease_id, first.epoch)
    assert refused.lease is None, "a request that did not wait is never granted later"
    assert ledger.drain_settled() == []
    ledger.cancel(refused)  # the broker cancels it on the way out: a no-op
    assert kinds(ledger) == [EventKind.RELEASED], "cancelling it must emit no LEFT event"


def test_request_without_wait_does_not_block_others():
    ledger = make_ledger()
    blocker = granted(ask(ledger, 400))
    queued = ask(ledger, 200, priority=0)
    assert queued.lease is None
    urgent = ask(ledger, 300, priority=5, wait=False)
    assert urgent.lease is None and ledger.waiters() == [queued]
    ledger.release(blocker.lease_id, blocker.epoch)
    assert granted(queued).bytes == 200, "a refused no-wait request leaves no trace in the queue"
    small = ask(ledger, 50, wait=False)
    assert granted(small).bytes == 50


def test_growth_without_wait():
    ledger = make_ledger()
    mine = granted(ask(ledger, 200))
    granted(ask(ledger, 250))
    growth = ledger.resize(mine.lease_id, mine.epoch, 300, wait=False)
    assert isinstance(growth, Waiter) and growth.lease is None and growth.error is None
    assert ledger.waiters() == [], "a growth that may not wait must not be queued"
    assert ledger.lease(mine.lease_id).bytes == 200
    fits = ledger.resize(mine.lease_id, mine.epoch, 250, wait=False)
    assert granted(fits).bytes == 250, "a growth that fits is granted without waiting"


# ---- queue order -----------------------------------------------------------

def test_strict_priority_then_arrival_order():
    ledger = make_ledger()
    blocker = granted(ask(ledger, 500, name="agent/blocker"))
    low_a = ask(ledger, 100, name="agent/low-a", priority=0)
    high = ask(ledger, 100, name="agent/high", priority=5)
    low_b = ask(ledger, 100, name="agent/low-b", priority=0)
    urgent = ask(ledger, 100, name="agent/urgent", priority=9)
    assert ledger.waiters() == [urgent, high, low_a, low_b], (
        "the queue must be ordered by priority, then arrival: "
        f"{[w.holder.name for w in ledger.waiters()]}")
    ledger.drain_settled()
    ledger.release(blocker.lease_id, blocker.epoch)
    assert ledger.drain_settled() == [urgent, high, low_a, low_b]
    epochs = [granted(w).epoch for w in (urgent, high, low_a, low_b)]
    assert epochs == sorted(epochs), f"grants must follow queue order, epochs {epochs}"


def test_no_overtaking_on_the_same_device_but_other_devices_serve():
    ledger = make_ledger(memory(GPU0), memory(GPU1))
    holder = granted(ask(ledger, 400, GPU0))
    big = ask(ledger, 300, GPU0, name="agent/big")
    small = ask(ledger, 50, GPU0, name="agent/small")
    assert big.lease is None, "300 > 100 free must wait"
    assert small.lease is None, (
        "50 bytes fit in the 100 free, but a blocked earlier waiter on gpu:0 must not be overtaken")
    elsewhere = ask(ledger, 50, GPU1, name="agent/elsewhere")
    assert granted(elsewhere).device == GPU1, "a request on another device is not blocked"
    ledger.drain_settled()
    ledger.release(holder.lease_id, holder.epoch)
    assert ledger.drain_settled() == [big, small], "the earlier waiter must be served first"


def test_higher_priority_request_is_served_past_a_blocked_lower_one():
    ledger = make_ledger()
    granted(ask(ledger, 400))
    big_low = ask(ledger, 300, priority=0)
    small_high = ask(ledger, 50, priority=1)
    assert big_low.lease is None
    assert granted(small_high).bytes == 50, "a higher priority sorts before the blocked waiter"


def test_any_device_request_goes_to_the_device_with_most_free_room():
    ledger = make_ledger(memory(GPU0), memory(GPU1))
    granted(ask(ledger, 100, GPU0))
    granted(ask(ledger, 300, GPU1))
    lease = granted(ask(ledger, 50, None))
    assert lease.device == GPU0, "gpu:0 has 400 free, gpu:1 200: any-device goes to gpu:0"
    # Now gpu:0 has 350 free, gpu:1 200; 300 bytes fit only on gpu:0.
    assert granted(ask(ledger, 300, None)).device == GPU0
    # gpu:0 50 free, gpu:1 200 free.
    assert granted(ask(ledger, 150, None)).device == GPU1


def test_any_device_waiter_is_served_by_whichever_device_frees_first():
    ledger = make_ledger(memory(GPU0), memory(GPU1))
    on0 = granted(ask(ledger, 400, GPU0))
    granted(ask(ledger, 400, GPU1))
    anywhere = ask(ledger, 300, None)
    assert anywhere.lease is None
    (view0, view1) = ledger.devices()
    assert (view0.num_waiting, view1.num_waiting) == (1, 1), "an any-device waiter waits on both"
    ledger.release(on0.lease_id, on0.epoch)
    assert granted(anywhere).device == GPU0


def test_cancel_of_a_blocking_waiter_lets_those_behind_it_through():
    clock = FakeClock()
    ledger = make_ledger(clock=clock)
    granted(ask(ledger, 400))
    big = ask(ledger, 300, name="agent/big")
    small = ask(ledger, 50, name="agent/small")
    assert small.lease is None
    ledger.drain_events()
    clock.advance(0.5)
    ledger.cancel(big)
    assert big not in ledger.waiters(), "a cancelled waiter must leave the queue"
    assert big.lease is None and big.error is None
    assert granted(small).bytes == 50, "with the blocker gone, the small request fits"
    events = ledger.drain_events()
    assert [e.kind for e in events] == [EventKind.LEFT, EventKind.GRANTED]
    assert events[0].waiter is big and events[0].reason == "cancelled"
    assert events[0].waited_s == pytest.approx(0.5)
    ledger.cancel(big)  # twice: nothing happens
    ledger.cancel(small)  # settled: nothing happens
    assert ledger.drain_events() == [], "cancelling a gone or settled waiter emits nothing"
    assert ledger.holds(granted(small).lease_id), "cancel must not undo a grant"


def test_cancel_reason_timed_out_is_reported():
    ledger = make_ledger()
    granted(ask(ledger, 500))
    waiter = ask(ledger, 100)
    ledger.drain_events()
    ledger.cancel(waiter, "timed_out")
    (event,) = ledger.drain_events()
    assert (event.kind, event.reason) == (EventKind.LEFT, "timed_out")


# ---- resize ----------------------------------------------------------------

def test_resize_growth_waits_and_shrink_is_immediate():
    ledger = make_ledger()
    mine = granted(ask(ledger, 200, name="agent/mine"))
    other = granted(ask(ledger, 250, name="agent/other"))
    ledger.drain_events()
    ledger.drain_settled()

    growth = ledger.resize(mine.lease_id, mine.epoch, 300)
    assert isinstance(growth, Waiter), "a growth of 100 with 50 free must wait"
    assert (growth.lease_id, growth.bytes, growth.lease) == (mine.lease_id, 100, None)
    assert ledger.lease(mine.lease_id).bytes == 200, "a waiting growth leaves the lease as it was"
    assert ledger.waiters() == [growth]

    ledger.release(other.lease_id, other.epoch)
    grown = granted(growth)
    assert (grown.lease_id, grown.bytes, grown.epoch) == (mine.lease_id, 300, mine.epoch), (
        "a growth keeps the lease's id and epoch")
    assert ledger.leased_bytes(GPU0) == 300
    assert ledger.drain_settled() == [growth]
    resized = [e for e in ledger.drain_events() if e.kind is EventKind.RESIZED]
    assert len(resized) == 1 and (resized[0].old_bytes, resized[0].lease.bytes) == (200, 300)

    shrunk = ledger.resize(mine.lease_id, mine.epoch, 100)
    assert isinstance(shrunk, Lease) and shrunk.bytes == 100, "a shrink is granted at once"
    assert ledger.leased_bytes(GPU0) == 100
    (event,) = ledger.drain_events()
    assert (event.kind, event.old_bytes, event.lease.bytes) == (EventKind.RESIZED, 300, 100)

    same = ledger.resize(mine.lease_id, mine.epoch, 100)
    assert isinstance(same, Lease) and same.bytes == 100
    assert ledger.drain_events() == [], "a resize to the same size changes nothing"


def test_resize_growth_that_fits_is_granted_at_once():
    ledger = make_ledger()
    mine = granted(ask(ledger, 200))
    growth = ledger.resize(mine.lease_id, mine.epoch, 450)
    assert isinstance(growth, Waiter)
    assert granted(growth).bytes == 450
    assert ledger.leased_bytes(GPU0) == 450


@pytest.mark.parametrize("end", ["release", "expiry"])
def test_growth_waiting_for_a_lease_that_goes_away_is_settled_with_an_error(end):
    clock = FakeClock()
    ledger = make_ledger(clock=clock)
    mine = granted(ask(ledger, 200, ttl_s=1.0))
    granted(ask(ledger, 250, ttl_s=100.0))
    growth = ledger.resize(mine.lease_id, mine.epoch, 400)
    assert isinstance(growth, Waiter) and growth.lease is None
    ledger.drain_settled()
    if end == "release":
        ledger.release(mine.lease_id, mine.epoch)
    else:
        clock.advance(1.0)
        assert [lease.lease_id for lease in ledger.expire_due()] == [mine.lease_id]
    assert growth.lease is None
    if end == "release":
        assert isinstance(growth.error, NotFound), f"growth must fail with NotFound, got {growth.error!r}"
    else:
        assert isinstance(growth.error, FailedPrecondition), f"got {growth.error!r}"
        assert growth.error.reason == "LEASE_EXPIRED", "a growth of an expired lease says so"
    assert growth not in ledger.waiters(), "a failed growth must leave the queue"
    assert ledger.drain_settled() == [growth], "the failed growth must be handed to the caller"
    assert ledger.leased_bytes(GPU0) == 250


# ---- renew, expiry, fencing ------------------------------------------------

def test_renew_extends_expiry():
    clock = FakeClock()
    ledger = make_ledger(clock=clock)
    lease = granted(ask(ledger, 100, ttl_s=1.0))
    assert lease.expires_at == pytest.approx(clock.now + 1.0)
    clock.advance(0.8)
    renewed = ledger.renew(lease.lease_id, lease.epoch)
    assert renewed.renewed_at == clock.now and renewed.expires_at == pytest.approx(clock.now + 1.0)
    assert (renewed.epoch, renewed.bytes, renewed.granted_at) == (
        lease.epoch, lease.bytes, lease.granted_at), "renew changes only the renewal time"
    clock.advance(0.8)  # 1.6 s after the grant: past the first expiry, before the renewed one
    assert ledger.expire_due() == [], "a renewed lease must not expire at its old deadline"
    assert ledger.holds(lease.lease_id)
    clock.advance(0.2)
    assert [gone.lease_id for gone in ledger.expire_due()] == [lease.lease_id]


def test_expire_due_expires_only_overdue_leases_and_they_stay_expired():
    clock = FakeClock()
    ledger = make_ledger(clock=clock)
    short = granted(ask(ledger, 100, ttl_s=1.0, name="agent/short"))
    long = granted(ask(ledger, 100, ttl_s=5.0, name="agent/long"))
    ledger.drain_events()
    clock.advance(0.999)
    assert ledger.expire_due() == [], "nothing is overdue yet"
    clock.advance(0.001)
    assert ledger.expire_due() == [short], "a lease expires once its TTL is over"
    assert ledger.holds(long.lease_id) and not ledger.holds(short.lease_id)
    assert ledger.leased_bytes(GPU0) == 100
    events = ledger.drain_events()
    assert [(e.kind, e.lease.lease_id) for e in events] == [(EventKind.EXPIRED, short.lease_id)]
    for call in (lambda: ledger.renew(short.lease_id, short.epoch),
                 lambda: ledger.release(short.lease_id, short.epoch),
                 lambda: ledger.resize(short.lease_id, short.epoch, 50),
                 lambda: ledger.lease(short.lease_id)):
        with pytest.raises(FailedPrecondition) as err:
            call()
        assert err.value.reason == "LEASE_EXPIRED", f"got reason {err.value.reason!r}"
    assert ledger.expire_due() == [], "an expired lease expires once"


def test_overdue_lease_not_yet_swept_cannot_be_renewed():
    clock = FakeClock()
    ledger = make_ledger(clock=clock)
    lease = granted(ask(ledger, 100, ttl_s=1.0))
    clock.advance(1.5)
    with pytest.raises(FailedPrecondition) as err:
        ledger.renew(lease.lease_id, lease.epoch)
    assert err.value.reason == "LEASE_EXPIRED", "an overdue lease is expired even before the sweep"
    assert not ledger.holds(lease.lease_id)
    assert ledger.leased_bytes(GPU0) == 0


def test_unknown_or_released_lease_is_not_found():
    ledger = make_ledger()
    with pytest.raises(NotFound):
        ledger.renew("lease-nope", 1)
    lease = granted(ask(ledger, 100))
    ledger.release(lease.lease_id, lease.epoch)
    for call in (lambda: ledger.release(lease.lease_id, lease.epoch),
                 lambda: ledger.renew(lease.lease_id, lease.epoch),
                 lambda: ledger.resize(lease.lease_id, lease.epoch, 10)):
        with pytest.raises(NotFound) as err:
            call()
        assert err.value.ident == lease.lease_id
    with pytest.raises(InvalidArgument) as err:
        ledger.renew("", 1)
    assert err.value.field == "lease_id"


def test_wrong_epoch_is_a_stale_epoch():
    ledger = make_ledger()
    lease = granted(ask(ledger, 100))
    for call in (lambda: ledger.renew(lease.lease_id, lease.epoch + 1),
                 lambda: ledger.release(lease.lease_id, lease.epoch - 1),
                 lambda: ledger.resize(lease.lease_id, 0, 50)):
        with pytest.raises(FailedPrecondition) as err:
            call()
        assert err.value.reason == "STALE_EPOCH", f"got reason {err.value.reason!r}"
    assert ledger.lease(lease.lease_id) == lease, "a fenced-off call must not touch the lease"


def test_epochs_strictly_increase():
    ledger = make_ledger(memory(GPU0), memory(GPU1), epoch_start=41)
    first = granted(ask(ledger, 400, GPU0))
    assert first.epoch == 42, "the first epoch follows epoch_start"
    second = granted(ask(ledger, 100, GPU1))
    queued = ask(ledger, 300, GPU0)
    ledger.release(first.lease_id, first.epoch)
    third = granted(queued)
    fourth = granted(ask(ledger, 100, None))
    epochs = [first.epoch, second.epoch, third.epoch, fourth.epoch]
    assert epochs == sorted(set(epochs)), f"epochs must strictly increase: {epochs}"


def test_default_epochs_start_from_the_wall_clock():
    import time

    before = time.time_ns() // 1000
    lease = granted(ask(Ledger([memory(GPU0)], 0.5, clock=FakeClock()), 10))
    assert lease.epoch > before, "epochs must keep growing across restarts of admission"


# ---- validation ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(num_bytes=0), "bytes"),
    (dict(num_bytes=-5), "bytes"),
    (dict(num_bytes=501), "bytes"),           # over the cap of 500
    (dict(device="gpu:9"), "device"),
    (dict(name=""), "holder.name"),
    (dict(name="   "), "holder.name"),
    (dict(name="x" * (MAX_NAME_CHARS + 1)), "holder.name"),
    (dict(name="bad\nname"), "holder.name"),
    (dict(name="bell\x07"), "holder.name"),
    (dict(pid=-1), "holder.pid"),
    (dict(priority=1001), "priority"),
    (dict(priority=-1001), "priority"),
    (dict(ttl_s=-1.0), "ttl_ms"),
])
def test_bad_acquire_names_the_field(kwargs, field):
    ledger = make_ledger()
    args = dict(num_bytes=100, device=GPU0, name="agent/a", pid=1, priority=0, ttl_s=0.0) | kwargs
    with pytest.raises(InvalidArgument) as err:
        ledger.acquire(Holder(args["name"], args["pid"]), args["num_bytes"], Purpose.KV,
                       args["device"], args["priority"], args["ttl_s"])
    assert err.value.field == field, f"{kwargs} must be blamed on {field}, not {err.value.field}"
    assert ledger.waiters() == [] and ledger.leases() == [], "a refused request changes nothing"
    assert ledger.drain_events() == []


@pytest.mark.parametrize("kwargs", [
    dict(num_bytes=500),                      # exactly the cap
    dict(name="x" * MAX_NAME_CHARS),
    dict(name="agent/ü-ñ"),
    dict(priority=1000),
    dict(priority=-1000),
    dict(pid=0),
])
def test_limits_are_inclusive(kwargs):
    ledger = make_ledger()
    args = dict(num_bytes=100, name="agent/a", pid=1, priority=0) | kwargs
    waiter = ledger.acquire(Holder(args["name"], args["pid"]), args["num_bytes"], Purpose.KV,
                            GPU0, args["priority"], 0.0)
    granted(waiter)


def test_any_device_bytes_are_checked_against_the_largest_cap():
    ledger = make_ledger(memory(GPU0, total=1000), memory(GPU1, total=2000))
    assert granted(ask(ledger, 800, None)).device == GPU1, "800 fits only gpu:1's cap of 1000"
    with pytest.raises(InvalidArgument) as err:
        ask(ledger, 1001, None)
    assert err.value.field == "bytes"
    with pytest.raises(InvalidArgument):
        ask(ledger, 501, GPU0)  # over gpu:0's own cap


@pytest.mark.parametrize("new_bytes", [0, -1, 501])
def test_bad_resize_names_bytes(new_bytes):
    ledger = make_ledger()
    lease = granted(ask(ledger, 100))
    with pytest.raises(InvalidArgument) as err:
        ledger.resize(lease.lease_id, lease.epoch, new_bytes)
    assert err.value.field == "bytes"
    assert ledger.lease(lease.lease_id).bytes == 100


def test_ledger_needs_devices_and_a_sane_cap():
    with pytest.raises(ValueError):
        Ledger([], 0.5)
    for cap in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError):
            Ledger([memory(GPU0)], cap)


@pytest.mark.parametrize("requested, expected", [
    (0.0, 10.0),        # none asked: the default
    (0.01, 0.1),        # below the minimum
    (5.0, 5.0),
    (99_999.0, 3600.0),  # above the maximum
])
def test_ttl_is_clamped(requested, expected):
    ledger = make_ledger()
    assert granted(ask(ledger, 10, ttl_s=requested)).ttl_s == expected


# ---- foreign memory ----------------------------------------------------------

def test_update_devices_moves_the_budget():
    ledger = make_ledger(memory(GPU0), memory(GPU1))
    held = granted(ask(ledger, 300))
    ledger.update_devices([memory(GPU0, foreign=300)])
    assert ledger.budget_bytes(GPU0) == 200, "more foreign memory shrinks the budget"
    assert ledger.leased_bytes(GPU0) == 300, "leases are never taken back"
    assert ledger.free_bytes(GPU0) == -100
    waiter = ask(ledger, 1)
    assert waiter.lease is None, "nothing is granted while over budget"
    ledger.update_devices([memory(GPU0, foreign=0), memory("gpu:7", foreign=9)])
    assert granted(waiter).bytes == 1, "less foreign memory must serve the queue"
    assert ledger.device_ids() == [GPU0, GPU1], "an unknown device in an update is ignored"
    assert ledger.holds(held.lease_id)


def test_update_devices_with_less_foreign_serves_the_queue():
    ledger = make_ledger(memory(GPU0, foreign=400))
    assert ledger.budget_bytes(GPU0) == 100
    waiter = ask(ledger, 300)
    assert waiter.lease is None
    ledger.update_devices([memory(GPU0, foreign=250)])
    assert waiter.lease is None, "budget 250 is still short of 300"
    ledger.update_devices([memory(GPU0, foreign=200)])
    assert granted(waiter).bytes == 300
    assert ledger.drain_settled() == [waiter]


# ---- the rest of the book ------------------------------------------------------

def test_accounted_by_pid_and_device_views():
    ledger = make_ledger(memory(GPU0), memory(GPU1))
    granted(ask(ledger, 100, GPU0, pid=7))
    granted(ask(ledger, 50, GPU0, pid=7))
    granted(ask(ledger, 30, GPU1, pid=7))
    granted(ask(ledger, 20, GPU0, pid=8))
    assert ledger.accounted_by_pid() == {(GPU0, 7): 150, (GPU1, 7): 30, (GPU0, 8): 20}
    granted(ask(ledger, 300, GPU0))
    ask(ledger, 100, GPU0)
    view0, view1 = ledger.devices()
    assert (view0.num_leases, view0.leased_bytes, view0.num_waiting) == (4, 470, 1)
    assert (view1.num_leases, view1.leased_bytes, view1.num_waiting) == (1, 30, 0)


def test_a_waiter_on_a_named_device_is_accounted_to_its_process():
    ledger = make_ledger()
    granted(ask(ledger, 400, GPU0, pid=7))
    ask(ledger, 300, GPU0, pid=9)
    ask(ledger, 200, None, pid=10)       # any device: cannot say which
    ask(ledger, 100, GPU0, pid=0)        # no pid: nothing to match on NVML
    assert ledger.accounted_by_pid() == {(GPU0, 7): 400, (GPU0, 9): 300}


def test_shortfall_and_retry_hint():
    clock = FakeClock()
    ledger = make_ledger(clock=clock)
    granted(ask(ledger, 400, ttl_s=3.0))
    waiter = ask(ledger, 300)
    short = ledger.shortfall(waiter)
    assert (short.device, short.requested_bytes, short.free_bytes, short.missing_bytes) == (
        GPU0, 300, 100, 200)
    assert ledger.retry_after_s(waiter) == pytest.approx(3.0), "retry when the lease expires"
    clock.advance(2.99)
    assert ledger.retry_after_s(waiter) == pytest.approx(0.1), "never sooner than 0.1 s"
    long_ledger = make_ledger(clock=clock)
    granted(long_ledger.acquire(Holder("a"), 500, Purpose.WEIGHTS, GPU0, 0, 60.0))
    assert long_ledger.retry_after_s(ask(long_ledger, 1)) == 5.0, "never later than 5 s"
    empty = make_ledger(memory(GPU0, foreign=500), clock=clock)
    assert empty.retry_after_s(ask(empty, 1)) == 1.0, "1 s when no lease could expire"


def test_leases_are_listed_in_grant_order():
    clock = FakeClock()
    ledger = make_ledger(clock=clock)
    first = granted(ask(ledger, 10))
    clock.advance(1)
    second = granted(ask(ledger, 10))
    clock.advance(1)
    ledger.renew(first.lease_id, first.epoch)
    assert [lease.lease_id for lease in ledger.leases()] == [first.lease_id, second.lease_id]


def test_a_second_resize_while_a_growth_waits_is_refused():
    ledger = make_ledger()
    lease = granted(ask(ledger, 300))
    granted(ask(ledger, 200, name="agent/b"))
    growth = ledger.resize(lease.lease_id, lease.epoch, 400)
    assert isinstance(growth, Waiter) and growth.lease is None, "the growth should wait"
    for new_bytes in (100, 450):
        with pytest.raises(FailedPrecondition) as refused:
            ledger.resize(lease.lease_id, lease.epoch, new_bytes)
        assert refused.value.reason == "RESIZE_PENDING", refused.value.reason
    assert ledger.lease(lease.lease_id).bytes == 300, "the refused resize changed the lease"


def test_a_growth_is_not_granted_to_a_lease_past_its_ttl():
    clock = FakeClock()
    ledger = make_ledger(clock=clock)
    lease = granted(ask(ledger, 300, ttl_s=1.0))
    other = granted(ask(ledger, 200, name="agent/b", ttl_s=100.0))
    growth = ledger.resize(lease.lease_id, lease.epoch, 400)
    clock.advance(2.0)  # the lease lapsed, not yet swept
    ledger.release(other.lease_id, other.epoch)  # frees enough for the growth
    assert growth.lease is None, "a lapsed lease was extended by its growth"
    ledger.expire_due()
    assert isinstance(growth.error, FailedPrecondition) and growth.error.reason == "LEASE_EXPIRED"
    assert ledger.leased_bytes(GPU0) == 0
