"""A do-nothing AdmissionService for the benchmark's baseline: Acquire answers
a made-up lease, Release answers its bytes. No ledger, no interceptor, no
logging: what is left is the cost of grpc.aio itself on this machine, the
floor under the real server's numbers.

    python bench/null_server.py --listen 127.0.0.1:PORT    (SIGTERM to stop)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402

from lmx.v1 import admission_pb2 as pb  # noqa: E402
from lmx.v1 import admission_pb2_grpc  # noqa: E402

SERVICE = "lmx.v1.AdmissionService"


class NullAdmission(admission_pb2_grpc.AdmissionServiceServicer):
    def __init__(self) -> None:
        self._epochs = itertools.count(1)
        self._held: dict[str, int] = {}

    async def Acquire(self, request: pb.AcquireRequest, context) -> pb.AcquireResponse:
        epoch = next(self._epochs)
        lease_id = f"lease-{epoch:016x}"
        self._held[lease_id] = request.bytes
        return pb.AcquireResponse(lease=pb.Lease(
            lease_id=lease_id, device="cpu:0", bytes=request.bytes, epoch=epoch, ttl_ms=10_000,
            holder=request.holder, purpose=request.purpose, expires_in_ms=10_000))

    async def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseResponse:
        return pb.ReleaseResponse(released_bytes=self._held.pop(request.lease_id, 0))


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    admission_pb2_grpc.add_AdmissionServiceServicer_to_server(NullAdmission(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if not server.add_insecure_port(listen):
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    await health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    asyncio.run(serve(parser.parse_args().listen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
