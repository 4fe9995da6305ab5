"""The lease ledger: who holds how many bytes of which device, and who waits.

Pure and synchronous (no grpc, no asyncio): every method runs to completion,
so the invariant below holds between any two calls, whatever their order.

    for every device:  sum(lease.bytes) <= budget = cap_fraction * total - foreign

A request that fits is granted at once unless someone queued before it could
be served on that device (no overtaking: strict priority, then arrival).
Otherwise it waits in the queue; every release, shrink, expiry, cancellation
or drop of foreign memory serves the queue again from its head. Waiters whose
request was settled (granted or failed) are handed to the caller through
`drain_settled()`, events through `drain_events()`.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import structlog

from services.admission import limits
from services.admission.devices import DeviceMemory
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    LmxError,
    NotFound,
    Shortfall,
)

log = structlog.get_logger(__name__)

PRIORITY_RANGE = (-1000, 1000)
EXPIRED_REMEMBERED = 10_000


class Purpose(enum.Enum):
    WEIGHTS = "weights"
    KV = "kv"
    WORKSPACE = "workspace"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Holder:
    name: str
    pid: int = 0


@dataclass(frozen=True, slots=True)
class Lease:
    lease_id: str
    device: str
    bytes: int
    epoch: int
    ttl_s: float
    holder: Holder
    purpose: Purpose
    priority: int
    granted_at: float
    renewed_at: float
    #: When its size last changed (grant or resize): how recently it was used.
    resized_at: float = 0.0

    @property
    def expires_at(self) -> float:
        return self.renewed_at + self.ttl_s


@dataclass(eq=False, slots=True)
class Waiter:
    """A request in the queue: a new lease (lease_id None) or the growth of one."""

    waiter_id: str
    seq: int
    holder: Holder
    device: str | None          # None: any device
    bytes: int                  # bytes to add: the whole request, or the growth
    purpose: Purpose
    priority: int
    ttl_s: float
    enqueued_at: float
    lease_id: str | None = None
    # Set once settled:
    lease: Lease | None = None
    error: LmxError | None = None

    @property
    def sort_key(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


@dataclass(frozen=True, slots=True)
class DeviceView:
    memory: DeviceMemory
    cap_fraction: float
    cap_bytes: int
    budget_bytes: int
    leased_bytes: int
    num_leases: int
    num_waiting: int

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.leased_bytes


class EventKind(enum.Enum):
    GRANTED = "granted"
    RESIZED = "resized"
    RELEASED = "released"
    EXPIRED = "expired"
    QUEUED = "queued"
    LEFT = "left"
    # Memory pressure (services/admission/reclaim.py) and what workers report.
    RECLAIM_REQUESTED = "reclaim_requested"
    RECLAIM_ANSWERED = "reclaim_answered"
    RECLAIM_OVERDUE = "reclaim_overdue"
    ACTIVITY = "activity"


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    device: str
    lease: Lease | None = None
    waiter: Waiter | None = None
    old_bytes: int = 0
    waited_s: float = 0.0
    reason: str = ""           # LEFT: "timed_out" | "cancelled"
    #: RECLAIM_*: the ask (a services.admission.reclaim.Reclaim); ACTIVITY: a
    #: services.admission.reclaim.Activity.
    detail: object = None


@dataclass(slots=True)
class _Device:
    memory: DeviceMemory
    leased: int = 0
    leases: dict[str, Lease] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TtlLimits:
    default_s: float = 10.0
    min_s: float = 0.1
    max_s: float = 3600.0

    def clamp(self, requested_s: float) -> float:
        if requested_s <= 0:
            return self.default_s
        return min(self.max_s, max(self.min_s, requested_s))


class Ledger:
    def __init__(self, devices: Iterable[DeviceMemory], cap_fraction: float = 0.9,
                 ttl: TtlLimits = TtlLimits(), clock: Callable[[], float] = time.monotonic,
                 epoch_start: int | None = None):
        if not 0 < cap_fraction <= 1:
            raise ValueError(f"cap_fraction must be in (0, 1], got {cap_fraction}")
        self.cap_fraction = cap_fraction
        self.ttl = ttl
        self.clock = clock
        self._devices: dict[str, _Device] = {d.device: _Device(d) for d in devices}
        if not self._devices:
            raise ValueError("a ledger needs at least one device")
        self._leases: dict[str, Lease] = {}
        self._expired: OrderedDict[str, Lease] = OrderedDict()
        self._queue: list[Waiter] = []
        self._queue_keys: list[tuple[int, int]] = []
        self._seq = itertools.count()
        # Epochs start from the wall clock in microseconds, so that they keep
        # growing across restarts of admission (unless the clock goes back or
        # more than a million grants a second were made before the restart).
        self._epoch = epoch_start if epoch_start is not None else time.time_ns() // 1000
        self._events: list[Event] = []
        self._settled: list[Waiter] = []
        #: Whether a waiter may be served past the head of the queue (when it
        #: fits). Memory pressure sets it: a holder asked to give its weights
        #: back may grow its KV to finish the work in flight first.
        self.may_overtake: Callable[[Waiter], bool] = lambda waiter: False
        # Lease and waiter ids: random hex digits, seeded from os.urandom.
        # Cheaper than uuid4 (no system call per id); they identify, they are
        # not secrets (a lease is fenced by its epoch).
        self._ids = random.Random()
        #: No grant before this time (clock()): admission restarted while the
        #: previous run's holders may still use their memory (book_file.py).
        self.paused_until = 0.0

    # ---- queries -------------------------------------------------------
    def cap_bytes(self, device: str) -> int:
        return int(self._devices[device].memory.total_bytes * self.cap_fraction)

    def budget_bytes(self, device: str) -> int:
        dev = self._devices[device]
        return self.cap_bytes(device) - dev.memory.foreign_bytes

    def free_bytes(self, device: str) -> int:
        return self.budget_bytes(device) - self._devices[device].leased

    def leased_bytes(self, device: str) -> int:
        return self._devices[device].leased

    def device_ids(self) -> list[str]:
        return list(self._devices)

    def lease(self, lease_id: str) -> Lease:
        found = self._leases.get(lease_id)
        if found is None:
            if lease_id in self._expired:
                raise FailedPrecondition(
                    f"lease {lease_id!r} expired (not renewed within its TTL); its memory went "
                    "back to the pool: stop using it and acquire a new lease", reason="LEASE_EXPIRED")
            raise NotFound("lease", lease_id, "it was released, or never granted here")
        return found

    def holds(self, lease_id: str) -> bool:
        return lease_id in self._leases

    def leases(self) -> list[Lease]:
        return sorted(self._leases.values(), key=lambda lease: lease.granted_at)

    def waiters(self) -> list[Waiter]:
        return list(self._queue)

    def devices(self) -> list[DeviceView]:
        waiting: dict[str, int] = {}
        for waiter in self._queue:
            for device in ([waiter.device] if waiter.device else self._devices):
                waiting[device] = waiting.get(device, 0) + 1
        return [DeviceView(dev.memory, self.cap_fraction, self.cap_bytes(dev_id),
                           self.budget_bytes(dev_id), dev.leased, len(dev.leases),
                           waiting.get(dev_id, 0))
                for dev_id, dev in self._devices.items()]

    def accounted_by_pid(self) -> dict[tuple[str, int], int]:
        """Bytes per (device, pid) that the book already accounts for: the
        process's leases, plus what it waits for on a named device. A worker
        creates its CUDA context before its first lease is granted and counts
        the context in its ask; without the waiter's share the context would be
        foreign too, counted twice, and an ask that fits exactly would never
        be granted."""
        totals: dict[tuple[str, int], int] = {}
        for lease in self._leases.values():
            key = (lease.device, lease.holder.pid)
            totals[key] = totals.get(key, 0) + lease.bytes
        for waiter in self._queue:
            if waiter.device and waiter.holder.pid:
                key = (waiter.device, waiter.holder.pid)
                totals[key] = totals.get(key, 0) + waiter.bytes
        return totals

    def shortfall(self, waiter: Waiter) -> Shortfall:
        """How far the best device is from serving `waiter` now."""
        candidates = [waiter.device] if waiter.device else list(self._devices)
        best = max(candidates, key=self.free_bytes)
        return Shortfall(best, waiter.bytes, max(0, self.free_bytes(best)))

    def retry_after_s(self, waiter: Waiter) -> float:
        """When trying again makes sense: the soonest expiry on the waiter's
        devices, between 0.1 s and 5 s; 1 s when no lease could expire."""
        now = self.clock()
        candidates = {waiter.device} if waiter.device else set(self._devices)
        expiries = [lease.expires_at - now for lease in self._leases.values()
                    if lease.device in candidates]
        if not expiries:
            return 1.0
        return min(5.0, max(0.1, min(expiries)))

    # ---- validation ----------------------------------------------------
    def _check_bytes(self, num_bytes: int, devices: list[str], field_name: str = "bytes") -> None:
        if num_bytes <= 0:
            raise InvalidArgument(field_name, f"must be a positive number of bytes, got {num_bytes}")
        largest = max(self.cap_bytes(d) for d in devices)
        if num_bytes > largest:
            where = devices[0] if len(devices) == 1 else "any device"
            raise InvalidArgument(
                field_name, f"{num_bytes} bytes exceed the cap of {where} ({largest} bytes = "
                f"{self.cap_fraction:g} x total): it could never be granted")

    def _check_device(self, device: str | None) -> list[str]:
        if not device:
            return list(self._devices)
        if device not in self._devices:
            raise InvalidArgument("device", f"unknown device {device!r}; known: "
                                  f"{', '.join(self._devices)} (or empty for any)")
        return [device]

    @staticmethod
    def _check_holder(holder: Holder) -> None:
        if not holder.name or not holder.name.strip():
            raise InvalidArgument("holder.name", "a holder name is required (e.g. worker/smollm2)")
        limits.check_name("holder.name", holder.name)
        if holder.pid < 0:
            raise InvalidArgument("holder.pid", f"must not be negative, got {holder.pid}")

    def _fenced(self, lease_id: str, epoch: int) -> Lease:
        if not lease_id:
            raise InvalidArgument("lease_id", "is required")
        lease = self.lease(lease_id)
        if lease.expires_at <= self.clock():
            # Expired but not yet swept: it is expired all the same.
            self.expire_due()
            lease = self.lease(lease_id)  # raises FailedPrecondition
        if epoch != lease.epoch:
            raise FailedPrecondition(
                f"stale epoch {epoch} for lease {lease_id!r} (current {lease.epoch}): "
                "this holder must not use the lease's memory", reason="STALE_EPOCH")
        return lease

    # ---- requests --------------------------------------------------------
    def acquire(self, holder: Holder, num_bytes: int, purpose: Purpose, device: str | None = None,
                priority: int = 0, ttl_s: float = 0.0, wait: bool = True) -> Waiter:
        """Queue a request for a new lease and serve the queue. The returned
        waiter has `lease` set if it was granted at once; otherwise it stays
        queued until a later call settles it or `cancel` removes it. With
        wait=False a request that cannot be granted at once is not queued
        (the returned waiter is left unsettled and outside the queue)."""
        self._check_holder(holder)
        devices = self._check_device(device)
        self._check_bytes(num_bytes, devices)
        if not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
            raise InvalidArgument("priority", f"must be within {PRIORITY_RANGE}, got {priority}")
        if ttl_s < 0:
            raise InvalidArgument("ttl_ms", f"must not be negative, got {ttl_s}")
        waiter = Waiter(self._new_id(12), next(self._seq), holder, device or None,
                        num_bytes, purpose, priority, self.ttl.clamp(ttl_s), self.clock())
        return self._enqueue(waiter, wait)

    def resize(self, lease_id: str, epoch: int, new_bytes: int,
               wait: bool = True) -> Waiter | Lease:
        """Shrink (or keep) at once and return the lease; a growth is queued
        like an acquire (`wait` as there) and the waiter returned."""
        lease = self._fenced(lease_id, epoch)
        self._check_bytes(new_bytes, [lease.device])
        if any(waiter.lease_id == lease_id for waiter in self._queue):
            # One resize at a time: a growth waits for a fixed number of bytes.
            raise FailedPrecondition(
                f"lease {lease_id!r} already has a growth waiting in the queue; wait for it "
                "to be granted or to time out", reason="RESIZE_PENDING")
        if new_bytes <= lease.bytes:
            if new_bytes < lease.bytes:
                self._set_bytes(lease, new_bytes)
                self._pump()
            return self._leases[lease_id]
        waiter = Waiter(self._new_id(12), next(self._seq), lease.holder, lease.device,
                        new_bytes - lease.bytes, lease.purpose, lease.priority, lease.ttl_s,
                        self.clock(), lease_id=lease_id)
        return self._enqueue(waiter, wait)

    def release(self, lease_id: str, epoch: int) -> Lease:
        lease = self._fenced(lease_id, epoch)
        self._drop(lease)
        self._events.append(Event(EventKind.RELEASED, lease.device, lease=lease))
        log.debug("lease_released", lease_id=lease_id, device=lease.device, bytes=lease.bytes)
        self._pump()
        return lease

    def renew(self, lease_id: str, epoch: int) -> Lease:
        lease = self._fenced(lease_id, epoch)
        renewed = replace(lease, renewed_at=self.clock())
        self._store(renewed)
        return renewed

    def cancel(self, waiter: Waiter, reason: str = "cancelled") -> None:
        """Take a waiter out of the queue (its caller gave up or timed out).
        A waiter already settled is left as it is."""
        if waiter.lease is not None or waiter.error is not None:
            return
        index = bisect.bisect_left(self._queue_keys, waiter.sort_key)
        if index < len(self._queue) and self._queue[index] is waiter:
            del self._queue[index]
            del self._queue_keys[index]
            device = waiter.device or ""
            self._events.append(Event(EventKind.LEFT, device, waiter=waiter, reason=reason,
                                      waited_s=self.clock() - waiter.enqueued_at))
            log.info("waiter_left", waiter_id=waiter.waiter_id, holder=waiter.holder.name,
                     bytes=waiter.bytes, reason=reason)
            # The waiter may have been blocking those behind it.
            self._pump()

    def expire_due(self) -> list[Lease]:
        """Expire every lease not renewed within its TTL; serve the queue."""
        now = self.clock()
        due = [lease for lease in self._leases.values() if lease.expires_at <= now]
        for lease in due:
            self._expired[lease.lease_id] = lease  # first: a growth still queued fails as expired
            self._drop(lease)
            while len(self._expired) > EXPIRED_REMEMBERED:
                self._expired.popitem(last=False)
            self._events.append(Event(EventKind.EXPIRED, lease.device, lease=lease))
            log.warning("lease_expired", lease_id=lease.lease_id, holder=lease.holder.name,
                        pid=lease.holder.pid, device=lease.device, bytes=lease.bytes,
                        ttl_s=lease.ttl_s)
        if due:
            self._pump()
        return due

    def update_devices(self, memories: Iterable[DeviceMemory]) -> None:
        """New figures from the device source (foreign memory moves)."""
        for memory in memories:
            dev = self._devices.get(memory.device)
            if dev is not None and dev.memory != memory:
                dev.memory = memory
        self._pump()

    def pump(self) -> None:
        """Serve the queue again (after may_overtake's answer changed, or a
        pause ended)."""
        self._pump()

    def paused_for(self) -> float:
        """Seconds left before anything may be granted (0: not paused)."""
        return max(0.0, self.paused_until - self.clock()) if self.paused_until else 0.0

    # ---- settling --------------------------------------------------------
    def drain_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def drain_settled(self) -> list[Waiter]:
        settled, self._settled = self._settled, []
        return settled

    # ---- internals -------------------------------------------------------
    def _overdue(self, lease_id: str) -> bool:
        lease = self._leases.get(lease_id)
        return lease is not None and lease.expires_at <= self.clock()

    def _new_id(self, num_digits: int) -> str:
        return f"{self._ids.getrandbits(4 * num_digits):0{num_digits}x}"

    def _enqueue(self, waiter: Waiter, wait: bool) -> Waiter:
        index = bisect.bisect_right(self._queue_keys, waiter.sort_key)
        self._queue.insert(index, waiter)
        self._queue_keys.insert(index, waiter.sort_key)
        self._pump()
        if waiter.lease is None and waiter.error is None and not wait:
            index = bisect.bisect_left(self._queue_keys, waiter.sort_key)
            del self._queue[index]
            del self._queue_keys[index]
            self._pump()  # it may have blocked those behind it in that pass
        elif waiter.lease is None and waiter.error is None:
            self._events.append(Event(EventKind.QUEUED, waiter.device or "", waiter=waiter))
            log.info("waiter_queued", waiter_id=waiter.waiter_id, holder=waiter.holder.name,
                     device=waiter.device, bytes=waiter.bytes, priority=waiter.priority,
                     lease_id=waiter.lease_id, position=self._queue.index(waiter))
        return waiter

    def _pump(self) -> None:
        """Serve the queue from its head. A waiter that cannot be served
        blocks its devices for everyone behind it (no overtaking)."""
        if self.paused_until:
            if self.clock() < self.paused_until:
                return
            self.paused_until = 0.0
        blocked: set[str] = set()
        index = 0
        while index < len(self._queue):
            waiter = self._queue[index]
            if len(blocked) == len(self._devices) and not self.may_overtake(waiter):
                index += 1
                continue
            candidates = [waiter.device] if waiter.device else list(self._devices)
            if waiter.lease_id is not None and self._overdue(waiter.lease_id):
                index += 1  # its lease lapsed: the sweep expires it and fails the growth
                continue
            open_devices = [d for d in candidates if d not in blocked]
            if blocked and self.may_overtake(waiter):
                open_devices = candidates
            fitting = [d for d in open_devices if self.free_bytes(d) >= waiter.bytes]
            if not fitting:
                blocked.update(candidates)
                index += 1
                continue
            del self._queue[index]
            del self._queue_keys[index]
            # Any device: the one with the most room left.
            self._grant(waiter, max(fitting, key=self.free_bytes))

    def _grant(self, waiter: Waiter, device: str) -> None:
        assert self.free_bytes(device) >= waiter.bytes  # the invariant, checked where it is kept
        now = self.clock()
        if waiter.lease_id is None:
            self._epoch += 1
            lease = Lease(f"lease-{self._new_id(16)}", device, waiter.bytes, self._epoch,
                          waiter.ttl_s, waiter.holder, waiter.purpose, waiter.priority, now, now,
                          now)
            self._store(lease)
            self._events.append(Event(EventKind.GRANTED, device, lease=lease,
                                      waited_s=now - waiter.enqueued_at))
            log.debug("lease_granted", lease_id=lease.lease_id, holder=lease.holder.name,
                      device=device, bytes=lease.bytes, waited_s=now - waiter.enqueued_at)
        else:
            current = self._leases.get(waiter.lease_id)
            if current is None:  # released or expired while waiting; _drop settles those
                return
            lease = self._set_bytes(current, current.bytes + waiter.bytes)
        waiter.lease = lease
        self._settled.append(waiter)

    def _set_bytes(self, lease: Lease, new_bytes: int) -> Lease:
        resized = replace(lease, bytes=new_bytes, renewed_at=self.clock(), resized_at=self.clock())
        self._store(resized)
        self._events.append(Event(EventKind.RESIZED, lease.device, lease=resized,
                                  old_bytes=lease.bytes))
        log.debug("lease_resized", lease_id=lease.lease_id, device=lease.device,
                  old_bytes=lease.bytes, bytes=new_bytes)
        return resized

    def _store(self, lease: Lease) -> None:
        dev = self._devices[lease.device]
        old = dev.leases.get(lease.lease_id)
        dev.leased += lease.bytes - (old.bytes if old else 0)
        dev.leases[lease.lease_id] = lease
        self._leases[lease.lease_id] = lease

    def _drop(self, lease: Lease) -> None:
        dev = self._devices[lease.device]
        current = dev.leases.pop(lease.lease_id)
        dev.leased -= current.bytes
        del self._leases[lease.lease_id]
        # A growth still queued for this lease can never be served now.
        for index in range(len(self._queue) - 1, -1, -1):
            waiter = self._queue[index]
            if waiter.lease_id == lease.lease_id:
                del self._queue[index]
                del self._queue_keys[index]
                if lease.lease_id in self._expired:
                    waiter.error = FailedPrecondition(
                        f"lease {lease.lease_id!r} expired while the resize waited (not renewed "
                        "within its TTL): stop using it and acquire a new lease",
                        reason="LEASE_EXPIRED")
                else:
                    waiter.error = NotFound("lease", lease.lease_id,
                                            "it was released while the resize waited")
                self._settled.append(waiter)
