"""Keeping leases alive from a thread of their own.

A lease is renewed every third of its TTL. Renewed from the holder's event
loop, a renewal waits behind whatever that loop does: on a GPU worker
running 32 sessions the loop also streams every token, answers every RPC and
schedules every step, and a KV lease expired under load (TTL 10 s) while a
resize of it waited. Here each renewal is a blocking call on a channel of
its own, from a daemon thread that nothing else runs on: no step, graph
capture, copy or busy event loop delays it (the GIL is let go at least every
5 ms, and while the call waits on the network).

The holder hears back through callbacks: `on_renewed(sent_at)` from the
renewer's thread (it should only record the time), `on_lost(details)` on
the holder's event loop (admission says the lease is gone: stop using the
memory).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog

from lmx.v1 import admission_pb2 as pb
from lmx.v1 import admission_pb2_grpc
from services.admission.client import error_details
from services.common import transport

log = structlog.get_logger(__name__)

#: After a renewal that failed for another reason than the lease being
#: gone (admission unreachable, slow), the next try comes this soon.
RETRY_S = 0.5


@dataclass(eq=False)
class Held:
    """One lease being renewed; `cancel()` stops it."""

    lease: pb.Lease
    secret: str
    on_lost: Callable[[object], None] | None
    on_renewed: Callable[[float], None] | None
    next_at: float
    renewer: LeaseRenewer | None = field(default=None, repr=False)

    @property
    def period_s(self) -> float:
        return max(0.05, self.lease.ttl_ms / 3000)

    def cancel(self) -> None:
        if self.renewer is not None:
            self.renewer.drop(self)


class LeaseRenewer:
    def __init__(self, address: str, *, loop: asyncio.AbstractEventLoop | None = None):
        self.address = address
        self._loop = loop or asyncio.get_running_loop()
        self._held: list[Held] = []
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._closed = False
        self._channel = transport.channel(address)
        self._stub = admission_pb2_grpc.AdmissionServiceStub(self._channel)
        self._thread = threading.Thread(target=self._run, name="lmx-lease-renewer", daemon=True)
        self._thread.start()

    def hold(self, lease: pb.Lease, secret: str = "",
             on_lost: Callable[[object], None] | None = None,
             on_renewed: Callable[[float], None] | None = None) -> Held:
        """Renew `lease` every third of its TTL until cancelled, or until
        admission says it is gone (then `on_lost`, once)."""
        held = Held(lease, secret, on_lost, on_renewed, 0.0, self)
        held.next_at = time.monotonic() + held.period_s
        with self._lock:
            self._held.append(held)
        self._changed.set()
        return held

    def drop(self, held: Held) -> None:
        with self._lock:
            if held in self._held:
                self._held.remove(held)
        self._changed.set()

    def close(self) -> None:
        self._closed = True
        self._changed.set()
        self._thread.join(timeout=5.0)
        self._channel.close()

    # ---- the thread --------------------------------------------------------
    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                held = list(self._held)
            now = time.monotonic()
            for one in held:
                if one.next_at <= now and not self._closed:
                    self._renew(one)
            with self._lock:
                upcoming = min((h.next_at for h in self._held), default=None)
            timeout = None if upcoming is None else max(0.0, upcoming - time.monotonic())
            self._changed.wait(timeout)
            self._changed.clear()

    def _renew(self, held: Held) -> None:
        lease = held.lease
        sent_at = time.monotonic()
        try:
            self._stub.Renew(pb.RenewRequest(lease_id=lease.lease_id, epoch=lease.epoch,
                                             secret=held.secret), timeout=held.period_s)
        except grpc.RpcError as exc:
            with self._lock:
                current = held in self._held
            if not current:
                return           # cancelled meanwhile: nobody is told anything
            if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                details = error_details(exc)
                log.warning("lease_lost", lease_id=lease.lease_id, reason=details.reason,
                            message=details.message)
                self.drop(held)
                if held.on_lost is not None:
                    self._call_soon(held.on_lost, details)
                return
            log.warning("lease_renew_failed", lease_id=lease.lease_id, code=exc.code().name)
            held.next_at = time.monotonic() + min(RETRY_S, held.period_s)
            return
        held.next_at = sent_at + held.period_s
        if held.on_renewed is not None:
            held.on_renewed(sent_at)

    def _call_soon(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:      # the loop is closed: the holder is gone
            pass
