"""The worker's client of the kvstore's control plane: Reserve a region,
Commit it with the checksum of what was written (or Hold a region ahead
and Place an entry in it: one round trip a park), Open an entry (its region
and checksum), Delete it. The bytes themselves never pass through here:
services/worker/kv_transfer.py copies them straight to and from the shared
memory. gRPC errors come back as domain errors, so that the worker's callers
see the kvstore's answer."""

from __future__ import annotations

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
from services.kvstore.entry import Layout, pack_tokens, unpack_tokens
from services.kvstore.servicer import layout_to_pb
from services.common import transport

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Reservation:
    entry_id: str
    region: pb.ShmRegion


@dataclass(frozen=True)
class ShmRegion:
    """`length` bytes at `offset` of the segment file `segment` (a path)."""

    segment: str
    offset: int
    length: int

    def prefix(self, length: int) -> ShmRegion:
        return ShmRegion(self.segment, self.offset, length)


@dataclass(frozen=True)
class Held:
    """Shared memory held ahead of a park (the kvstore's Hold); renewed
    within ttl_s, or the kvstore drops it."""

    hold_id: str
    secret: str
    region: ShmRegion
    ttl_s: float


def _held(reply: pb.HoldResponse, secret: str) -> Held:
    region = reply.region
    return Held(reply.hold_id, secret, ShmRegion(region.segment, region.offset, region.length),
                reply.ttl_s)


@dataclass(frozen=True)
class OpenedEntry:
    entry_id: str
    layout: Layout
    token_ids: list[int]
    metadata: bytes
    region: pb.ShmRegion
    checksum: int


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
        self._channel = transport.aio_channel(address)
        self.stub = kvstore_pb2_grpc.KVStoreServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def reserve(self, layout: Layout, session_id: str, secret: str,
                      token_ids: list[int], metadata: bytes) -> Reservation:
        """A region of layout.num_bytes to write the KV into, then Commit."""
        try:
            reserved = await self.stub.Reserve(pb.ReserveRequest(
                owner=self.owner, session_id=session_id, secret=secret,
                layout=layout_to_pb(layout), packed_token_ids=pack_tokens(token_ids),
                metadata=metadata), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, "") from None
        return Reservation(reserved.entry_id, reserved.region)

    async def commit(self, entry_id: str, secret: str, checksum: int) -> None:
        try:
            await self.stub.Commit(pb.CommitRequest(entry_id=entry_id, secret=secret,
                                                    checksum=checksum), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, entry_id) from None

    async def hold(self, num_bytes: int, secret: str, renew: str = "") -> Held:
        """`num_bytes` of shared memory held for the next park (or the hold
        `renew` kept a TTL longer)."""
        try:
            held = await self.stub.Hold(pb.HoldRequest(owner=self.owner, secret=secret,
                                                       num_bytes=num_bytes, hold_id=renew),
                                        timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, renew) from None
        return _held(held, secret)

    async def place(self, held: Held, layout: Layout, session_id: str, secret: str,
                    token_ids: list[int], metadata: bytes, checksum: int,
                    hold_again: bool = True) -> tuple[str, Held | None]:
        """The bytes written at the start of `held`'s region, an entry (a
        Reserve and a Commit in one round trip): its id, and the next hold."""
        try:
            placed = await self.stub.Place(pb.PlaceRequest(
                hold_id=held.hold_id, hold_secret=held.secret, checksum=checksum,
                hold_again=hold_again,
                entry=pb.ReserveRequest(owner=self.owner, session_id=session_id, secret=secret,
                                        layout=layout_to_pb(layout),
                                        packed_token_ids=pack_tokens(token_ids),
                                        metadata=metadata)), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, held.hold_id) from None
        following = _held(placed.next, held.secret) if placed.HasField("next") else None
        return placed.entry.entry_id, following

    async def release_hold(self, held: Held) -> None:
        """Best effort, as delete."""
        try:
            await self.stub.ReleaseHold(pb.ReleaseHoldRequest(hold_id=held.hold_id,
                                                              secret=held.secret),
                                        timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("kv_hold_release_failed", hold_id=held.hold_id,
                            code=exc.code().name)

    async def open(self, entry_id: str, secret: str, contents: bool = True) -> OpenedEntry:
        """The entry's region and checksum (the reader checks the bytes);
        without `contents`, no token ids and no metadata (the caller has
        them: its own parked session)."""
        try:
            opened = await self.stub.Open(pb.OpenRequest(entry_id=entry_id, secret=secret,
                                                         omit_contents=not contents,
                                                         packed_token_ids=True),
                                          timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, entry_id) from None
        entry = opened.entry
        lay = entry.layout
        layout = Layout(model=lay.model, model_version=lay.model_version, dtype=lay.dtype,
                        num_layers=lay.num_layers, num_kv_heads=lay.num_kv_heads,
                        head_dim=lay.head_dim, num_tokens=lay.num_tokens,
                        block_size=lay.block_size)
        try:
            token_ids = unpack_tokens(entry.packed_token_ids).tolist()
        except ValueError as exc:   # the store broke the proto's contract
            raise FailedPrecondition(f"kvstore entry {entry_id!r}: {exc}") from None
        return OpenedEntry(entry_id, layout, token_ids, entry.metadata, opened.region,
                           entry.checksum)

    async def list_own(self) -> list[tuple[str, str, str]]:
        """(entry id, session id, state) of every entry this owner parked."""
        try:
            listed = await self.stub.ListEntries(pb.ListEntriesRequest(owner=self.owner),
                                                 timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, "") from None
        return [(e.entry_id, e.session_id, e.state) for e in listed.entries]

    async def delete(self, entry_id: str, secret: str) -> None:
        """Best effort: a failure is logged (the entry stays until deleted)."""
        try:
            await self.stub.Delete(pb.DeleteRequest(entry_id=entry_id, secret=secret),
                                   timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("kv_entry_delete_failed", entry_id=entry_id, code=exc.code().name)
