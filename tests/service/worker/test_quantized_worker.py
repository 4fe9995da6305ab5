"""A worker with 4-bit weights (--quantize int4), through the real services:
it registers with admission saying how its weights are held, leases the
packed bytes (not the 16-bit ones), and answers exactly as the float32
worker does: SmolLM2's GGUF is Q4_1, 4 bits in blocks of 32, so int4 in
groups of 32 holds the very same weights."""

from __future__ import annotations

import grpc
import pytest

from lmx.v1 import admission_pb2 as apb

from ..support import stub as admission_stub
from .worker_support import SMOLLM2, WorkerClient, launch_smollm2

pytestmark = pytest.mark.timeout(240, func_only=True)

PROMPT = "def fibonacci(n):\n    "
#: bench/quality.py measured SmolLM2-135M's weights at 513.1 MiB in float32,
#: 184.1 MiB with its decoder matrices in int4 (the embeddings stay float32).
FULL_BYTES = 538_060_288


@pytest.fixture(scope="module")
def int4_worker(worker_fleet, worker_admission):
    launch_smollm2(worker_fleet, worker_admission.address)
    worker = worker_fleet.ready("smollm2-int4", SMOLLM2, worker_admission.address,
                                "--quantize", "int4", "--max-context", "512")
    yield worker
    problem = worker_fleet.stop("smollm2-int4")
    assert problem is None, problem


def test_an_int4_worker_leases_its_packed_bytes_and_answers_as_float32(
        int4_worker, smollm2_worker, worker_admission):
    with WorkerClient(int4_worker.address) as client:
        status = client.status()
        assert status.weights == "int4-g32", status.weights
        assert status.weight_bytes < FULL_BYTES * 0.4, (
            f"{status.weight_bytes} bytes of weights: int4 should be about 35% of float32's")
        session = client.open()
        quantized = client.generate(session, prompt=PROMPT, max_tokens=24)
        client.close_session(session)
    with WorkerClient(smollm2_worker.address) as client:   # shared: left as it was found
        assert client.status().weights == "float32"
        session = client.open()
        full = client.generate(session, prompt=PROMPT, max_tokens=24)
        client.close_session(session)
    assert quantized.token_ids == full.token_ids, (
        f"int4-g32 holds SmolLM2's Q4_1 weights exactly: {quantized.text!r} vs {full.text!r}")

    with grpc.insecure_channel(worker_admission.address) as channel:
        reply = admission_stub(channel).Status(apb.StatusRequest(), timeout=10)
    info = next(w for w in reply.workers if w.pid == int4_worker.proc.pid)
    assert info.weights == "int4-g32"
    leased = sum(lease.bytes for lease in reply.leases if lease.holder.pid == int4_worker.proc.pid)
    assert status.weight_bytes <= leased < FULL_BYTES, (
        f"the worker leases {leased} bytes; its weights take {status.weight_bytes}")
