"""Priorities under memory pressure, with real processes on loopback:
admission (a simulated 1400 MiB device), a kvstore and a smollm2-135m
worker of priority 0.

A holder of a higher priority (10) asks for more memory than is free while
the worker is in the middle of a generation. The worker does not wait for
the generation to end: it pauses it between two steps, puts its model to
sleep, and the higher priority is granted while the client's stream is
still open. Once that holder lets go, the worker wakes by itself and the
same stream goes on to exactly the tokens of a generation never paused.
"""

from __future__ import annotations

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
from service.support import admission_servers  # noqa: E402
from service.worker.worker_support import (  # noqa: E402
    GENERATE_TIMEOUT_S,
    RPC_TIMEOUT_S,
    SHARED_MAX_CONTEXT,
    SMOLLM2,
    WorkerClient,
    WorkerProcess,
    generate_request,
)

pytestmark = pytest.mark.timeout(300, func_only=True)

MIB = 1 << 20
TOKENS = 160
PROMPT = "Count: one, two,"


def test_a_higher_priority_pauses_a_generation_which_then_goes_on_exactly(tmp_path):
    with admission_servers(tmp_path) as start_admission, kvstore_servers(tmp_path) as start_kv:
        kvstore = start_kv()
        admission = start_admission("--device", "cpu:0=1400MiB", "--reclaim-deadline-s", "5")
        worker = WorkerProcess(SMOLLM2, admission.address,
                               ("--max-context", str(SHARED_MAX_CONTEXT),
                                "--kvstore", kvstore.address, "--priority", "0"),
                               tmp_path / "worker.log")
        worker.launch().wait_ready()
        stub = admission_pb2_grpc.AdmissionServiceStub(grpc.insecure_channel(admission.address))
        try:
            with WorkerClient(worker.address) as client:
                control = client.open()
                want = client.generate(control, prompt=PROMPT, max_tokens=TOKENS).token_ids
                assert len(want) == TOKENS
                client.close_session(control)

                session = client.open()
                stream = client.stub.Generate(
                    generate_request(session, prompt=PROMPT, max_tokens=TOKENS),
                    timeout=GENERATE_TIMEOUT_S)
                got = list(next(stream).delta.token_ids)
                status = stub.Status(apb.StatusRequest(), timeout=RPC_TIMEOUT_S)
                free = status.devices[0].free_bytes
                granted: dict = {}

                def urgent_holder() -> None:
                    try:
                        granted["lease"] = stub.Acquire(apb.AcquireRequest(
                            holder=apb.Holder(name="test/urgent", pid=1), priority=10,
                            bytes=free + 64 * MIB, purpose=apb.PURPOSE_OTHER,
                            wait_ms=60_000, ttl_ms=120_000), timeout=70).lease
                    except grpc.RpcError as exc:
                        granted["error"] = exc
                        return
                    # Granted: the stream must be open and standing still.
                    granted["at"] = len(got)
                    time.sleep(1.0)
                    granted["a_second_later"] = len(got)
                    stub.Release(apb.ReleaseRequest(lease_id=granted["lease"].lease_id,
                                                    epoch=granted["lease"].epoch),
                                 timeout=RPC_TIMEOUT_S)

                waiter = threading.Thread(target=urgent_holder)
                waiter.start()
                finish = None
                for reply in stream:            # the rest: paused, then on again
                    if reply.HasField("delta"):
                        got.extend(reply.delta.token_ids)
                    elif reply.HasField("finish"):
                        finish = reply.finish
                waiter.join(60)
                assert "lease" in granted, f"the higher priority was not granted: {granted}"
                assert granted["at"] < TOKENS, (
                    f"granted only once the generation had ended: {granted}")
                assert granted["a_second_later"] == granted["at"], (
                    f"the generation went on while the higher priority held the memory: {granted}")
                assert finish is not None and got == want, (
                    "the paused generation did not go on to the tokens of one never paused")
                log = worker.log()
                assert "generations_paused" in log and '"state": "asleep"' in log, (
                    "the worker should have paused its generation and slept")
                assert "generations_resumed" in log
        finally:
            worker.kill()
