"""A timeline of a device's memory book: who held how much, when, and the
parks, sleeps and wakes in between. A recorder samples admission's Status and
follows its Watch (both in background threads, one gRPC channel each); `plot`
draws the leases stacked per holder over time with the cap, and the events
marked, as a PNG (matplotlib, headless).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lmx.v1 import admission_pb2 as pb
from lmx.v1 import admission_pb2_grpc
from services.common import transport

ACTIVITY_NAMES = {
    pb.WorkerActivity.KIND_SESSION_PARKED: "park",
    pb.WorkerActivity.KIND_SESSION_RESTORED: "restore",
    pb.WorkerActivity.KIND_MODEL_ASLEEP: "sleep",
    pb.WorkerActivity.KIND_MODEL_AWAKE: "wake",
}


@dataclass(frozen=True)
class Sample:
    t: float                       # seconds since the recorder started
    held: dict[str, int]           # holder -> leased bytes on the device


@dataclass(frozen=True)
class Mark:
    t: float
    kind: str                      # park | restore | sleep | wake | reclaim
    holder: str                    # the model, or the holder asked
    detail: str


@dataclass
class Recorder:
    address: str
    device: str = ""               # "" : the first device
    interval_s: float = 0.1
    samples: list[Sample] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    cap_bytes: int = 0
    total_bytes: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch_call = None
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def start(self) -> Recorder:
        self._t0 = time.monotonic()
        for target in (self._sample_loop, self._watch_loop):
            thread = threading.Thread(target=target, daemon=True, name=target.__name__)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch_call is not None:
            self._watch_call.cancel()
        for thread in self._threads:
            thread.join(5)

    def _sample_loop(self) -> None:
        with transport.channel(self.address) as channel:
            stub = admission_pb2_grpc.AdmissionServiceStub(channel)
            while not self._stop.is_set():
                try:
                    status = stub.Status(pb.StatusRequest(), timeout=5)
                except grpc.RpcError:
                    self._stop.wait(self.interval_s)
                    continue
                devices = [d for d in status.devices if not self.device or d.device == self.device]
                if devices:
                    device = devices[0]
                    self.cap_bytes, self.total_bytes = device.cap_bytes, device.total_bytes
                    held: dict[str, int] = {}
                    for lease in status.leases:
                        if lease.device == device.device:
                            held[lease.holder.name] = held.get(lease.holder.name, 0) + lease.bytes
                    self.samples.append(Sample(self.now(), held))
                self._stop.wait(self.interval_s)

    def _watch_loop(self) -> None:
        with transport.channel(self.address) as channel:
            stub = admission_pb2_grpc.AdmissionServiceStub(channel)
            self._watch_call = stub.Watch(pb.WatchRequest())
            try:
                for event in self._watch_call:
                    mark = to_mark(event, self.now())
                    if mark is not None:
                        self.marks.append(mark)
            except grpc.RpcError:
                pass       # cancelled at stop, or admission went away


def to_mark(event: pb.Event, t: float) -> Mark | None:
    kind = event.WhichOneof("kind")
    if kind == "activity":
        activity = event.activity
        name = ACTIVITY_NAMES.get(activity.kind)
        if name is None:
            return None
        return Mark(t, name, activity.model, activity.reason)
    if kind == "reclaim_requested":
        reclaim = event.reclaim_requested.reclaim
        return Mark(t, "reclaim", reclaim.lease.holder.name, f"for {reclaim.for_holder}")
    return None


MARK_STYLE = {"park": ("v", "tab:blue"), "restore": ("^", "tab:cyan"),
              "sleep": ("s", "tab:red"), "wake": ("o", "tab:green"),
              "reclaim": ("x", "tab:gray")}


def plot(samples: list[Sample], marks: list[Mark], cap_bytes: int, total_bytes: int,
         path: Path, title: str, phases: list[tuple[float, float, str]] = ()) -> Path:
    """Stacked leases per holder over time, the cap, the events; PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = float(1 << 30)
    holders = sorted({h for s in samples for h in s.held})
    times = [s.t for s in samples]
    stacks = [[s.held.get(h, 0) / gib for s in samples] for h in holders]
    fig, ax = plt.subplots(figsize=(11, 5.2), dpi=110)
    if samples and holders:
        ax.stackplot(times, stacks, labels=holders, step="post", alpha=0.85)
    if cap_bytes:
        ax.axhline(cap_bytes / gib, color="black", linestyle="--", linewidth=1)
        ax.text(times[0] if times else 0, cap_bytes / gib, "  cap (leases may use)",
                va="bottom", fontsize=8)
    if total_bytes:
        ax.axhline(total_bytes / gib, color="gray", linestyle=":", linewidth=1)
        ax.text(times[0] if times else 0, total_bytes / gib, "  device", va="bottom", fontsize=8,
                color="gray")
    top = max([cap_bytes, total_bytes, 1]) / gib * 1.35
    for start, end, label in phases:
        ax.axvspan(start, end, color="0.93", zorder=0)
        ax.text((start + end) / 2, top * 0.97, label, ha="center", va="top", fontsize=8)
    seen: set[str] = set()
    rows = {"park": 0.80, "restore": 0.84, "sleep": 0.88, "wake": 0.92}   # one row per kind
    for mark in marks:
        if mark.kind not in rows:
            continue    # reclaims are frequent; the parks and sleeps they cause are marked
        shape, color = MARK_STYLE[mark.kind]
        ax.scatter([mark.t], [top * rows[mark.kind]], marker=shape, color=color, s=36, zorder=5,
                   label=mark.kind if mark.kind not in seen else None)
        seen.add(mark.kind)
    ax.set_ylim(0, top)
    ax.set_xlabel("seconds")
    ax.set_ylabel("GiB leased")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
