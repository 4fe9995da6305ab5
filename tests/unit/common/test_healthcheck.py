"""`python -m services.common.healthcheck` against a real gRPC health server:
exit 0 when SERVING, 1 when NOT_SERVING, unknown or nothing listening."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.healthcheck import check
from services.common.launch import free_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
SERVICE = "lmx.v1.KVStoreService"


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def run_healthcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.common.healthcheck", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)


def test_serving_exits_0(health_server):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    for args in ((address,), (address, SERVICE)):
        result = run_healthcheck(*args)
        assert result.returncode == 0, result
        assert "SERVING" in result.stdout
        assert len(result.stdout.strip().splitlines()) == 1


def test_not_serving_exits_1(health_server):
    address, servicer = health_server
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    result = run_healthcheck(address, SERVICE)
    assert result.returncode == 1, result
    assert result.stderr.strip() == f"{SERVICE} at {address}: NOT_SERVING"


def test_unknown_service_exits_1(health_server):
    address, _ = health_server
    serving, message = check(address, "lmx.v1.NoSuchService")
    assert not serving
    assert "NOT_FOUND" in message


def test_nothing_listening_exits_1():
    address = f"127.0.0.1:{free_port()}"
    result = run_healthcheck(address, "--timeout-s", "2")
    assert result.returncode == 1, result
    assert "UNAVAILABLE" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
