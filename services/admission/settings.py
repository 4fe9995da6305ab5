"""Admission's settings: one frozen object, built once at start."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.admission.devices import SimulatedDeviceSpec, parse_device_spec
from services.common import settings as loader
from services.common.settings import ServerFields
from services.common.errors import ConfigError

DEFAULT_LISTEN = "127.0.0.1:50051"


@dataclass(frozen=True)
class AdmissionSettings(ServerFields):
    listen: str = field(default=DEFAULT_LISTEN, metadata={"help": "HOST:PORT to serve on"})
    devices: tuple[SimulatedDeviceSpec, ...] = field(default=(), metadata={
        "help": "a simulated device ID=SIZE, e.g. cpu:0=8GiB (default: the GPUs NVML sees, "
                "or cpu:0=8GiB without one)",
        "parse": parse_device_spec, "repeat": True, "flag": "device"})
    device_backend: str = field(default="auto", metadata={
        "help": "auto | nvml | simulated"})
    cap_fraction: float = field(default=0.90, metadata={
        "help": "share of each device's total memory that leases may use, before foreign use"})
    default_ttl_s: float = field(default=10.0, metadata={
        "help": "lease time to live when the holder asks for none"})
    min_ttl_s: float = field(default=0.1, metadata={"help": "shortest TTL granted"})
    max_ttl_s: float = field(default=3600.0, metadata={"help": "longest TTL granted"})
    max_wait_s: float = field(default=300.0, metadata={
        "help": "longest a request may wait in the queue"})
    sweep_interval_s: float = field(default=0.05, metadata={
        "help": "how often expired leases are looked for"})
    poll_interval_s: float = field(default=1.0, metadata={
        "help": "how often NVML is read for foreign memory"})
    reclaim_deadline_s: float = field(default=5.0, metadata={
        "help": "how long a holder asked to give memory back may take to answer before it "
                "is reported overdue"})
    min_resident_s: float = field(default=0.0, metadata={
        "help": "a model's weights lease granted or grown less than this long ago is not asked "
                "back (a quantum: fewer swaps between models that take turns, longer waits)"})
    state_file: str = field(default="", metadata={
        "help": "where admission notes how many leases it has out (empty: <runtime dir>/"
                "admission-<address>.json; none: nowhere); a restart that finds leases there "
                "grants nothing until their holders have noticed and let go"})
    restart_grace_max_s: float = field(default=30.0, metadata={
        "help": "the longest such pause after a restart (holders renew every third of their "
                "TTL; one with a longer TTL may notice later)"})
    grace_s: float = field(default=5.0, metadata={
        "help": "how long in-flight calls may finish on shutdown"})
    log_format: str = field(default="auto", metadata={"help": "auto | json | console"})
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error"})

    def __post_init__(self) -> None:
        loader.check_common(self)
        if not 0 < self.cap_fraction <= 1:
            raise ConfigError("cap_fraction", f"must be in (0, 1], got {self.cap_fraction}")
        if not 0 < self.min_ttl_s <= self.default_ttl_s <= self.max_ttl_s:
            raise ConfigError("default_ttl_s", "need 0 < min_ttl_s <= default_ttl_s <= max_ttl_s")
        for name in ("max_wait_s", "sweep_interval_s", "poll_interval_s", "reclaim_deadline_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, "must be positive")
        if not 0 <= self.min_resident_s <= 3600:
            raise ConfigError("min_resident_s", "must be in [0, 3600]")
        if not 0 <= self.restart_grace_max_s <= 3600:
            raise ConfigError("restart_grace_max_s", "must be in [0, 3600]")


def load_settings(argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> AdmissionSettings:
    return loader.load(AdmissionSettings, "admission", argv, environ,
                       description="lmx admission: the GPU memory book (VRAM leases)")
