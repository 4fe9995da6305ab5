"""The `lmx` command as a user runs it: real processes, loopback only."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.admission.app import SERVICE_NAME
from services.common.launch import free_port, start_service

LMX = [sys.executable, "-m", "services.cli"]


def run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*LMX, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def admission(tmp_path: Path):
    service = start_service("services.admission", SERVICE_NAME,
                            ["--device", "cpu:0=8GiB", "--log-format", "json"],
                            log_path=tmp_path / "admission.log")
    yield service
    service.stop()


def test_sigterm_stops_cleanly_and_logs_the_shutdown(tmp_path: Path):
    service = start_service("services.admission", SERVICE_NAME,
                            ["--device", "cpu:0=1GiB", "--log-format", "json"],
                            log_path=tmp_path / "admission.log")
    started = time.monotonic()
    code = service.stop(timeout_s=10)
    assert code == 0, f"admission exited {code} on SIGTERM; log:\n{service.log_path.read_text()}"
    assert time.monotonic() - started < 5, "shutdown took longer than the grace period"
    events = [json.loads(line)["event"] for line in service.log_path.read_text().splitlines()]
    assert events[-2:] == ["server_stopping", "server_stopped"], events


def test_status_prints_the_table(admission):
    result = run(["status", "--admission", admission.address])
    assert result.returncode == 0, result.stderr
    assert "cpu:0" in result.stdout and "7.20 GiB (90%)" in result.stdout, result.stdout
    assert "no leases" in result.stdout, result.stdout


def test_status_json(admission):
    result = run(["status", "--json", "--admission", admission.address])
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["devices"][0]["total_bytes"] == str(8 << 30), status


def test_status_without_a_server_says_so():
    result = run(["status", "--admission", f"127.0.0.1:{free_port()}"])
    assert result.returncode == 1
    assert "cannot reach admission" in result.stderr and "Traceback" not in result.stderr, \
        result.stderr


def test_taken_port_is_a_clear_error(admission):
    result = run(["admission", "--listen", admission.address, "--device", "cpu:0=1GiB"],
                 timeout=30)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "cannot listen on" in result.stderr and "Traceback" not in result.stderr, \
        result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--cap-fraction", "1.5"], "cap_fraction"),
    (["--device", "cpu:0"], "DEVICE=SIZE"),
    (["--device", "cpu:0=lots"], "not a size"),
    (["--listen", "nowhere"], "HOST:PORT"),
    (["--device-backend", "tpu"], "unknown backend"),
])
def test_bad_settings_are_clear_errors(flags, message):
    result = run(["admission", *flags], timeout=30)
    assert result.returncode == 2, (flags, result.returncode, result.stderr)
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_unreadable_config_file(tmp_path: Path):
    result = run(["admission", "--config", str(tmp_path / "missing.toml")], timeout=30)
    assert result.returncode == 2 and "cannot read" in result.stderr, result.stderr


def test_watch_prints_events(admission):
    watch = subprocess.Popen([*LMX, "watch", "--admission", admission.address],
                             stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # the watcher subscribes
        import grpc

        from lmx.v1 import admission_pb2 as pb
        from lmx.v1 import admission_pb2_grpc
        with grpc.insecure_channel(admission.address) as channel:
            stub = admission_pb2_grpc.AdmissionServiceStub(channel)
            lease = stub.Acquire(pb.AcquireRequest(holder=pb.Holder(name="cli-test"),
                                                   bytes=1 << 30, purpose=pb.PURPOSE_KV),
                                 timeout=5).lease
            stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch), timeout=5)
        time.sleep(0.5)
    finally:
        watch.send_signal(signal.SIGINT)
        out, _ = watch.communicate(timeout=10)
    assert "granted  cli-test" in out and "released cli-test" in out, out
    assert watch.returncode == 130, watch.returncode   # stopped by the signal, cleanly
