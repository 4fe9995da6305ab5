"""A worker on a real GPU: the lease covers what the CUDA allocator holds.

Run on a CUDA host with `pytest -m gpu tests/gpu` (LMX_CACHE must hold the
smollm2 tokenizer: the synthetic models use it). Skipped without a GPU.
"""

from __future__ import annotations

import asyncio
import time

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


async def _generate(stub, pb, prompt: str, max_tokens: int) -> tuple[int, str]:
    session = await stub.OpenSession(pb.OpenSessionRequest())
    count, text = 0, ""
    async for reply in stub.Generate(pb.GenerateRequest(
            session_id=session.session_id, token=session.token, prompt=prompt,
            sampling=pb.SamplingParams(max_tokens=max_tokens))):
        if reply.HasField("delta"):
            count += len(reply.delta.token_ids)
            text += reply.delta.text
    await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id,
                                                   token=session.token))
    return count, text


@pytest.mark.timeout(300)     # the worker compiles its decode step at the warm-up
def test_worker_on_cuda_stays_inside_its_lease(tmp_path):
    import grpc

    from lmx.v1 import admission_pb2, admission_pb2_grpc
    from lmx.v1 import worker_pb2 as pb
    from lmx.v1 import worker_pb2_grpc
    from services.admission.app import SERVICE_NAME as ADMISSION
    from services.common.launch import start_service
    from services.worker.app import SERVICE_NAME as WORKER

    admission = start_service("services.admission", ADMISSION,
                              ["--device-backend", "nvml", "--poll-interval-s", "0.2",
                               "--log-format", "json"], log_path=tmp_path / "admission.log")
    worker = None

    def admission_device():
        with grpc.insecure_channel(admission.address) as channel:
            return admission_pb2_grpc.AdmissionServiceStub(channel).Status(
                admission_pb2.StatusRequest(), timeout=5).devices[0]

    try:
        time.sleep(0.5)
        foreign_before = admission_device().foreign_bytes
        worker = start_service(
            "services.worker", WORKER,
            ["--model", "synthetic:llama-1b", "--admission", admission.address, "--device", "cuda",
             "--log-format", "json", "--kv-chunk-bytes", "64MiB"],
            log_path=tmp_path / "worker.log", timeout_s=300)

        async def run() -> tuple[list, list]:
            samples = []
            async with grpc.aio.insecure_channel(worker.address) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                jobs = asyncio.gather(*(_generate(stub, pb, f"Agent {i} says", 64)
                                        for i in range(8)))
                task = asyncio.ensure_future(jobs)
                while not task.done():
                    samples.append(await stub.GetStatus(pb.GetStatusRequest()))
                    await asyncio.sleep(0.05)
                results = await task
                samples.append(await stub.GetStatus(pb.GetStatusRequest()))
            return results, samples

        results, samples = asyncio.run(run())
        assert all(count == 64 for count, _ in results), results
        for status in samples:
            assert status.held_bytes <= status.leased_bytes, (
                f"the worker holds {status.held_bytes} bytes beyond its lease of "
                f"{status.leased_bytes}")
        last = samples[-1]
        print(f"weights={last.weight_bytes} overhead={last.overhead_bytes} "
              f"leased={last.leased_bytes} held={last.held_bytes} kv={last.kv_bytes}")
        assert last.overhead_bytes > 0, "the CUDA context was not measured"
        log = (tmp_path / "worker.log").read_text()
        assert "worker_workspace_measured" in log, "the workspace was not measured"

        # Admission sees the worker's memory as leased, not foreign.
        time.sleep(0.5)
        device = admission_device()
        print(f"admission: leased={device.leased_bytes} foreign={device.foreign_bytes} "
              f"(before the worker {foreign_before}) free={device.free_bytes}")
        assert device.leased_bytes >= last.weight_bytes
        assert device.foreign_bytes - foreign_before < 256 << 20, (
            f"foreign memory grew from {foreign_before} to {device.foreign_bytes} bytes: the "
            "worker uses memory its lease does not cover")
    finally:
        if worker is not None:
            assert worker.stop() == 0, (tmp_path / "worker.log").read_text()[-3000:]
        assert admission.stop() == 0


def _nvml_used(pid: int) -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return max((int(p.usedGpuMemory or 0)
                    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                    if int(p.pid) == pid), default=0)
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.timeout(400)     # 100 s before the step was compiled (6783507)
def test_a_sleeping_worker_holds_no_more_than_the_lease_it_keeps_cycle_after_cycle(tmp_path):
    """Another holder asks for nearly all the memory: the worker sleeps, and
    then NVML's figure for its process (context, weights' leftovers, the
    graphs' pool, the allocator's cache) is within the lease it keeps. The
    holder lets go, a request wakes the worker and decodes (graphs captured
    again). Five times."""
    import grpc

    from lmx.v1 import admission_pb2, admission_pb2_grpc
    from lmx.v1 import worker_pb2 as pb
    from lmx.v1 import worker_pb2_grpc
    from services.admission.app import SERVICE_NAME as ADMISSION
    from services.common.launch import start_service
    from services.worker.app import SERVICE_NAME as WORKER

    admission = start_service("services.admission", ADMISSION,
                              ["--device-backend", "nvml", "--poll-interval-s", "0.2",
                               "--reclaim-deadline-s", "20", "--log-format", "json"],
                              log_path=tmp_path / "admission.log")
    worker = None
    try:
        worker = start_service(
            "services.worker", WORKER,
            ["--model", "synthetic:llama-1b", "--admission", admission.address, "--device", "cuda",
             "--kvstore", "none", "--log-format", "json"],
            log_path=tmp_path / "worker.log", timeout_s=300)
        pid = worker.process.pid
        with grpc.insecure_channel(admission.address) as channel:
            book = admission_pb2_grpc.AdmissionServiceStub(channel)

            def worker_leases() -> int:
                status = book.Status(admission_pb2.StatusRequest(), timeout=5)
                return sum(lease.bytes for lease in status.leases if lease.holder.pid == pid)

            async def one_turn() -> int:
                async with grpc.aio.insecure_channel(worker.address) as wchannel:
                    count, _ = await _generate(worker_pb2_grpc.WorkerServiceStub(wchannel), pb,
                                               "Agent says", 16)
                return count

            for cycle in range(5):
                assert asyncio.run(one_turn()) == 16
                awake = worker_leases()
                device = book.Status(admission_pb2.StatusRequest(), timeout=5).devices[0]
                # All but the CUDA context's room (the lease it keeps asleep).
                want = device.free_bytes + awake - (3 << 29)
                granted = book.Acquire(admission_pb2.AcquireRequest(
                    holder=admission_pb2.Holder(name="test/other", pid=1), bytes=want,
                    purpose=admission_pb2.PURPOSE_OTHER, wait_ms=60_000, ttl_ms=60_000),
                    timeout=90).lease
                time.sleep(0.5)
                kept, used = worker_leases(), _nvml_used(pid)
                print(f"cycle {cycle}: leases awake {awake >> 20} MiB, asleep {kept >> 20} MiB; "
                      f"NVML {used >> 20} MiB")
                assert kept < awake / 2, f"cycle {cycle}: the worker kept {kept} of {awake} bytes"
                assert used <= kept, (
                    f"cycle {cycle}: asleep, the worker's process holds {used} bytes on the GPU "
                    f"(NVML), beyond the {kept} bytes of lease it keeps")
                book.Release(admission_pb2.ReleaseRequest(lease_id=granted.lease_id,
                                                          epoch=granted.epoch), timeout=5)
        assert asyncio.run(one_turn()) == 16
        log = (tmp_path / "worker.log").read_text()
        assert "step_out_of_memory" not in log and "worker_lease_lost" not in log
    finally:
        if worker is not None:
            assert worker.stop() == 0, (tmp_path / "worker.log").read_text()[-3000:]
        assert admission.stop() == 0
