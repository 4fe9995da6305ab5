"""The front's side of gRPC: which workers serve which model (admission's
worker registry), their sessions, and Generate; and the one place where a
gRPC error becomes an OpenAI error (`api_error`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import structlog

from lmx.v1 import admission_pb2 as apb
from lmx.v1 import worker_pb2 as wpb
from lmx.v1 import worker_pb2_grpc
from services.admission.client import AdmissionClient, error_details
from services.common import transport
from services.front.openai_api import ApiError, Call

log = structlog.get_logger(__name__)

#: The registry is read again after this long (a worker that started or
#: stopped shows up within it).
REGISTRY_TTL_S = 1.0
SERVING = (apb.WORKER_STATE_READY, apb.WORKER_STATE_ASLEEP)

#: gRPC status -> (HTTP status, OpenAI error type).
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (503, "service_unavailable_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


def api_error(exc: grpc.aio.AioRpcError) -> ApiError:
    """A worker's or admission's refusal as OpenAI's client expects it: 429
    with Retry-After when memory is short, 400 naming the field, ..."""
    details = error_details(exc)
    status, kind = STATUS.get(details.code, (500, "api_error"))
    retry = details.retry_after_s
    if retry is None and status in (429, 503):
        retry = 1.0
    return ApiError(status, details.message or details.code.name, type=kind,
                    param=details.field or None, code=details.reason or details.code.name,
                    retry_after_s=retry)


class Workers:
    def __init__(self, admission: str, timeout_s: float):
        self.admission = AdmissionClient(admission)
        self.timeout_s = timeout_s
        self._listed: list[apb.WorkerInfo] = []
        self._listed_at = 0.0
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        await self.admission.close()

    async def listed(self) -> list[apb.WorkerInfo]:
        if time.monotonic() - self._listed_at > REGISTRY_TTL_S:
            try:
                reply = await self.admission.stub.ListWorkers(apb.ListWorkersRequest(),
                                                              timeout=10)
            except grpc.aio.AioRpcError as exc:
                raise api_error(exc) from None
            self._listed = [w for w in reply.workers if w.state in SERVING]
            self._listed_at = time.monotonic()
        return self._listed

    async def models(self) -> list[str]:
        return sorted({w.model for w in await self.listed()})

    async def serving(self, model: str) -> list[apb.WorkerInfo]:
        """The workers of `model`, fewest sessions first; 404 if none."""
        workers = [w for w in await self.listed() if w.model == model]
        if not workers:
            known = ", ".join(await self.models()) or "none"
            raise ApiError(404, f"model {model!r} is not served here (served: {known})",
                           type="not_found_error", param="model", code="model_not_found")
        return sorted(workers, key=lambda w: w.num_sessions)

    def stub(self, address: str) -> worker_pb2_grpc.WorkerServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = transport.aio_channel(address)
        return worker_pb2_grpc.WorkerServiceStub(channel)

    async def open(self, address: str, model: str) -> wpb.OpenSessionResponse:
        try:
            return await self.stub(address).OpenSession(wpb.OpenSessionRequest(model=model),
                                                        timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise api_error(exc) from None

    async def close_session(self, address: str, session_id: str, token: str) -> None:
        try:
            await self.stub(address).CloseSession(
                wpb.CloseSessionRequest(session_id=session_id, token=token), timeout=10)
        except grpc.aio.AioRpcError as exc:
            log.info("front_close_failed", worker=address, session_id=session_id,
                     code=exc.code().name)

    def generate(self, address: str, session_id: str, token: str,
                 call: Call) -> AsyncIterator[wpb.GenerateResponse]:
        s = call.sampling
        sampling = wpb.SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature,
                                      top_p=s.top_p, stop=list(s.stop))
        if s.seed is not None:
            sampling.seed = s.seed
        request = wpb.GenerateRequest(session_id=session_id, token=token, sampling=sampling)
        if call.kind == "chat":
            request.conversation.CopyFrom(wpb.Conversation(messages=[
                wpb.ChatMessage(role=role, content=content) for role, content in call.messages]))
        else:
            request.whole_prompt = call.prompt
        return self.stub(address).Generate(request, timeout=self.timeout_s)
