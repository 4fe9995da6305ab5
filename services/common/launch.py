"""Start an lmx service as a child process and wait until its health check
says SERVING; stop it with SIGTERM. Used by the demo, the tests and the
benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import transport
from services.common.parent import child_env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


#: The health "service" of an HTTP server (the OpenAI front): GET /health.
HTTP_HEALTH = "http:/health"


def _wait_http(address: str, timeout_s: float, process: subprocess.Popen | None) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the HTTP server exited with code {process.returncode} before "
                               "it was ready")
        try:
            with urllib.request.urlopen(f"http://{address}/health",
                                        timeout=min(1.0, timeout_s)) as reply:
                if reply.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"http://{address}/health not answering after {timeout_s}s")
        time.sleep(0.05)


def wait_serving(address: str, service: str, timeout_s: float = 30.0,
                 process: subprocess.Popen | None = None) -> None:
    """Poll the standard health check until `service` is SERVING (for
    HTTP_HEALTH: until GET /health answers 200)."""
    if service == HTTP_HEALTH:
        _wait_http(address, timeout_s, process)
        return
    deadline = time.monotonic() + timeout_s
    with transport.channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{service} exited with code {process.returncode} before "
                                   "it was ready")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} at {address} not SERVING after {timeout_s}s")
            time.sleep(0.05)


@dataclass
class ServiceProcess:
    process: subprocess.Popen
    address: str
    log_path: Path | None

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_service(module: str, service: str, args: Sequence[str] = (), *,
                  host: str = "127.0.0.1", port: int | None = None,
                  log_path: Path | None = None, timeout_s: float = 30.0,
                  env: dict[str, str] | None = None) -> ServiceProcess:
    """`python -m <module> --listen host:port <args>`, ready when healthy."""
    port = port or free_port(host)
    address = f"{host}:{port}"
    log_file = open(log_path, "wb") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", module, "--listen", address, *args],
        stdout=log_file, stderr=subprocess.STDOUT, env=child_env({**os.environ, **(env or {})}),
        start_new_session=True)
    if log_path:
        log_file.close()
    handle = ServiceProcess(process, address, log_path)
    try:
        wait_serving(address, service, timeout_s, process)
    except BaseException:
        handle.stop()
        raise
    return handle
