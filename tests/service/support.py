"""A real admission server as a subprocess, and small helpers for talking to
it through gRPC. Used by the service tests' conftest and the tests themselves."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmx.v1 import admission_pb2 as pb
from lmx.v1 import admission_pb2_grpc
from services.admission.client import ErrorDetails, error_details
from services.common.parent import child_env

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE = "lmx.v1.AdmissionService"
GiB = 1 << 30
MiB = 1 << 20

#: Every call in these tests carries a deadline; this is the usual one.
RPC_TIMEOUT_S = 5.0
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 4.0


def cap_of(total_bytes: int, cap_fraction: float = 0.9) -> int:
    """What the server computes as a device's cap (and, simulated, its budget)."""
    return int(total_bytes * cap_fraction)


def server_ready_address(log_text: str) -> str:
    """The address in the last "server_ready" line of a JSON log ("" if none):
    servers listen on port 0 and say there which port they took; a restarted
    server appends to the same log."""
    address = ""
    for line in log_text.splitlines():
        if '"server_ready"' in line:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                address = json.loads(line)["address"]
    return address


@dataclass
class AdmissionProcess:
    """`python -m services.admission` on a free loopback port."""

    flags: tuple[str, ...]
    log_path: Path
    proc: subprocess.Popen | None = None
    address: str = ""
    signalled: bool = False     # the test sent SIGTERM itself
    _log_file: object = field(default=None, repr=False)

    def start(self) -> AdmissionProcess:
        # The server picks a free port itself (--listen 127.0.0.1:0) and says
        # which in its "server_ready" log line: no race for the port.
        # No book file unless a test asks (--state-file PATH): one left by a
        # killed server would pause a later one that happens to get its port.
        argv = [sys.executable, "-m", "services.admission", "--listen", "127.0.0.1:0",
                "--log-format", "json", "--state-file", "none", *self.flags]
        if not any(flag == "--device" or flag.startswith("--device=") for flag in self.flags):
            argv += ["--device", "cpu:0=8GiB"]
        env = {key: value for key, value in os.environ.items() if not key.startswith("LMX_")}
        self._log_file = open(self.log_path, "wb")
        # child_env: the server stops if this test process dies (no
        # preexec_fn: see services/common/parent.py).
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=child_env(env),
                                     stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            self.address = self._ready_address()
            if self.address:
                break
            if self.proc.poll() is not None:
                raise AssertionError(f"admission exited with {self.proc.returncode} before it was "
                                     f"ready ({' '.join(argv)}); log:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"admission logged no server_ready within {START_TIMEOUT_S}s; "
                                     f"log:\n{self.log_tail()}")
            time.sleep(0.02)
        self._wait_serving(deadline)
        return self

    def _ready_address(self) -> str:
        return server_ready_address(self.log())

    def _wait_serving(self, deadline: float) -> None:
        last = "no answer"
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                except grpc.RpcError as exc:
                    last = f"{exc.code().name}: {exc.details()}"
                time.sleep(0.05)
        self.kill()
        raise AssertionError(f"health of {SERVICE} at {self.address} not SERVING within "
                             f"{START_TIMEOUT_S}s (last: {last}); log:\n{self.log_tail()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, num_chars: int = 8000) -> str:
        """The end of the server's log, for failure messages."""
        text = self.log()
        return text if len(text) <= num_chars else "...\n" + text[-num_chars:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        assert self.proc is not None
        self.signalled = True
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> tuple[int, float]:
        """(exit code, seconds waited); fails the test if it does not exit."""
        assert self.proc is not None
        started = time.monotonic()
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"admission did not exit within {timeout_s}s of SIGTERM; "
                                 f"log:\n{self.log_tail()}") from None
        return code, time.monotonic() - started

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> float:
        """SIGTERM, then expect exit code 0 within `timeout_s`. Returns the seconds it took."""
        if not self.alive():
            code = self.proc.returncode if self.proc else None
            self._close_log()
            raise AssertionError(f"admission at {self.address} died during the test "
                                 f"(exit code {code}); log:\n{self.log_tail()}")
        self.terminate()
        code, took = self.wait_exit(timeout_s)
        self._close_log()
        assert code == 0, f"admission exited with {code} after SIGTERM; log:\n{self.log_tail()}"
        return took

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(5)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


@contextlib.contextmanager
def admission_servers(log_dir: Path):
    """start(*flags) -> a running AdmissionProcess; on exit, each still running is
    stopped with SIGTERM and must exit 0 (a server the caller stopped is left alone)."""
    started: list[AdmissionProcess] = []

    def start(*flags: str) -> AdmissionProcess:
        server = AdmissionProcess(tuple(flags), log_dir / f"admission-{len(started)}.log")
        started.append(server)
        return server.start()

    try:
        yield start
    except BaseException:
        for server in started:
            server.kill()
        raise
    problems = []
    for server in started:
        if server.proc is None or server.signalled:
            server.kill()  # stopped (and checked) by the caller, or never started
            continue
        try:
            server.stop()
        except AssertionError as exc:
            problems.append(str(exc))
    if problems:
        pytest.fail("admission did not shut down cleanly:\n" + "\n".join(problems))


# ---- gRPC helpers ------------------------------------------------------------

def stub(channel: grpc.Channel) -> admission_pb2_grpc.AdmissionServiceStub:
    return admission_pb2_grpc.AdmissionServiceStub(channel)


def acquire_request(bytes_: int, *, name: str = "test/holder", pid: int = 4242,
                    purpose: int = pb.PURPOSE_KV, **fields) -> pb.AcquireRequest:
    return pb.AcquireRequest(holder=pb.Holder(name=name, pid=pid), bytes=bytes_,
                             purpose=purpose, **fields)


def call_error(fn, request, timeout: float = RPC_TIMEOUT_S) -> tuple[grpc.RpcError, ErrorDetails]:
    """Call `fn` expecting an error; return it with its rich details."""
    try:
        answer = fn(request, timeout=timeout)
    except grpc.RpcError as exc:
        # error_details reads only code(), details() and trailing_metadata(),
        # which a synchronous call's error has as well.
        return exc, error_details(exc)
    raise AssertionError(f"{fn._method.decode() if hasattr(fn, '_method') else fn} "
                         f"succeeded but should have failed: {request!r} -> {answer!r}")


def status(admission: admission_pb2_grpc.AdmissionServiceStub) -> pb.StatusResponse:
    return admission.Status(pb.StatusRequest(), timeout=RPC_TIMEOUT_S)


def device_status(admission, device: str = "cpu:0") -> pb.DeviceStatus:
    for dev in status(admission).devices:
        if dev.device == device:
            return dev
    raise AssertionError(f"Status lists no device {device!r}")


def result_of(future, what: str, timeout_s: float = 5.0):
    """The result of a call running in a thread; fail naming `what` if it hangs."""
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise AssertionError(f"{what} did not finish within {timeout_s}s") from None


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.02):
    """Poll `predicate` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


class WatchStream:
    """A Watch call consumed by a thread into a queue, so that tests can
    read its events with timeouts."""

    _END = object()

    def __init__(self, admission: admission_pb2_grpc.AdmissionServiceStub,
                 timeout_s: float = 60.0):
        self.call = admission.Watch(pb.WatchRequest(), timeout=timeout_s)
        self.events: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._consume, name="watch", daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.ended.set()
            self.events.put(self._END)

    def next(self, timeout_s: float = RPC_TIMEOUT_S) -> pb.Event:
        try:
            item = self.events.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no Watch event within {timeout_s}s") from None
        if item is self._END:
            self.events.put(item)
            raise AssertionError(f"the Watch stream ended early ({self.describe_end()})")
        return item

    def describe_end(self) -> str:
        if self.error is None:
            return "with OK"
        return f"with {self.error.code().name}: {self.error.details()}"

    def sync(self, admission: admission_pb2_grpc.AdmissionServiceStub,
             timeout_s: float = 10.0) -> int:
        """Make sure the server has subscribed this stream: acquire and release
        a probe lease until its events come through. Returns the seq of the
        last event read (the last probe's release)."""
        deadline = time.monotonic() + timeout_s
        probes: list[str] = []
        seen_any = False
        while True:
            if not seen_any:
                lease = admission.Acquire(acquire_request(1, name="test/watch-probe"),
                                          timeout=RPC_TIMEOUT_S).lease
                admission.Release(pb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch),
                                  timeout=RPC_TIMEOUT_S)
                probes.append(lease.lease_id)
            try:
                event = self.next(0.3)
            except AssertionError:
                if self.ended.is_set() or time.monotonic() > deadline:
                    state = ("ended " + self.describe_end()) if self.ended.is_set() else "open"
                    raise AssertionError(f"Watch delivered no probe event within {timeout_s}s "
                                         f"(the stream is {state})") from None
                continue
            if event.WhichOneof("kind") == "released" and event.released.lease.lease_id in probes:
                seen_any = True
                if event.released.lease.lease_id == probes[-1]:
                    return event.seq

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(5)


def hostile_payloads(rng, known: list[bytes], *, random_count: int = 40,
                     per_known: int = 5, extra: tuple[bytes, ...] = ()) -> list[bytes]:
    """Bytes for fuzzing an RPC: a few fixed odd ones, `random_count` random
    ones, and each known valid message as is and `per_known` times with a byte
    changed and cut short somewhere."""
    out = [b"", b"\x00", b"\xff" * 9, b"\x0a\x05hello", b"\x08" + b"\xff" * 10, *extra]
    out += [rng.randbytes(rng.randrange(1, 64)) for _ in range(random_count)]
    for raw in known:
        for _ in range(per_known):
            mutated = bytearray(raw)
            if mutated:
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
                out.append(bytes(mutated[:rng.randrange(len(mutated) + 1)]))
        out.append(raw)
    return out


def rss_bytes(pid: int) -> int:
    """A process's resident memory (Linux /proc), for tests that check a
    server's memory before and after hostile requests."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
