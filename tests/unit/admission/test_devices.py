"""Device sources: simulated capacities, NVML through a fake module, and the
backend choice."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.admission import devices
from services.admission.devices import (
    DEFAULT_SIMULATED,
    DeviceMemory,
    NvmlDevices,
    NvmlUnavailable,
    SimulatedDevices,
    SimulatedDeviceSpec,
    open_devices,
    parse_device_spec,
)
from services.common.errors import ConfigError

GIB = 1 << 30


# ---- parse_device_spec -------------------------------------------------------

@pytest.mark.parametrize("text, device, total", [
    ("cpu:0=8GiB", "cpu:0", 8 * GIB),
    (" gpu:1 = 512MiB ", "gpu:1", 512 << 20),
    ("sim=4096", "sim", 4096),
    ("cpu:2=1.5GB", "cpu:2", 1_500_000_000),
])
def test_parse_device_spec(text, device, total):
    assert parse_device_spec(text) == SimulatedDeviceSpec(device, total)


@pytest.mark.parametrize("text", ["cpu:0", "=8GiB", " =8GiB", "cpu:0=", "cpu:0=0",
                                  "cpu:0=lots", "cpu:0=-1GiB"])
def test_parse_device_spec_rejects(text):
    with pytest.raises(ValueError):
        parse_device_spec(text)


# ---- SimulatedDevices --------------------------------------------------------

def test_simulated_devices_have_their_capacity_and_nothing_foreign():
    source = SimulatedDevices((SimulatedDeviceSpec("cpu:0", 8 * GIB),
                               SimulatedDeviceSpec("cpu:1", GIB)))
    memories = source.read({("cpu:0", 1): 123})
    assert memories == [
        DeviceMemory("cpu:0", "simulated", "", 8 * GIB, 0, "simulated"),
        DeviceMemory("cpu:1", "simulated", "", GIB, 0, "simulated"),
    ]
    memories.clear()
    assert len(source.read({})) == 2, "read must hand out a copy"
    source.close()


def test_simulated_devices_need_unique_devices():
    with pytest.raises(ConfigError) as err:
        SimulatedDevices(())
    assert err.value.setting == "devices"
    with pytest.raises(ConfigError) as err:
        SimulatedDevices((SimulatedDeviceSpec("cpu:0", 1), SimulatedDeviceSpec("cpu:0", 2)))
    assert err.value.setting == "devices" and "twice" in err.value.message


# ---- NVML through a fake module -----------------------------------------------

class FakeNvml:
    """The part of pynvml that NvmlDevices uses. GPUs are dicts: name, uuid,
    total, used (total - free), compute and graphics [(pid, used or None)]."""

    def __init__(self, gpus: list[dict], init_error: Exception | None = None):
        self.gpus = gpus
        self.init_error = init_error
        self.initialised = False
        self.shutdowns = 0
        self.broken_queries: set[str] = set()

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error
        self.initialised = True

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def _gpu(self, handle):
        assert handle[0] == "handle", f"not a handle: {handle!r}"
        return self.gpus[handle[1]]

    def nvmlDeviceGetName(self, handle):
        return self._gpu(handle)["name"]

    def nvmlDeviceGetUUID(self, handle):
        return self._gpu(handle)["uuid"]

    def nvmlDeviceGetMemoryInfo(self, handle):
        gpu = self._gpu(handle)
        return SimpleNamespace(total=gpu["total"], free=gpu["total"] - gpu["used"],
                               used=gpu["used"])

    def _processes(self, handle, kind):
        if kind in self.broken_queries:
            raise RuntimeError("NVMLError_NotSupported")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used)
                for pid, used in self._gpu(handle).get(kind, [])]

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return self._processes(handle, "compute")

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return self._processes(handle, "graphics")


def gpu(used: int, total: int = 10_000, compute=(), graphics=(), name=b"NVIDIA H200",
        uuid="GPU-aaaa") -> dict:
    return dict(name=name, uuid=uuid, total=total, used=used, compute=list(compute),
                graphics=list(graphics))


def test_nvml_devices_names_and_foreign_memory_without_leases():
    nvml = FakeNvml([gpu(used=1_500, compute=[(10, 1_000)]),
                     gpu(used=0, total=20_000, name="Other GPU", uuid=b"GPU-bbbb")])
    source = NvmlDevices(nvml)
    assert nvml.initialised
    first, second = source.read({})
    assert first == DeviceMemory("gpu:0", "NVIDIA H200", "GPU-aaaa", 10_000, 1_500, "nvml"), (
        "with no lease, everything in use (total - free) is foreign")
    assert second == DeviceMemory("gpu:1", "Other GPU", "GPU-bbbb", 20_000, 0, "nvml")
    source.close()
    assert nvml.shutdowns == 1


def test_nvml_foreign_excludes_lease_holders_usage_up_to_their_lease():
    nvml = FakeNvml([gpu(used=5_000, compute=[(10, 1_000), (20, 3_000), (30, 500)]),
                     gpu(used=2_000, compute=[(10, 2_000)])])
    source = NvmlDevices(nvml)
    leased = {("gpu:0", 10): 1_500,   # uses 1000 of a 1500 lease: 1000 covered
              ("gpu:0", 20): 2_000,   # uses 3000 of a 2000 lease: 2000 covered, 1000 foreign
              ("gpu:1", 30): 9_999}   # pid 30 holds a lease on the other device only
    first, second = source.read(leased)
    # in use 5000 - covered (1000 + 2000) = 2000: pid 30's 500, pid 20's excess 1000, and 500
    # unattributed (driver, contexts).
    assert first.foreign_bytes == 2_000, f"gpu:0 foreign {first.foreign_bytes}, expected 2000"
    assert second.foreign_bytes == 2_000, "a lease on gpu:0 must not cover usage on gpu:1"
    assert first.over_lease == ((20, 1_000),), (
        f"pid 20 uses 1000 more than its lease, nobody else: {first.over_lease}")
    assert second.over_lease == (), "pid 10 has no lease on gpu:1: its use there is not excess"


def test_nvml_process_lists_are_merged_and_unknown_usage_skipped():
    nvml = FakeNvml([gpu(used=4_000, compute=[(10, 1_000), (11, None)],
                         graphics=[(10, 1_200), (12, 300)])])
    source = NvmlDevices(nvml)
    (only,) = source.read({("gpu:0", 10): 5_000, ("gpu:0", 11): 5_000, ("gpu:0", 12): 100})
    # pid 10 counted once at its largest (1200); pid 11 reports no usage; pid 12 100 of 300.
    assert only.foreign_bytes == 4_000 - 1_200 - 100, f"foreign {only.foreign_bytes}"
    nvml.broken_queries = {"compute", "graphics"}
    (only,) = source.read({("gpu:0", 10): 5_000})
    assert only.foreign_bytes == 4_000, "without process lists, all use is foreign"


def test_nvml_foreign_is_never_negative():
    nvml = FakeNvml([gpu(used=1_000, compute=[(10, 2_000)])])  # NVML figures disagree
    (only,) = NvmlDevices(nvml).read({("gpu:0", 10): 5_000})
    assert only.foreign_bytes == 0


def test_nvml_unavailable_when_init_fails_or_no_gpu():
    with pytest.raises(NvmlUnavailable, match="did not start"):
        NvmlDevices(FakeNvml([], init_error=RuntimeError("NVMLError_LibraryNotFound")))
    empty = FakeNvml([])
    with pytest.raises(NvmlUnavailable, match="no GPU"):
        NvmlDevices(empty)
    assert empty.shutdowns == 1, "NVML must be shut down again when it sees no GPU"


def test_nvml_close_swallows_shutdown_errors():
    nvml = FakeNvml([gpu(used=0)])
    source = NvmlDevices(nvml)

    def broken():
        raise RuntimeError("already shut down")

    nvml.nvmlShutdown = broken
    source.close()


# ---- open_devices ---------------------------------------------------------------

@pytest.fixture
def nvml_ok(monkeypatch):
    fake = FakeNvml([gpu(used=100)])
    monkeypatch.setattr(devices, "NvmlDevices", lambda: NvmlDevices(fake))
    return fake


@pytest.fixture
def nvml_missing(monkeypatch):
    def unavailable():
        raise NvmlUnavailable("NVML sees no GPU")

    monkeypatch.setattr(devices, "NvmlDevices", unavailable)


SPEC = SimulatedDeviceSpec("cpu:3", 2 * GIB)


def test_open_devices_auto_prefers_given_capacities(nvml_ok):
    source = open_devices("auto", (SPEC,))
    assert isinstance(source, SimulatedDevices)
    assert [m.device for m in source.read({})] == ["cpu:3"]


def test_open_devices_auto_uses_nvml_when_it_answers(nvml_ok):
    source = open_devices("auto", ())
    assert isinstance(source, NvmlDevices)
    assert [m.source for m in source.read({})] == ["nvml"]


def test_open_devices_auto_falls_back_to_the_default_simulated_device(nvml_missing):
    source = open_devices("auto", ())
    assert isinstance(source, SimulatedDevices)
    (only,) = source.read({})
    assert (only.device, only.total_bytes) == (DEFAULT_SIMULATED.device, 8 * GIB)


def test_open_devices_simulated(nvml_ok):
    (only,) = open_devices("simulated", ()).read({})
    assert only.device == DEFAULT_SIMULATED.device, "simulated with no --device: the default"
    (only,) = open_devices("simulated", (SPEC,)).read({})
    assert only.device == "cpu:3"


def test_open_devices_nvml(nvml_ok):
    assert isinstance(open_devices("nvml", ()), NvmlDevices)


def test_open_devices_nvml_without_a_gpu_is_a_config_error(nvml_missing):
    with pytest.raises(ConfigError) as err:
        open_devices("nvml", ())
    assert err.value.setting == "device_backend" and err.value.fix


def test_open_devices_nvml_with_simulated_devices_is_a_config_error(nvml_ok):
    with pytest.raises(ConfigError) as err:
        open_devices("nvml", (SPEC,))
    assert err.value.setting == "devices"


def test_open_devices_unknown_backend():
    with pytest.raises(ConfigError) as err:
        open_devices("cuda", ())
    assert err.value.setting == "device_backend" and "auto, nvml or simulated" in err.value.fix
