"""The admission core's asynchronous side: callers wait for grants here, and
two background tasks keep the ledger current (lease expiry, device figures).

The ledger is only ever touched from the event loop's thread, one call at a
time, so its invariant needs no lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from services.admission.devices import DeviceSource
from services.admission.events import EventBus, Published
from services.admission.secret_book import SecretBook
from services.admission.ledger import (
    DeviceView,
    Event,
    EventKind,
    Holder,
    Lease,
    Ledger,
    Purpose,
    Waiter,
)
from services.admission.reclaim import Activity, Reclaim, Reclaimer
from services.admission.registry import WorkerRecord, WorkerRegistry
from services.common.errors import CapacityExhausted, InvalidArgument, LmxError, Shortfall

log = structlog.get_logger(__name__)

#: Excess over a holder's leases is reported in steps of this size.
OVER_LEASE_STEP = 32 << 20


@dataclass(frozen=True, slots=True)
class Snapshot:
    devices: list[DeviceView]
    leases: list[Lease]
    waiters: list[Waiter]
    workers: list[WorkerRecord]
    reclaims: list[Reclaim]
    now: float


class Broker:
    def __init__(self, ledger: Ledger, source: DeviceSource, *, max_wait_s: float = 300.0,
                 sweep_interval_s: float = 0.1, poll_interval_s: float = 1.0,
                 bus: EventBus | None = None, reclaim_deadline_s: float = 5.0,
                 min_resident_s: float = 0.0):
        self.ledger = ledger
        self.reclaimer = Reclaimer(ledger, reclaim_deadline_s, min_resident_s=min_resident_s)
        self.source = source
        self.bus = bus or EventBus()
        self.registry = WorkerRegistry(ledger.clock, max_ttl_s=ledger.ttl.max_s)
        self.max_wait_s = max_wait_s
        self.sweep_interval_s = sweep_interval_s
        self.poll_interval_s = poll_interval_s
        self._over_lease: dict[str, dict[int, int]] = {}
        #: Secrets of the leases acquired with one (services/admission/secret_book.py).
        self.secrets = SecretBook("lease", "acquired")
        self._waiter_secrets: dict[Waiter, str] = {}
        self._futures: dict[Waiter, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self._clock = ledger.clock

    # ---- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="lease-expiry"))
        if any(view.memory.source == "nvml" for view in self.ledger.devices()):
            self._tasks.append(asyncio.create_task(self._poll_loop(), name="device-poll"))

    def drain(self) -> None:
        self.bus.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.bus.close()
        self.source.close()

    # ---- requests --------------------------------------------------------
    async def acquire(self, holder: Holder, num_bytes: int, purpose: Purpose, *,
                      device: str | None = None, priority: int = 0, ttl_s: float = 0.0,
                      wait_s: float = 0.0, secret: str = "") -> Lease:
        self._check_wait(wait_s)
        self.secrets.validate(secret)
        paused = self.ledger.paused_for()
        if paused and wait_s <= 0:
            raise CapacityExhausted(
                f"admission restarted: it grants nothing for {paused:.1f} s more, while the "
                "holders of its previous run give their memory up; retry then, or wait (wait_ms)",
                Shortfall(device or "", num_bytes, 0), paused)
        waiter = self.ledger.acquire(holder, num_bytes, purpose, device, priority, ttl_s,
                                     wait=wait_s > 0)
        if secret:
            # Remembered when the grant is settled, before its events go out
            # (_publish): no one who sees the lease can touch it first.
            self._waiter_secrets[waiter] = secret
        try:
            return await self._settle(waiter, wait_s)
        finally:
            self._waiter_secrets.pop(waiter, None)

    async def resize(self, lease_id: str, epoch: int, num_bytes: int, *,
                     wait_s: float = 0.0, secret: str = "") -> Lease:
        self._check_wait(wait_s)
        self.secrets.check(lease_id, secret)
        try:
            result = self.ledger.resize(lease_id, epoch, num_bytes, wait=wait_s > 0)
        except LmxError:
            self._publish()
            raise
        if isinstance(result, Lease):
            self._publish()
            return result
        return await self._settle(result, wait_s)

    def release(self, lease_id: str, epoch: int, secret: str = "") -> Lease:
        self.secrets.check(lease_id, secret)
        try:
            return self.ledger.release(lease_id, epoch)
        finally:  # also when it failed because the lease just expired
            self._publish()

    def renew(self, lease_id: str, epoch: int, secret: str = "") -> Lease:
        self.secrets.check(lease_id, secret)
        try:
            return self.ledger.renew(lease_id, epoch)
        finally:
            self._publish()

    def snapshot(self) -> Snapshot:
        self.ledger.expire_due()
        self._publish()
        return Snapshot(self.ledger.devices(), self.ledger.leases(), self.ledger.waiters(),
                        self.registry.workers(), self.reclaimer.reclaims(), self._clock())

    def answer_reclaim(self, reclaim_id: str, freed_bytes: int, detail: str,
                       secret: str = "") -> Reclaim:
        """The holder's answer: only with the secret of the lease that was
        asked, if it was acquired with one and is still held (a holder often
        answers after giving the lease back: then anyone may say so)."""
        lease_id = self.reclaimer.ask(reclaim_id).lease.lease_id
        if self.ledger.holds(lease_id):
            self.secrets.check(lease_id, secret)
        answered = self.reclaimer.answer(reclaim_id, freed_bytes, detail)
        self.bus.publish(Event(EventKind.RECLAIM_ANSWERED, answered.device, lease=answered.lease,
                               detail=answered))
        self._publish()   # the next stage may start
        return answered

    def report_activity(self, activity: Activity, secret: str = "") -> None:
        self.registry.check(activity.worker_id, secret)
        device = next((w.device for w in self.registry.workers()
                       if w.worker_id == activity.worker_id), "")
        log.info("worker_activity", kind=activity.kind, worker_id=activity.worker_id,
                 model=activity.model, session_id=activity.session_id, bytes=activity.bytes,
                 seconds=round(activity.seconds, 4), reason=activity.reason)
        self.bus.publish(Event(EventKind.ACTIVITY, device, detail=activity))

    def watch(self) -> AsyncIterator[Published]:
        return self.bus.subscribe()

    # ---- internals -------------------------------------------------------
    @staticmethod
    def _check_wait(wait_s: float) -> None:
        if wait_s < 0:
            raise InvalidArgument("wait_ms", f"must not be negative, got {wait_s * 1000:.0f}")

    async def _settle(self, waiter: Waiter, wait_s: float) -> Lease:
        self._publish()
        if waiter.lease is None and waiter.error is None and wait_s > 0:
            future = asyncio.get_running_loop().create_future()
            self._futures[waiter] = future
            try:
                async with asyncio.timeout(min(wait_s, self.max_wait_s)):
                    await future
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                # The caller went away: give back what may have been granted
                # meanwhile, or leave the queue.
                granted = waiter.lease
                if granted is not None and waiter.lease_id is None:
                    self.ledger.release(granted.lease_id, granted.epoch)
                elif granted is not None and self.ledger.holds(granted.lease_id):
                    current = self.ledger.lease(granted.lease_id)
                    try:
                        self.ledger.resize(current.lease_id, current.epoch,
                                           current.bytes - waiter.bytes)
                    except LmxError as exc:  # the caller is gone either way
                        log.warning("resize_rollback_failed", lease_id=current.lease_id,
                                    error=exc.message)
                self.ledger.cancel(waiter, "cancelled")
                self._publish()
                raise
            finally:
                self._futures.pop(waiter, None)
        if waiter.lease is not None:
            return waiter.lease
        if waiter.error is not None:
            raise waiter.error
        shortfall = self.ledger.shortfall(waiter)
        retry_after_s = self.ledger.retry_after_s(waiter)
        self.ledger.cancel(waiter, "timed_out")  # a no-op for one never queued (wait 0)
        self._publish()
        what = f"grow lease {waiter.lease_id} by" if waiter.lease_id else "grant"
        raise CapacityExhausted(
            f"cannot {what} {shortfall.requested_bytes} bytes on {shortfall.device}: "
            f"{shortfall.free_bytes} free under the cap, {shortfall.missing_bytes} missing; "
            f"retry in {retry_after_s:.1f}s or wait longer (wait_ms)",
            shortfall, retry_after_s)

    def _publish(self) -> None:
        for waiter in self.ledger.drain_settled():
            secret = self._waiter_secrets.pop(waiter, "")
            if secret and waiter.lease is not None:
                self.secrets.remember(waiter.lease.lease_id, secret)
            future = self._futures.get(waiter)
            if future is not None and not future.done():
                future.set_result(None)
        for event in self.ledger.drain_events():
            self.bus.publish(event)
        asks = self.reclaimer.plan()
        for ask in asks:
            self.bus.publish(Event(EventKind.RECLAIM_REQUESTED, ask.device, lease=ask.lease,
                                   detail=ask))
        if asks:  # a holder asked for its weights may now grow past the queue's head
            self.ledger.pump()
            self._publish()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            self.ledger.expire_due()
            if self.ledger.paused_until and not self.ledger.paused_for():
                log.info("restart_grace_over")
                self.ledger.pump()
            self.registry.expire_due()
            self.secrets.keep_only(lease.lease_id for lease in self.ledger.leases())
            for ask in self.reclaimer.overdue():
                self.bus.publish(Event(EventKind.RECLAIM_OVERDUE, ask.device, lease=ask.lease,
                                       detail=ask))
            self._publish()

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                memories = await asyncio.to_thread(self.source.read, self.ledger.accounted_by_pid())
            except Exception as exc:  # noqa: BLE001 - keep the last figures, say so
                log.warning("device_poll_failed", error=str(exc))
                continue
            self._report_over_lease(memories)
            self.ledger.update_devices(memories)
            self._publish()

    def _report_over_lease(self, memories) -> None:
        """A log line when a holder's process uses more than its leases (by
        OVER_LEASE_STEP steps): that excess counts as foreign and can keep a
        waiter, even the holder's own, from ever fitting."""
        for memory in memories:
            steps = {pid: excess // OVER_LEASE_STEP for pid, excess in memory.over_lease
                     if excess >= OVER_LEASE_STEP}
            if steps != self._over_lease.get(memory.device, {}):
                self._over_lease[memory.device] = steps
                holders = {lease.holder.pid: lease.holder.name for lease in self.ledger.leases()}
                log.warning("holders_over_lease", device=memory.device,
                            processes=[{"pid": pid, "holder": holders.get(pid, ""),
                                        "excess_bytes": excess}
                                       for pid, excess in memory.over_lease
                                       if pid in steps],
                            foreign_bytes=memory.foreign_bytes)
