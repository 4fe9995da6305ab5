"""`lmx worker` and `lmx chat` as a user runs them: real processes on
loopback, the real SmolLM2 model (converted into LMX_CACHE on first use)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from lmx.v1 import admission_pb2 as pb
from lmx.v1 import admission_pb2_grpc
from services.admission.app import SERVICE_NAME as ADMISSION_SERVICE
from services.common.launch import free_port, start_service, wait_serving

LMX = [sys.executable, "-m", "services.cli"]
REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_SERVICE = "lmx.v1.WorkerService"
MODEL = "smollm2-135m"
#: A first start converts the model's GGUF into the cache: a minute or two.
START_TIMEOUT_S = 300

# Start-up is bounded by START_TIMEOUT_S inside the tests, the rest by each step's timeout.
pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 120)


def lmx_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LMX_")}
    env["LMX_CACHE"] = os.environ.get("LMX_CACHE") or str(REPO_ROOT / ".cache" / "lmx")
    return env


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*LMX, *args], capture_output=True, text=True, timeout=timeout,
                          env=lmx_env(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def admission(tmp_path_factory):
    service = start_service("services.admission", ADMISSION_SERVICE,
                            ["--device", "cpu:0=8GiB", "--log-format", "json"],
                            log_path=tmp_path_factory.mktemp("admission") / "admission.log")
    yield service
    service.stop()


@pytest.fixture
def admission_stub(admission):
    with grpc.insecure_channel(admission.address) as channel:
        yield admission_pb2_grpc.AdmissionServiceStub(channel)


def leases_of(stub, pid: int) -> list[pb.Lease]:
    return [lease for lease in stub.Status(pb.StatusRequest(), timeout=5).leases
            if lease.holder.pid == pid]


def workers_at(stub, address: str) -> list[pb.WorkerInfo]:
    return [w for w in stub.ListWorkers(pb.ListWorkersRequest(), timeout=5).workers
            if w.address == address]


def test_worker_serves_chat_and_stops_cleanly_on_sigterm(admission, admission_stub, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log_file:
        worker = subprocess.Popen(
            [*LMX, "worker", "--model", MODEL, "--listen", address, "--admission",
             admission.address, "--log-format", "json"],
            stdout=log_file, stderr=subprocess.STDOUT, env=lmx_env(), cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        try:
            wait_serving(address, WORKER_SERVICE, START_TIMEOUT_S, worker)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"lmx worker did not come up: {exc}; log:\n"
                                 f"{log_path.read_text()[-5000:]}") from None

        listed = workers_at(admission_stub, address)
        assert [(w.model, w.state, w.pid) for w in listed] == [
            (MODEL, pb.WORKER_STATE_READY, worker.pid)], (
            f"admission should list the worker READY with its pid {worker.pid}: {listed}")
        held = leases_of(admission_stub, worker.pid)
        assert [lease.purpose for lease in held].count(pb.PURPOSE_WEIGHTS) == 1, (
            f"the worker should hold one weights lease: {held}")

        chat = run(["chat", "--model", MODEL, "--admission", admission.address, "-p",
                    "What is the capital of France? One word.", "--max-tokens", "8"])
        assert chat.returncode == 0, f"lmx chat failed ({chat.returncode}): {chat.stderr}"
        assert chat.stdout.strip(), f"lmx chat printed no answer; stderr: {chat.stderr}"
        assert "Traceback" not in chat.stderr, chat.stderr

        worker.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = worker.wait(15)
        took = time.monotonic() - started
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    log = log_path.read_text()
    assert code == 0, f"lmx worker exited {code} on SIGTERM; log:\n{log[-5000:]}"
    assert took < 8, f"lmx worker took {took:.1f}s to stop"
    events = [json.loads(line[line.index("{"):])["event"] for line in log.splitlines()
              if line.lstrip().startswith("{")]
    assert events[-1] == "server_stopped", f"the log does not end with server_stopped: {events}"
    # Its leases were released and it unregistered as it stopped (not by expiry).
    deadline = time.monotonic() + 2
    while True:
        held = leases_of(admission_stub, worker.pid)
        listed = workers_at(admission_stub, address)
        if not held and not listed:
            break
        assert time.monotonic() < deadline, (
            f"2 s after the worker exited admission still lists its leases {held} or its "
            f"registration {listed}")
        time.sleep(0.05)
    assert "worker_unregistered" in admission.log_path.read_text(), (
        "admission logged no worker_unregistered: the registration went by expiry")


def test_an_unknown_model_is_a_clear_error(admission, admission_stub):
    result = run(["worker", "--model", "no-such-model", "--listen", "127.0.0.1:0",
                  "--admission", admission.address, "--log-format", "json"])
    assert result.returncode in (1, 2), (result.returncode, result.stderr[-3000:])
    assert "no-such-model" in result.stderr and "smollm2-135m" in result.stderr, (
        f"the error should name the unknown model and the known ones: {result.stderr[-3000:]}")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    listed = [w for w in admission_stub.ListWorkers(pb.ListWorkersRequest(), timeout=5).workers
              if w.model == "no-such-model"]
    assert not listed, f"the failed worker is still registered: {listed}"


def test_an_unreachable_admission_is_a_clear_error():
    address = f"127.0.0.1:{free_port()}"
    result = run(["worker", "--model", MODEL, "--listen", "127.0.0.1:0", "--admission", address,
                  "--log-format", "json"])
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert f"cannot reach admission at {address}" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "float64"], "dtype"),
    (["--device", "tpu"], "device"),
    (["--kv-chunk-bytes", "0"], "kv_chunk_bytes"),
    (["--admission", "nowhere"], "admission"),
    (["--listen", "nowhere"], "listen"),
])
def test_bad_worker_settings_are_clear_errors(flags, message):
    result = run(["worker", "--model", MODEL, *flags], timeout=60)
    assert result.returncode == 2, (flags, result.returncode, result.stderr[-3000:])
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


def test_chat_without_a_worker_for_the_model_says_so(admission):
    result = run(["chat", "--model", "gemma3-270m", "--admission", admission.address,
                  "-p", "hello"], timeout=60)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "no worker serves gemma3-270m" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
