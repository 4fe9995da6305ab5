"""`lmx demo` (what `make demo` runs), end to end: the naive way crashes out
of memory, the lmx way finishes every agent's every turn, and it writes the
timeline picture and the summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900, func_only=True)

REPO = Path(__file__).resolve().parents[2]


def test_demo_tells_the_story(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--out", str(tmp_path),
                             "--device", "cpu", "--max-tokens", "8"],
                            cwd=REPO, capture_output=True, text=True, timeout=800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "crashed out of memory" in out and "4 of 4 agents finished every turn" in out, out
    summary = json.loads((tmp_path / "summary.json").read_text())
    naive = [r["outcome"] for r in summary["naive"]]
    assert naive == ["ran", "out of memory", "out of memory", "out of memory"], summary["naive"]
    lmx = summary["lmx"]
    assert lmx["errors"] == []
    assert [len(a["turns"]) for a in lmx["agents"]] == [3, 3, 3, 3]
    assert len({a["model"] for a in lmx["agents"]}) == 3, "three models, one shared by two agents"
    assert all(t["tokens"] > 0 for a in lmx["agents"] for t in a["turns"])
    assert lmx["events"]["sleep"] >= 1 and lmx["events"]["wake"] >= 1, lmx["events"]
    assert 0 < lmx["peak_leased_bytes"] <= summary["cap_bytes"], "the book stayed under the cap"
    png = (tmp_path / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not list(Path("/dev/shm").glob("lmx-demo*")), "the demo left shared memory"


def test_demo_through_the_openai_front(tmp_path: Path):
    """--via openai: the same agents as OpenAI clients of `lmx front`, each
    resending its whole history; all finish under the same memory pressure,
    later turns reuse their context, and /metrics shows the book moving."""
    result = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--out", str(tmp_path),
                             "--device", "cpu", "--via", "openai", "--skip-naive",
                             "--max-tokens", "8"],
                            cwd=REPO, capture_output=True, text=True, timeout=800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lmx = json.loads((tmp_path / "summary.json").read_text())["lmx"]
    assert lmx["errors"] == [] and [len(a["turns"]) for a in lmx["agents"]] == [3, 3, 3, 3]
    assert all(t["cached_tokens"] > 0 for a in lmx["agents"] for t in a["turns"][1:]), (
        "a later turn recomputed its whole history")
    assert lmx["events"]["sleep"] >= 1 and lmx["events"]["wake"] >= 1, lmx["events"]
    leased = {v for s in lmx["metrics_scrapes"] for k, v in s.items()
              if k.startswith("lmx:device_leased_bytes")}
    assert len(leased) >= 2, "a scrape of /metrics should show the memory book moving"
