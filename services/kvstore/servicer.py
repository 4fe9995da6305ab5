"""KVStoreService over gRPC: converts protobuf to domain values, calls one
store method per RPC (Hold, Place and ReleaseHold too), converts back.
Export and Import move the bytes in chunks straight between the stream and
the shared-memory region."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import structlog

from lmx.v1 import kvstore_pb2 as pb
from lmx.v1 import kvstore_pb2_grpc
from services.common.errors import InvalidArgument, LmxError
from services.kvstore import limits
from services.kvstore.arena import Region
from services.kvstore.entry import Entry, Layout, pack_tokens, unpack_tokens
from services.kvstore.store import Store

log = structlog.get_logger(__name__)


def layout_from_pb(layout: pb.KVLayout, present: bool) -> Layout:
    if not present:
        raise InvalidArgument("layout", "is required")
    return Layout(model=layout.model, model_version=layout.model_version, dtype=layout.dtype,
                  num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                  head_dim=layout.head_dim, num_tokens=layout.num_tokens,
                  block_size=layout.block_size)


def layout_to_pb(layout: Layout) -> pb.KVLayout:
    return pb.KVLayout(model=layout.model, model_version=layout.model_version,
                       dtype=layout.dtype, num_layers=layout.num_layers,
                       num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                       num_tokens=layout.num_tokens, block_size=layout.block_size)


def token_ids_from_pb(request: pb.ReserveRequest) -> Sequence[int]:
    """The entry's token ids: its packed_token_ids as an array("i"), else
    the repeated field as it is (the store copies it)."""
    if not request.packed_token_ids:
        return request.token_ids
    if len(request.token_ids):
        raise InvalidArgument("packed_token_ids", "set token_ids or packed_token_ids, not both")
    try:
        return unpack_tokens(request.packed_token_ids)
    except ValueError as exc:
        raise InvalidArgument("packed_token_ids", str(exc)) from None


def entry_to_pb(entry: Entry, now: float, contents: bool = True,
                packed: bool = False) -> pb.EntryInfo:
    """`contents`: with the token ids and the metadata (the session's chat);
    `packed`: the ids in packed_token_ids rather than token_ids."""
    ids = entry.token_ids if contents else ()
    return pb.EntryInfo(
        entry_id=entry.entry_id, owner=entry.owner, session_id=entry.session_id,
        layout=layout_to_pb(entry.layout), token_ids=() if packed else ids,
        packed_token_ids=pack_tokens(ids) if packed else b"",
        num_bytes=entry.num_bytes, checksum=entry.checksum or 0, state=entry.state,
        metadata=entry.metadata if contents else b"",
        age_s=max(0.0, now - entry.created_at), idle_s=max(0.0, now - entry.last_used_at))


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServiceServicer):
    def __init__(self, store: Store, export_chunk_bytes: int):
        self.store = store
        self.export_chunk_bytes = export_chunk_bytes

    def _region_to_pb(self, region: Region) -> pb.ShmRegion:
        # The full path: a client needs no setting to find the file.
        return pb.ShmRegion(segment=str(self.store.arena.path_of(region.segment)),
                            offset=region.offset, length=region.length)

    def _reserve(self, request: pb.ReserveRequest) -> tuple[Entry, Region]:
        return self.store.reserve(request.owner, request.session_id, request.secret,
                                  layout_from_pb(request.layout, request.HasField("layout")),
                                  token_ids_from_pb(request), request.metadata)

    async def Reserve(self, request, context):
        entry, region = self._reserve(request)
        return pb.ReserveResponse(entry_id=entry.entry_id, region=self._region_to_pb(region))

    async def Commit(self, request, context):
        entry = self.store.commit(request.entry_id, request.secret, request.checksum)
        return pb.CommitResponse(entry=entry_to_pb(entry, self.store.clock(), contents=False))

    def _hold_to_pb(self, held) -> pb.HoldResponse:
        return pb.HoldResponse(hold_id=held.hold_id, region=self._region_to_pb(held.region),
                               ttl_s=self.store.config.reservation_ttl_s)

    async def Hold(self, request, context):
        return self._hold_to_pb(self.store.hold(request.owner, request.secret,
                                                request.num_bytes, request.hold_id))

    async def Place(self, request, context):
        if not request.HasField("entry"):
            raise InvalidArgument("entry", "is required")
        header = request.entry
        entry, following = self.store.place(
            request.hold_id, request.hold_secret, header.owner, header.session_id,
            header.secret, layout_from_pb(header.layout, header.HasField("layout")),
            token_ids_from_pb(header), header.metadata, request.checksum, request.hold_again)
        return pb.PlaceResponse(
            entry=entry_to_pb(entry, self.store.clock(), contents=False),
            next=self._hold_to_pb(following) if following is not None else None)

    async def ReleaseHold(self, request, context):
        return pb.ReleaseHoldResponse(
            freed_bytes=self.store.release_hold(request.hold_id, request.secret))

    async def Open(self, request, context):
        entry, region = self.store.open(request.entry_id, request.secret)
        return pb.OpenResponse(entry=entry_to_pb(entry, self.store.clock(),
                                                 contents=not request.omit_contents,
                                                 packed=request.packed_token_ids),
                               region=self._region_to_pb(region))

    async def Delete(self, request, context):
        return pb.DeleteResponse(freed_bytes=self.store.delete(request.entry_id, request.secret))

    async def ListEntries(self, request, context):
        """Ids, owners, sizes and states: never the contents (the session's
        tokens and its metadata, the chat): those take the entry's secret
        (Open)."""
        now = self.store.clock()
        entries = []
        for entry in self.store.list(request.owner):
            entries.append(entry_to_pb(entry, now, contents=False))
        return pb.ListEntriesResponse(entries=entries)

    async def GetStoreStatus(self, request, context):
        status = self.store.status()
        return pb.GetStoreStatusResponse(
            capacity_bytes=status.capacity_bytes, used_bytes=status.used_bytes,
            spilled_bytes=status.spilled_bytes, num_entries=status.num_entries,
            num_segments=status.num_segments, when_full=status.when_full)

    async def Export(self, request, context) -> AsyncIterator[pb.ExportChunk]:
        limits.check_chunk_bytes(request.chunk_bytes)
        chunk_bytes = request.chunk_bytes or self.export_chunk_bytes
        entry, region = self.store.open(request.entry_id, request.secret)
        self.store.pin(entry.entry_id)   # not spilled nor deleted while streamed
        try:
            yield pb.ExportChunk(entry=entry_to_pb(entry, self.store.clock()))
            for start in range(0, region.length, chunk_bytes):
                with self.store.view(region) as view:
                    data = bytes(view[start:start + chunk_bytes])
                yield pb.ExportChunk(data=data)
        finally:
            self.store.unpin(entry.entry_id)

    async def Import(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "header":
            raise InvalidArgument("header", "the first chunk must be the header (a ReserveRequest)")
        header = first.header
        entry, region = self._reserve(header)
        self.store.pin(entry.entry_id)   # not expired while its bytes arrive
        try:
            written = 0
            crc = None
            async for chunk in request_iterator:
                kind = chunk.WhichOneof("kind")
                if crc is not None:
                    raise InvalidArgument("checksum", "must be the last chunk")
                if kind == "data":
                    if written + len(chunk.data) > region.length:
                        raise InvalidArgument("data", f"more than the layout's "
                                                      f"{region.length} bytes")
                    with self.store.view(region) as view:
                        view[written:written + len(chunk.data)] = chunk.data
                    written += len(chunk.data)
                elif kind == "checksum":
                    crc = chunk.checksum
                else:
                    raise InvalidArgument("header", "only the first chunk may be a header")
            if written != region.length:
                raise InvalidArgument("data", f"{written} bytes sent, the layout needs "
                                              f"{region.length}")
            if crc is None:
                raise InvalidArgument("checksum", "is required as the last chunk")
            entry = self.store.commit(entry.entry_id, header.secret, crc, verify=True)
        except BaseException:
            self.store.unpin(entry.entry_id)
            if self.store.get(entry.entry_id) is not None:
                try:
                    self.store.delete(entry.entry_id, header.secret)
                except LmxError:
                    pass
            raise
        self.store.unpin(entry.entry_id)
        log.info("entry_imported", entry_id=entry.entry_id, bytes=entry.num_bytes)
        return pb.ImportResponse(entry=entry_to_pb(entry, self.store.clock()))

