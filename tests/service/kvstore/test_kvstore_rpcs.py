"""KVStoreService through a real server: the shared-memory data plane,
secrets, validation, Export/Import between two servers, crash and clean stop."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from lmx.v1 import kvstore_pb2 as pb
from services.admission.client import error_details
from services.kvstore.checksum import checksum
from services.kvstore.client import ChecksumMismatch, read_checked, read_region, write_region
from services.kvstore.entry import pack_tokens, unpack_tokens

from .support import (
    REPO_ROOT,
    RPC_TIMEOUT_S,
    SECRET,
    layout,
    num_bytes,
    park,
    reserve_request,
    stub,
)


def rpc_error(fn, request) -> grpc.RpcError:
    try:
        answer = fn(request, timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"succeeded but should have failed: {request!r} -> {answer!r}")


def export(kv, entry_id: str, secret: str = SECRET, chunk_bytes: int = 0):
    chunks = list(kv.Export(pb.ExportRequest(entry_id=entry_id, secret=secret,
                                             chunk_bytes=chunk_bytes), timeout=RPC_TIMEOUT_S))
    assert chunks[0].WhichOneof("kind") == "entry"
    return chunks[0].entry, b"".join(c.data for c in chunks[1:]), len(chunks) - 1


def import_chunks(header: pb.ReserveRequest, data: bytes, crc: int | None, chunk: int = 3000):
    yield pb.ImportChunk(header=header)
    for start in range(0, len(data), chunk):
        yield pb.ImportChunk(data=data[start:start + chunk])
    if crc is not None:
        yield pb.ImportChunk(checksum=crc)


def test_reserve_write_commit_open_read_back(kv, shared_kvstore):
    entry, data = park(kv)
    assert entry.state == "ready" and entry.num_bytes == len(data) == 8192
    assert entry.checksum == checksum(data)
    opened = kv.Open(pb.OpenRequest(entry_id=entry.entry_id, secret=SECRET),
                     timeout=RPC_TIMEOUT_S)
    assert opened.region.segment.startswith(str(shared_kvstore.shm_dir) + "/lmx-main-")
    assert oct(os.stat(opened.region.segment).st_mode & 0o777) == "0o600"
    assert read_region(opened.region) == data
    assert list(opened.entry.token_ids) == list(range(10))
    assert not entry.token_ids and not entry.metadata, (
        "Commit's reply carries the token ids and metadata the writer just sent")
    bare = kv.Open(pb.OpenRequest(entry_id=entry.entry_id, secret=SECRET, omit_contents=True),
                   timeout=RPC_TIMEOUT_S)
    assert not bare.entry.token_ids and not bare.entry.metadata and bare.region == opened.region
    assert bare.entry.checksum == entry.checksum and bare.entry.layout == opened.entry.layout
    listed = kv.ListEntries(pb.ListEntriesRequest(owner="worker-1"), timeout=RPC_TIMEOUT_S)
    assert entry.entry_id in [e.entry_id for e in listed.entries]
    mine = next(e for e in listed.entries if e.entry_id == entry.entry_id)
    assert not mine.token_ids and not mine.metadata, (
        "a listing must not show a session's tokens or chat: they take its secret")
    assert mine.num_bytes == 8192 and mine.owner == "worker-1"
    assert kv.ListEntries(pb.ListEntriesRequest(owner="nobody"), timeout=RPC_TIMEOUT_S).entries == []
    status = kv.GetStoreStatus(pb.GetStoreStatusRequest(), timeout=RPC_TIMEOUT_S)
    assert status.when_full == "spill" and status.used_bytes >= 8192 and status.num_segments >= 1
    freed = kv.Delete(pb.DeleteRequest(entry_id=entry.entry_id, secret=SECRET),
                      timeout=RPC_TIMEOUT_S)
    assert freed.freed_bytes == 8192
    exc = rpc_error(kv.Open, pb.OpenRequest(entry_id=entry.entry_id, secret=SECRET))
    assert exc.code() == grpc.StatusCode.NOT_FOUND


def test_hold_then_place_makes_ready_entries_in_one_call_each(kv):
    """A hold's region is written at once, then Place makes the entry (a
    Reserve and a Commit in one round trip), holding the next region."""
    held = kv.Hold(pb.HoldRequest(owner="worker-1", secret="hold-1", num_bytes=32 << 10),
                   timeout=RPC_TIMEOUT_S)
    assert held.region.length == 32 << 10 and held.ttl_s > 0
    placed = []
    for _ in range(3):
        request = reserve_request()
        data = os.urandom(num_bytes(request.layout))
        region = pb.ShmRegion(segment=held.region.segment, offset=held.region.offset,
                              length=len(data))
        crc = write_region(region, data)
        answer = kv.Place(pb.PlaceRequest(hold_id=held.hold_id, hold_secret="hold-1",
                                          entry=request, checksum=crc, hold_again=True),
                          timeout=RPC_TIMEOUT_S)
        assert answer.entry.state == "ready" and answer.entry.checksum == crc
        assert answer.entry.token_ids == [], "Place's reply, like Commit's, has no contents"
        assert answer.HasField("next") and answer.next.hold_id != held.hold_id
        placed.append((answer.entry.entry_id, data))
        old, held = held, answer.next
        exc = rpc_error(kv.Place, pb.PlaceRequest(hold_id=old.hold_id, hold_secret="hold-1",
                                                  entry=request, checksum=crc))
        assert exc.code() == grpc.StatusCode.NOT_FOUND, "a hold is used once"
    for entry_id, data in placed:
        opened = kv.Open(pb.OpenRequest(entry_id=entry_id, secret=SECRET), timeout=RPC_TIMEOUT_S)
        assert read_checked(opened.region, opened.entry.checksum) == data
    exc = rpc_error(kv.ReleaseHold, pb.ReleaseHoldRequest(hold_id=held.hold_id, secret="x"))
    assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
    big = reserve_request(layout(num_tokens=64))                       # 64 KiB
    exc = rpc_error(kv.Place, pb.PlaceRequest(hold_id=held.hold_id, hold_secret="hold-1",
                                              entry=big, checksum=0))
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(exc).reason == "HOLD_TOO_SMALL"
    exc = rpc_error(kv.Hold, pb.HoldRequest(owner="worker-1", secret="hold-1"))
    assert (exc.code(), error_details(exc).field) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                      "num_bytes")
    freed = kv.ReleaseHold(pb.ReleaseHoldRequest(hold_id=held.hold_id, secret="hold-1"),
                           timeout=RPC_TIMEOUT_S)
    assert freed.freed_bytes == 32 << 10


def test_token_ids_packed_in_bytes_come_back_the_same_either_way(kv):
    """packed_token_ids (little-endian int32) in place of the repeated field,
    at Reserve and at Place; Open gives them back packed when asked, as the
    repeated field when not, the same ids both ways."""
    ids = [0, 1, 151_935, 2**31 - 1, 42, *range(1000, 1100)]
    lay = layout(num_tokens=100)
    request = pb.ReserveRequest(owner="worker-1", session_id="s-packed", secret=SECRET,
                                layout=lay, packed_token_ids=pack_tokens(ids))
    answer = kv.Reserve(request, timeout=RPC_TIMEOUT_S)
    crc = write_region(answer.region, os.urandom(num_bytes(lay)))
    kv.Commit(pb.CommitRequest(entry_id=answer.entry_id, secret=SECRET, checksum=crc),
              timeout=RPC_TIMEOUT_S)
    held = kv.Hold(pb.HoldRequest(owner="worker-1", secret="hold-p", num_bytes=num_bytes(lay)),
                   timeout=RPC_TIMEOUT_S)
    region = pb.ShmRegion(segment=held.region.segment, offset=held.region.offset,
                          length=num_bytes(lay))
    crc = write_region(region, os.urandom(num_bytes(lay)))
    placed = kv.Place(pb.PlaceRequest(
        hold_id=held.hold_id, hold_secret="hold-p", checksum=crc, entry=pb.ReserveRequest(
            owner="worker-1", session_id="s-placed", secret=SECRET, layout=lay,
            packed_token_ids=pack_tokens(ids))), timeout=RPC_TIMEOUT_S).entry
    for entry_id in (answer.entry_id, placed.entry_id):
        packed = kv.Open(pb.OpenRequest(entry_id=entry_id, secret=SECRET, packed_token_ids=True),
                         timeout=RPC_TIMEOUT_S).entry
        assert not packed.token_ids and list(unpack_tokens(packed.packed_token_ids)) == ids
        plain = kv.Open(pb.OpenRequest(entry_id=entry_id, secret=SECRET), timeout=RPC_TIMEOUT_S)
        assert list(plain.entry.token_ids) == ids and not plain.entry.packed_token_ids
        bare = kv.Open(pb.OpenRequest(entry_id=entry_id, secret=SECRET, omit_contents=True,
                                      packed_token_ids=True), timeout=RPC_TIMEOUT_S).entry
        assert not bare.packed_token_ids and not bare.token_ids
        header, _, _ = export(kv, entry_id)
        assert list(header.token_ids) == ids
        kv.Delete(pb.DeleteRequest(entry_id=entry_id, secret=SECRET), timeout=RPC_TIMEOUT_S)


def test_wrong_secret_is_permission_denied(kv):
    entry, _ = park(kv)
    for secret in ("", "other-session"):
        assert rpc_error(kv.Open, pb.OpenRequest(entry_id=entry.entry_id, secret=secret)
                         ).code() == grpc.StatusCode.PERMISSION_DENIED
        assert rpc_error(kv.Delete, pb.DeleteRequest(entry_id=entry.entry_id, secret=secret)
                         ).code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:
            export(kv, entry.entry_id, secret)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(("request_", "field"), [
    (reserve_request(layout(dtype="int4")), "layout.dtype"),
    (reserve_request(layout(num_layers=0)), "layout.num_layers"),
    (reserve_request(layout(num_kv_heads=-2)), "layout.num_kv_heads"),
    (reserve_request(layout(head_dim=0)), "layout.head_dim"),
    (pb.ReserveRequest(owner="w", session_id="s", secret="x", layout=layout(), token_ids=[1]),
     "layout.num_tokens"),
    (pb.ReserveRequest(owner="w", session_id="s", secret="x"), "layout"),
    (reserve_request(secret=""), "secret"),
    (reserve_request(owner=""), "owner"),
    (reserve_request(layout(num_layers=1 << 20, num_tokens=1 << 20, head_dim=1 << 10)), "layout"),
    (pb.ReserveRequest(owner="w", session_id="s", secret="x", layout=layout(),
                       token_ids=list(range(10)), packed_token_ids=pack_tokens(range(10))),
     "packed_token_ids"),
    (pb.ReserveRequest(owner="w", session_id="s", secret="x", layout=layout(),
                       packed_token_ids=pack_tokens(range(10))[:-1]), "packed_token_ids"),
    (pb.ReserveRequest(owner="w", session_id="s", secret="x", layout=layout(),
                       packed_token_ids=pack_tokens(range(7))), "layout.num_tokens"),
])
def test_bad_reserve_is_invalid_argument_naming_the_field(kv, request_, field):
    exc = rpc_error(kv.Reserve, request_)
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(exc).field == field


def test_corruption_is_caught_by_the_reader(kv):
    entry, _ = park(kv)
    opened = kv.Open(pb.OpenRequest(entry_id=entry.entry_id, secret=SECRET), timeout=RPC_TIMEOUT_S)
    with open(opened.region.segment, "r+b") as fh:    # flip a byte of the parked context
        fh.seek(opened.region.offset + 17)
        byte = fh.read(1)[0]
        fh.seek(opened.region.offset + 17)
        fh.write(bytes([byte ^ 0x40]))
    opened = kv.Open(pb.OpenRequest(entry_id=entry.entry_id, secret=SECRET), timeout=RPC_TIMEOUT_S)
    with pytest.raises(ChecksumMismatch):
        read_checked(opened.region, opened.entry.checksum)


def test_import_checks_sizes_and_checksum(kv):
    header = reserve_request()
    data = os.urandom(num_bytes(header.layout))
    cases = [
        (import_chunks(header, data[:-1], checksum(data[:-1])), grpc.StatusCode.INVALID_ARGUMENT),
        (import_chunks(header, data + b"x", checksum(data)), grpc.StatusCode.INVALID_ARGUMENT),
        (import_chunks(header, data, None), grpc.StatusCode.INVALID_ARGUMENT),
        (import_chunks(header, data, checksum(data) ^ 1), grpc.StatusCode.FAILED_PRECONDITION),
        (iter([pb.ImportChunk(data=b"x")]), grpc.StatusCode.INVALID_ARGUMENT),
        (iter([]), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    before = kv.GetStoreStatus(pb.GetStoreStatusRequest(), timeout=RPC_TIMEOUT_S).used_bytes
    for chunks, code in cases:
        with pytest.raises(grpc.RpcError) as err:
            kv.Import(chunks, timeout=RPC_TIMEOUT_S)
        assert err.value.code() == code
    after = kv.GetStoreStatus(pb.GetStoreStatusRequest(), timeout=RPC_TIMEOUT_S).used_bytes
    assert after == before     # nothing half-imported is left


def test_export_import_between_two_servers(start_kvstore):
    a = start_kvstore(store_id="a")
    b = start_kvstore(store_id="b")
    with grpc.insecure_channel(a.address) as ca, grpc.insecure_channel(b.address) as cb:
        kv_a, kv_b = stub(ca), stub(cb)
        entry, data = park(kv_a, lay=layout(num_tokens=100))          # 100 KiB
        info, exported, num_chunks = export(kv_a, entry.entry_id, chunk_bytes=16 << 10)
        assert exported == data and num_chunks == 7 and info.checksum == checksum(data)
        header = pb.ReserveRequest(owner="worker-2", session_id=info.session_id, secret="s2",
                                   layout=info.layout, token_ids=info.token_ids)
        imported = kv_b.Import(import_chunks(header, exported, info.checksum),
                               timeout=RPC_TIMEOUT_S).entry
        assert imported.state == "ready" and imported.checksum == info.checksum
        opened = kv_b.Open(pb.OpenRequest(entry_id=imported.entry_id, secret="s2"),
                           timeout=RPC_TIMEOUT_S)
        assert read_region(opened.region) == data
        assert "/lmx-b-" in opened.region.segment


def test_kill_9_then_restart_keeps_committed_and_spilled_entries(start_kvstore):
    server = start_kvstore("--capacity-bytes", "24KiB", store_id="crash")
    with grpc.insecure_channel(server.address) as channel:
        kv = stub(channel)
        parked = [park(kv) for _ in range(4)]              # 4 x 8 KiB: the first is spilled
        states = {e.entry_id: e.state for e in kv.ListEntries(pb.ListEntriesRequest(),
                                                              timeout=RPC_TIMEOUT_S).entries}
        assert sorted(states.values()) == ["ready", "ready", "ready", "spilled"]
        kv.Reserve(reserve_request(), timeout=RPC_TIMEOUT_S)   # never committed
    server.kill()                                              # SIGKILL: no cleanup at all
    assert server.segments()
    server.restart()
    assert '"entry_adopted"' in server.log()
    with grpc.insecure_channel(server.address) as channel:
        kv = stub(channel)
        for entry, data in parked:
            opened = kv.Open(pb.OpenRequest(entry_id=entry.entry_id, secret=SECRET),
                             timeout=RPC_TIMEOUT_S)
            assert read_region(opened.region) == data, f"{entry.entry_id} changed"
        assert len(kv.ListEntries(pb.ListEntriesRequest(), timeout=RPC_TIMEOUT_S).entries) == 4


def test_sigterm_exits_0_leaves_no_segment_and_keeps_entries(start_kvstore):
    server = start_kvstore(store_id="stop")
    with grpc.insecure_channel(server.address) as channel:
        entry, data = park(stub(channel))
    assert server.segments()
    assert server.stop() == 0
    assert server.segments() == []
    assert not (server.shm_dir / "lmx-stop.lock").exists()
    server.restart()
    with grpc.insecure_channel(server.address) as channel:
        kv = stub(channel)
        listed = kv.ListEntries(pb.ListEntriesRequest(), timeout=RPC_TIMEOUT_S).entries
        assert [(e.entry_id, e.state) for e in listed] == [(entry.entry_id, "spilled")]
        opened = kv.Open(pb.OpenRequest(entry_id=entry.entry_id, secret=SECRET),
                         timeout=RPC_TIMEOUT_S)
        assert read_region(opened.region) == data


def test_refuse_when_full_is_resource_exhausted(start_kvstore):
    server = start_kvstore("--capacity-bytes", "16KiB", "--when-full", "refuse", store_id="full")
    with grpc.insecure_channel(server.address) as channel:
        kv = stub(channel)
        park(kv)
        park(kv)
        exc = rpc_error(kv.Reserve, reserve_request())
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error_details(exc)
        assert details.metadata["missing_bytes"] == "8192" and details.retry_after_s


def test_a_second_server_with_the_same_store_id_is_refused(start_kvstore, tmp_path):
    server = start_kvstore(store_id="dup")
    done = subprocess.run(
        [sys.executable, "-m", "services.kvstore", "--listen", "127.0.0.1:0",
         "--shm-dir", str(server.shm_dir), "--store-id", "dup",
         "--state-dir", str(tmp_path / "other")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    assert done.returncode == 2 and "already running" in done.stderr


def test_a_commit_and_a_delete_survive_kill_9_right_after(start_kvstore):
    """Commits and deletes go on the manifest's journal at once (the whole
    manifest is rewritten later, --manifest-delay-s): a SIGKILL right after
    them keeps the one committed and forgets the one deleted."""
    server = start_kvstore("--manifest-delay-s", "60", store_id="journal")
    with grpc.insecure_channel(server.address) as channel:
        kv = stub(channel)
        entry, data = park(kv)
        gone, _ = park(kv)
        kv.Delete(pb.DeleteRequest(entry_id=gone.entry_id, secret=SECRET), timeout=RPC_TIMEOUT_S)
    server.kill()
    server.restart()
    with grpc.insecure_channel(server.address) as channel:
        kv = stub(channel)
        opened = kv.Open(pb.OpenRequest(entry_id=entry.entry_id, secret=SECRET),
                         timeout=RPC_TIMEOUT_S)
        assert read_region(opened.region) == data
        listed = kv.ListEntries(pb.ListEntriesRequest(), timeout=RPC_TIMEOUT_S).entries
        assert [e.entry_id for e in listed] == [entry.entry_id]
