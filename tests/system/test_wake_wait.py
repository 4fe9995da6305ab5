"""A request to a sleeping model has an end it learns about (issue 19: it
waited for ever while another holder kept the memory).

Real processes on loopback: admission (a simulated 1400 MiB device), a
kvstore and a smollm2-135m worker with --wake-wait-s 2. A holder of a higher
priority takes the memory, the worker sleeps; a Generate then gets
RESOURCE_EXHAUSTED with a retry hint about 2 s later, while the worker's
health stays SERVING; once the holder lets go, the same request succeeds."""

from __future__ import annotations

import sys
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
from service.support import admission_servers  # noqa: E402
from service.worker.worker_support import (  # noqa: E402
    RPC_TIMEOUT_S,
    SHARED_MAX_CONTEXT,
    SMOLLM2,
    WorkerClient,
    WorkerProcess,
    generate_request,
    rpc_error,
)

pytestmark = pytest.mark.timeout(300, func_only=True)

MIB = 1 << 20
WAKE_WAIT_S = 2.0


def test_a_request_to_a_sleeping_model_is_refused_after_wake_wait_s(tmp_path):
    with admission_servers(tmp_path) as start_admission, kvstore_servers(tmp_path) as start_kv:
        kvstore = start_kv()
        admission = start_admission("--device", "cpu:0=1400MiB", "--reclaim-deadline-s", "5")
        worker = WorkerProcess(SMOLLM2, admission.address,
                               ("--max-context", str(SHARED_MAX_CONTEXT),
                                "--kvstore", kvstore.address, "--wake-wait-s", str(WAKE_WAIT_S)),
                               tmp_path / "worker.log")
        worker.launch().wait_ready()
        stub = admission_pb2_grpc.AdmissionServiceStub(grpc.insecure_channel(admission.address))
        try:
            with WorkerClient(worker.address) as client:
                session = client.open()
                client.generate(session, prompt="Hello", max_tokens=2)
                free = stub.Status(apb.StatusRequest(), timeout=RPC_TIMEOUT_S).devices[0].free_bytes
                hog = stub.Acquire(apb.AcquireRequest(
                    holder=apb.Holder(name="test/hog", pid=1), priority=10,
                    bytes=free + 256 * MIB, purpose=apb.PURPOSE_OTHER,
                    wait_ms=60_000, ttl_ms=120_000), timeout=70).lease
                try:
                    # The worker gives its lease back, then logs that it sleeps.
                    deadline = time.monotonic() + 10
                    while '"state": "asleep"' not in worker.log() and time.monotonic() < deadline:
                        time.sleep(0.05)
                    assert '"state": "asleep"' in worker.log(), "the worker should have slept"
                    started = time.monotonic()
                    _, details = rpc_error(client.stub.Generate, generate_request(
                        session, prompt=" again", max_tokens=2), timeout=60)
                    took = time.monotonic() - started
                    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
                    assert details.retry_after_s > 0, details
                    assert "--wake-wait-s" in details.message, details.message
                    assert WAKE_WAIT_S * 0.7 <= took <= WAKE_WAIT_S + 5, took
                    assert worker.health() == "SERVING"
                finally:
                    stub.Release(apb.ReleaseRequest(lease_id=hog.lease_id, epoch=hog.epoch),
                                 timeout=RPC_TIMEOUT_S)
                again = client.generate(session, prompt=" again", max_tokens=2)
                assert again.finish.completion_tokens == 2
        finally:
            worker.kill()
