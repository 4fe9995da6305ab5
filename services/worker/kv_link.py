"""The worker's client of the kvstore: park bytes (Reserve, write straight
into the shared-memory region, Commit with the CRC-32), fetch them (Open,
read, check the CRC-32 again) and delete an entry. gRPC errors come back as
domain errors, so that the worker's callers see the kvstore's answer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import structlog

from lmx.v1 import kvstore_pb2 as pb
from lmx.v1 import kvstore_pb2_grpc
from services.admission.client import error_details
from services.common.errors import (
    CapacityExhausted,
    FailedPrecondition,
    InvalidArgument,
    LmxError,
    NotFound,
    PermissionDenied,
    Shortfall,
)
from services.kvstore.client import checksum, read_region, write_region
from services.kvstore.entry import Layout
from services.kvstore.servicer import layout_to_pb

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class FetchedEntry:
    entry_id: str
    layout: Layout
    token_ids: list[int]
    metadata: bytes
    data: bytes


def domain_error(exc: grpc.aio.AioRpcError, what: str) -> LmxError:
    """The kvstore's answer as the worker's own error."""
    details = error_details(exc)
    code = exc.code()
    message = f"kvstore: {details.message}"
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound("entry", what, "it was restored, deleted or never parked")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied("token", "does not match the parked session's token")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(message, details.reason or "KVSTORE_REFUSED")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return CapacityExhausted(message, Shortfall("kvstore", 0, 0), details.retry_after_s or 1.0)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(details.field or "entry_id", message)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return FailedPrecondition(f"the kvstore does not answer ({code.name}): start it "
                                  "(lmx kvstore), or check the worker's --kvstore",
                                  "KVSTORE_UNAVAILABLE")
    return LmxError(f"kvstore failed: {code.name}: {details.message}")


class KVStoreLink:
    def __init__(self, address: str, owner: str, timeout_s: float = 30.0):
        self.address = address
        self.owner = owner
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(address)
        self.stub = kvstore_pb2_grpc.KVStoreServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def park(self, layout: Layout, session_id: str, secret: str, token_ids: list[int],
                   metadata: bytes, data: bytes) -> str:
        """A committed entry holding `data`; its id."""
        if len(data) != layout.num_bytes:
            raise ValueError(f"{len(data)} bytes for a layout of {layout.num_bytes}")
        try:
            reserved = await self.stub.Reserve(pb.ReserveRequest(
                owner=self.owner, session_id=session_id, secret=secret,
                layout=layout_to_pb(layout), token_ids=token_ids, metadata=metadata),
                timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, "") from None
        try:
            crc = await asyncio.to_thread(write_region, reserved.region, data)
            await self.stub.Commit(pb.CommitRequest(entry_id=reserved.entry_id, secret=secret,
                                                    checksum=crc), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            await self.delete(reserved.entry_id, secret)
            raise domain_error(exc, reserved.entry_id) from None
        except BaseException:
            await self.delete(reserved.entry_id, secret)
            raise
        return reserved.entry_id

    async def fetch(self, entry_id: str, secret: str) -> FetchedEntry:
        """The entry's bytes, checked against its checksum (CORRUPTED if not)."""
        try:
            opened = await self.stub.Open(pb.OpenRequest(entry_id=entry_id, secret=secret),
                                          timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, entry_id) from None
        entry = opened.entry
        data = await asyncio.to_thread(read_region, opened.region)
        if len(data) != entry.num_bytes or checksum(data) != entry.checksum:
            # The region is not pinned after Open: it changed since.
            raise FailedPrecondition(f"entry {entry_id!r} changed while it was read "
                                     "(checksum mismatch); it was not used", "CORRUPTED")
        lay = entry.layout
        layout = Layout(model=lay.model, model_version=lay.model_version, dtype=lay.dtype,
                        num_layers=lay.num_layers, num_kv_heads=lay.num_kv_heads,
                        head_dim=lay.head_dim, num_tokens=lay.num_tokens,
                        block_size=lay.block_size)
        return FetchedEntry(entry_id, layout, list(entry.token_ids), entry.metadata, data)

    async def delete(self, entry_id: str, secret: str) -> None:
        """Best effort: a failure is logged (the entry stays until deleted)."""
        try:
            await self.stub.Delete(pb.DeleteRequest(entry_id=entry_id, secret=secret),
                                   timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("kv_entry_delete_failed", entry_id=entry_id, code=exc.code().name)
