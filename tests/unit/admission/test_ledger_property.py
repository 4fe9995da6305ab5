"""The ledger under random sequences of requests (hypothesis state machine).

After every step the book must balance, no grant may have gone beyond the
budget, the queue must hold nobody it could serve, and what the events say
must match what the ledger holds.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from services.admission.devices import DeviceMemory
from services.admission.ledger import EventKind, Holder, Lease, Ledger, Purpose, TtlLimits, Waiter
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def memory(device: str, total: int, foreign: int) -> DeviceMemory:
    return DeviceMemory(device, "simulated", "", total, foreign, "simulated")


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.clock = FakeClock()
        self.ledger: Ledger | None = None
        self.totals: dict[str, int] = {}
        self.foreign: dict[str, int] = {}
        self.pending: list[Waiter] = []          # returned by the ledger, not settled or cancelled
        self.shadow: dict[str, Lease] = {}       # live leases, as told by the events
        self.expired: dict[str, Lease] = {}
        self.released: dict[str, Lease] = {}
        self.last_epoch = 0
        self.prev_leased: dict[str, int] = {}

    # ---- set-up ----------------------------------------------------------
    @initialize(totals=st.lists(st.integers(100, 2000), min_size=1, max_size=3),
                cap=st.sampled_from([0.5, 0.9, 1.0]),
                foreign=st.lists(st.integers(0, 400), min_size=3, max_size=3))
    def start(self, totals, cap, foreign):
        ids = [f"gpu:{i}" for i in range(len(totals))]
        self.totals = dict(zip(ids, totals))
        self.foreign = {d: min(f, self.totals[d]) for d, f in zip(ids, foreign)}
        self.ledger = Ledger([memory(d, self.totals[d], self.foreign[d]) for d in ids], cap,
                             TtlLimits(1.0, 0.1, 10.0), self.clock, epoch_start=0)
        self.prev_leased = {d: 0 for d in ids}
        self.check(grew=set())

    # ---- helpers -----------------------------------------------------------
    def device_of(self, index: int) -> str | None:
        ids = self.ledger.device_ids()
        return None if index < 0 else ids[index % len(ids)]

    def pick_lease(self, data) -> Lease:
        # In grant order (lease ids are random, so never sort by them).
        ids = sorted(self.shadow, key=lambda lease_id: self.shadow[lease_id].epoch)
        return self.ledger.lease(ids[data.draw(st.integers(0, len(ids) - 1), label="lease")])

    def track(self, waiter: Waiter) -> None:
        if waiter.lease is None and waiter.error is None:
            self.pending.append(waiter)

    # ---- rules ---------------------------------------------------------------
    @rule(device=st.integers(-1, 2), num_bytes=st.integers(1, 2100), priority=st.integers(-2, 2),
          ttl_s=st.sampled_from([0.0, 0.05, 0.5, 1.0, 3.0, 20.0]), pid=st.integers(0, 3),
          wait=st.sampled_from([True, True, True, False]))
    def acquire(self, device, num_bytes, priority, ttl_s, pid, wait):
        target = self.device_of(device)
        candidates = [target] if target else self.ledger.device_ids()
        never_fits = num_bytes > max(self.ledger.cap_bytes(d) for d in candidates)
        try:
            waiter = self.ledger.acquire(Holder(f"agent/{pid}", pid), num_bytes, Purpose.KV,
                                         target, priority, ttl_s, wait=wait)
        except InvalidArgument as exc:
            assert never_fits and exc.field == "bytes", f"refused a valid request: {exc}"
        else:
            assert not never_fits, f"accepted {num_bytes} bytes, over every cap of {candidates}"
            assert waiter.ttl_s == min(10.0, max(0.1, ttl_s)) if ttl_s else waiter.ttl_s == 1.0
            if wait:
                self.track(waiter)
            else:
                assert all(w is not waiter for w in self.ledger.waiters()), (
                    "a request that may not wait was queued")
        self.check(grew=set())

    @rule(device=st.integers(0, 2), priority=st.integers(-2, 2))
    def acquire_exactly_the_free_bytes(self, device, priority):
        target = self.device_of(device)
        free = self.ledger.free_bytes(target)
        if free > 0:
            waiter = self.ledger.acquire(Holder("agent/exact", 9), free, Purpose.KV, target,
                                         priority, 0.0)
            self.track(waiter)
        self.check(grew=set())

    @precondition(lambda self: self.shadow)
    @rule(data=st.data(), factor=st.floats(0.1, 3.0), wait=st.sampled_from([True, True, False]))
    def resize(self, data, factor, wait):
        lease = self.pick_lease(data)
        new_bytes = max(1, int(lease.bytes * factor))
        if new_bytes > self.ledger.cap_bytes(lease.device):
            try:
                self.ledger.resize(lease.lease_id, lease.epoch, new_bytes)
            except InvalidArgument as exc:
                assert exc.field == "bytes"
            else:
                raise AssertionError(f"resize to {new_bytes} over the cap was accepted")
        else:
            queued = [w for w in self.ledger.waiters() if w.lease_id == lease.lease_id]
            if queued:
                try:
                    self.ledger.resize(lease.lease_id, lease.epoch, new_bytes, wait=wait)
                except FailedPrecondition as exc:
                    assert exc.reason == "RESIZE_PENDING", exc.reason
                else:
                    raise AssertionError("a second resize while a growth waits was accepted")
                self.check(grew=set())
                return
            result = self.ledger.resize(lease.lease_id, lease.epoch, new_bytes, wait=wait)
            if new_bytes <= lease.bytes:
                assert isinstance(result, Lease) and result.bytes == new_bytes, (
                    f"a shrink to {new_bytes} must apply at once, got {result}")
            else:
                assert isinstance(result, Waiter) and result.bytes == new_bytes - lease.bytes
                if wait:
                    self.track(result)
                else:
                    assert all(w is not result for w in self.ledger.waiters()), (
                        "a growth that may not wait was queued")
        self.check(grew=set())

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def release(self, data):
        lease = self.pick_lease(data)
        released = self.ledger.release(lease.lease_id, lease.epoch)
        assert released.lease_id == lease.lease_id
        self.check(grew=set())

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def renew(self, data):
        lease = self.pick_lease(data)
        renewed = self.ledger.renew(lease.lease_id, lease.epoch)
        assert renewed.expires_at == self.clock.now + lease.ttl_s
        self.check(grew=set())

    @precondition(lambda self: self.shadow)
    @rule(data=st.data(), delta=st.sampled_from([-1, 1]))
    def stale_epoch(self, data, delta):
        lease = self.pick_lease(data)
        try:
            self.ledger.renew(lease.lease_id, lease.epoch + delta)
        except FailedPrecondition as exc:
            assert exc.reason == "STALE_EPOCH"
        else:
            raise AssertionError("a wrong epoch was accepted")
        self.check(grew=set())

    @precondition(lambda self: self.expired or self.released)
    @rule(data=st.data())
    def use_after_end(self, data):
        gone = sorted([*self.expired.items(), *self.released.items()],
                      key=lambda item: item[1].epoch)
        lease_id, lease = gone[data.draw(st.integers(0, len(gone) - 1), label="gone")]
        try:
            self.ledger.renew(lease_id, lease.epoch)
        except FailedPrecondition as exc:
            assert lease_id in self.expired and exc.reason == "LEASE_EXPIRED", (
                f"{lease_id}: {exc.reason}")
        except NotFound:
            assert lease_id in self.released, f"an expired lease {lease_id} reads as unknown"
        else:
            raise AssertionError(f"renewed a lease that ended: {lease_id}")
        self.check(grew=set())

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def cancel(self, data):
        waiter = self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1), label="waiter"))
        self.ledger.cancel(waiter)
        assert all(w is not waiter for w in self.ledger.waiters()), "cancelled waiter still queued"
        self.check(grew=set())

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.5]))
    def advance_and_expire(self, seconds):
        self.clock.now += seconds
        overdue = {lease.lease_id for lease in self.ledger.leases()
                   if lease.expires_at <= self.clock.now}
        expired = self.ledger.expire_due()
        assert {lease.lease_id for lease in expired} == overdue, (
            "expire_due must expire exactly the overdue leases")
        self.check(grew=set())

    @rule(device=st.integers(0, 2), foreign=st.integers(0, 1200))
    def foreign_moves(self, device, foreign):
        dev = self.device_of(device)
        foreign = min(foreign, self.totals[dev])
        grew = {dev} if foreign > self.foreign[dev] else set()
        self.foreign[dev] = foreign
        self.ledger.update_devices([memory(dev, self.totals[dev], foreign)])
        assert self.ledger.budget_bytes(dev) == self.ledger.cap_bytes(dev) - foreign
        self.check(grew=grew)

    # ---- the invariants, checked after every step --------------------------
    def check(self, grew: set[str]) -> None:
        ledger = self.ledger
        queue = ledger.waiters()
        live = {lease.lease_id: lease for lease in ledger.leases()}

        grew_on: set[str] = set()
        for event in ledger.drain_events():
            lease = event.lease
            if event.kind is EventKind.GRANTED:
                assert lease.lease_id not in self.shadow, "granted twice"
                assert lease.epoch > self.last_epoch, (
                    f"epoch {lease.epoch} after {self.last_epoch}: epochs must strictly increase")
                self.last_epoch = lease.epoch
                self.shadow[lease.lease_id] = lease
                grew_on.add(event.device)
            elif event.kind is EventKind.RESIZED:
                before = self.shadow[lease.lease_id]
                assert before.bytes == event.old_bytes, "RESIZED old_bytes disagree with the book"
                assert lease.epoch == before.epoch, "a resize must keep the epoch"
                self.shadow[lease.lease_id] = lease
                if lease.bytes > event.old_bytes:
                    grew_on.add(event.device)
            elif event.kind in (EventKind.RELEASED, EventKind.EXPIRED):
                assert self.shadow.pop(lease.lease_id).bytes == lease.bytes
                ended = self.released if event.kind is EventKind.RELEASED else self.expired
                ended[lease.lease_id] = lease
            elif event.kind is EventKind.QUEUED:
                assert any(w is event.waiter for w in queue) or event.waiter.lease is not None \
                    or event.waiter.error is not None, "QUEUED for a waiter that vanished"
            elif event.kind is EventKind.LEFT:
                assert all(w is not event.waiter for w in queue), "LEFT but still queued"

        for waiter in ledger.drain_settled():
            assert all(w is not waiter for w in queue), "a settled waiter is still queued"
            if waiter.lease is not None:
                # No overtaking: nobody still queued before it may wait on that device.
                for earlier in queue:
                    if earlier.sort_key < waiter.sort_key:
                        assert earlier.device not in (None, waiter.lease.device), (
                            f"waiter {waiter.waiter_id} was served on {waiter.lease.device} "
                            f"past the earlier waiter {earlier.waiter_id} ({earlier.device})")
            assert (waiter.lease is None) != (waiter.error is None), (
                "a settled waiter has exactly a lease or an error")
            if waiter.error is not None:
                assert waiter.lease_id is not None and waiter.lease_id not in live, (
                    f"only a growth of a vanished lease may fail here: {waiter.error!r}")
                if waiter.lease_id in self.expired:
                    assert isinstance(waiter.error, FailedPrecondition) and (
                        waiter.error.reason == "LEASE_EXPIRED"), (
                        f"growth of an expired lease failed with {waiter.error!r}")
                else:
                    assert waiter.lease_id in self.released and isinstance(
                        waiter.error, NotFound), (
                        f"growth of a released lease failed with {waiter.error!r}")
            self.pending = [w for w in self.pending if w is not waiter]
        assert len(self.pending) == len(queue) and all(
            any(w is p for w in queue) for p in self.pending), (
            "the queue must hold exactly the waiters neither settled nor cancelled")

        # The events tell the whole story of the leases.
        assert {i: (l.device, l.bytes, l.epoch) for i, l in self.shadow.items()} == {
            i: (l.device, l.bytes, l.epoch) for i, l in live.items()}, "events disagree with leases"

        for device in ledger.device_ids():
            leased = sum(lease.bytes for lease in live.values() if lease.device == device)
            assert leased == ledger.leased_bytes(device), (
                f"{device}: leases sum to {leased}, the book says {ledger.leased_bytes(device)}")
            budget = ledger.budget_bytes(device)
            if device in grew_on:
                assert leased <= budget, (
                    f"{device}: a grant or growth took leased to {leased} > budget {budget}")
            elif leased > budget:
                assert device in grew or (
                    self.prev_leased[device] > budget and leased <= self.prev_leased[device]), (
                    f"{device}: leased {leased} > budget {budget} without foreign growth")
            self.prev_leased[device] = leased

        now = self.clock.now
        for lease in live.values():
            assert lease.lease_id not in self.expired, f"{lease.lease_id} is live and expired"
            assert lease.expires_at > now, f"{lease.lease_id} overdue but live after a step"

        # Queue order, and nobody in it could be served now (no overtaking).
        keys = [(-w.priority, w.seq) for w in queue]
        assert keys == sorted(keys), "the queue must be in priority, then arrival order"
        blocked: set[str] = set()
        for waiter in queue:
            candidates = [waiter.device] if waiter.device else ledger.device_ids()
            if waiter.lease_id is not None:
                assert waiter.lease_id in live, "a growth waits for a lease that is gone"
            fits = [d for d in candidates
                    if d not in blocked and ledger.free_bytes(d) >= waiter.bytes]
            assert not fits, (
                f"waiter {waiter.waiter_id} ({waiter.bytes} bytes) could be served on {fits}")
            blocked.update(candidates)


LedgerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_ledger_state_machine = LedgerMachine.TestCase
