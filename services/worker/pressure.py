"""What a worker does when admission asks it for memory back, and how it
wakes again. No grpc: the app feeds it reclaim requests and sends its answers.

- KV: park idle sessions (not generating, not moving, holding KV) to the
  kvstore, least recently used first, until the KV lease has shrunk by the
  bytes asked or no idle session is left.
- Weights: put the model to sleep: refused when the model is pinned
  (--pin-model). Generations in flight finish first ("draining": new
  requests wait meanwhile), for at most --max-turn-s: past it they pause
  between two steps (their KV given back, recomputed when they go on) and
  go on once the model wakes again, so that no model holds the device
  against another's waiting request longer than that; then every session
  with KV is parked, the weights
  go to host memory (services/worker/sleep.py) and the weights lease shrinks
  to what stays on the device (the CUDA context; released on the CPU). The
  worker is then "asleep".
- Serving through a drain (--min-awake-s, a quantum): a model woken less
  than that long ago and asked to sleep goes on taking new requests while it
  has work, and sleeps once the quantum is over or it has been idle for
  IDLE_GRACE_S. Its agents' next turns then run before the swap instead of
  after two more swaps; the waiter for its memory waits up to the quantum
  longer.
- Wake: the next request (Generate, RestoreSession) waits in admission's
  queue for the weights lease again, copies the weights back and goes on;
  its sessions come back from the kvstore as they are used. The client's
  stream simply starts later.

- A lost lease (it expired while the worker was frozen, or admission
  restarted and forgot it): the memory may be someone else's now. Every
  generation ends at once with ABORTED (retryable; each session keeps the
  tokens already in its caller's stream), no step runs until the memory is
  given up (Memory.fresh), every session's KV is parked (or dropped, to be
  recomputed from its tokens, if it cannot be), the weights go to host
  memory and every lease still held is released: the model is asleep, and
  the next request acquires its memory again like any wake.

Transitions run one at a time (a lock); a request that arrives while the
model is going to sleep waits for it, then wakes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog

from services.common.errors import Aborted, CapacityExhausted, LmxError, Shortfall
from services.worker.engine import Engine
from services.worker.memory import Memory
from services.worker.parking import Parking
from services.worker.sessions import SessionTable
from services.worker.sleep import StreamedStash, WeightStash

log = structlog.get_logger(__name__)

#: Longest a worker asked to sleep waits for its sessions to stop generating.
DRAIN_LIMIT_S = 300.0
#: Serving through a drain, the model sleeps once it has had no work this long
#: (an agent's next turn usually follows its last within milliseconds).
IDLE_GRACE_S = 0.25
#: The retry hint of a request that waited too long for a wake.
WAKE_RETRY_S = 5.0


@dataclass(frozen=True, slots=True)
class Relief:
    freed_bytes: int
    detail: str


class PressureRelief:
    def __init__(self, engine: Engine, sessions: SessionTable, parking: Parking,
                 memory: Memory, stash: WeightStash | StreamedStash, *, base_bytes: int,
                 keep_bytes: int = 0,
                 residue: Callable[[], int] = lambda: 0, pinned: bool = False,
                 min_awake_s: float = 0.0,
                 on_activity: Callable[..., None] | None = None,
                 on_state: Callable[[str], None] | None = None,
                 wake_wait_s: float = 30.0, max_turn_s: float = DRAIN_LIMIT_S):
        self.engine = engine
        #: Asked to sleep, the longest the model goes on generating for the
        #: sessions it serves before it pauses them (--max-turn-s): another
        #: model's waiting request gets the device within it.
        self.max_turn_s = max_turn_s
        #: How long a request waits for the memory to wake the model before
        #: RESOURCE_EXHAUSTED with a retry hint (--wake-wait-s).
        self.wake_wait_s = wake_wait_s
        self.sessions = sessions
        self.parking = parking
        self.memory = memory
        self.stash = stash
        self.base_bytes = base_bytes
        #: Bytes the weights lease keeps while asleep: what stays on the device
        #: (the CUDA context); 0 releases the lease.
        self.keep_bytes = keep_bytes
        #: What the allocator still holds once the weights left (cuBLAS's
        #: workspace, 32 MiB on a Hopper GPU): also kept leased while asleep,
        #: or admission would count it as foreign memory.
        self.residue = residue
        self.pinned = pinned
        #: The quantum: asked to sleep less than this long after waking, the
        #: model keeps taking requests while it has work.
        self.min_awake_s = min_awake_s
        self._awake_since = time.monotonic()
        #: Requests past the wake gate that the engine does not count yet.
        self._entering = 0
        self.on_activity = on_activity
        self.on_state = on_state
        self.state = "ready"          # ready | draining | sleeping | asleep | waking
        self._state_changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._self_relief: asyncio.Task | None = None
        self._resuming: asyncio.Task | None = None
        self._urgent = False      # an urgent sleep is under way
        self._giving_up: asyncio.Task | None = None

    # ---- the worker's own shortage ----
    def kv_short(self, num_bytes: int) -> bool:
        """A request of this worker waits for KV memory: park this worker's
        own idle sessions (least recently used first) so that it can use
        their blocks, while admission asks the other holders. True while
        that is under way."""
        if self._self_relief is not None and not self._self_relief.done():
            return True
        if self.parking.link is None or not self.idle_sessions():
            return False
        self._self_relief = asyncio.create_task(self._relieve_self(num_bytes),
                                                name="kv-self-relief")
        return True

    async def _relieve_self(self, num_bytes: int) -> None:
        try:
            pool = self.engine.pool
            block_bytes = pool.block_size * self.engine.loaded.kv_shape.bytes_per_token
            free_before = pool.num_free_blocks
            for session in self.idle_sessions():
                await self.parking.park(session, reason="kv short")
                if (pool.num_free_blocks - free_before) * block_bytes >= num_bytes:
                    break
        except LmxError as exc:
            log.info("kv_self_relief_stopped", error=exc.message)

    # ---- KV ----
    def idle_sessions(self) -> list:
        """Sessions whose KV could be parked now, least recently used first."""
        candidates = [s for s in self.sessions.all()
                      if not s.busy and not s.moving and not s.entering
                      and not s.parked_entry
                      and self.engine.pool.length(s.session_id) > 0]
        return sorted(candidates, key=lambda s: s.last_used)

    async def park_idle(self, wanted_bytes: int, reason: str) -> Relief:
        if self.parking.link is None:
            return Relief(0, "parking is disabled on this worker (--kvstore none)")
        before = self._held("kv")
        parked = 0
        for session in self.idle_sessions():
            if before - self._held("kv") >= wanted_bytes:
                break
            try:
                await self.parking.park(session, reason=reason)
            except LmxError as exc:     # became busy, kvstore full...: try the next
                log.info("reclaim_park_skipped", session_id=session.session_id, error=exc.message)
                continue
            parked += 1
            await self.engine.wait_settled(timeout_s=5.0)
        freed = max(0, before - self._held("kv"))
        detail = (f"parked {parked} idle session(s)" if parked else "no idle session to park")
        return Relief(freed, detail)

    # ---- weights ----
    async def sleep(self, reason: str, urgent: bool = False) -> Relief:
        """Put the model to sleep. Sessions generating are not interrupted:
        the worker drains (new requests wait) until they finish, then
        sleeps; the waiting requests wake it again, queued in admission
        behind whoever asked. `urgent` (the memory is for a holder of a
        higher priority): generations in flight are not waited for but
        paused between two steps (their KV given back, recomputed later),
        and once asleep the model asks for its memory again at once, so
        that they resume, their streams only later, when the higher
        priority has what it needs."""
        if self.pinned:
            return Relief(0, "the model is pinned (--pin-model): it never sleeps")
        async with self._lock:
            if self.state != "ready":
                return Relief(0, f"the model is {self.state}")
            cannot = self._cannot_sleep()
            if cannot:
                return Relief(0, cannot)
            self._set_state("draining")
            started = time.monotonic()
            deadline = started + DRAIN_LIMIT_S
            idle_since: float | None = None
            paused = urgent
            if urgent:
                self._urgent = True          # no quantum: nothing new is let in
                await self.engine.pause()
            while not paused:
                now = time.monotonic()
                if self._busy():
                    idle_since = None
                    if now >= started + self.max_turn_s:
                        # The turn is over: generations that would hold the
                        # device past it pause between two steps, their KV
                        # given back, and go on once the model wakes again.
                        log.info("turn_over", max_turn_s=self.max_turn_s, reason=reason)
                        self._urgent = True
                        await self.engine.pause()
                        paused = True
                        break
                else:
                    idle_since = now if idle_since is None else idle_since
                    if not self._serving_through() or now - idle_since >= IDLE_GRACE_S:
                        break
                if now > deadline:
                    self._set_state("ready")
                    return Relief(0, f"sessions kept generating for {DRAIN_LIMIT_S:g}s")
                await asyncio.sleep(0.01)
            self._set_state("sleeping")
            try:
                before = sum(self.memory.granted().values())
                self.base_bytes = self._held("weights") or self.base_bytes
                for session in self.idle_sessions():
                    await self.parking.park(session, reason=reason)
                await self.engine.wait_settled(timeout_s=10.0)
                if self._busy(paused_ok=paused) or self.engine.pool.usage().num_used_blocks:
                    raise LmxError("a request came in while its sessions were parked")
                moved = await asyncio.to_thread(self.stash.sleep)
                keep = self.keep_bytes + self.residue() if self.keep_bytes else 0
                if keep:
                    await self.memory.resize_base(keep)
                else:
                    await self.memory.release_base()
            except BaseException as exc:
                if self.stash.asleep:
                    await asyncio.to_thread(self.stash.wake)
                self.engine.resume()
                self._urgent = False
                self._set_state("ready")
                if isinstance(exc, LmxError):
                    return Relief(0, f"could not sleep: {exc.message}")
                raise
            self._urgent = False
            self._set_state("asleep")
            freed = max(0, before - sum(self.memory.granted().values()))
            self._activity("model_asleep", "", moved.num_bytes, moved.seconds, reason)
            if self.engine.paused:
                # Paused generations have no request at the wake gate to
                # wake the model for them: ask for the memory now (queued in
                # admission behind the higher priority).
                self._resuming = asyncio.create_task(self._resume_paused(), name="resume")
            return Relief(freed, f"model asleep ({moved.num_bytes} bytes of weights to host "
                                 "memory)")

    @asynccontextmanager
    async def entry(self) -> AsyncIterator[None]:
        """Around a request's way in, from the wake gate until the engine (or
        a restore under way) counts it busy: awake, and busy meanwhile, so
        that a drain does not put the model to sleep under it."""
        await self.ensure_awake()
        self._entering += 1
        try:
            yield
        finally:
            self._entering -= 1

    def _serving_through(self) -> bool:
        return (self.state == "draining" and not self._urgent
                and time.monotonic() < self._awake_since + self.min_awake_s)

    # ---- a lost lease ----
    def lease_lost(self, purpose: str) -> None:
        """Admission no longer holds one of this worker's leases: stop every
        generation now, then give all the device memory up (in the
        background); requests wait meanwhile and wake the model after."""
        aborted = self.engine.abort_all(Aborted(
            f"this worker's {purpose} lease was lost (it expired, or admission restarted); "
            "retry", reason="LEASE_LOST"))
        log.warning("worker_giving_up_memory", purpose=purpose, aborted=aborted)
        if self._giving_up is None or self._giving_up.done():
            self._giving_up = asyncio.create_task(self._give_up(purpose), name="give-up")

    async def _give_up(self, purpose: str) -> None:
        async with self._lock:
            try:
                # Anything that came in while the lock was held ends too.
                self.engine.abort_all(Aborted(
                    f"this worker's {purpose} lease was lost; retry", reason="LEASE_LOST"))
                if self.state != "asleep":
                    self._set_state("sleeping")
                    for session in self.sessions.all():
                        if session.busy or session.moving or session.parked_entry:
                            continue
                        if not self.engine.pool.length(session.session_id):
                            continue
                        try:
                            await self.parking.park(session, reason=f"{purpose} lease lost")
                        except LmxError as exc:
                            # No kvstore, or it is full: the context is
                            # recomputed from the session's tokens next turn.
                            log.info("lease_lost_kv_dropped", session_id=session.session_id,
                                     error=exc.message)
                            self.engine.release_kv(session)
                    await self.engine.wait_settled(timeout_s=10.0)
                    moved = await asyncio.to_thread(self.stash.sleep)
                    self._activity("model_asleep", "", moved.num_bytes, moved.seconds,
                                   f"{purpose} lease lost")
                await self.memory.release_base()
            except Exception as exc:  # noqa: BLE001 - nothing may run on that memory: say so
                log.error("worker_give_up_failed", exc_info=exc)
            finally:
                # Asleep either way: the next request acquires the memory
                # again before anything runs (waking weights already in place
                # copies nothing).
                self.memory.loss_handled()
                self._set_state("asleep")

    async def ensure_awake(self, wait_s: float | None = -1.0) -> None:
        """Before any work on the model: wake it if it sleeps (or is going to,
        unless it serves through its drain). A request waits at most
        wait_s (default: wake_wait_s) for the memory, in line behind other
        wakes included, then gets CapacityExhausted with a retry hint; None
        waits for ever (generations paused for a higher priority)."""
        giving_up = self._giving_up is not None and not self._giving_up.done()
        if not giving_up and (self.state == "ready" or self._serving_through()):
            return
        if wait_s is not None and wait_s < 0:
            wait_s = self.wake_wait_s
        deadline = None if wait_s is None else time.monotonic() + wait_s
        try:
            # asyncio.timeout, not wait_for: a cancelled Lock.acquire never
            # leaves the lock taken.
            async with asyncio.timeout(wait_s):
                await self._lock.acquire()
        except TimeoutError:
            raise CapacityExhausted(
                f"the model is asleep and waking it waits for memory: not awake within "
                f"{wait_s:g} s (--wake-wait-s); retry", Shortfall("wake", self.base_bytes, 0),
                WAKE_RETRY_S) from None
        try:
            if self.state != "asleep":
                return
            self._set_state("waking")
            started = time.perf_counter()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                if self._held("weights"):
                    if left is None:
                        await self.memory.resize_base(self.base_bytes, wait_forever=True)
                    else:
                        await self.memory.resize_base(self.base_bytes, wait_s=left)
                else:
                    await self.memory.acquire_base(self.base_bytes, wait_s=left)
                moved = await asyncio.to_thread(self.stash.wake)
            except BaseException:
                self._set_state("asleep")
                raise
            self.engine.resume()        # generations paused for a higher priority go on
            self._awake_since = time.monotonic()
            self._set_state("ready")
            self._activity("model_awake", "", moved.num_bytes, time.perf_counter() - started,
                           "request")
        finally:
            self._lock.release()

    async def _resume_paused(self) -> None:
        try:
            await self.ensure_awake(wait_s=None)
        except Exception as exc:  # noqa: BLE001 - the paused requests fail instead of hanging
            log.error("paused_generations_not_resumed", error=str(exc))
            self.engine.abort_all(Aborted(f"the model could not wake again: {exc}; retry",
                                          reason="WAKE_FAILED"))

    def _busy(self, paused_ok: bool = False) -> bool:
        """Work under way: a request at the gate, a session generating or
        moving, requests in the engine (`paused_ok`: those the engine
        paused do not count, their KV is given back)."""
        if self._entering:
            return True
        if any(s.moving for s in self.sessions.all()):
            return True
        if paused_ok and self.engine.paused:
            return False
        if any(s.busy for s in self.sessions.all()):
            return True
        stats = self.engine.stats()
        return bool(stats.num_waiting or stats.num_running)

    def _cannot_sleep(self) -> str:
        if self.parking.link is None and self.engine.pool.usage().num_used_blocks:
            return "its sessions' KV cannot leave: parking is disabled (--kvstore none)"
        return ""

    def _held(self, purpose: str) -> int:
        return self.memory.granted().get(purpose, 0)

    async def settle_first(self, purpose: str) -> Relief | None:
        """The answer to an ask that finds the model changing state, or None
        when it is ready and the ask is to be handled as usual.

        Waking: wait until awake, then handle it like an awake model (its
        quantum counting from the wake); answering "waking, nothing freed"
        would leave this model's KV growths queued behind the asker until
        the ask came again. Draining or sleeping: the sleep under way gives
        back all the KV and the weights; answered when it is done, so that
        admission knows this holder is still finishing (its KV may grow past
        the queue's head meanwhile)."""
        await self.wake_settled()
        state = self.state
        if state in ("draining", "sleeping"):
            before = self._held(purpose)
            await self.sleep_settled()
            freed = max(0, before - self._held(purpose))
            return Relief(freed, f"the model was {state} when asked; now {self.state}")
        if state != "ready":
            return Relief(0, f"the model is {state} already")
        return None

    async def wake_settled(self) -> None:
        """Return once no wake is under way (it finished, or failed)."""
        while self.state == "waking":
            await self._state_changed.wait()

    async def sleep_settled(self) -> None:
        """Return once no sleep is under way (it finished, or gave up)."""
        while self.state in ("draining", "sleeping"):
            await self._state_changed.wait()

    def _set_state(self, state: str) -> None:
        self.state = state
        self._state_changed.set()
        self._state_changed = asyncio.Event()
        log.info("model_state", state=state)
        if self.on_state is not None:
            self.on_state(state)

    def _activity(self, kind: str, session_id: str, num_bytes: int, seconds: float,
                  reason: str) -> None:
        if self.on_activity is not None:
            self.on_activity(kind, session_id, num_bytes, seconds, reason)
