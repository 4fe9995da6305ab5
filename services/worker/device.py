"""The worker's device: which torch device and dtype, its id in admission's
book, and what it costs before any weights (the CUDA context)."""

from __future__ import annotations

import ctypes
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


#: The compute capability from which a card has bfloat16 arithmetic
#: (Ampere), runs Triton's kernels (Triton's README: NVIDIA 8.0+; the decode
#: graphs attend with them) and PyTorch's tinygemm int4 kernel.
MODERN_CAPABILITY = (8, 0)


def capability(device: torch.device) -> tuple[int, int] | None:
    """The card's compute capability; None off CUDA."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def modern(device: torch.device) -> bool:
    """Whether `device` is a CUDA card of MODERN_CAPABILITY or newer."""
    found = capability(device)
    return found is not None and found >= MODERN_CAPABILITY


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: float32 on the CPU; bfloat16 on a card that computes in it,
    float16 on an older one. bfloat16 asked for on an older card is a
    ConfigError."""
    found = capability(device)
    if name == "auto":
        if found is None:
            return torch.float32
        return torch.bfloat16 if found >= MODERN_CAPABILITY else torch.float16
    if name == "bfloat16" and found is not None and found < MODERN_CAPABILITY:
        raise ConfigError("dtype", f"bfloat16 needs compute capability "
                                   f"{MODERN_CAPABILITY[0]}.{MODERN_CAPABILITY[1]} or newer; "
                                   f"this card is {found[0]}.{found[1]}",
                          fix="--dtype auto (float16 here) or float16")
    return DTYPES[name]


def decode_graphs(setting: str, device: torch.device) -> bool:
    """Whether decode steps replay CUDA graphs (with the Triton kernels):
    --cuda-graphs auto on a modern card; eager elsewhere."""
    return setting == "auto" and modern(device)


def describe_card(device: torch.device, dtype: torch.dtype, graphs_setting: str) -> dict:
    """What this card runs, for one log line (card_support)."""
    found = capability(device)
    if found is None:
        return dict(device=str(device), dtype=str(dtype).removeprefix("torch."),
                    decode="eager", int4="dequant")
    old = found < MODERN_CAPABILITY
    why = f"compute capability {found[0]}.{found[1]} < 8.0" if old else "--cuda-graphs off"
    graphs = decode_graphs(graphs_setting, device)
    return dict(device=str(device), capability=f"{found[0]}.{found[1]}",
                dtype=str(dtype).removeprefix("torch."),
                decode="CUDA graphs with Triton kernels" if graphs else f"eager ({why})",
                int4="tinygemm" if not old and dtype == torch.bfloat16 else "dequant")


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


def init_cuda_context(device: torch.device, stack_bytes: int = 0) -> int:
    """Create this process's CUDA context on `device` and return the bytes it
    takes (NVML's figure for this process; a typical size if unknown).
    `stack_bytes`: the per-thread stack the context reserves (0: CUDA's own
    default; see set_stack_limit)."""
    torch.cuda.set_device(device)
    torch.zeros(1, device=device)
    if stack_bytes:
        set_stack_limit(stack_bytes)
    torch.cuda.synchronize(device)
    context = cuda_context_bytes(device)
    return CUDA_CONTEXT_GUESS if context is None else context


def set_stack_limit(stack_bytes: int) -> int | None:
    """Ask for `stack_bytes` of stack per GPU thread on this thread's current
    context (CU_LIMIT_STACK_SIZE, through the driver's libcuda: torch may link
    the runtime statically). The context reserves that much for every thread
    the card can run at once (1 KiB by default: 264 MiB on an H100's 132
    SMs); the driver raises it by itself for a kernel that needs more, at its
    launch. Returns the limit now in force, or None if the driver could not
    be asked (logged)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        code = driver.cuCtxSetLimit(0, ctypes.c_size_t(stack_bytes))
        now = ctypes.c_size_t(0)
        driver.cuCtxGetLimit(ctypes.byref(now), 0)
    except (OSError, AttributeError) as exc:
        log.warning("cuda_stack_limit_unset", error=str(exc))
        return None
    if code != 0:
        log.warning("cuda_stack_limit_refused", asked_bytes=stack_bytes, cuda_error=code)
    log.info("cuda_stack_limit", asked_bytes=stack_bytes, bytes_per_thread=now.value)
    return now.value


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
