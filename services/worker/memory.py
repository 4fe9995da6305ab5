"""Where the worker's device memory comes from. Two implementations:

- AdmissionMemory: leases from the admission service: one for the weights
  and fixed overhead, one for KV that grows and shrinks a chunk at a time.
  Both are renewed from a thread of their own (services/admission/renewer.py),
  so that no step, capture or busy event loop lets one expire.
- FixedMemory: a local byte budget, for running a worker without admission
  (tests of the engine, `lmx chat --standalone`).

The worker allocates KV tensors only after `set_kv_bytes` returned, and frees
them before shrinking, so it never holds memory beyond its leases.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Protocol

import grpc
import structlog

from lmx.v1 import admission_pb2 as pb
from services.admission.client import AdmissionClient, error_details
from services.admission.renewer import LeaseRenewer
from services.common.errors import Aborted, CapacityExhausted, FailedPrecondition, Shortfall

log = structlog.get_logger(__name__)


class Memory(Protocol):
    #: Called with the bytes granted in all, after every change (the worker
    #: caps its CUDA allocator there).
    on_change: Callable[[int], None] | None

    async def acquire_base(self, num_bytes: int, wait_s: float | None = None) -> None:
        """Weights + fixed overhead; waits until granted (wait_s: at most that
        long, then CapacityExhausted with admission's retry hint)."""
        ...

    async def resize_base(self, num_bytes: int, wait_forever: bool = False,
                          wait_s: float = 60.0) -> None:
        """Make the weights lease num_bytes (a growth waits up to wait_s for
        admission to reclaim memory from others; with wait_forever it waits
        in admission's queue until granted)."""
        ...

    async def release_base(self) -> None:
        """Give the weights' memory back (the model went to sleep)."""
        ...

    async def set_kv_bytes(self, num_bytes: int, wait_s: float) -> None:
        """Make the KV lease exactly num_bytes; raises CapacityExhausted."""
        ...

    def granted(self) -> dict[str, int]:
        """Bytes held now, by purpose ("weights", "kv")."""
        ...

    def fresh(self) -> bool:
        """Every lease held was confirmed less than its TTL ago (a worker
        frozen past it must not touch the memory before `confirm`)."""
        ...

    async def confirm(self) -> bool:
        """Renew the leases now: False if one is gone (its memory may be
        granted elsewhere: stop using it); True if all are held, or admission
        cannot be reached (then nobody can be granted them either)."""
        ...

    def loss_handled(self) -> None:
        """The worker stopped using the memory of its lost leases (it gave it
        all up): `fresh` and `confirm` stop failing for them."""
        ...

    async def close(self) -> None: ...


class FixedMemory:
    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._held = {"weights": 0, "kv": 0}
        self.on_change: Callable[[int], None] | None = None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(sum(self._held.values()))

    async def acquire_base(self, num_bytes: int, wait_s: float | None = None) -> None:
        if num_bytes > self.capacity_bytes:
            raise CapacityExhausted(f"the model needs {num_bytes} bytes, the budget is "
                                    f"{self.capacity_bytes}",
                                    Shortfall("local", num_bytes, self.capacity_bytes), 1.0)
        self._held["weights"] = num_bytes
        self._changed()

    async def resize_base(self, num_bytes: int, wait_forever: bool = False,
                          wait_s: float = 60.0) -> None:
        await self.acquire_base(num_bytes)

    async def release_base(self) -> None:
        self._held["weights"] = 0
        self._changed()

    async def set_kv_bytes(self, num_bytes: int, wait_s: float) -> None:
        free = self.capacity_bytes - self._held["weights"]
        if num_bytes > free:
            raise CapacityExhausted(f"KV needs {num_bytes} bytes, {free} left in the budget",
                                    Shortfall("local", num_bytes, free), 1.0)
        self._held["kv"] = num_bytes
        self._changed()

    def granted(self) -> dict[str, int]:
        return dict(self._held)

    def fresh(self) -> bool:
        return True

    async def confirm(self) -> bool:
        return True

    def loss_handled(self) -> None:
        pass

    async def close(self) -> None:
        self._held = {"weights": 0, "kv": 0}


#: Admission could not be reached in time (restarting, or gone): the
#: request that needed the memory is aborted, to be retried.
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _unreachable(exc: grpc.aio.AioRpcError, what: str) -> Aborted:
    return Aborted(f"{what}: admission could not be reached ({exc.code().name}); retry",
                   reason="ADMISSION_UNAVAILABLE")


def _capacity_error(exc: grpc.aio.AioRpcError, what: str) -> CapacityExhausted:
    details = error_details(exc)
    meta = details.metadata or {}
    shortfall = Shortfall(meta.get("device", "?"), int(meta.get("requested_bytes", 0)),
                          int(meta.get("free_bytes", 0)))
    return CapacityExhausted(f"{what}: admission refused: {details.message}", shortfall,
                             details.retry_after_s or 1.0)


class AdmissionMemory:
    def __init__(self, client: AdmissionClient, holder: str, device: str, *,
                 ttl_s: float = 10.0, on_lost: Callable[[str], None] | None = None,
                 priority: int = 0):
        self.client = client
        self.holder = holder
        self.device = device
        self.ttl_s = ttl_s
        self.priority = priority
        self.on_lost = on_lost
        self._leases: dict[str, pb.Lease] = {}
        self._keepers: dict = {}            # purpose -> renewer.Held
        self._renewer: LeaseRenewer | None = None
        #: Per purpose: time.monotonic() until which the lease is surely held
        #: (its TTL from when its last grant or renewal was sent).
        self._valid_until: dict[str, float] = {}
        #: Leases found gone whose memory the worker has not given up yet:
        #: until it has (loss_handled) or the purpose is granted again, no
        #: step may run.
        self._lost_purposes: set[str] = set()
        self.pid = os.getpid()
        self.on_change: Callable[[int], None] | None = None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(sum(lease.bytes for lease in self._leases.values()))

    def lease_ids(self) -> list[str]:
        return [lease.lease_id for lease in self._leases.values()]

    def purpose_of(self, lease_id: str) -> str | None:
        """"weights" or "kv" for a lease of this worker, else None."""
        return next((purpose for purpose, lease in self._leases.items()
                     if lease.lease_id == lease_id), None)

    def granted(self) -> dict[str, int]:
        return {purpose: lease.bytes for purpose, lease in self._leases.items()}

    def _keep(self, purpose: str, lease: pb.Lease, sent_at: float) -> None:
        self._leases[purpose] = lease
        self._valid_until[purpose] = sent_at + lease.ttl_ms / 1000
        self._lost_purposes.discard(purpose)
        self._changed()
        old = self._keepers.pop(purpose, None)
        if old is not None:
            old.cancel()

        def renewed(at: float) -> None:     # on the renewer's thread: a float stored
            if self._leases.get(purpose) is lease:
                self._valid_until[purpose] = at + lease.ttl_ms / 1000

        def lost(details) -> None:          # on this event loop
            self._lost(purpose, lease, details.reason)

        if self._renewer is None:
            self._renewer = LeaseRenewer(self.client.address)
        self._keepers[purpose] = self._renewer.hold(
            lease, self.client.lease_secret(lease.lease_id), on_lost=lost, on_renewed=renewed)

    def _lost(self, purpose: str, lease: pb.Lease, reason: str) -> None:
        """Admission says the lease is gone (expired while this worker was
        frozen, or admission restarted): forget it and tell the worker, which
        stops using the memory."""
        if self._leases.get(purpose) is not lease:
            return
        self._leases.pop(purpose, None)
        self._valid_until.pop(purpose, None)
        self._lost_purposes.add(purpose)
        keeper = self._keepers.pop(purpose, None)
        if keeper is not None:
            keeper.cancel()
        self._changed()
        log.error("worker_lease_lost", purpose=purpose, lease_id=lease.lease_id, reason=reason)
        if self.on_lost is not None:
            self.on_lost(purpose)

    def fresh(self) -> bool:
        now = time.monotonic()
        return not self._lost_purposes and all(until > now
                                               for until in self._valid_until.values())

    def loss_handled(self) -> None:
        self._lost_purposes.clear()

    async def confirm(self) -> bool:
        if self._lost_purposes:
            return False
        now = time.monotonic()
        for purpose, until in list(self._valid_until.items()):
            lease = self._leases.get(purpose)
            if until > now or lease is None:
                continue
            sent_at = time.monotonic()
            try:
                await self.client.renew(lease)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.NOT_FOUND):
                    self._lost(purpose, lease, error_details(exc).reason or exc.code().name)
                    return False
                log.warning("worker_lease_unconfirmed", purpose=purpose, code=exc.code().name)
                continue
            if self._leases.get(purpose) is lease:
                self._valid_until[purpose] = sent_at + lease.ttl_ms / 1000
        return True

    async def acquire_base(self, num_bytes: int, wait_s: float | None = None) -> None:
        """Wait in admission's queue (visible in its status) until granted:
        for ever at start (wait_s None), at most wait_s for a request."""
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            sent_at = time.monotonic()
            wait = 60.0 if deadline is None else max(0.0, deadline - sent_at)
            try:
                lease = await self.client.acquire(self.holder, num_bytes, "weights",
                                                  device=self.device, wait_s=wait,
                                                  ttl_s=self.ttl_s, pid=self.pid,
                                                  priority=self.priority)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in UNREACHABLE:
                    raise _unreachable(exc, "acquiring the weights' memory") from None
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                if deadline is not None and time.monotonic() >= deadline - 0.05:
                    raise _capacity_error(exc, f"waking the model (waited {wait_s:g} s, "
                                               "--wake-wait-s)") from None
                log.warning("worker_waiting_for_memory", bytes=num_bytes, device=self.device,
                            message=exc.details())
                continue
            self._keep("weights", lease, sent_at)
            log.info("worker_lease_granted", purpose="weights", bytes=num_bytes,
                     lease_id=lease.lease_id)
            return

    async def resize_base(self, num_bytes: int, wait_forever: bool = False,
                          wait_s: float = 60.0) -> None:
        while True:
            lease = self._leases.get("weights")
            if lease is None:
                raise FailedPrecondition("the weights lease is gone", reason="LEASE_LOST")
            sent_at = time.monotonic()
            try:
                self._keep("weights", await self.client.resize(lease, num_bytes, wait_s=wait_s),
                           sent_at)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in UNREACHABLE:
                    raise _unreachable(exc, "resizing the weights' lease") from None
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                if not wait_forever:
                    raise _capacity_error(exc, "growing the weights lease") from None
                log.warning("worker_waiting_for_memory", bytes=num_bytes, device=self.device,
                            message=exc.details())

    async def release_base(self) -> None:
        lease = self._leases.pop("weights", None)
        if lease is None:
            return
        self._valid_until.pop("weights", None)
        self._keepers.pop("weights").cancel()
        self._changed()
        try:
            await self.client.release(lease)
        except grpc.aio.AioRpcError as exc:   # gone already (expired): nothing held either way
            log.warning("worker_release_failed", lease_id=lease.lease_id, code=exc.code().name)

    async def set_kv_bytes(self, num_bytes: int, wait_s: float) -> None:
        lease = self._leases.get("kv")
        try:
            if num_bytes == 0:
                if lease is not None:
                    self._keepers.pop("kv").cancel()
                    del self._leases["kv"]
                    self._valid_until.pop("kv", None)
                    self._changed()
                    await self.client.release(lease)
                return
            sent_at = time.monotonic()
            if lease is None:
                lease = await self.client.acquire(self.holder, num_bytes, "kv",
                                                  device=self.device, wait_s=wait_s,
                                                  ttl_s=self.ttl_s, pid=self.pid,
                                                  priority=self.priority)
            else:
                lease = await self.client.resize(lease, num_bytes, wait_s=wait_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise _capacity_error(exc, f"growing KV to {num_bytes} bytes") from None
            if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                if lease is not None:
                    self._lost("kv", lease, error_details(exc).reason or exc.code().name)
                raise FailedPrecondition(f"the KV lease is gone: {exc.details()}",
                                         reason="LEASE_LOST") from None
            if exc.code() in UNREACHABLE:
                raise _unreachable(exc, f"growing KV to {num_bytes} bytes") from None
            raise
        self._keep("kv", lease, sent_at)

    async def close(self) -> None:
        for held in self._keepers.values():
            held.cancel()
        self._keepers.clear()
        if self._renewer is not None:
            await asyncio.to_thread(self._renewer.close)
            self._renewer = None
        for lease in self._leases.values():
            try:
                await self.client.release(lease)
            except grpc.aio.AioRpcError as exc:
                log.warning("worker_release_failed", lease_id=lease.lease_id,
                            code=exc.code().name)
        self._leases.clear()
        self._valid_until.clear()
