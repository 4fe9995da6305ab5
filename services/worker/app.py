"""The worker as an App for the shared server bootstrap.

Start-up, in order: register with admission (state "waiting"), convert the
model into the cache if needed, count the weights' bytes without loading
them, create the CUDA context and measure it, acquire a lease for weights +
overhead + workspace (waiting in admission's queue, visibly, if it does not
fit), load the weights once (state "loading"), on CUDA measure the real
workspace with a full-size warm-up step and resize the lease to it, then
serve (state "ready"). A heartbeat re-registers every TTL/3.

The base lease is sized from the step memory plan (step_memory.py): the
weights, the CUDA context, the workspace of the largest step the limits
allow, the decode graphs' pool (estimated, then measured after capture),
staging buffers and the allocator's slack. The engine never runs a step
whose plan exceeds that workspace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path

import grpc
import structlog
import torch

from lmx.v1 import admission_pb2, worker_pb2, worker_pb2_grpc
from services.admission.client import WORKER_SECRET_ENV, AdmissionClient
from services.common.errors import FailedPrecondition, LmxError
from services.worker import compiled_decode, decode_ahead, device as devices
from services.worker.core import WorkerCore, template_chars
from services.worker.engine import Engine
from services.worker.memory import AdmissionMemory, FixedMemory, Memory
from services.worker.kv_link import KVStoreLink
from services.worker.models import LoadedModel, default_cache_dir, load_model, weight_plan
from services.worker.quantize import QuantSpec
from services.worker.settings import AUTO
from services.worker.stream_policy import StreamPolicy
from services.worker.streaming import LayerStreamer, streamed_indices
from services.worker.parking import Parking
from services.worker.placement import Candidate, place
from services.worker.pressure import PressureRelief, Relief
from services.worker.servicer import WorkerServicer
from services.worker.sessions import SessionTable
from services.worker.settings import WorkerSettings
from services.worker.sleep import StreamedStash, WeightStash
from services.worker.sizing import LeaseSizing
from services.worker.step_memory import BaseLease
from services.worker.templates import TemplateSandbox, with_chat_template

log = structlog.get_logger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
STATE_TO_PB = {"waiting": admission_pb2.WORKER_STATE_WAITING,
               "loading": admission_pb2.WORKER_STATE_LOADING,
               "ready": admission_pb2.WORKER_STATE_READY,
               "asleep": admission_pb2.WORKER_STATE_ASLEEP,
               "stopping": admission_pb2.WORKER_STATE_STOPPING}
ACTIVITY_TO_PB = {"session_parked": admission_pb2.WorkerActivity.KIND_SESSION_PARKED,
                  "session_restored": admission_pb2.WorkerActivity.KIND_SESSION_RESTORED,
                  "model_asleep": admission_pb2.WorkerActivity.KIND_MODEL_ASLEEP,
                  "model_awake": admission_pb2.WorkerActivity.KIND_MODEL_AWAKE}


class WorkerApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.device = devices.resolve_device(settings.device)
        self.dtype = devices.resolve_dtype(settings.dtype, self.device)
        self.quant = QuantSpec.of(settings)
        self.cache = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
        self.state = "waiting"
        self.address = ""
        self.admission_device = ""
        self.overhead_bytes = 0
        self.loaded: LoadedModel | None = None
        self.streamer: LayerStreamer | None = None
        #: --resident-fraction auto: how many layers may stream to make room.
        self.stream_policy: StreamPolicy | None = None
        self.engine: Engine | None = None
        self.core: WorkerCore | None = None
        self.sessions = SessionTable(settings.max_sessions)
        self.admission: AdmissionClient | None = None
        self.memory: Memory | None = None
        self.kvstore: KVStoreLink | None = None
        self.pressure: PressureRelief | None = None
        self._plan = None
        self.sizing: LeaseSizing | None = None
        self.lease_terms: BaseLease | None = None
        self._heartbeat: asyncio.Task | None = None
        self._reclaim_task: asyncio.Task | None = None
        self._grow_task: asyncio.Task | None = None
        self._reclaim_lock = asyncio.Lock()
        self._answering: set[str] = set()   # reclaim ids being answered
        self._background: set[asyncio.Task] = set()
        self._registering: set[asyncio.Future] = set()  # state changes on their way
        # One registration at a time, each with the state as it is when it is
        # sent: an earlier state can never land after a later one.
        self._register_lock = asyncio.Lock()
        self._registration_held = False   # an earlier process's entry holds this id
        self.worker_id = ""

    # ---- App -------------------------------------------------------------
    def register(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(self._core, self.status_pb), server)

    async def start(self, address: str) -> None:
        settings = self.settings
        self.address = settings.advertise or address
        host = self.address.rpartition(":")[0].strip("[]")
        if host in ("0.0.0.0", "::", ""):
            log.warning("worker_address_unreachable", address=self.address,
                        message="clients cannot reach a wildcard address; pass --advertise "
                                "HOST:PORT (the address clients should use)")
        self.worker_id = f"{settings.model}@{self.address}"
        if settings.admission == "none":
            self.memory = FixedMemory(settings.budget)
            self.admission_device = "local"
        else:
            self.admission = AdmissionClient(
                settings.admission, timeout_s=10,
                worker_secret=os.environ.get(WORKER_SECRET_ENV, ""))
            try:
                status = await self.admission.status()
            except grpc.aio.AioRpcError as exc:
                raise FailedPrecondition(
                    f"cannot reach admission at {settings.admission}: {exc.code().name}; start it "
                    "first (lmx admission), or run with --admission none",
                    reason="ADMISSION_UNREACHABLE") from None
            self.admission_device = (settings.admission_device
                                     or await self._place(status.devices)
                                     or devices.admission_device_id(self.device, status.devices))
            self.memory = AdmissionMemory(self.admission, f"worker/{settings.model}",
                                          self.admission_device, ttl_s=settings.lease_ttl_s,
                                          priority=settings.priority,
                                          on_lost=self._lease_lost)
            self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        log.info("card_support", **devices.describe_card(self.device, self.dtype,
                                                         settings.cuda_graphs))
        log.info("worker_starting", model=settings.model, device=str(self.device),
                 dtype=str(self.dtype).removeprefix("torch."), weights=self._weights(),
                 admission=settings.admission, admission_device=self.admission_device)

        plan = await self._weight_plan()
        self.sizing = await asyncio.to_thread(LeaseSizing, settings, self.device, self.dtype,
                                              self.cache)
        if self.device.type == "cuda":
            self.overhead_bytes = await asyncio.to_thread(
                devices.init_cuda_context, self.device, settings.cuda_stack_bytes)
            self.memory.on_change = self._cap_allocator
        # The load itself needs no more than the weights: synthetic models are
        # built without a transient output matrix (models.build_synthetic),
        # checkpoints are loaded in place.
        terms = self.sizing.initial(self.overhead_bytes)
        fraction = settings.resident_fraction
        if fraction == AUTO:
            # Room for the KV of one full prefill step too, or sessions could
            # not start.
            kv_room = max(settings.kv_chunk_bytes,
                          settings.max_prefill_tokens * plan.kv_bytes_per_token)
            fraction = await self._fitting_fraction(plan, terms.total + kv_room)
        # Streaming: only the resident layers and the ring go on the device.
        streamed = streamed_indices(plan.num_layers, fraction)
        terms = dataclasses.replace(terms, weights=plan.device_bytes(len(streamed),
                                                                     settings.stream_ring))
        base = terms.total
        self.lease_terms = terms
        log.info("worker_lease_needed", **terms.fields())
        await self.memory.acquire_base(base)

        self._set_state("loading")
        self.loaded = await asyncio.to_thread(self._load, streamed)
        if settings.chat_template:
            self.loaded = with_chat_template(self.loaded, settings.chat_template)
        graphs = devices.decode_graphs(settings.cuda_graphs, self.device)
        if compiled_decode.enabled(settings.compile_decode, graphs):
            log.info("compile_cache", path=str(compiled_decode.keep_caches_in(self.cache)))
        self.engine = Engine(self.loaded, self.memory, block_size=settings.block_size,
                             chunk_bytes=settings.kv_chunk_bytes, kv_wait_s=settings.kv_wait_s,
                             max_batch=settings.max_batch,
                             max_prefill_tokens=settings.max_prefill_tokens,
                             decode_graphs=graphs,
                             compile_decode=compiled_decode.enabled(settings.compile_decode,
                                                                    graphs),
                             compile_options=compiled_decode.options(settings.compile_decode),
                             decode_ahead=decode_ahead.enabled(settings.decode_ahead, graphs),
                             step_plan=self.sizing.plan)
        if self.device.type == "cuda":
            # Every step within the workspace the lease holds, from the first.
            self.engine.runner.workspace_bytes = terms.workspace
        self.engine.start()
        if settings.kvstore != "none":
            self.kvstore = KVStoreLink(settings.kvstore, owner=self.worker_id)
        parking = Parking(self.loaded, self.engine, self.sessions, self.kvstore,
                          park_ahead_bytes=self.settings.park_ahead_bytes)
        parking.on_activity = self._report_activity
        self.pressure = PressureRelief(
            self.engine, self.sessions, parking, self.memory,
            self._stash(), base_bytes=base,
            keep_bytes=self.overhead_bytes, residue=self._allocator_residue,
            pinned=settings.pin_model, min_awake_s=settings.min_awake_s,
            on_activity=self._report_activity, on_state=lambda _state: self._register_soon(),
            wake_wait_s=settings.wake_wait_s, max_turn_s=settings.max_turn_s)
        self.engine.on_kv_short = self.pressure.kv_short
        client_templates = settings.client_templates == "sandboxed"
        self.core = WorkerCore(
            self.loaded, self.engine, self.sessions, parking, self.pressure,
            max_prompt_chars=settings.max_prompt_chars, client_templates=client_templates,
            tool_format_setting=settings.tool_format,
            sandbox=TemplateSandbox(settings.template_timeout_s,
                                    template_chars(settings.max_prompt_chars))
            if client_templates else None)
        if self.device.type == "cuda":
            await self._measure()
            # Pin the host buffer the weights sleep into now, not in the
            # middle of the first reclaim (seconds per GB to pin, against
            # a copy at PCIe speed).
            await asyncio.to_thread(self.pressure.stash.prepare)
        if self.kvstore is not None:
            await self._find_orphans(parking)
            parking.hold_ahead()    # shared memory for the next park, in the background
        self._set_state("ready")
        # Admission lists the worker ready before its health check says
        # SERVING: a client that waited for the health check and then asks
        # admission for the model's worker must not hear "loading".
        await asyncio.gather(*self._registering, return_exceptions=True)
        if self.admission is not None:
            self._reclaim_task = asyncio.create_task(self._reclaim_loop(), name="reclaims")
            # Only a share chosen automatically grows; a share that was set stays.
            if (self.streamer is not None and settings.resident_fraction == AUTO
                    and settings.stream_grow_interval_s > 0):
                self._grow_task = asyncio.create_task(self._grow_loop(), name="stream-grow")

    def drain(self) -> None:
        self._set_state("stopping")

    async def close(self) -> None:
        for task in (self._reclaim_task, self._grow_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.engine is not None:
            await self.engine.close()
        if self.core is not None:
            await self.core.parking.release()
            self.core.parking.close()
            if self.core.sandbox is not None:
                self.core.sandbox.close()
        if self.streamer is not None:
            self.streamer.close()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        # A state change still on its way must land before the unregister,
        # or it would register the worker again after it.
        await asyncio.gather(*self._registering, *self._background, return_exceptions=True)
        if self.kvstore is not None:
            await self.kvstore.close()
        if self.memory is not None:
            await self.memory.close()
        if self.admission is not None:
            try:
                await self.admission.unregister_worker(self.worker_id)
            except grpc.aio.AioRpcError:
                pass
            await self.admission.close()

    # ---- layer streaming -----------------------------------------------------
    async def _grow_loop(self) -> None:
        """A streamed worker brings layers back to the device when admission
        has room for them and nobody waits: its lease grows first, then the
        layers move, between two steps."""
        assert self.streamer is not None and self.admission is not None
        while True:
            await asyncio.sleep(self.settings.stream_grow_interval_s)
            if (not self.streamer.count or self.pressure is None
                    or self.pressure.state != "ready"):
                continue
            try:
                status = await self.admission.status()
            except grpc.aio.AioRpcError:
                continue
            device = next((d for d in status.devices if d.device == self.admission_device), None)
            if device is None or device.num_waiting:
                continue
            layer = self.streamer.layer_bytes
            room = device.free_bytes - self.settings.kv_chunk_bytes   # keep room for KV
            count = min(self.streamer.count, max(0, room // layer))
            if not count:
                continue
            held = self.memory.granted().get("weights", 0)
            try:
                # Now or not at all: the room seen may be gone (another
                # worker grew into it), and a growth waiting in admission's
                # queue would keep every request behind it waiting, a
                # starting worker's among them (none overtakes).
                await self.memory.resize_base(held + count * layer, wait_s=0)
            except LmxError as exc:
                log.info("stream_grow_refused", layers=count, reason=exc.message)
                continue
            await self.engine.between_steps(self.streamer.make_resident, count)
            self._register_soon()

    # ---- memory pressure ---------------------------------------------------
    async def _reclaim_loop(self) -> None:
        """Admission's reclaim requests for this worker's leases, from Watch."""
        assert self.admission is not None
        while True:
            try:
                async for event in self.admission.watch():
                    if event.WhichOneof("kind") != "reclaim_requested":
                        continue
                    reclaim = event.reclaim_requested.reclaim
                    purpose = self.memory.purpose_of(reclaim.lease.lease_id)
                    if purpose is not None:
                        self._spawn(self._answer_reclaim(reclaim, purpose))
            except grpc.aio.AioRpcError as exc:
                log.warning("reclaim_watch_lost", code=exc.code().name)
            await asyncio.sleep(1.0)

    async def _answer_reclaim(self, reclaim, purpose: str) -> None:
        assert self.pressure is not None and self.admission is not None
        if reclaim.reclaim_id in self._answering:
            return      # sent again while this worker is still at it: one answer
        self._answering.add(reclaim.reclaim_id)
        try:
            relief = await self._relieve(reclaim, purpose)
            try:
                await self.admission.answer_reclaim(reclaim, relief.freed_bytes, relief.detail)
            except grpc.aio.AioRpcError as exc:
                log.warning("reclaim_answer_failed", reclaim_id=reclaim.reclaim_id,
                            code=exc.code().name)
            log.info("reclaim_answered", reclaim_id=reclaim.reclaim_id,
                     freed_bytes=relief.freed_bytes, detail=relief.detail)
        finally:
            self._answering.discard(reclaim.reclaim_id)

    async def _relieve(self, reclaim, purpose: str) -> Relief:
        assert self.pressure is not None
        log.info("reclaim_received", reclaim_id=reclaim.reclaim_id, purpose=purpose,
                 bytes=reclaim.bytes, for_holder=reclaim.for_holder)
        relief = await self.pressure.settle_first(purpose)
        if relief is not None:
            return relief
        async with self._reclaim_lock:   # one at a time
            if self.memory.purpose_of(reclaim.lease.lease_id) is None:
                return Relief(0, "that lease is no longer held")
            if purpose == "kv":
                return await self.pressure.park_idle(reclaim.bytes,
                                                     f"reclaim {reclaim.reclaim_id}")
            shrunk = await self._stream_more_for(reclaim.needed_bytes)
            if shrunk is not None:
                return shrunk
            # For a higher priority, generations in flight are paused, not
            # waited for (the policy: a session in the middle of a
            # generation gives way only to a higher priority).
            return await self.pressure.sleep(f"reclaim {reclaim.reclaim_id}",
                                             urgent=reclaim.for_priority > self.settings.priority)

    async def _stream_more_for(self, needed_bytes: int) -> Relief | None:
        """A worker streaming with --resident-fraction auto answers a weights
        ask by streaming more of its layers, when that frees what the waiter
        misses, and goes on serving; None when it cannot (then it sleeps)."""
        streamed = await self._stream_more(needed_bytes)
        if streamed is None:
            return None
        moved, frees = streamed
        held = self.memory.granted().get("weights", 0)
        await self.memory.resize_base(held - frees)
        self._register_soon()
        assert self.streamer is not None
        return Relief(frees, f"streaming {moved} more layers "
                             f"({self.streamer.info().resident_fraction:.0%} resident)")

    async def _stream_more(self, needed_bytes: int, within_policy: bool = True
                           ) -> tuple[int, int] | None:
        """The fewest more layers streamed whose weights free `needed_bytes`
        on the device (the lease is the caller's to shrink): how many moved
        and the bytes freed; None when the worker may not (a share that was
        set, not chosen automatically; past its StreamPolicy, unless not
        `within_policy`) or cannot (even every layer would not)."""
        streamer = self.streamer
        if (streamer is None or needed_bytes <= 0
                or self.settings.resident_fraction != AUTO):
            return None
        resident = streamer.num_layers - streamer.count
        # The fewest layers whose streaming frees what is missing (a resident
        # model's first ones also pay for the ring); none if even all of them
        # would not.
        count = next((k for k in range(1, resident + 1) if streamer.more_frees(k) >= needed_bytes),
                     None)
        if count is None:
            return None
        policy = self.stream_policy
        if within_policy and policy is not None and not policy.may_stream(streamer.count + count):
            # Past what a step's compute hides: taking turns whole costs less.
            log.info("worker_stream_limit", needed_layers=count, streamed=streamer.count,
                     max_streamed=policy.max_streamed, needed_bytes=needed_bytes)
            return None
        assert self.engine is not None
        before = streamer.info()
        moved = await self.engine.between_steps(streamer.stream_more, count)
        if not moved:
            return None
        after = streamer.info()
        log.info("worker_streamed_more", layers=moved, needed_bytes=needed_bytes,
                 resident_fraction=round(after.resident_fraction, 3))
        return moved, ((after.host_bytes - before.host_bytes)
                       - (after.ring_bytes - before.ring_bytes))

    async def _weight_plan(self):
        """The model's weights counted on the meta device, once (placement
        and the lease both need them)."""
        if self._plan is None:
            self._plan = await asyncio.to_thread(weight_plan, self.settings.model, self.cache,
                                                 self.dtype, self.quant)
        return self._plan

    async def _place(self, listed) -> str:
        """Admission's device for this worker when it may choose (several
        simulated devices for a CPU worker; several GPUs and --device auto or
        cuda): services/worker/placement.py's best fit for what it needs to
        start. On a GPU the worker then runs on that card. "" when there is
        nothing to choose."""
        settings = self.settings
        if self.device.type == "cuda":
            if settings.device not in ("auto", "cuda"):
                return ""
            uuids = {devices.gpu_uuid(torch.device(f"cuda:{i}")): i
                     for i in range(torch.cuda.device_count())}
            options = [d for d in listed if d.uuid in uuids]
        else:
            options = [d for d in listed if d.source == "simulated"]
        if len(options) < 2:
            return ""
        plan = await self._weight_plan()
        share = 1.0 if settings.resident_fraction == AUTO else settings.resident_fraction
        need = (plan.device_bytes(len(streamed_indices(plan.num_layers, share)),
                                  settings.stream_ring)
                + (devices.CUDA_CONTEXT_GUESS if self.device.type == "cuda" else 0)
                + settings.kv_chunk_bytes)
        chosen = place(need, [Candidate(d.device, d.free_bytes, d.uuid) for d in options])
        if self.device.type == "cuda":
            self.device = torch.device(f"cuda:{uuids[chosen.uuid]}")
        log.info("worker_placed", device=chosen.device, torch_device=str(self.device),
                 need_bytes=need, free_bytes=chosen.free_bytes,
                 options={d.device: d.free_bytes for d in options})
        return chosen.device

    async def _find_orphans(self, parking: Parking) -> None:
        """Sessions this worker id parked in an earlier run come back on use."""
        try:
            await asyncio.wait_for(parking.find_orphans(), 5.0)
        except (LmxError, TimeoutError) as exc:
            log.warning("parked_sessions_unknown", error=getattr(exc, "message", "timed out"))

    def _lease_lost(self, purpose: str) -> None:
        """A lease of this worker is gone in admission's book: stop using the
        memory (services/worker/pressure.py). Before the model is up there is
        nothing to stop: the start fails when it next asks admission."""
        if self.pressure is not None:
            self.pressure.lease_lost(purpose)

    def _report_activity(self, kind: str, session_id: str, num_bytes: int, seconds: float,
                         reason: str) -> None:
        self._register_soon()
        if self.admission is None:
            return
        activity = admission_pb2.WorkerActivity(
            kind=ACTIVITY_TO_PB[kind], worker_id=self.worker_id, model=self.settings.model,
            session_id=session_id, bytes=num_bytes, seconds=seconds, reason=reason)

        async def send() -> None:
            try:
                await self.admission.report_activity(activity)
            except grpc.aio.AioRpcError as exc:
                log.warning("activity_report_failed", kind=kind, code=exc.code().name)

        self._spawn(send())

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _register_soon(self) -> None:
        if self._heartbeat is not None:
            task = asyncio.ensure_future(self._register())
            self._registering.add(task)
            task.add_done_callback(self._registering.discard)

    def _reported_state(self) -> str:
        if self.state == "ready" and self.pressure is not None and self.pressure.state != "ready":
            return "asleep" if self.pressure.state in ("asleep", "sleeping", "waking") else "ready"
        return self.state

    # ---- internals -------------------------------------------------------
    def _core(self) -> WorkerCore:
        if self.core is None or self.state != "ready":
            raise FailedPrecondition(f"the worker is {self.state}, not ready yet",
                                     reason="NOT_READY")
        return self.core

    def _stash(self) -> WeightStash | StreamedStash:
        """What moves the weights when the model sleeps: all of them, or for
        a streamed model the resident ones (and its ring is freed)."""
        assert self.loaded is not None and self.engine is not None
        if self.streamer is None:
            stash = WeightStash(self.loaded.model, self.device)
        else:
            stash = WeightStash(self.loaded.model, self.device,
                                skip=self.streamer.streamed_parameters())
        graphs = self.engine.runner.graphs
        if graphs is not None:
            # Their pool goes with the weights (captured again, the largest
            # first, at the first decode step after the wake).
            stash.before_sleep = graphs.release
        return stash if self.streamer is None else StreamedStash(stash, self.streamer)

    def _allocator_residue(self) -> int:
        """What torch's allocator holds on the device now (after the weights
        left and its cache was emptied); 0 off CUDA."""
        if self.device.type != "cuda":
            return 0
        return torch.cuda.memory_reserved(self.device)

    def _cap_allocator(self, granted_bytes: int) -> None:
        """Hold torch's CUDA allocator to what the leases grant (less the
        context): past it, the allocator frees its cache and, failing that,
        raises inside the step that asked, never taking more."""
        total = torch.cuda.get_device_properties(self.device).total_memory
        allowed = max(0, granted_bytes - self.overhead_bytes)
        torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total), self.device)
        if torch.cuda.memory_reserved(self.device) > allowed:
            torch.cuda.empty_cache()  # a lower cap does not shrink what is cached
            reserved = torch.cuda.memory_reserved(self.device)
            if reserved > allowed:
                log.warning("allocator_over_lease", reserved=reserved, allowed=allowed)
        log.debug("allocator_capped", bytes=allowed)

    def _set_state(self, state: str) -> None:
        self.state = state
        log.info("worker_state", state=state, worker_id=self.worker_id)
        self._register_soon()

    async def _register(self) -> None:
        if self.admission is None:
            return
        async with self._register_lock:
            await self._send_registration()

    async def _send_registration(self) -> None:
        assert self.admission is not None
        info = admission_pb2.WorkerInfo(
            worker_id=self.worker_id, model=self.settings.model, address=self.address,
            state=STATE_TO_PB[self._reported_state()], pid=os.getpid(),
            device=self.admission_device, num_sessions=len(self.sessions),
            num_parked=sum(1 for s in self.sessions.all() if s.parked_entry),
            resident_fraction=self._resident_fraction(), weights=self._weights(),
            steps_out_of_memory=self.engine.runner.out_of_memory if self.engine else 0)
        try:
            await self.admission.register_worker(info, ttl_s=self.settings.lease_ttl_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
                log.warning("worker_register_failed", code=exc.code().name, message=exc.details())
            elif not self._registration_held:   # said once; the heartbeat keeps trying
                self._registration_held = True
                log.warning("worker_registration_held", worker_id=self.worker_id,
                            reason="admission still lists an earlier process of this worker id "
                                   "(this address) under another secret, a crash's leftover",
                            effect="listed, and its activity reported, once that entry expires "
                                   f"(within {self.settings.lease_ttl_s:g} s); it serves meanwhile")
        else:
            if self._registration_held:
                log.info("worker_registration_taken_over", worker_id=self.worker_id)
            self._registration_held = False

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._register()
            await asyncio.sleep(self.settings.lease_ttl_s / 3)

    async def _measure(self) -> None:
        """The profile run and the base lease resized to what it measured
        (services/worker/sizing.py)."""
        assert self.core is not None and self.engine is not None and self.pressure is not None
        core = self.core

        async def close(session) -> None:
            await core.close_session(session.session_id, session.token)

        self.lease_terms = await self.sizing.measure(
            self.engine, lambda: core.open_session().session, close, self.memory,
            weight_bytes=self.device_weight_bytes, overhead=self.overhead_bytes,
            staging=core.parking.transfer.staging_bytes, estimated=self.lease_terms,
            shed_weights=self._shed_weights)
        self.overhead_bytes = self.lease_terms.overhead
        self.pressure.keep_bytes = self.overhead_bytes
        self.pressure.base_bytes = self.lease_terms.total

    async def _shed_weights(self, needed_bytes: int) -> bool:
        """At start, the measured lease larger than admission can grant (the
        others did not give memory back within the sizing wait): more layers
        streamed, where the share was chosen automatically, past the
        StreamPolicy too (the alternative is a start that fails)."""
        return await self._stream_more(needed_bytes, within_policy=False) is not None

    def _load(self, streamed: list[int]) -> LoadedModel:
        """The model, loaded once. Streamed (--resident-fraction below 1):
        loaded in host memory, the streamed layers' weights kept there
        (pinned on a GPU host) behind a ring of device buffers, then the
        rest moved to the device."""
        settings = self.settings
        if not streamed:
            loaded = load_model(settings.model, cache=self.cache, device=self.device,
                                dtype=self.dtype, max_context=settings.max_context,
                                quant=self.quant)
            if settings.resident_fraction == AUTO:
                # Everything fits now; a streamer with nothing streamed lets
                # the model give layers back under pressure instead of sleeping.
                self.streamer = LayerStreamer(
                    loaded.model, self.device, [], ring_slots=settings.stream_ring)
            return loaded
        # Quantized: packed for this device's kernels, kept in host memory.
        loaded = load_model(settings.model, cache=self.cache, device=torch.device("cpu"),
                            dtype=self.dtype, max_context=settings.max_context,
                            quant=self.quant, kernel_device=self.device)
        self.streamer = LayerStreamer(
            loaded.model, self.device, streamed, ring_slots=settings.stream_ring,
            share_as=settings.model if settings.share_streamed_weights else None,
            shm_dir=Path(settings.weights_shm_dir))
        self.streamer.attach()
        if self.device.type != "cpu":
            loaded.model.to(self.device)     # the resident part; streamed layers are in the ring
            loaded = dataclasses.replace(loaded, device=self.device)
        return loaded

    async def _fitting_fraction(self, plan, fixed_bytes: int) -> float:
        """--resident-fraction auto: all layers if they fit what admission
        (or --budget) has free now, else the largest share that does, the
        rest streamed through the ring; all streamed if even that is too
        much (the lease then waits in admission's queue). A model that fits
        the device alone streams no more than its StreamPolicy allows: past
        it, all layers (the lease waits while admission asks the others)."""
        if self.admission is not None:
            status = await self.admission.status()
            device = next((d for d in status.devices if d.device == self.admission_device), None)
            free = device.free_bytes if device is not None else 0
            budget = device.budget_bytes if device is not None else 0
        else:
            free = budget = self.settings.budget
        whole = plan.total_bytes + fixed_bytes
        self.stream_policy = StreamPolicy.for_model(plan.num_layers, self.settings.stream_max_share,
                                                    whole, budget)
        if whole <= free:
            fitting = plan.num_layers
        else:
            ring = min(self.settings.stream_ring, plan.num_layers) * plan.layer_bytes
            others = plan.total_bytes - plan.num_layers * plan.layer_bytes   # embeddings, norms
            room = free - fixed_bytes - others - ring
            fitting = max(0, min(plan.num_layers - 1, room // plan.layer_bytes))
        chosen = self.stream_policy.start_layers(fitting)
        fraction = chosen / plan.num_layers if chosen else 1e-9
        log.info("worker_resident_fraction_chosen", free_bytes=free, budget_bytes=budget,
                 layers=plan.num_layers, fitting_layers=fitting, resident_layers=chosen,
                 resident_fraction=round(chosen / plan.num_layers, 3),
                 fits_alone=self.stream_policy.fits_alone,
                 max_streamed=self.stream_policy.max_streamed)
        return fraction

    def _weights(self) -> str:
        """How the decoder layers' weights are held: "bfloat16", "int4-g128"."""
        return str(self.quant) if self.quant.on else str(self.dtype).removeprefix("torch.")

    def _resident_fraction(self) -> float:
        return 1.0 if self.streamer is None else self.streamer.info().resident_fraction

    def device_weight_bytes(self) -> int:
        """The weights on the device: all of them, or the resident part and
        the ring when streaming."""
        assert self.loaded is not None
        if self.streamer is None:
            return self.loaded.device_bytes
        info = self.streamer.info()
        return self.loaded.device_bytes - info.host_bytes + info.ring_bytes

    def status_pb(self) -> worker_pb2.GetStatusResponse:
        granted = self.memory.granted() if self.memory is not None else {}
        now = time.monotonic()
        reply = worker_pb2.GetStatusResponse(
            model=self.settings.model, device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."), state=self._reported_state(),
            num_sessions=len(self.sessions), overhead_bytes=self.overhead_bytes,
            leased_bytes=sum(granted.values()),
            sessions=[worker_pb2.SessionInfo(session_id=s.session_id, state=s.state,
                                             num_tokens=len(s.tokens), idle_s=now - s.last_used)
                      for s in self.sessions.all()],
            num_parked=sum(1 for s in self.sessions.all() if s.parked_entry),
            resident_fraction=self._resident_fraction(), weights=self._weights())
        if self.streamer is not None:
            reply.streamed_bytes = self.streamer.info().host_bytes
        if self.loaded is not None and self.engine is not None:
            stats = self.engine.stats()
            if self.device.type == "cuda":
                held = torch.cuda.memory_reserved(self.device) + self.overhead_bytes
            else:
                held = self.device_weight_bytes() + stats.kv_bytes
            reply.MergeFrom(worker_pb2.GetStatusResponse(
                num_running=stats.num_running, num_waiting=stats.num_waiting,
                weight_bytes=self.loaded.weight_bytes, kv_bytes=stats.kv_bytes,
                kv_blocks=stats.num_blocks, kv_blocks_used=stats.num_used_blocks,
                block_size=self.settings.block_size, held_bytes=held, steps=stats.steps,
                tokens_generated=stats.tokens_generated, max_context=self.loaded.max_context,
                workspace_bytes=stats.workspace_bytes, steps_split=stats.steps_split,
                steps_out_of_memory=stats.steps_out_of_memory,
                step_plan_misses=self.engine.runner.plan_misses,
                steps_graphed=stats.steps_graphed, steps_ahead=stats.steps_ahead))
        return reply
