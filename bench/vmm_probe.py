"""Can a sleeping model keep its CUDA graphs? A probe of CUDA's virtual memory
API through ctypes, for issue 20's models that take turns.

Each wake now captures the decode graphs again (0.8-1.0 s for four buckets
on an H100): they hold the weights' device addresses, and a wake puts the
weights in a new buffer. vLLM's sleep mode and SGLang's memory saver keep the
addresses instead: the weights live in a virtual address range reserved
once; a sleep unmaps and releases the physical memory behind it, a wake
maps new physical memory at the same addresses and copies the weights back,
and the graphs replay unchanged. vLLM's notes say a ctypes wrapper of the
driver failed there for a context mismatch; this worker already sets the
stack limit through libcuda's ctypes on torch's current context, so this
probe tries the same path and reports, as JSON:

1. reserve a range, create physical memory, map it, grant access, and make a
   torch tensor over it (__cuda_array_interface__: no copy);
2. capture a CUDA graph whose kernels read a "weight" in that range, replay;
3. copy the weight to host, unmap and release the physical memory (NVML's
   and cudaMemGetInfo's free bytes should rise by the range);
4. create and map new physical memory at the same address, copy the weight
   back, replay the same graph: the same output, and the time of each step.

    python bench/vmm_probe.py [--mib 1024]     # GPU only
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0


class Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class AllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int),
                ("location", Location), ("win32HandleMetaData", ctypes.c_void_p),
                ("allocFlags", AllocFlags)]


class AccessDesc(ctypes.Structure):
    _fields_ = [("location", Location), ("flags", ctypes.c_int)]


class Driver:
    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")

    def __call__(self, name: str, *args) -> None:
        code = getattr(self.lib, name)(*args)
        if code != 0:
            raise RuntimeError(f"{name} returned CUDA error {code}")


class DeviceArray:
    """__cuda_array_interface__ over a raw device pointer, for torch.as_tensor."""

    def __init__(self, ptr: int, num_bytes: int):
        self.__cuda_array_interface__ = {"shape": (num_bytes,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 3, "strides": None}


def probe(mib: int) -> dict:
    import torch

    torch.zeros(1, device="cuda")
    device = torch.cuda.current_device()
    drv = Driver()
    report: dict = {"mib": mib, "device": torch.cuda.get_device_name(), "steps": {}}

    def step(name: str, started: float) -> None:
        torch.cuda.synchronize()
        report["steps"][name] = round((time.perf_counter() - started) * 1e3, 3)

    our_ctx = ctypes.c_void_p()
    drv("cuCtxGetCurrent", ctypes.byref(our_ctx))
    report["context"] = {"current": our_ctx.value}
    prop = AllocationProp()
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location = Location(CU_MEM_LOCATION_TYPE_DEVICE, device)
    granularity = ctypes.c_size_t()
    drv("cuMemGetAllocationGranularity", ctypes.byref(granularity), ctypes.byref(prop),
        CU_MEM_ALLOC_GRANULARITY_MINIMUM)
    size = -(-(mib << 20) // granularity.value) * granularity.value
    report["granularity"] = granularity.value
    access = AccessDesc(Location(CU_MEM_LOCATION_TYPE_DEVICE, device),
                        CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
    ptr = ctypes.c_ulonglong()
    handle = ctypes.c_ulonglong()

    def map_new() -> None:
        drv("cuMemCreate", ctypes.byref(handle), ctypes.c_size_t(size), ctypes.byref(prop),
            ctypes.c_ulonglong(0))
        drv("cuMemMap", ptr, ctypes.c_size_t(size), ctypes.c_size_t(0), handle,
            ctypes.c_ulonglong(0))
        drv("cuMemSetAccess", ptr, ctypes.c_size_t(size), ctypes.byref(access),
            ctypes.c_size_t(1))

    started = time.perf_counter()
    drv("cuMemAddressReserve", ctypes.byref(ptr), ctypes.c_size_t(size), ctypes.c_size_t(0),
        ctypes.c_ulonglong(0), ctypes.c_ulonglong(0))
    map_new()
    flat = torch.as_tensor(DeviceArray(ptr.value, size), device="cuda")
    step("reserve_and_map_ms", started)
    report["same_address"] = flat.data_ptr() == ptr.value
    n = 4096
    weight = flat[:n * n * 2].view(torch.bfloat16).view(n, n)
    weight.copy_(torch.randn(n, n, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(8, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(8, n, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.matmul(x, weight, out=out)            # warm-up (cuBLAS handles) off the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.matmul(x, weight, out=out)
    graph.replay()
    torch.cuda.synchronize()
    want = out.clone()
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    free_awake = torch.cuda.mem_get_info()[0]

    started = time.perf_counter()
    host.copy_(flat, non_blocking=True)
    step("copy_out_ms", started)
    started = time.perf_counter()
    drv("cuMemUnmap", ptr, ctypes.c_size_t(size))
    drv("cuMemRelease", handle)
    step("unmap_release_ms", started)
    free_asleep = torch.cuda.mem_get_info()[0]
    report["freed_bytes"] = free_asleep - free_awake
    report["range_bytes"] = size

    started = time.perf_counter()
    map_new()
    step("map_again_ms", started)
    started = time.perf_counter()
    flat.copy_(host, non_blocking=True)
    step("copy_in_ms", started)
    report["copy_in_gb_s"] = round(size / max(report["steps"]["copy_in_ms"], 1e-6) / 1e6, 1)
    out.zero_()
    started = time.perf_counter()
    graph.replay()
    step("replay_after_wake_ms", started)
    report["same_output_after_wake"] = bool(torch.equal(out, want))
    report["address_kept"] = flat.data_ptr() == ptr.value and weight.data_ptr() == ptr.value
    del graph
    torch.cuda.synchronize()
    drv("cuMemUnmap", ptr, ctypes.c_size_t(size))
    drv("cuMemRelease", handle)
    drv("cuMemAddressFree", ptr, ctypes.c_size_t(size))
    report["ok"] = bool(report["same_output_after_wake"] and report["freed_bytes"] >= size // 2)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        report = probe(args.mib)
    except Exception as exc:  # noqa: BLE001 - the probe's answer is the failure itself
        report = {"mib": args.mib, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(report, indent=1))
    from benchkit import write_cuda_report

    write_cuda_report("vmm_probe", report, args.out)
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
