"""The worker's device: which torch device and dtype, its id in admission's
book, and what it costs before any weights (the CUDA context)."""

from __future__ import annotations

import os

import structlog
import torch

from services.common.errors import ConfigError

log = structlog.get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# When NVML cannot tell this process's usage: a CUDA context with cuBLAS
# workspaces is typically 0.4-0.6 GiB.
CUDA_CONTEXT_GUESS = 600 << 20


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device("cuda:0" if name == "cuda" else name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{name} asked for, but torch sees no CUDA GPU",
                              fix="use --device cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("device", f"{name}: only {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def gpu_uuid(device: torch.device) -> str:
    """NVML's form of the GPU's UUID ("GPU-..."), as admission reports it."""
    return "GPU-" + str(torch.cuda.get_device_properties(device).uuid)


def admission_device_id(device: torch.device, devices: list) -> str:
    """Admission's id for `device`, from its Status devices."""
    if device.type == "cuda":
        uuid = gpu_uuid(device)
        for info in devices:
            if info.uuid == uuid:
                return info.device
    for info in devices:
        if info.device == "cpu:0" or (device.type == "cpu" and info.source == "simulated"):
            return info.device
    if devices:
        return devices[0].device
    raise ConfigError("admission_device", "admission reports no device")


def init_cuda_context(device: torch.device) -> int:
    """Create this process's CUDA context on `device` and return the bytes it
    takes (NVML's figure for this process; a typical size if unknown)."""
    torch.cuda.set_device(device)
    torch.zeros(1, device=device)
    torch.cuda.synchronize(device)
    context = cuda_context_bytes(device)
    return CUDA_CONTEXT_GUESS if context is None else context


def cuda_context_bytes(device: torch.device) -> int | None:
    """What this process uses on `device` beyond torch's allocator: the CUDA
    context, which grows as kernels are first loaded (lazy module loading)
    and libraries make their handles. None when NVML cannot tell."""
    used = process_device_bytes(device)
    if used is None:
        return None
    return max(0, used - torch.cuda.memory_reserved(device))


def process_device_bytes(device: torch.device) -> int | None:
    """NVML's figure for this process's memory on `device`, or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(gpu_uuid(device))
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory:
                    return int(proc.usedGpuMemory)
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - the caller falls back
        log.warning("cuda_usage_unmeasured", error=str(exc))
    return None
