"""The reclaim policy over a real ledger with a fake clock: who is asked for
how much, in which order, in two stages (KV, then weights), priorities, the
waiter's own holder left alone, answers and overdue asks."""

from __future__ import annotations

import pytest

from services.admission.devices import SimulatedDevices, SimulatedDeviceSpec
from services.admission.ledger import Holder, Ledger, Purpose, TtlLimits
from services.admission.reclaim import Reclaimer
from services.common.errors import InvalidArgument, NotFound

KV, WEIGHTS = Purpose.KV, Purpose.WEIGHTS


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def book():
    clock = Clock()
    source = SimulatedDevices((SimulatedDeviceSpec("cpu:0", 1000),))
    ledger = Ledger(source.read({}), 1.0, TtlLimits(100.0, 0.1, 3600.0), clock=clock)
    return ledger, Reclaimer(ledger, deadline_s=5.0, clock=clock), clock


def grant(ledger, name, num_bytes, purpose, priority=0):
    waiter = ledger.acquire(Holder(name, 1), num_bytes, purpose, priority=priority)
    assert waiter.lease is not None, f"{name} was not granted"
    return waiter.lease


def test_nothing_is_asked_while_nobody_waits(book):
    ledger, reclaimer, _ = book
    grant(ledger, "worker/a", 900, KV)
    assert reclaimer.plan() == []


def test_kv_is_asked_before_weights_least_recently_resized_first(book):
    ledger, reclaimer, clock = book
    weights = grant(ledger, "worker/a", 400, WEIGHTS)
    old_kv = grant(ledger, "worker/a", 200, KV)
    clock.now += 1
    new_kv = grant(ledger, "worker/b", 300, KV)
    ledger.acquire(Holder("worker/c", 1), 250, WEIGHTS)          # 100 free: 150 missing
    asks = reclaimer.plan()
    assert [(a.lease.lease_id, a.bytes) for a in asks] == [(old_kv.lease_id, 150)], (
        "the least recently resized KV lease should be asked for exactly the shortfall")
    assert reclaimer.plan() == [], "asked bytes count as coming: no second ask"
    # Worker a parked only 50 bytes: the rest is asked of the next KV lease.
    ledger.resize(old_kv.lease_id, old_kv.epoch, 150)
    reclaimer.answer(asks[0].reclaim_id, 50, "parked 1 session")
    asks = reclaimer.plan()
    assert [(a.lease.lease_id, a.bytes) for a in asks] == [(new_kv.lease_id, 100)]
    # Nobody parks more; once every KV ask is answered, weights are asked, whole.
    reclaimer.answer(asks[0].reclaim_id, 0, "nothing idle")
    asks = reclaimer.plan()
    assert [(a.lease.lease_id, a.bytes) for a in asks] == [(weights.lease_id, 400)], (
        "stage 2 should ask the weights lease for all its bytes (a model sleeps whole)")
    assert ledger.leases()[0].lease_id == weights.lease_id


def test_weights_wait_while_a_kv_ask_is_open(book):
    ledger, reclaimer, _ = book
    grant(ledger, "worker/a", 500, WEIGHTS)
    kv = grant(ledger, "worker/a", 100, KV)
    ledger.acquire(Holder("worker/c", 1), 600, WEIGHTS)           # 400 free: 200 missing
    asks = reclaimer.plan()
    assert [a.lease.lease_id for a in asks] == [kv.lease_id]
    assert reclaimer.plan() == [], "weights must not be asked while the KV ask is open"


def test_own_holder_and_higher_priorities_are_left_alone(book):
    ledger, reclaimer, _ = book
    grant(ledger, "worker/c", 300, KV)                            # the waiter's own KV
    grant(ledger, "worker/vip", 300, KV, priority=10)
    low = grant(ledger, "worker/low", 300, KV, priority=-5)
    ledger.acquire(Holder("worker/c", 1), 300, WEIGHTS, priority=0)
    asks = reclaimer.plan()
    assert [a.lease.lease_id for a in asks] == [low.lease_id], (
        "only a lease of another holder at or below the waiter's priority may be asked")
    assert asks[0].for_holder == "worker/c" and asks[0].for_priority == 0


def test_only_the_head_waiter_of_a_device_asks(book):
    ledger, reclaimer, _ = book
    grant(ledger, "worker/a", 500, KV)
    grant(ledger, "worker/b", 500, KV)
    ledger.acquire(Holder("worker/c", 1), 100, WEIGHTS)
    ledger.acquire(Holder("worker/d", 1), 900, WEIGHTS)
    asks = reclaimer.plan()
    assert len(asks) == 1 and asks[0].for_holder == "worker/c" and asks[0].bytes == 100


def test_overdue_is_reported_once_then_others_are_asked(book):
    ledger, reclaimer, clock = book
    a = grant(ledger, "worker/a", 500, KV)
    b = grant(ledger, "worker/b", 500, KV)
    ledger.acquire(Holder("worker/c", 1), 100, WEIGHTS)
    first = reclaimer.plan()
    assert [x.lease.lease_id for x in first] == [a.lease_id]
    clock.now += 4.9
    assert reclaimer.overdue() == []
    clock.now += 0.2
    late = reclaimer.overdue()
    assert [x.reclaim_id for x in late] == [first[0].reclaim_id] and late[0].state == "overdue"
    assert reclaimer.overdue() == [], "an overdue ask is reported once"
    assert [x.state for x in reclaimer.reclaims()] == ["overdue"], "status shows it"
    second = reclaimer.plan()
    assert [x.lease.lease_id for x in second] == [b.lease_id], (
        "past the deadline the shortfall should be asked of the next holder")
    clock.now += 5.2          # b's ask is overdue too; a's for a second deadline
    reclaimer.overdue()
    third = reclaimer.plan()
    assert first[0].reclaim_id in [x.reclaim_id for x in third], (
        "an ask overdue for another deadline should be sent again, same id (it may have been "
        "missed, or the holder is still at it)")
    again = reclaimer.answer(first[0].reclaim_id, 500, "parked")
    assert again.state == "answered", "the answer to the first sending must land"


def test_an_ask_whose_lease_went_away_counts_as_answered(book):
    ledger, reclaimer, _ = book
    a = grant(ledger, "worker/a", 900, KV)
    ledger.acquire(Holder("worker/c", 1), 300, WEIGHTS)
    ask = reclaimer.plan()[0]
    ledger.release(a.lease_id, a.epoch)   # the waiter is granted meanwhile
    assert reclaimer.overdue() == []
    (answered,) = reclaimer.reclaims()
    assert answered.reclaim_id == ask.reclaim_id and answered.state == "answered"


def test_answer_checks(book):
    ledger, reclaimer, _ = book
    grant(ledger, "worker/a", 900, KV)
    ledger.acquire(Holder("worker/c", 1), 300, WEIGHTS)
    ask = reclaimer.plan()[0]
    with pytest.raises(NotFound):
        reclaimer.answer("reclaim-999", 0, "")
    with pytest.raises(InvalidArgument):
        reclaimer.answer(ask.reclaim_id, -1, "")
    done = reclaimer.answer(ask.reclaim_id, 300, "parked 3 sessions")
    assert (done.state, done.freed_bytes, done.detail) == ("answered", 300, "parked 3 sessions")


def test_a_holder_asked_for_its_weights_may_grow_past_the_head(book):
    ledger, reclaimer, _ = book
    weights = grant(ledger, "worker/a", 500, WEIGHTS)
    kv = grant(ledger, "worker/a", 100, KV)
    head = ledger.acquire(Holder("worker/b", 1), 600, WEIGHTS)   # 400 free: waits
    growth = ledger.resize(kv.lease_id, kv.epoch, 150)           # fits, but behind the head
    assert growth.lease is None, "no overtaking before worker/a is asked for its weights"
    asks = reclaimer.plan()                                      # stage 1: its KV
    reclaimer.answer(asks[0].reclaim_id, 0, "nothing idle")
    asks = reclaimer.plan()                                      # stage 2: its weights
    assert [a.lease.lease_id for a in asks] == [weights.lease_id]
    ledger.pump()
    assert growth.lease is not None and growth.lease.bytes == 150, (
        "worker/a, draining to sleep, must be able to grow its KV to finish")
    assert head.lease is None
    fresh = ledger.acquire(Holder("worker/a", 1), 20, KV)        # a first KV lease too
    assert fresh.lease is not None, "a draining holder's new KV lease should pass as well"
    other = ledger.acquire(Holder("worker/c", 1), 10, KV)
    assert other.lease is None, "a holder not asked must still wait its turn"


def test_a_lease_that_gives_nothing_is_asked_again_after_a_doubling_backoff(book):
    ledger, reclaimer, clock = book
    asleep = grant(ledger, "worker/a", 100, WEIGHTS)     # an asleep model's context
    grant(ledger, "worker/b", 850, WEIGHTS, priority=5)  # above the waiter: never asked
    ledger.acquire(Holder("worker/c", 1), 200, WEIGHTS)   # 50 free: waits

    def asked_now() -> bool:
        reclaimer.overdue()
        return asleep.lease_id in [a.lease.lease_id for a in reclaimer.plan()]

    def answer_nothing() -> None:
        (ask,) = [r for r in reclaimer.reclaims()
                  if r.lease.lease_id == asleep.lease_id and r.state != "answered"]
        reclaimer.answer(ask.reclaim_id, 0, "the model is asleep already")

    assert asked_now()
    answer_nothing()
    clock.now += 4.0
    assert not asked_now(), "within the first backoff (one deadline, 5 s)"
    clock.now += 1.5
    assert asked_now(), "after one deadline it may be asked again (it may be waking: ready now)"
    answer_nothing()
    clock.now += 9.0
    assert not asked_now(), "a second answer of nothing doubles the backoff (10 s)"
    clock.now += 1.5
    assert asked_now()
    answer_nothing()
    clock.now += 1.0
    ledger.resize(asleep.lease_id, asleep.epoch, 90)      # it changed since
    clock.now += 4.5          # past the deadline, well within the third backoff (20 s)
    assert asked_now(), "a lease that changed size since its answer may be asked again"


def test_a_quantum_keeps_a_woken_models_weights_for_a_while():
    clock = Clock()
    source = SimulatedDevices((SimulatedDeviceSpec("cpu:0", 1000),))
    ledger = Ledger(source.read({}), 1.0, TtlLimits(100.0, 0.1, 3600.0), clock=clock)
    reclaimer = Reclaimer(ledger, deadline_s=5.0, clock=clock, min_resident_s=3.0)
    woken = grant(ledger, "worker/a", 900, WEIGHTS)
    ledger.acquire(Holder("worker/b", 1), 500, WEIGHTS)
    assert reclaimer.plan() == [], "within its quantum the woken model is not asked"
    clock.now += 2.9
    assert reclaimer.plan() == []
    clock.now += 0.2
    assert [a.lease.lease_id for a in reclaimer.plan()] == [woken.lease_id], (
        "past its quantum it is asked as before")


def test_a_weights_ask_says_how_much_the_waiter_misses(book):
    ledger, reclaimer, _ = book
    weights = grant(ledger, "worker/a", 700, WEIGHTS)
    ledger.acquire(Holder("worker/c", 1), 500, WEIGHTS)      # 300 free: 200 missing
    (ask,) = reclaimer.plan()
    assert (ask.lease.lease_id, ask.bytes, ask.needed) == (weights.lease_id, 700, 200), (
        "weights are asked whole, and the ask says what the waiter misses")
