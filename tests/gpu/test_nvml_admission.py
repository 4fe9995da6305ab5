"""Admission on a real GPU: devices and foreign memory from NVML.

Run on a CUDA host with `pytest -m gpu tests/gpu`. Skipped without a GPU.
"""

from __future__ import annotations

import os
import time

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GIB = 1 << 30


def _status(address: str):
    import grpc

    from lmx.v1 import admission_pb2 as pb
    from lmx.v1 import admission_pb2_grpc
    with grpc.insecure_channel(address) as channel:
        return admission_pb2_grpc.AdmissionServiceStub(channel).Status(pb.StatusRequest(),
                                                                     timeout=5)


def _device(address: str, uuid: str):
    return next(d for d in _status(address).devices if d.uuid == uuid)


def _settled_foreign(address: str, uuid: str, polls: int = 3) -> int:
    time.sleep(polls * 0.3)  # a few NVML polls (poll interval 0.2 s)
    return _device(address, uuid).foreign_bytes


def test_nvml_devices_and_foreign_memory(tmp_path):
    import grpc

    from lmx.v1 import admission_pb2 as pb
    from lmx.v1 import admission_pb2_grpc
    from services.admission.app import SERVICE_NAME
    from services.common.launch import start_service

    torch.cuda.init()
    torch.zeros(1, device="cuda")  # this process's CUDA context exists from here on
    uuid = "GPU-" + str(torch.cuda.get_device_properties(0).uuid)
    service = start_service("services.admission", SERVICE_NAME,
                            ["--device-backend", "nvml", "--poll-interval-s", "0.2",
                             "--log-format", "json"], log_path=tmp_path / "admission.log")
    try:
        device = _device(service.address, uuid)
        total = torch.cuda.get_device_properties(0).total_memory
        print(f"{device.device} {device.name} total={device.total_bytes} "
              f"foreign={device.foreign_bytes} budget={device.budget_bytes}")
        assert device.source == "nvml" and "NVIDIA" in device.name, device
        assert abs(device.total_bytes - total) < GIB, (device.total_bytes, total)
        assert device.cap_bytes == int(device.total_bytes * 0.9)
        assert device.foreign_bytes > 0, "this process's CUDA context is foreign memory"

        # 4 GiB allocated by a process without a lease: foreign grows by it.
        before = _settled_foreign(service.address, uuid)
        unleased = torch.empty(4 * GIB, dtype=torch.uint8, device="cuda")
        unleased.fill_(1)
        torch.cuda.synchronize()
        grown = _settled_foreign(service.address, uuid)
        print(f"foreign before={before} after 4 GiB unleased={grown}")
        assert 3.9 * GIB < grown - before < 4.5 * GIB, (before, grown)

        # A lease for 2 GiB, then 2 GiB allocated under it: not foreign.
        with grpc.insecure_channel(service.address) as channel:
            stub = admission_pb2_grpc.AdmissionServiceStub(channel)
            lease = stub.Acquire(pb.AcquireRequest(
                holder=pb.Holder(name="gpu-test", pid=os.getpid()), device=device.device,
                bytes=2 * GIB, purpose=pb.PURPOSE_KV, ttl_ms=60_000), timeout=10).lease
            leased = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
            leased.fill_(1)
            torch.cuda.synchronize()
            after_lease = _settled_foreign(service.address, uuid)
            view = _device(service.address, uuid)
            print(f"foreign after 2 GiB under a lease={after_lease} leased={view.leased_bytes}"
                  f" free={view.free_bytes}")
            assert abs(after_lease - grown) < 256 << 20, (grown, after_lease)
            assert view.budget_bytes == view.cap_bytes - view.foreign_bytes
            assert view.free_bytes == view.budget_bytes - 2 * GIB
            stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch),
                         timeout=5)
        del leased, unleased
        torch.cuda.empty_cache()
    finally:
        assert service.stop() == 0
