"""Diagnosis, not a benchmark: generations of synthetic models one after
another in one process, each eagerly then with decode graphs, and whether
they agree (the GPU test test_decode_graphs_gpu.py's `generate`).

    SEQ="llama-tiny:0:float32,smollm2-135m:0:float32" GC=1 SYNC=1 \
        python3 bench/diag_graph_fault.py

SEQ: shape:compile(0|1):dtype, in order. GC=1: the garbage collector runs
before the allocator's cache is emptied after each model (the engines are in
reference cycles: without it their graphs outlive them). SYNC=1: the device is
synchronized after every step and before every capture, and the step or
capture that faulted is named. CLEAR_CUBLAS=1: cuBLAS's workspaces are
freed before each engine's first capture. On an H100 (2026-12-07, f831fde) GC=1 made the
second model's first capture raise an illegal memory access every time; run
it under `compute-sanitizer --tool memcheck` to name the kernel.
"""
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, "tests/gpu")
from test_decode_graphs_gpu import generate  # noqa: E402

from services.worker import decode_graphs as DG  # noqa: E402
from services.worker import runner as R  # noqa: E402
from services.worker.models import converted_dir, default_cache_dir, load_model  # noqa: E402

SYNC = os.environ.get("SYNC") == "1"
n = [0]
orig_step, orig_capture = R.ModelRunner._step, DG.DecodeGraphs._capture


def step(self, items):
    if SYNC and self.graphs is not None:
        print(f"step {n[0] + 1} rows={len(items)} tokens={[len(i.tokens) for i in items]} "
              f"graphs={self.graphs.num_graphs} checked={self.graphs.checked}", flush=True)
    out = orig_step(self, items)
    n[0] += 1
    if SYNC:
        try:
            torch.cuda.synchronize()
        except Exception:
            g = self.graphs
            print(f"FAULT at step {n[0]} rows={len(items)} tokens={[len(i.tokens) for i in items]}"
                  f" ctx={[len(i.all_slots) for i in items]} path={self._path}"
                  f" checked={g.checked if g else None} graphs={g.num_graphs if g else None}"
                  f" chunks={self.storage.num_chunks}", flush=True)
            raise
    return out


def capture(self, size):
    if os.environ.get("CLEAR_CUBLAS") == "1" and not self._graphs:
        torch._C._cuda_clearCublasWorkspaces()
    if SYNC:
        torch.cuda.synchronize()
        print(f"capturing {size} after step {n[0]} chunks={self.storage.num_chunks}", flush=True)
    out = orig_capture(self, size)
    if SYNC:
        try:
            torch.cuda.synchronize()
        except Exception:
            print(f"FAULT at capture of {size} after step {n[0]}", flush=True)
            raise
    return out


R.ModelRunner._step = step
DG.DecodeGraphs._capture = capture

cache = default_cache_dir()
converted_dir("smollm2-135m", cache)
for spec in os.environ["SEQ"].split(","):
    shape, comp, dtype = spec.split(":")
    started = time.time()
    try:
        loaded = load_model(f"synthetic:{shape}", cache=cache, device=torch.device("cuda"),
                            dtype=getattr(torch, dtype))
        print(f"{spec}: eager", flush=True)
        eager, _ = generate(loaded, graphs=False)
        print(f"{spec}: graphed", flush=True)
        graphed, runner = generate(loaded, graphs=True, compile=comp == "1")
        same = sum(a == b for e, g in zip(eager, graphed) for a, b in zip(e, g))
        total = sum(len(e) for e in eager)
        print(f"{spec}: {same}/{total} same, first4 {[e[:4] == g[:4] for e, g in zip(eager, graphed)]}"
              f" broken={runner.graphs.broken} steps={n[0]} {time.time() - started:.1f}s", flush=True)
        del loaded, runner
        if os.environ.get("GC") == "1":
            import gc
            gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception as exc:
        print(f"{spec}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        traceback.print_exc(limit=6)
        break
