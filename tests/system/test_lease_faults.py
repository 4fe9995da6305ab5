"""Faults around a worker's memory leases, with real processes on loopback:
admission (a simulated 1400 MiB device), a kvstore and a smollm2-135m worker.

- The worker frozen (SIGSTOP) past its lease TTL, mid-generation: admission
  lets the lease expire and grants its memory to a waiting holder; after
  SIGCONT the worker finds its lease gone before it runs another step, ends
  the generation with ABORTED (reason LEASE_LOST, retryable), parks its
  sessions and gives its memory up. The session keeps what its caller
  received, and the next turn (once the other holder let go) acquires the
  memory again and goes on.
- The worker killed (SIGKILL) mid-generation: the client's stream ends with
  UNAVAILABLE at once, and admission frees the worker's leases within two
  TTLs.
- Admission killed (SIGKILL) and started again on the same port: the worker
  learns that the new admission holds none of its leases, gives its memory
  up, re-registers, and the next turn acquires a new lease from the new
  admission and goes on from the same context.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from lmx.v1 import admission_pb2 as apb  # noqa: E402
from lmx.v1 import admission_pb2_grpc  # noqa: E402
from service.kvstore.support import kvstore_servers  # noqa: E402
from service.support import admission_servers, wait_until  # noqa: E402
from service.worker.worker_support import (  # noqa: E402
    RPC_TIMEOUT_S,
    SHARED_MAX_CONTEXT,
    SMOLLM2,
    WorkerClient,
    WorkerProcess,
    generate_request,
)
from services.admission.client import error_details  # noqa: E402
from services.common.launch import free_port  # noqa: E402

pytestmark = pytest.mark.timeout(300, func_only=True)

LEASE_TTL_S = 1.5
MIB = 1 << 20
DEVICE = "cpu:0=1400MiB"          # cap 0.9: 1260 MiB; the worker leases about 600


def admission_stub(address: str) -> admission_pb2_grpc.AdmissionServiceStub:
    return admission_pb2_grpc.AdmissionServiceStub(grpc.insecure_channel(address))


def leases_of(address: str, pid: int) -> list[apb.Lease]:
    answer = admission_stub(address).Status(apb.StatusRequest(), timeout=RPC_TIMEOUT_S)
    return [lease for lease in answer.leases if lease.holder.pid == pid]


@pytest.fixture
def stack(tmp_path):
    """start_admission(port) and start_worker(admission, kvstore); the kvstore
    runs already. Every process is stopped (or killed) at the end."""
    workers: list[WorkerProcess] = []
    with admission_servers(tmp_path) as start_admission, kvstore_servers(tmp_path) as start_kv:
        kvstore = start_kv()

        def admission(port: int):
            return start_admission("--device", DEVICE, "--listen", f"127.0.0.1:{port}",
                                   "--state-file", str(tmp_path / "admission-book.json"))

        def worker(admission_address: str) -> WorkerProcess:
            process = WorkerProcess(SMOLLM2, admission_address,
                                    ("--max-context", str(SHARED_MAX_CONTEXT),
                                     "--kvstore", kvstore.address,
                                     "--lease-ttl-s", str(LEASE_TTL_S)),
                                    tmp_path / f"worker-{len(workers)}.log")
            workers.append(process)
            return process.launch().wait_ready()

        try:
            yield admission, worker
        finally:
            for process in workers:
                if process.alive():
                    os.kill(process.proc.pid, signal.SIGCONT)
                process.kill()


def test_a_frozen_worker_loses_its_lease_and_stops_before_its_next_step(stack):
    start_admission, start_worker = stack
    admission = start_admission(0)
    worker = start_worker(admission.address)
    pid = worker.proc.pid
    held = sum(lease.bytes for lease in leases_of(admission.address, pid))
    budget = admission_stub(admission.address).Status(
        apb.StatusRequest(), timeout=RPC_TIMEOUT_S).devices[0].budget_bytes
    other_bytes = budget - held + 64 * MIB       # fits only once the worker's memory is free
    with WorkerClient(worker.address) as client:
        session = client.open()
        stream = client.stub.Generate(generate_request(session, prompt="Count: one, two,",
                                                       max_tokens=400),
                                      timeout=120)
        received = list(next(stream).delta.token_ids)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        granted: dict = {}

        def other_holder() -> None:
            try:
                granted["lease"] = admission_stub(admission.address).Acquire(
                    apb.AcquireRequest(holder=apb.Holder(name="test/other", pid=1),
                                       bytes=other_bytes, purpose=apb.PURPOSE_KV,
                                       wait_ms=30_000, ttl_ms=60_000),
                    timeout=40).lease
            except grpc.RpcError as exc:
                granted["error"] = exc

        waiter = threading.Thread(target=other_holder)
        waiter.start()
        waiter.join(30)
        assert "lease" in granted, f"the frozen worker's memory was not granted: {granted}"
        waited = time.monotonic() - stopped_at
        assert waited < 2 * LEASE_TTL_S + 2.0, f"the lease took {waited:.1f}s to expire"
        wait_until(lambda: not leases_of(admission.address, pid),
                   max(0.1, stopped_at + 2 * LEASE_TTL_S + 1.0 - time.monotonic()),
                   "the frozen worker's leases to expire")

        os.kill(pid, signal.SIGCONT)
        after = []
        with pytest.raises(grpc.RpcError) as ended:
            for response in stream:
                after += response.delta.token_ids
        assert ended.value.code() == grpc.StatusCode.ABORTED, ended.value
        assert error_details(ended.value).reason == "LEASE_LOST"
        # At most what a step in flight at SIGSTOP and the transport held.
        assert len(after) <= 2, f"{len(after)} tokens came after the lease was lost"
        received += after
        wait_until(lambda: client.status().state == "asleep", 20,
                   "the worker to give its memory up")
        assert "worker_lease_lost" in worker.log()

        # The other holder lets go; the next turn acquires the memory again and
        # goes on from exactly what the caller received.
        admission_stub(admission.address).Release(
            apb.ReleaseRequest(lease_id=granted["lease"].lease_id,
                               epoch=granted["lease"].epoch), timeout=RPC_TIMEOUT_S)
        more = client.generate(session, prompt=" three", max_tokens=4)
        assert more.token_ids and more.finish.context_tokens >= len(received) + 4, more.finish
        assert leases_of(admission.address, pid), "the worker works without a lease"


def test_admission_restarted_workers_give_up_and_acquire_again(stack):
    start_admission, start_worker = stack
    port = free_port()
    admission = start_admission(port)
    worker = start_worker(admission.address)
    pid = worker.proc.pid
    with WorkerClient(worker.address) as client:
        session = client.open()
        first = client.generate(session, prompt="The sky is", max_tokens=6)
        admission.signalled = True       # killed on purpose: not checked at the end
        admission.kill()
        restarted = start_admission(port)
        assert restarted.address == admission.address
        wait_until(lambda: client.status().state == "asleep", 20,
                   "the worker to give up memory the new admission does not know of")
        more = client.generate(session, prompt=" and the sea is", max_tokens=6)
        assert more.token_ids, "no answer after admission restarted"
        assert more.finish.context_tokens > first.finish.context_tokens
        assert leases_of(restarted.address, pid), "the worker holds no lease of the new admission"
        workers = admission_pb2_grpc.AdmissionServiceStub(
            grpc.insecure_channel(restarted.address)).ListWorkers(
                apb.ListWorkersRequest(), timeout=RPC_TIMEOUT_S).workers
        assert any(w.address == worker.address for w in workers), "the worker did not re-register"


def test_a_worker_killed_mid_generation_fails_its_client_fast_and_frees_its_leases(stack):
    start_admission, start_worker = stack
    admission = start_admission(0)
    worker = start_worker(admission.address)
    pid = worker.proc.pid
    assert leases_of(admission.address, pid)
    with WorkerClient(worker.address) as client:
        session = client.open()
        stream = client.stub.Generate(generate_request(session, prompt="Count: one, two,",
                                                       max_tokens=400), timeout=120)
        next(stream)
        worker.proc.kill()
        killed_at = time.monotonic()
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
        took = time.monotonic() - killed_at
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
    assert took < 5.0, f"the client waited {took:.1f}s to hear the worker was gone"
    wait_until(lambda: not leases_of(admission.address, pid),
               max(0.1, killed_at + 2 * LEASE_TTL_S + 0.5 - time.monotonic()),
               "admission to free the killed worker's leases within two TTLs")
