"""Raw bytes into every KVStoreService RPC of a real server: what does not
decode is INVALID_ARGUMENT, what does is handled like any request; never
INTERNAL or UNKNOWN, and the server keeps answering."""

from __future__ import annotations

import random

import grpc

from lmx.v1 import kvstore_pb2 as pb

from ..support import hostile_payloads
from .support import RPC_TIMEOUT_S, SERVICE, park, reserve_request

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
METHODS = pb.DESCRIPTOR.services_by_name["KVStoreService"].methods


def test_raw_bytes_into_every_rpc(kv, shared_kvstore):
    rng = random.Random(4)
    entry, _ = park(kv)
    known = [
        reserve_request().SerializeToString(),
        pb.OpenRequest(entry_id=entry.entry_id, secret="secret-1").SerializeToString(),
        pb.ExportRequest(entry_id=entry.entry_id, secret="secret-1",
                         chunk_bytes=4096).SerializeToString(),
        pb.ImportChunk(header=reserve_request()).SerializeToString(),
        pb.ImportChunk(data=b"x" * 100).SerializeToString(),
        pb.ImportChunk(checksum=5).SerializeToString(),
    ]
    seen: dict[str, set] = {}
    with grpc.insecure_channel(shared_kvstore.address) as channel:
        for method in METHODS:
            path = f"/{SERVICE}/{method.name}"
            for payload in hostile_payloads(rng, known):
                try:
                    if method.server_streaming:
                        list(channel.unary_stream(path)(payload, timeout=RPC_TIMEOUT_S))
                    elif method.client_streaming:
                        chunks = [payload] + [rng.choice(known) for _ in range(rng.randrange(3))]
                        channel.stream_unary(path)(iter(chunks), timeout=RPC_TIMEOUT_S)
                    else:
                        channel.unary_unary(path)(payload, timeout=RPC_TIMEOUT_S)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                assert code in ALLOWED, f"{method.name}({payload!r}) -> {code}: " \
                                        f"{shared_kvstore.log()[-3000:]}"
                seen.setdefault(method.name, set()).add(code)
    assert all(grpc.StatusCode.INVALID_ARGUMENT in codes for codes in seen.values()), seen
    log = shared_kvstore.log()
    assert '"rpc_failed"' not in log and "Traceback" not in log
    # still serving (the parked entry itself may have been deleted by a
    # DeleteRequest that is byte for byte the OpenRequest above)
    again, data = park(kv)
    opened = kv.Open(pb.OpenRequest(entry_id=again.entry_id, secret="secret-1"),
                     timeout=RPC_TIMEOUT_S)
    assert opened.entry.checksum == again.checksum
