"""Load (in the default suite, about 40 s on 2 cores; alone: `make test-load`):
64 concurrent sessions across three
models on a simulated 1600 MiB device, through real processes (bench/load.py),
bounded in time. Every request completes or ends with a clear retryable error
(RESOURCE_EXHAUSTED, ABORTED, UNAVAILABLE); none is lost; no worker logs an
out-of-memory error; every service exits 0 and leaves no segment; the p50 and
p99 latencies are recorded (in the JSON the benchmark writes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import load  # noqa: E402

pytestmark = pytest.mark.timeout(1200, func_only=True)


def test_64_sessions_across_three_models_lose_nothing(tmp_path):
    args = load.parse_args(["--out-dir", str(tmp_path), "--duration-s", "900"])
    result = load.run(args)
    s = result["summary"]
    assert s["generates"] == 64 * args.turns, s
    assert s["lost"] == 0, f"requests lost: {s['lost_examples']}"
    assert s["oom"] == 0, result["oom_lines"][:5]
    assert s["completed"] > 0 and s["latency_s"]["p50"] is not None
    assert s["latency_s"]["p99"] >= s["latency_s"]["p50"]
    assert not any(result["exit_codes"].values()), result["exit_codes"]
    assert result["shm_files_left_after_stop"] == []
