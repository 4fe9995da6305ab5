"""Where device memory figures come from: NVML on a GPU host, or a configured
capacity (a simulated device) on a machine without one.

The two implementations share one interface, `DeviceSource.read`, which
returns a `DeviceMemory` per device. "Foreign" memory is what is used on the
device by anything that holds no lease: other processes, the driver's reserve,
and whatever a lease holder uses beyond its lease.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from services.common.errors import ConfigError
from services.common.units import parse_bytes

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    device: str          # "gpu:0" (NVML index) or a simulated id such as "cpu:0"
    name: str            # product name, or "simulated"
    uuid: str            # NVML UUID; "" for a simulated device
    total_bytes: int
    foreign_bytes: int
    source: str          # "nvml" | "simulated"
    #: (pid, bytes) of lease holders whose process uses more than the book
    #: accounts to it there: the excess is in foreign_bytes (a CUDA context
    #: that grew as kernels loaded, memory outside torch's allocator).
    over_lease: tuple[tuple[int, int], ...] = ()


class DeviceSource(Protocol):
    def read(self, accounted_by_pid: Mapping[tuple[str, int], int]) -> list[DeviceMemory]:
        """Current figures. `accounted_by_pid` maps (device, pid) to the bytes
        the book accounts to that process there (its leases and what it waits
        for), so that its own usage, up to that, is not foreign."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SimulatedDeviceSpec:
    device: str
    total_bytes: int


def parse_device_spec(text: str) -> SimulatedDeviceSpec:
    """'cpu:0=8GiB' -> SimulatedDeviceSpec('cpu:0', 8 GiB)."""
    device, sep, size = text.partition("=")
    device = device.strip()
    if not sep or not device:
        raise ValueError(f"not DEVICE=SIZE: {text!r} (e.g. cpu:0=8GiB)")
    total = parse_bytes(size)
    if total <= 0:
        raise ValueError(f"device {device} needs a positive size")
    return SimulatedDeviceSpec(device, total)


class SimulatedDevices:
    """Devices of a configured capacity, with nothing foreign on them."""

    def __init__(self, specs: tuple[SimulatedDeviceSpec, ...]):
        ids = [spec.device for spec in specs]
        if not specs:
            raise ConfigError("devices", "no simulated device given")
        if len(set(ids)) != len(ids):
            raise ConfigError("devices", f"a device is named twice: {ids}")
        self._devices = [DeviceMemory(s.device, "simulated", "", s.total_bytes, 0, "simulated")
                         for s in specs]

    def read(self, accounted_by_pid: Mapping[tuple[str, int], int]) -> list[DeviceMemory]:
        return list(self._devices)

    def close(self) -> None:
        pass


class NvmlUnavailable(Exception):
    """NVML could not be loaded or sees no GPU."""


class NvmlDevices:
    """Every GPU that NVML sees, as "gpu:<nvml index>"."""

    def __init__(self, nvml: Any = None):
        if nvml is None:
            try:
                import pynvml as nvml  # the nvidia-ml-py package
            except ImportError as exc:  # pragma: no cover - a dependency
                raise NvmlUnavailable(f"pynvml is not installed: {exc}") from None
        self._nvml = nvml
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            raise NvmlUnavailable(f"NVML did not start: {exc}") from None
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            nvml.nvmlShutdown()
            raise NvmlUnavailable("NVML sees no GPU")
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self._names = [_text(nvml.nvmlDeviceGetName(h)) for h in self._handles]
        self._uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in self._handles]

    def _process_usage(self, handle: Any) -> dict[int, int]:
        usage: dict[int, int] = {}
        for query in ("nvmlDeviceGetComputeRunningProcesses",
                      "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                processes = getattr(self._nvml, query)(handle)
            except Exception:  # noqa: BLE001 - not supported in some sandboxes
                continue
            for proc in processes:
                used = proc.usedGpuMemory
                if used is not None:
                    usage[int(proc.pid)] = max(usage.get(int(proc.pid), 0), int(used))
        return usage

    def read(self, accounted_by_pid: Mapping[tuple[str, int], int]) -> list[DeviceMemory]:
        result = []
        for index, handle in enumerate(self._handles):
            device = f"gpu:{index}"
            info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            in_use = int(info.total) - int(info.free)
            usage = self._process_usage(handle)
            # A lease holder's own usage, up to its lease, is accounted by the
            # lease; anything beyond it is foreign like everybody else's.
            covered = sum(min(used, accounted_by_pid.get((device, pid), 0))
                          for pid, used in usage.items())
            over = tuple(sorted((pid, used - accounted_by_pid[(device, pid)])
                                for pid, used in usage.items()
                                if accounted_by_pid.get((device, pid), 0)
                                and used > accounted_by_pid[(device, pid)]))
            result.append(DeviceMemory(device, self._names[index], self._uuids[index],
                                       int(info.total), max(0, in_use - covered), "nvml",
                                       over))
        return result

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down anyway
            pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


DEFAULT_SIMULATED = SimulatedDeviceSpec("cpu:0", 8 << 30)


def open_devices(backend: str, specs: tuple[SimulatedDeviceSpec, ...]) -> DeviceSource:
    """backend "auto": the given capacities if any, else NVML, else a simulated
    8 GiB device; "nvml": NVML or fail; "simulated": the given capacities (or
    the 8 GiB default)."""
    if backend not in ("auto", "nvml", "simulated"):
        raise ConfigError("device_backend", f"unknown backend {backend!r}",
                          fix="use auto, nvml or simulated")
    if specs or backend == "simulated":
        if backend == "nvml":
            raise ConfigError("devices", "simulated devices given with --device-backend nvml",
                              fix="drop --device, or use --device-backend auto")
        return SimulatedDevices(specs or (DEFAULT_SIMULATED,))
    try:
        return NvmlDevices()
    except NvmlUnavailable as exc:
        if backend == "nvml":
            raise ConfigError("device_backend", str(exc),
                              fix="run on a host with an NVIDIA driver, or give --device ID=SIZE") from None
        log.warning("no_gpu_using_simulated_device", reason=str(exc),
                    device=DEFAULT_SIMULATED.device, total_bytes=DEFAULT_SIMULATED.total_bytes)
        return SimulatedDevices((DEFAULT_SIMULATED,))
