"""Domain errors to gRPC status codes with rich details (google.rpc.Status)."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.common.errors import (
    CapacityExhausted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Shortfall,
)
from services.common.interceptors import ERROR_DOMAIN, to_status

DETAILS_KEY = "grpc-status-details-bin"


def rich_status(status: grpc.Status) -> status_pb2.Status:
    found = [value for key, value in status.trailing_metadata if key == DETAILS_KEY]
    assert len(found) == 1, f"expected one {DETAILS_KEY} entry, got {status.trailing_metadata}"
    return status_pb2.Status.FromString(found[0])


def unpack(rich: status_pb2.Status) -> dict[type, object]:
    """The details by type; each type at most once."""
    out: dict[type, object] = {}
    for detail in rich.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo,
                     error_details_pb2.BadRequest):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                assert kind not in out, f"{kind.__name__} appears twice"
                out[kind] = message
                break
        else:
            raise AssertionError(f"unexpected detail type {detail.type_url}")
    return out


def test_capacity_exhausted_is_resource_exhausted_with_retry_and_shortfall():
    exc = CapacityExhausted("cannot grant 300 bytes", Shortfall("gpu:0", 300, 100), 1.5)
    status = to_status(exc, "req-1")
    assert status.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status.details == "cannot grant 300 bytes"
    rich = rich_status(status)
    assert (rich.code, rich.message) == (code_pb2.RESOURCE_EXHAUSTED, "cannot grant 300 bytes")
    details = unpack(rich)
    assert set(details) == {error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo}
    retry = details[error_details_pb2.RetryInfo].retry_delay
    assert (retry.seconds, retry.nanos) == (1, 500_000_000), f"retry delay {retry}"
    info = details[error_details_pb2.ErrorInfo]
    assert (info.reason, info.domain) == ("INSUFFICIENT_DEVICE_MEMORY", ERROR_DOMAIN)
    assert dict(info.metadata) == {"device": "gpu:0", "requested_bytes": "300",
                                   "free_bytes": "100", "missing_bytes": "200"}


def test_capacity_exhausted_with_negative_free_reports_missing_bytes():
    # Over budget after foreign memory grew: free is negative.
    exc = CapacityExhausted("full", Shortfall("gpu:1", 10, -50), 0.1)
    info = unpack(rich_status(to_status(exc, "r")))[error_details_pb2.ErrorInfo]
    assert info.metadata["free_bytes"] == "-50" and info.metadata["missing_bytes"] == "60"


def test_invalid_argument_names_the_field():
    exc = InvalidArgument("holder.name", "a holder name is required")
    status = to_status(exc, "req-2")
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "holder.name: a holder name is required"
    details = unpack(rich_status(status))
    assert set(details) == {error_details_pb2.BadRequest}
    (violation,) = details[error_details_pb2.BadRequest].field_violations
    assert (violation.field, violation.description) == ("holder.name", "a holder name is required")


def test_an_invalid_argument_with_a_reason_carries_it_in_error_info():
    exc = InvalidArgument("prompt", "too long", reason="CONTEXT_LENGTH_EXCEEDED")
    details = unpack(rich_status(to_status(exc, "req-9")))
    assert details[error_details_pb2.ErrorInfo].reason == "CONTEXT_LENGTH_EXCEEDED"
    assert details[error_details_pb2.BadRequest].field_violations[0].field == "prompt"


def test_not_found():
    status = to_status(NotFound("lease", "lease-1", "it was released"), "req-3")
    assert status.code is grpc.StatusCode.NOT_FOUND
    assert status.details == "unknown lease 'lease-1'; it was released"
    rich = rich_status(status)
    assert rich.code == code_pb2.NOT_FOUND and list(rich.details) == []


def test_failed_precondition_carries_the_reason():
    for reason in ("LEASE_EXPIRED", "STALE_EPOCH"):
        status = to_status(FailedPrecondition("stop using it", reason=reason), "req-4")
        assert status.code is grpc.StatusCode.FAILED_PRECONDITION
        assert status.details == "stop using it"
        details = unpack(rich_status(status))
        info = details[error_details_pb2.ErrorInfo]
        assert (info.reason, info.domain) == (reason, ERROR_DOMAIN)


def test_anything_else_is_internal_and_hides_the_exception():
    status = to_status(KeyError("secret internals"), "req-5")
    assert status.code is grpc.StatusCode.INTERNAL
    assert "req-5" in status.details, "the message must give the request id to look up"
    assert "secret" not in status.details, "an internal error must not leak its text"
    rich = rich_status(status)
    assert rich.code == code_pb2.INTERNAL and list(rich.details) == []
