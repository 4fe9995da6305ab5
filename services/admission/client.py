"""A small asyncio client for AdmissionService, used by the CLI, the demo and
the other lmx services. A lease is kept alive by renewer.LeaseRenewer, from a
thread of its own."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import structlog
from google.rpc import error_details_pb2, status_pb2

from lmx.v1 import admission_pb2 as pb
from lmx.v1 import admission_pb2_grpc
from services.common import transport

log = structlog.get_logger(__name__)

#: A worker's registration secret, when its starter gives one (`lmx up`
#: does, the same for every restart of that worker, so that a restarted
#: worker takes over its entry at once); otherwise each client makes one.
WORKER_SECRET_ENV = "LMX_WORKER_SECRET"

PURPOSES = {"weights": pb.PURPOSE_WEIGHTS, "kv": pb.PURPOSE_KV,
            "workspace": pb.PURPOSE_WORKSPACE, "other": pb.PURPOSE_OTHER}


@dataclass(frozen=True)
class ErrorDetails:
    """What a refused call's rich status says."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] | None = None
    retry_after_s: float | None = None
    field: str = ""


def error_details(exc: grpc.aio.AioRpcError) -> ErrorDetails:
    reason, metadata, retry, field = "", None, None, ""
    for key, value in exc.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for any_detail in status.details:
            if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                any_detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                any_detail.Unpack(info)
                retry = info.retry_delay.ToNanoseconds() / 1e9
            elif any_detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                info = error_details_pb2.BadRequest()
                any_detail.Unpack(info)
                if info.field_violations:
                    field = info.field_violations[0].field
    return ErrorDetails(exc.code(), exc.details() or "", reason, metadata, retry, field)


class AdmissionClient:
    def __init__(self, address: str, *, timeout_s: float = 30.0, worker_secret: str = ""):
        self.address = address
        self.worker_secret = worker_secret
        self.timeout_s = timeout_s
        self._channel = transport.aio_channel(address)
        self.stub = admission_pb2_grpc.AdmissionServiceStub(self._channel)
        #: The secret of each lease this client acquired (see AcquireRequest.secret):
        #: every lease it acquires gets a random one, given again on each
        #: Resize, Release and Renew of it.
        self._secrets: dict[str, str] = {}
        #: Likewise for each worker this client registers: `worker_secret`,
        #: or a random secret made on its first registration, given again on
        #: every later one, its activity reports and its unregistration.
        self._worker_secrets: dict[str, str] = {}

    async def __aenter__(self) -> AdmissionClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        await asyncio.wait_for(self._channel.channel_ready(), timeout_s)

    async def acquire(self, holder: str, num_bytes: int, purpose: str = "other", *,
                      device: str = "", priority: int = 0, wait_s: float = 0.0,
                      ttl_s: float = 0.0, pid: int | None = None) -> pb.Lease:
        secret = secrets.token_urlsafe(24)
        request = pb.AcquireRequest(
            holder=pb.Holder(name=holder, pid=os.getpid() if pid is None else pid),
            device=device, bytes=num_bytes, purpose=PURPOSES[purpose], priority=priority,
            wait_ms=round(wait_s * 1000), ttl_ms=round(ttl_s * 1000), secret=secret)
        # wait_for_ready: an admission restarting (the channel reconnecting)
        # is waited for within the timeout, not an error at once.
        response = await self.stub.Acquire(request, timeout=self.timeout_s + wait_s,
                                           wait_for_ready=True)
        self._secrets[response.lease.lease_id] = secret
        return response.lease

    async def resize(self, lease: pb.Lease, num_bytes: int, *, wait_s: float = 0.0) -> pb.Lease:
        response = await self.stub.Resize(
            pb.ResizeRequest(lease_id=lease.lease_id, epoch=lease.epoch, bytes=num_bytes,
                             wait_ms=round(wait_s * 1000),
                             secret=self._secrets.get(lease.lease_id, "")),
            timeout=self.timeout_s + wait_s, wait_for_ready=True)
        return response.lease

    async def release(self, lease: pb.Lease) -> int:
        try:
            response = await self.stub.Release(
                pb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch,
                                  secret=self._secrets.get(lease.lease_id, "")),
                timeout=self.timeout_s)
        finally:   # released, or gone already: the secret serves no more
            self._secrets.pop(lease.lease_id, None)
        return response.released_bytes

    async def renew(self, lease: pb.Lease) -> pb.Lease:
        response = await self.stub.Renew(
            pb.RenewRequest(lease_id=lease.lease_id, epoch=lease.epoch,
                            secret=self._secrets.get(lease.lease_id, "")),
            timeout=self.timeout_s)
        return response.lease

    async def register_worker(self, info: pb.WorkerInfo, ttl_s: float) -> None:
        secret = self._worker_secrets.setdefault(
            info.worker_id, self.worker_secret or secrets.token_urlsafe(24))
        await self.stub.RegisterWorker(
            pb.RegisterWorkerRequest(worker=info, ttl_ms=round(ttl_s * 1000), secret=secret),
            timeout=self.timeout_s)

    async def unregister_worker(self, worker_id: str) -> None:
        await self.stub.UnregisterWorker(
            pb.UnregisterWorkerRequest(worker_id=worker_id,
                                       secret=self._worker_secrets.get(worker_id, "")),
            timeout=self.timeout_s)

    async def report_activity(self, activity: pb.WorkerActivity) -> None:
        await self.stub.ReportActivity(
            pb.ReportActivityRequest(activity=activity,
                                     secret=self._worker_secrets.get(activity.worker_id, "")),
            timeout=self.timeout_s)

    async def answer_reclaim(self, reclaim: pb.Reclaim, freed_bytes: int, detail: str) -> None:
        """Answer a ReclaimRequested event for a lease this client holds."""
        await self.stub.AnswerReclaim(
            pb.AnswerReclaimRequest(reclaim_id=reclaim.reclaim_id, freed_bytes=freed_bytes,
                                    detail=detail,
                                    secret=self._secrets.get(reclaim.lease.lease_id, "")),
            timeout=self.timeout_s)

    async def list_workers(self, model: str = "") -> list[pb.WorkerInfo]:
        response = await self.stub.ListWorkers(pb.ListWorkersRequest(model=model),
                                               timeout=self.timeout_s)
        return list(response.workers)

    async def status(self) -> pb.StatusResponse:
        return await self.stub.Status(pb.StatusRequest(), timeout=self.timeout_s)

    async def watch(self) -> AsyncIterator[pb.Event]:
        async for event in self.stub.Watch(pb.WatchRequest()):
            yield event

    def lease_secret(self, lease_id: str) -> str:
        """The secret this client acquired `lease_id` with ("" if none)."""
        return self._secrets.get(lease_id, "")
