"""Memory pressure: which holders admission asks to give bytes back, and the
book of those asks. Pure and synchronous, like the ledger it reads.

When the first waiter for a device cannot be served, the shortfall (its bytes
less the device's free bytes, less what is already asked for and not yet
answered) is asked of other holders' leases on that device, in this order
(the policy):

  1. KV leases before any other: a holder gives back KV of idle sessions
     (parks them), least recently used first; a KV lease whose size changed
     least recently (its sessions idle longest) is asked first.
  2. Then weights (and other) leases: a holder puts an idle model to sleep
     (weights to host memory) and releases the lease; a model pinned by its
     holder, or one with a session generating, says no.
  A holder asked for its weights finishes its generations in flight first
  (it drains); meanwhile its KV growths may pass the queue's head when they
  fit (`finishing`), or it could never finish, nor sleep.
  Only leases of a priority at or below the waiter's are asked (a holder's
  priority is its leases'), lower priorities first; never the waiter's own
  holder. With a quantum (`min_resident_s`), a weights lease granted or
  grown less than that long ago is not asked yet: a woken model serves its
  waiting requests for that long before it can be asked to sleep again
  (fewer swaps, longer waits for the other models). A lease whose answers
  gave nothing is asked again only after a
  backoff that doubles with each such answer (up to a minute), unless its
  size changed. A second stage (weights) starts only once every KV lease asked
  has answered or is overdue, so that models sleep only when parking was
  not enough.

Each ask has a deadline (`deadline_s`); past it, unanswered, it is reported
overdue once (status and an event), and after one more deadline sent again
under the same id while the waiter still needs it. A holder that also stops
renewing loses its lease to expiry, as before.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import structlog

from services.admission.ledger import Lease, Ledger, Purpose, Waiter
from services.common.errors import InvalidArgument, NotFound

log = structlog.get_logger(__name__)

#: Answered asks stay in status this long.
ANSWERED_KEPT_S = 60.0
#: The longest a lease that keeps answering with nothing goes unasked.
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True, slots=True)
class Activity:
    """What a worker reports it did: parked or restored a session, slept or
    woke its model (kind: session_parked | session_restored | model_asleep |
    model_awake)."""
    kind: str
    worker_id: str
    model: str
    session_id: str = ""
    bytes: int = 0
    seconds: float = 0.0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Reclaim:
    reclaim_id: str
    lease: Lease               # as it was when asked
    bytes: int                 # wanted back
    asked_at: float
    deadline: float
    for_holder: str
    for_priority: int
    state: str = "asked"       # asked | answered | overdue
    needed: int = 0            # what the waiter still missed (at most bytes)
    freed_bytes: int = 0
    detail: str = ""
    answered_at: float = 0.0

    @property
    def device(self) -> str:
        return self.lease.device


class Reclaimer:
    def __init__(self, ledger: Ledger, deadline_s: float = 5.0,
                 clock: Callable[[], float] | None = None, min_resident_s: float = 0.0):
        self.ledger = ledger
        self.deadline_s = deadline_s
        #: A weights (or other) lease granted or grown less than this long
        #: ago is not asked back: the quantum a woken model gets.
        self.min_resident_s = min_resident_s
        self.clock = clock or ledger.clock
        self._asks: dict[str, Reclaim] = {}
        self._ids = itertools.count(1)
        ledger.may_overtake = self.finishing

    def finishing(self, waiter: Waiter) -> bool:
        """KV (a new lease or a growth) for a holder asked, and not yet
        answered, to give its weights back: it finishes its generations in
        flight before it sleeps, so this may pass the waiter it drains for
        (when it fits)."""
        if waiter.purpose is not Purpose.KV:
            return False
        return any(r.state != "answered" and r.lease.purpose is not Purpose.KV
                   and r.lease.holder.name == waiter.holder.name for r in self._asks.values())

    # ---- queries ----
    def reclaims(self) -> list[Reclaim]:
        now = self.clock()
        return [r for r in self._asks.values()
                if r.state != "answered" or now - r.answered_at < ANSWERED_KEPT_S]

    def open_asks(self, device: str) -> list[Reclaim]:
        return [r for r in self._asks.values() if r.device == device and r.state == "asked"]

    # ---- the policy ----
    def plan(self) -> list[Reclaim]:
        """New asks for the first blocked waiter of each device."""
        self._forget_old()
        new: list[Reclaim] = []
        served: set[str] = set()
        for waiter in self.ledger.waiters():
            devices = [waiter.device] if waiter.device else self.ledger.device_ids()
            device = max(devices, key=self.ledger.free_bytes)
            if device in served:
                continue
            served.update(devices)    # only the head waiter of a device asks
            new += self._ask_for(waiter, device)
        return new

    def _ask_for(self, waiter: Waiter, device: str) -> list[Reclaim]:
        pending = sum(r.bytes for r in self.open_asks(device))
        missing = waiter.bytes - self.ledger.free_bytes(device) - pending
        if missing <= 0:
            return []
        now = self.clock()
        asks: list[Reclaim] = []
        # An overdue ask is sent again, under the same id, once another
        # deadline has passed: the holder may have missed it (not watching
        # yet, a dropped stream), or be still at work on it (draining a model
        # takes as long as its generations in flight); either way its answer
        # to the first sending still lands.
        for reclaim_id, ask in list(self._asks.items()):
            if missing <= 0:
                break
            if (ask.device == device and ask.state == "overdue"
                    and now - ask.deadline >= self.deadline_s):
                again = replace(ask, state="asked", asked_at=now, deadline=now + self.deadline_s)
                self._asks[reclaim_id] = again
                asks.append(again)
                missing -= again.bytes
                log.info("reclaim_requested_again", reclaim_id=reclaim_id,
                         holder=ask.lease.holder.name, bytes=ask.bytes)
        asked = {r.lease.lease_id for r in self._asks.values() if r.state != "answered"}
        # A holder that just answered (maybe with nothing to give) is not asked
        # again for the same waiter until a deadline has passed.
        answered = {r.lease.lease_id for r in self._asks.values()
                    if r.state == "answered" and r.for_holder == waiter.holder.name
                    and now - r.answered_at < self.deadline_s}
        candidates = [lease for lease in self.ledger.leases()
                      if lease.device == device and lease.holder.name != waiter.holder.name
                      and lease.priority <= waiter.priority
                      and lease.lease_id not in asked and lease.lease_id not in answered
                      and not self._backing_off(lease, now)]
        kv = [lease for lease in candidates if lease.purpose is Purpose.KV]
        if not kv:
            # Stage 2 only once no KV ask for this device is still open.
            if any(r.lease.purpose is Purpose.KV for r in self.open_asks(device)):
                return asks
            stage = [lease for lease in candidates if lease.purpose is not Purpose.KV
                     and now - lease.resized_at >= self.min_resident_s]
        else:
            stage = kv
        stage.sort(key=lambda lease: (lease.priority, lease.resized_at, lease.granted_at))
        for lease in stage:
            if missing <= 0:
                break
            # Weights go all at once (a model sleeps whole); KV as much as needed.
            wanted = lease.bytes if lease.purpose is not Purpose.KV else min(lease.bytes, missing)
            ask = Reclaim(f"reclaim-{next(self._ids)}", lease, wanted, now,
                          now + self.deadline_s, waiter.holder.name, waiter.priority,
                          needed=min(wanted, missing))
            self._asks[ask.reclaim_id] = ask
            asks.append(ask)
            missing -= wanted
            log.info("reclaim_requested", reclaim_id=ask.reclaim_id, lease_id=lease.lease_id,
                     holder=lease.holder.name, purpose=lease.purpose.value, bytes=wanted,
                     for_holder=waiter.holder.name, device=device)
        return asks

    def _backing_off(self, lease: Lease, now: float) -> bool:
        """A lease whose last answers gave nothing (pinned; asleep already,
        what is left being its CUDA context) is asked again only after a
        backoff that doubles with each such answer (one deadline, two, four,
        up to a minute), unless it changed size since."""
        nothing = sorted((r.answered_at for r in self._asks.values()
                          if r.lease.lease_id == lease.lease_id and r.state == "answered"
                          and r.freed_bytes == 0), reverse=True)
        if not nothing or lease.resized_at > nothing[0]:
            return False
        backoff = min(MAX_BACKOFF_S, self.deadline_s * 2 ** (len(nothing) - 1))
        return now - nothing[0] < backoff

    # ---- answers and deadlines ----
    def ask(self, reclaim_id: str) -> Reclaim:
        ask = self._asks.get(reclaim_id)
        if ask is None:
            raise NotFound("reclaim", reclaim_id, "it was answered long ago, or never asked")
        return ask

    def answer(self, reclaim_id: str, freed_bytes: int, detail: str) -> Reclaim:
        ask = self.ask(reclaim_id)
        if freed_bytes < 0:
            raise InvalidArgument("freed_bytes", f"must not be negative, got {freed_bytes}")
        answered = replace(ask, state="answered", freed_bytes=freed_bytes, detail=detail[:500],
                           answered_at=self.clock())
        self._asks[reclaim_id] = answered
        log.info("reclaim_answered", reclaim_id=reclaim_id, holder=ask.lease.holder.name,
                 asked_bytes=ask.bytes, freed_bytes=freed_bytes, detail=detail[:500],
                 late=ask.state == "overdue")
        return answered

    def overdue(self) -> list[Reclaim]:
        """Asks past their deadline, unanswered: each reported once. An ask
        whose lease is gone (released, expired) counts as answered."""
        now = self.clock()
        late = []
        for reclaim_id, ask in list(self._asks.items()):
            if ask.state == "answered":
                continue
            if not self.ledger.holds(ask.lease.lease_id):
                self._asks[reclaim_id] = replace(ask, state="answered", freed_bytes=ask.lease.bytes,
                                                 detail="the lease is gone", answered_at=now)
                continue
            if ask.state == "asked" and now > ask.deadline:
                self._asks[reclaim_id] = replace(ask, state="overdue")
                late.append(self._asks[reclaim_id])
                log.warning("reclaim_overdue", reclaim_id=reclaim_id,
                            holder=ask.lease.holder.name, lease_id=ask.lease.lease_id,
                            bytes=ask.bytes, overdue_s=round(now - ask.deadline, 3))
        return late

    def _forget_old(self) -> None:
        now = self.clock()
        for reclaim_id, ask in list(self._asks.items()):
            if ask.state == "answered" and now - ask.answered_at >= ANSWERED_KEPT_S:
                del self._asks[reclaim_id]
