"""The step memory plan on a real GPU: for every step shape the runner may
run (eager decodes and prefills of 1 to 128 rows, graphed decodes, contexts
up to the model's window), the plan is never below what the step allocated
(torch.cuda.max_memory_allocated), and the decode graphs' pool never above
its estimate. bench/step_memory.py runs the same for every synthetic shape
up to 3B and writes the JSON; this test covers three architectures quickly.

Run on a CUDA host with `pytest -m gpu tests/gpu` (LMX_CACHE must hold the
smollm2 tokenizer: the synthetic models use it). Skipped without a GPU.
"""

from __future__ import annotations

import argparse

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.timeout(300)     # compiles the step as the worker does (qwen2.5-1.5b: about 90 s)
@pytest.mark.parametrize("model", ["synthetic:llama-1b", "synthetic:qwen2.5-1.5b",
                                   "synthetic:gemma3-270m"])
def test_the_plan_is_never_below_a_steps_measured_peak(model, step_memory_bench):
    report = step_memory_bench.run_model(model, argparse.Namespace(quick=True),
                                         torch.device("cuda"))
    ran = [s for s in report["steps"] if "measured" in s]
    assert len(ran) >= 10, report["steps"]
    below = [s for s in ran if s["measured"] > s["planned"]]
    assert not below, f"{model}: the plan is below the measured peak for {below}"
    # The graphs hold the compiled step, as in the worker (--compile-decode auto).
    assert report["compiled"] and not report["graphs_broken"], (
        report["compile_broken"], report["graphs_broken"])
    assert report["graph_pool_measured"] <= report["graph_pool_estimate"], (
        f"{model}: the graph pool measured {report['graph_pool_measured']} bytes, estimated "
        f"{report['graph_pool_estimate']}")
