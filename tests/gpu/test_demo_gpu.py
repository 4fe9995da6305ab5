"""`lmx demo --at-scale` on a GPU host runs on the GPU (the lent machines have
no model packages: synthetic Qwen2.5-1.5B, SmolLM2-1.7B and Llama-3B
shapes at the default 8 GiB cap, bfloat16): the naive engines really
allocate on the card (shrunk to --cap-gib by a ballast) and the ones that do
not fit die of the card's own out-of-memory error; the stack's admission
reads NVML with its cap at --cap-gib, its workers run on CUDA, and every
agent finishes every turn with the leases under the cap.

Writes bench/results/demo-<card>-<date>.json (the demo's summary and what it
printed). Run on a CUDA host with `pytest -m gpu tests/gpu`. Skipped without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from benchkit import card_slug, git_commit  # noqa: E402


@pytest.mark.timeout(660)     # three workers loading and taking turns: not the suite's 120 s
def test_lmx_demo_runs_on_the_gpu(tmp_path: Path):
    if torch.cuda.is_initialized():   # what earlier tests of this process cached: foreign
        torch.cuda.empty_cache()      # memory to the demo's admission, against its cap
    # Under bench/gpu_suite.sh, the stack's logs go where the suite packs them
    # (kept even when the call is cut at its limit).
    kept = os.environ.get("LMX_GPU_LOGS")
    if kept:
        tmp_path = Path(kept) / "demo"
        tmp_path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--out", str(tmp_path),
                             "--at-scale", "--max-tokens", "8"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    print(result.stdout[-6000:])
    if result.returncode != 0:   # what admission and each worker did last: the log has it
        for log in sorted((tmp_path / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()
            keep = 60 if log.name.startswith("admission") else 20
            print(f"--- {log.name}, last {keep} lines\n" + "\n".join(lines[-keep:]))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "NVIDIA" in summary["device"], summary["device"]
    naive = [r["outcome"] for r in summary["naive"]]
    assert naive[0] == "ran" and "out of memory" in naive, summary["naive"]
    assert all(o in ("ran", "out of memory") for o in naive), summary["naive"]
    lmx = summary["lmx"]
    assert lmx["errors"] == []
    assert [len(a["turns"]) for a in lmx["agents"]] == [3, 3, 3, 3]
    assert all(t["tokens"] > 0 for a in lmx["agents"] for t in a["turns"])
    assert 0 < lmx["peak_leased_bytes"] <= summary["cap_bytes"]
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("worker*"))
    assert '"device": "cuda' in logs or "cuda:0" in logs, "the workers ran on the CPU"
    # Kept as a result (bench/gpu_suite.sh packs what is new in bench/results).
    slug = card_slug(summary["device"])
    (REPO / "bench" / "results" / f"demo-{slug}-{time.strftime('%Y-%m-%d')}.json").write_text(
        json.dumps({"commit": git_commit(), "stdout": result.stdout, **summary}, indent=1))
