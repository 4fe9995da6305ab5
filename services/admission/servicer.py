"""AdmissionService over gRPC: converts protobuf to domain values, calls one
broker method per RPC, converts back. No logic of its own."""

from __future__ import annotations

import time

import structlog

from lmx.v1 import admission_pb2 as pb
from lmx.v1 import admission_pb2_grpc
from services.admission import limits
from services.admission.broker import Broker
from services.admission.events import Published
from services.admission.ledger import DeviceView, EventKind, Holder, Lease, Purpose, Waiter
from services.admission.reclaim import Activity, Reclaim
from services.admission.registry import WorkerRecord
from services.common.errors import InvalidArgument

log = structlog.get_logger(__name__)

PURPOSE_FROM_PB = {
    pb.PURPOSE_WEIGHTS: Purpose.WEIGHTS,
    pb.PURPOSE_KV: Purpose.KV,
    pb.PURPOSE_WORKSPACE: Purpose.WORKSPACE,
    pb.PURPOSE_OTHER: Purpose.OTHER,
}
PURPOSE_TO_PB = {value: key for key, value in PURPOSE_FROM_PB.items()}
LEFT_REASON_TO_PB = {
    "timed_out": pb.WaiterLeft.REASON_TIMED_OUT,
    "cancelled": pb.WaiterLeft.REASON_CANCELLED,
}


def purpose_from_pb(value: int) -> Purpose:
    purpose = PURPOSE_FROM_PB.get(value)
    if purpose is None:
        raise InvalidArgument("purpose", "is required: PURPOSE_WEIGHTS, PURPOSE_KV, "
                              "PURPOSE_WORKSPACE or PURPOSE_OTHER")
    return purpose


def holder_from_pb(holder: pb.Holder, present: bool) -> Holder:
    if not present:
        raise InvalidArgument("holder", "is required: {name, pid}")
    return Holder(holder.name, holder.pid)


def lease_to_pb(lease: Lease, now: float) -> pb.Lease:
    return pb.Lease(
        lease_id=lease.lease_id, device=lease.device, bytes=lease.bytes, epoch=lease.epoch,
        ttl_ms=round(lease.ttl_s * 1000),
        holder=pb.Holder(name=lease.holder.name, pid=lease.holder.pid),
        purpose=PURPOSE_TO_PB[lease.purpose], priority=lease.priority,
        age_s=now - lease.granted_at, since_renewal_s=now - lease.renewed_at,
        expires_in_ms=round((lease.expires_at - now) * 1000))


def waiter_to_pb(waiter: Waiter, now: float) -> pb.Waiter:
    return pb.Waiter(
        waiter_id=waiter.waiter_id,
        holder=pb.Holder(name=waiter.holder.name, pid=waiter.holder.pid),
        device=waiter.device or "", bytes=waiter.bytes, purpose=PURPOSE_TO_PB[waiter.purpose],
        priority=waiter.priority, waited_s=now - waiter.enqueued_at,
        lease_id=waiter.lease_id or "")


def device_to_pb(view: DeviceView) -> pb.DeviceStatus:
    memory = view.memory
    return pb.DeviceStatus(
        device=memory.device, name=memory.name, uuid=memory.uuid,
        total_bytes=memory.total_bytes, cap_fraction=view.cap_fraction,
        cap_bytes=view.cap_bytes, foreign_bytes=memory.foreign_bytes,
        budget_bytes=view.budget_bytes, leased_bytes=view.leased_bytes,
        free_bytes=view.free_bytes, num_leases=view.num_leases,
        num_waiting=view.num_waiting, source=memory.source)


WORKER_STATE_TO_PB = {
    "waiting": pb.WORKER_STATE_WAITING,
    "loading": pb.WORKER_STATE_LOADING,
    "ready": pb.WORKER_STATE_READY,
    "asleep": pb.WORKER_STATE_ASLEEP,
    "stopping": pb.WORKER_STATE_STOPPING,
}
WORKER_STATE_FROM_PB = {value: key for key, value in WORKER_STATE_TO_PB.items()}


def worker_to_pb(record: WorkerRecord, now: float) -> pb.WorkerInfo:
    return pb.WorkerInfo(worker_id=record.worker_id, model=record.model, address=record.address,
                         state=WORKER_STATE_TO_PB[record.state], pid=record.pid,
                         device=record.device, num_sessions=record.num_sessions,
                         updated_s_ago=now - record.updated_at, num_parked=record.num_parked,
                         resident_fraction=record.resident_fraction,
                         steps_out_of_memory=record.steps_out_of_memory,
                         weights=record.weights)


ACTIVITY_TO_PB = {
    "session_parked": pb.WorkerActivity.KIND_SESSION_PARKED,
    "session_restored": pb.WorkerActivity.KIND_SESSION_RESTORED,
    "model_asleep": pb.WorkerActivity.KIND_MODEL_ASLEEP,
    "model_awake": pb.WorkerActivity.KIND_MODEL_AWAKE,
}
ACTIVITY_FROM_PB = {value: key for key, value in ACTIVITY_TO_PB.items()}


def reclaim_to_pb(ask: Reclaim, now: float) -> pb.Reclaim:
    # Deadlines are kept on admission's monotonic clock; answers give wall time.
    wall = time.time() - now
    return pb.Reclaim(reclaim_id=ask.reclaim_id, lease=lease_to_pb(ask.lease, now),
                      bytes=ask.bytes, deadline_unix=ask.deadline + wall,
                      for_holder=ask.for_holder, for_priority=ask.for_priority, state=ask.state,
                      freed_bytes=ask.freed_bytes, detail=ask.detail, needed_bytes=ask.needed)


def activity_to_pb(activity: Activity) -> pb.WorkerActivity:
    return pb.WorkerActivity(kind=ACTIVITY_TO_PB[activity.kind], worker_id=activity.worker_id,
                             model=activity.model, session_id=activity.session_id,
                             bytes=activity.bytes, seconds=activity.seconds,
                             reason=activity.reason)


def activity_from_pb(activity: pb.WorkerActivity, present: bool) -> Activity:
    kind = ACTIVITY_FROM_PB.get(activity.kind)
    if not present or kind is None:
        raise InvalidArgument("activity.kind", "is required: KIND_SESSION_PARKED, "
                              "KIND_SESSION_RESTORED, KIND_MODEL_ASLEEP or KIND_MODEL_AWAKE")
    limits.check_name("activity.worker_id", activity.worker_id)
    if activity.bytes < 0:
        raise InvalidArgument("activity.bytes", f"must not be negative, got {activity.bytes}")
    if not activity.seconds >= 0:
        raise InvalidArgument("activity.seconds", f"must not be negative, got {activity.seconds}")
    return Activity(kind, activity.worker_id, activity.model[:256], activity.session_id[:256],
                    activity.bytes, activity.seconds, activity.reason[:500])


def event_to_pb(item: Published, now: float) -> pb.Event:
    event = item.event
    out = pb.Event(seq=item.seq, time_unix=item.time_unix, device=event.device)
    lease = lease_to_pb(event.lease, now) if event.lease is not None else None
    if event.kind is EventKind.GRANTED:
        out.granted.CopyFrom(pb.LeaseGranted(lease=lease, waited_s=event.waited_s))
    elif event.kind is EventKind.RESIZED:
        out.resized.CopyFrom(pb.LeaseResized(lease=lease, old_bytes=event.old_bytes))
    elif event.kind is EventKind.RELEASED:
        out.released.CopyFrom(pb.LeaseReleased(lease=lease))
    elif event.kind is EventKind.EXPIRED:
        out.expired.CopyFrom(pb.LeaseExpired(lease=lease))
    elif event.kind is EventKind.QUEUED:
        out.queued.CopyFrom(pb.WaiterQueued(waiter=waiter_to_pb(event.waiter, now)))
    elif event.kind is EventKind.LEFT:
        out.left.CopyFrom(pb.WaiterLeft(waiter=waiter_to_pb(event.waiter, now),
                                        reason=LEFT_REASON_TO_PB[event.reason]))
    elif event.kind is EventKind.RECLAIM_REQUESTED:
        out.reclaim_requested.CopyFrom(pb.ReclaimRequested(reclaim=reclaim_to_pb(event.detail, now)))
    elif event.kind is EventKind.RECLAIM_ANSWERED:
        out.reclaim_answered.CopyFrom(pb.ReclaimAnswered(reclaim=reclaim_to_pb(event.detail, now)))
    elif event.kind is EventKind.RECLAIM_OVERDUE:
        out.reclaim_overdue.CopyFrom(pb.ReclaimOverdue(reclaim=reclaim_to_pb(event.detail, now),
                                                       overdue_s=now - event.detail.deadline))
    elif event.kind is EventKind.ACTIVITY:
        out.activity.CopyFrom(activity_to_pb(event.detail))
    return out


class AdmissionServicer(admission_pb2_grpc.AdmissionServiceServicer):
    def __init__(self, broker: Broker):
        self.broker = broker

    async def Acquire(self, request: pb.AcquireRequest, context) -> pb.AcquireResponse:
        lease = await self.broker.acquire(
            holder_from_pb(request.holder, request.HasField("holder")), request.bytes,
            purpose_from_pb(request.purpose), device=request.device or None,
            priority=request.priority, ttl_s=request.ttl_ms / 1000,
            wait_s=request.wait_ms / 1000, secret=request.secret)
        return pb.AcquireResponse(lease=lease_to_pb(lease, self.broker.ledger.clock()))

    async def Resize(self, request: pb.ResizeRequest, context) -> pb.ResizeResponse:
        lease = await self.broker.resize(request.lease_id, request.epoch, request.bytes,
                                         wait_s=request.wait_ms / 1000, secret=request.secret)
        return pb.ResizeResponse(lease=lease_to_pb(lease, self.broker.ledger.clock()))

    async def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseResponse:
        lease = self.broker.release(request.lease_id, request.epoch, request.secret)
        return pb.ReleaseResponse(released_bytes=lease.bytes)

    async def Renew(self, request: pb.RenewRequest, context) -> pb.RenewResponse:
        lease = self.broker.renew(request.lease_id, request.epoch, request.secret)
        return pb.RenewResponse(lease=lease_to_pb(lease, self.broker.ledger.clock()))

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        snap = self.broker.snapshot()
        return pb.StatusResponse(
            devices=[device_to_pb(view) for view in snap.devices],
            leases=[lease_to_pb(lease, snap.now) for lease in snap.leases],
            waiters=[waiter_to_pb(waiter, snap.now) for waiter in snap.waiters],
            workers=[worker_to_pb(record, snap.now) for record in snap.workers],
            reclaims=[reclaim_to_pb(ask, snap.now) for ask in snap.reclaims])

    async def Watch(self, request: pb.WatchRequest, context):
        async for item in self.broker.watch():
            yield event_to_pb(item, self.broker.ledger.clock())

    async def RegisterWorker(self, request: pb.RegisterWorkerRequest,
                             context) -> pb.RegisterWorkerResponse:
        if not request.HasField("worker"):
            raise InvalidArgument("worker", "is required")
        info = request.worker
        state = WORKER_STATE_FROM_PB.get(info.state)
        if state is None:
            raise InvalidArgument("worker.state", "is required: WORKER_STATE_WAITING, _LOADING, "
                                  "_READY, _ASLEEP or _STOPPING")
        self.broker.registry.register(
            info.worker_id, info.model, info.address, state, pid=info.pid, device=info.device,
            num_sessions=info.num_sessions, ttl_s=(request.ttl_ms or 10_000) / 1000,
            num_parked=info.num_parked, resident_fraction=info.resident_fraction,
            steps_out_of_memory=info.steps_out_of_memory, weights=info.weights,
            secret=request.secret)
        return pb.RegisterWorkerResponse()

    async def UnregisterWorker(self, request: pb.UnregisterWorkerRequest,
                               context) -> pb.UnregisterWorkerResponse:
        self.broker.registry.unregister(request.worker_id, request.secret)
        return pb.UnregisterWorkerResponse()

    async def ListWorkers(self, request: pb.ListWorkersRequest, context) -> pb.ListWorkersResponse:
        now = self.broker.ledger.clock()
        return pb.ListWorkersResponse(workers=[worker_to_pb(record, now) for record in
                                               self.broker.registry.workers(request.model)])

    async def AnswerReclaim(self, request: pb.AnswerReclaimRequest,
                            context) -> pb.AnswerReclaimResponse:
        if not request.reclaim_id:
            raise InvalidArgument("reclaim_id", "is required")
        self.broker.answer_reclaim(request.reclaim_id, request.freed_bytes, request.detail,
                                   request.secret)
        return pb.AnswerReclaimResponse()

    async def ReportActivity(self, request: pb.ReportActivityRequest,
                             context) -> pb.ReportActivityResponse:
        self.broker.report_activity(activity_from_pb(request.activity,
                                                     request.HasField("activity")),
                                    request.secret)
        return pb.ReportActivityResponse()
