"""A real kvstore server as a subprocess (`python -m services.kvstore` on a
free loopback port), with its shm directory a fresh directory under /dev/shm
that is removed however the test ends."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmx.v1 import kvstore_pb2 as pb
from lmx.v1 import kvstore_pb2_grpc
from services.common.parent import child_env
from services.kvstore.checksum import checksum as host_checksum
from services.kvstore.client import write_region

from ..support import REPO_ROOT, server_ready_address  # noqa: F401 - REPO_ROOT re-exported

SERVICE = "lmx.v1.KVStoreService"
RPC_TIMEOUT_S = 5.0
START_TIMEOUT_S = 20.0
SECRET = "secret-1"


def layout(num_tokens: int = 8, dtype: str = "float32", **fields) -> pb.KVLayout:
    """2 * 2 * 8 * 2 * 32 * 4 = 8 KiB by default."""
    values = dict(model="synthetic:llama-tiny", model_version="v1", dtype=dtype, num_layers=2,
                  num_kv_heads=2, head_dim=32, num_tokens=num_tokens, block_size=16)
    values.update(fields)
    return pb.KVLayout(**values)


def num_bytes(lay: pb.KVLayout) -> int:
    item = {"float32": 4, "bfloat16": 2, "float16": 2}[lay.dtype]
    return 2 * lay.num_layers * lay.num_tokens * lay.num_kv_heads * lay.head_dim * item


def reserve_request(lay: pb.KVLayout | None = None, secret: str = SECRET, owner: str = "worker-1",
                    session_id: str = "sess-1") -> pb.ReserveRequest:
    lay = lay or layout()
    return pb.ReserveRequest(owner=owner, session_id=session_id, secret=secret, layout=lay,
                             token_ids=list(range(lay.num_tokens + 2)))


def park(kv, data: bytes | None = None, **kw) -> tuple[pb.EntryInfo, bytes]:
    """Reserve, write through shared memory, commit."""
    request = reserve_request(**kw)
    data = data if data is not None else os.urandom(num_bytes(request.layout))
    answer = kv.Reserve(request, timeout=RPC_TIMEOUT_S)
    crc = write_region(answer.region, data)
    assert crc == host_checksum(data)
    entry = kv.Commit(pb.CommitRequest(entry_id=answer.entry_id, secret=request.secret,
                                       checksum=crc), timeout=RPC_TIMEOUT_S).entry
    return entry, data


@dataclass
class KVStoreProcess:
    flags: tuple[str, ...]
    shm_dir: Path
    state_dir: Path
    log_path: Path
    store_id: str = "main"
    proc: subprocess.Popen | None = None
    address: str = ""
    _log_file: object = field(default=None, repr=False)

    def start(self) -> KVStoreProcess:
        argv = [sys.executable, "-m", "services.kvstore", "--listen", "127.0.0.1:0",
                "--log-format", "json", "--shm-dir", str(self.shm_dir),
                "--state-dir", str(self.state_dir), "--store-id", self.store_id,
                "--segment-bytes", "1MiB", "--capacity-bytes", "64MiB", "--grace-s", "1",
                *self.flags]
        env = {key: value for key, value in os.environ.items() if not key.startswith("LMX_")}
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=child_env(env),
                                     stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.address:
            self.address = self._ready_address()
            if self.address:
                break
            if self.proc.poll() is not None:
                raise AssertionError(f"kvstore exited with {self.proc.returncode} before it was "
                                     f"ready; log:\n{self.log()[-6000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"kvstore not ready in {START_TIMEOUT_S}s; "
                                     f"log:\n{self.log()[-6000:]}")
            time.sleep(0.02)
        with grpc.insecure_channel(self.address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=RPC_TIMEOUT_S)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        return self

    def _ready_address(self) -> str:
        # the lines of this start only: a restarted server appends to the same log
        return server_ready_address("\n".join(self.log().splitlines()[self._skip:]))

    _skip: int = 0

    def restart(self) -> KVStoreProcess:
        self._skip = len(self.log().splitlines())
        self.address = ""
        self._close_log()
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 5.0) -> int:
        """SIGTERM; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"kvstore did not exit within {timeout_s}s of SIGTERM; "
                                 f"log:\n{self.log()[-6000:]}") from None
        self._close_log()
        return code

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(5)
        self._close_log()

    def segments(self) -> list[str]:
        prefix = f"lmx-{self.store_id}-"
        return sorted(p.name for p in self.shm_dir.iterdir() if p.name.startswith(prefix))

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


@contextlib.contextmanager
def kvstore_servers(tmp_path: Path):
    """start(*flags, store_id=...) -> a running KVStoreProcess. Every server is
    stopped at the end, and the /dev/shm directory removed, even on failure."""
    shm_dir = Path("/dev/shm") / f"lmx-test-{secrets.token_hex(6)}"
    if not Path("/dev/shm").is_dir():   # not Linux: any directory will do
        shm_dir = tmp_path / "shm"
    shm_dir.mkdir(mode=0o700)
    started: list[KVStoreProcess] = []

    def start(*flags: str, store_id: str = "main") -> KVStoreProcess:
        server = KVStoreProcess(tuple(flags), shm_dir, tmp_path / "state" / store_id,
                                tmp_path / f"kvstore-{len(started)}.log", store_id)
        started.append(server)
        return server.start()

    try:
        yield start
        problems = []
        for server in started:
            if server.alive():
                code = server.stop()
                if code != 0:
                    problems.append(f"exit {code}: {server.log()[-3000:]}")
                if server.segments():
                    problems.append(f"segments left: {server.segments()}")
        assert not problems, "kvstore did not stop cleanly:\n" + "\n".join(problems)
    finally:
        for server in started:
            server.kill()
        shutil.rmtree(shm_dir, ignore_errors=True)


def stub(channel) -> kvstore_pb2_grpc.KVStoreServiceStub:
    return kvstore_pb2_grpc.KVStoreServiceStub(channel)
