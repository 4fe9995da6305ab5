"""A health check for containers: one standard gRPC health Check.

    python -m services.common.healthcheck ADDRESS [SERVICE]

Exit 0 when SERVICE (default "", the whole server) is SERVING, 1 otherwise,
with a one-line message either way. For docker compose `healthcheck.test`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import transport

SERVING = health_pb2.HealthCheckResponse.SERVING


def check(address: str, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    """One Check call: (serving, a one-line message)."""
    label = f"{service or 'server'} at {address}"
    with transport.channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{label}: {exc.code().name} ({exc.details()})"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == SERVING, f"{label}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.common.healthcheck",
        description="exit 0 when the gRPC health check says SERVING, 1 otherwise")
    parser.add_argument("address", metavar="ADDRESS", help="HOST:PORT of the server")
    parser.add_argument("service", metavar="SERVICE", nargs="?", default="",
                        help="e.g. lmx.v1.WorkerService (default: the whole server)")
    parser.add_argument("--timeout-s", type=float, default=3.0,
                        help="how long to wait for the answer [default: 3]")
    args = parser.parse_args(argv)
    serving, message = check(args.address, args.service, args.timeout_s)
    print(message, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    raise SystemExit(main())
