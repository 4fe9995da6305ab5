"""The one place where domain errors become gRPC status codes, and where each
request gets an id bound into structlog's context.

  CapacityExhausted  -> RESOURCE_EXHAUSTED, with RetryInfo and ErrorInfo
                        (device, requested, free and missing bytes)
  NotFound           -> NOT_FOUND
  PermissionDenied   -> PERMISSION_DENIED
  InvalidArgument    -> INVALID_ARGUMENT, with BadRequest naming the field (and
                        ErrorInfo(reason) when it has one: CONTEXT_LENGTH_EXCEEDED)
  FailedPrecondition -> FAILED_PRECONDITION, with ErrorInfo(reason)
  Aborted            -> ABORTED, with ErrorInfo(reason) (retry the request)
  anything else      -> INTERNAL, the exception logged with the request id

Only lmx's own services are wrapped; health and reflection pass unchanged.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable

import grpc
import structlog
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.errors import (
    Aborted,
    CapacityExhausted,
    FailedPrecondition,
    InvalidArgument,
    LmxError,
    NotFound,
    PermissionDenied,
)

log = structlog.get_logger(__name__)

ERROR_DOMAIN = "lmx.dev"
REQUEST_ID_KEY = "x-request-id"
# Messages may echo what the caller sent (a lease id, a device name). Clipped,
# so that a huge value cannot push the status past the client's 16 KiB
# metadata limit (the caller would then see RESOURCE_EXHAUSTED instead).
MAX_ERROR_MESSAGE_BYTES = 1024


def _clip(text: str) -> str:
    data = text.encode()
    if len(data) <= MAX_ERROR_MESSAGE_BYTES:
        return text
    return data[:MAX_ERROR_MESSAGE_BYTES].decode(errors="ignore") + "... (clipped)"


def to_status(exc: Exception, request_id: str) -> grpc.Status:
    """A grpc.Status (code, message, rich details) for an exception."""
    details = []
    if isinstance(exc, CapacityExhausted):
        code = code_pb2.RESOURCE_EXHAUSTED
        retry = duration_pb2.Duration()
        retry.FromNanoseconds(int(exc.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=retry))
        short = exc.shortfall
        details.append(error_details_pb2.ErrorInfo(
            reason="INSUFFICIENT_DEVICE_MEMORY", domain=ERROR_DOMAIN,
            metadata={"device": short.device,
                      "requested_bytes": str(short.requested_bytes),
                      "free_bytes": str(short.free_bytes),
                      "missing_bytes": str(short.missing_bytes)}))
    elif isinstance(exc, InvalidArgument):
        code = code_pb2.INVALID_ARGUMENT
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field,
                                                        description=_clip(exc.description))]))
        if exc.reason:
            details.append(error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN))
    elif isinstance(exc, PermissionDenied):
        code = code_pb2.PERMISSION_DENIED
    elif isinstance(exc, NotFound):
        code = code_pb2.NOT_FOUND
    elif isinstance(exc, FailedPrecondition):
        code = code_pb2.FAILED_PRECONDITION
        details.append(error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN))
    elif isinstance(exc, Aborted):
        code = code_pb2.ABORTED
        details.append(error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN))
    else:
        code = code_pb2.INTERNAL
    message = _clip(exc.message) if isinstance(exc, LmxError) else (
        f"internal error (request_id={request_id}); see the server's log")
    status = status_pb2.Status(code=code, message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, request_id: str,
                 rpc: str) -> None:
    if isinstance(exc, LmxError):
        log.info("rpc_refused", error=type(exc).__name__, message=_clip(exc.message))
    else:
        log.error("rpc_failed", exc_info=exc)
    status = to_status(exc, request_id)
    # The traceback's frames hold the request: grpc keeps the abort's
    # exception (chained to this one) for a while, and a request of many MB
    # would stay in memory with it, one per refused call.
    exc.__traceback__ = None
    await context.abort(status.code, status.details,
                        tuple(status.trailing_metadata) + ((REQUEST_ID_KEY, request_id),))


class _Malformed:
    """Stands in for a request whose bytes did not decode, so that the caller
    gets INVALID_ARGUMENT instead of grpc's generic INTERNAL."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserializer):
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends
            return _Malformed(exc)

    return deserialize


def _check_decoded(request) -> None:
    if isinstance(request, _Malformed):
        raise InvalidArgument("request", f"not a valid message: {request.error}")


def _request_id(details: grpc.HandlerCallDetails, ids: random.Random) -> str:
    """The caller's x-request-id, else 16 random hex digits (from `ids`: no
    system call per request, unlike uuid4; request ids need not be secret)."""
    for key, value in details.invocation_metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return f"{ids.getrandbits(64):016x}"


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, package_prefix: str = "/lmx."):
        self._prefix = package_prefix
        self._ids = random.Random()  # seeded from os.urandom
        # The lenient deserializer of each method, made once rather than per call.
        self._deserializers: dict[str, tuple[Callable | None, Callable | None]] = {}

    def _lenient_for(self, rpc: str, deserializer: Callable | None) -> Callable | None:
        lenient = self._deserializers.get(rpc)
        if lenient is None or lenient[0] is not deserializer:
            lenient = self._deserializers[rpc] = (deserializer, _lenient(deserializer))
        return lenient[1]

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        rpc = handler_call_details.method
        if handler is None or not rpc.startswith(self._prefix):
            return handler
        request_id = _request_id(handler_call_details, self._ids)
        short_rpc = rpc.rsplit("/", 1)[-1]

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                # bind/reset rather than bound_contextvars(): the same effect
                # (the previous values come back after the call) for a third
                # of the cost, which counts on every call.
                tokens = structlog.contextvars.bind_contextvars(request_id=request_id,
                                                                rpc=short_rpc)
                try:
                    _check_decoded(request)
                    return await inner(request, context)
                except Exception as exc:  # noqa: BLE001 - mapped, never fatal
                    del request   # not kept alive by the abort's traceback (see _abort)
                    await _abort(context, exc, request_id, rpc)
                finally:
                    structlog.contextvars.reset_contextvars(**tokens)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=self._lenient_for(rpc, handler.request_deserializer),
                response_serializer=handler.response_serializer)

        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream
            if not inspect.isasyncgenfunction(inner_stream):
                return handler

            async def unary_stream(request, context):
                with structlog.contextvars.bound_contextvars(request_id=request_id,
                                                             rpc=short_rpc):
                    try:
                        _check_decoded(request)
                        async for item in inner_stream(request, context):
                            yield item
                    except Exception as exc:  # noqa: BLE001
                        del request   # see _abort
                        await _abort(context, exc, request_id, rpc)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=self._lenient_for(rpc, handler.request_deserializer),
                response_serializer=handler.response_serializer)

        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(request_iterator, context):
                with structlog.contextvars.bound_contextvars(request_id=request_id,
                                                             rpc=short_rpc):
                    try:
                        return await inner_su(_checked_stream(request_iterator), context)
                    except Exception as exc:  # noqa: BLE001
                        await _abort(context, exc, request_id, rpc)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary,
                request_deserializer=self._lenient_for(rpc, handler.request_deserializer),
                response_serializer=handler.response_serializer)

        return handler


async def _checked_stream(requests):
    """A request stream whose undecodable messages raise INVALID_ARGUMENT."""
    async for request in requests:
        _check_decoded(request)
        yield request
