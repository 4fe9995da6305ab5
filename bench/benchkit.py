"""What the benchmarks share: the machine they run on, the commit, CPU
meters, writing their JSON, and waiting for the machine to be quiet."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def card_slug(card: str) -> str:
    """A card's short name for result files: "NVIDIA H100 80GB HBM3" is
    "h100"."""
    return card.lower().replace("nvidia ", "").split()[0]


def git_commit() -> str:
    """The checkout's commit (+dirty); LMX_BENCH_COMMIT where there is no
    git history (a copy of the tree on a lent GPU machine)."""
    if os.environ.get("LMX_BENCH_COMMIT"):
        return os.environ["LMX_BENCH_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def write_report(report: dict, path: Path) -> Path:
    """A benchmark's JSON (indented, one trailing newline), its folder made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def write_cuda_report(benchmark: str, fields: dict, out_dir: Path) -> Path:
    """A GPU benchmark's JSON: `fields` after its name, the card, torch, the
    commit and the time, written as <benchmark with dashes>-cuda-<card>-<date>.json
    in `out_dir`."""
    import torch

    card = torch.cuda.get_device_name()
    report = {"benchmark": benchmark, "gpu": card, "torch": torch.__version__,
              "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              **fields}
    name = benchmark.replace("_", "-")
    return write_report(report, out_dir / f"{name}-cuda-{card_slug(card)}-"
                                          f"{time.strftime('%Y-%m-%d')}.json")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds() -> float:
    """CPU time all processes of the machine have used so far (/proc/stat)."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait_s: float, threshold_cores: float = 0.25) -> float:
    """Wait (at most max_wait_s) until the machine is idle: less than
    threshold_cores busy over one second. Returns the last figure seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = busy_cpu_seconds()
        time.sleep(1.0)
        busy = busy_cpu_seconds() - before
        if busy < threshold_cores or time.monotonic() >= deadline:
            return round(busy, 2)

