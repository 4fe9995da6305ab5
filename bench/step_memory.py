"""The step memory plan against what a step really allocates, on a GPU.

For each synthetic shape (the published models' up to 3B by default), the
model is built on the device with random weights and a paged KV pool of
the model's whole window; then steps of many shapes run through the
worker's own runner, unsplit: eager decodes and prefills of 1 to 128 rows
at contexts up to the window, and graphed decodes (every bucket captured
up to 128 rows, the pool measured against its estimate). For each, the
peak of torch.cuda.max_memory_allocated beyond what was allocated before
the step is compared with StepMemoryPlan.step_bytes: the plan must never be
below it. Rows share the same slots (the contents do not matter for
memory), so 128 rows at 8,192 tokens need one window of KV.

    python3 bench/step_memory.py --device cuda             # all shapes up to 3B
    python3 bench/step_memory.py --models synthetic:llama-1b --quick

Writes bench/results/step-memory-<card>-<date>.json; exits 1 if any step
used more than its plan.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("LMX_CACHE", str(ROOT / ".cache" / "lmx"))

import torch  # noqa: E402

from benchkit import card_slug, git_commit, write_report  # noqa: E402

SHAPES_UP_TO_3B = ["smollm2-135m", "gemma3-270m", "llama-1b", "gemma3-1b", "qwen2.5-1.5b",
                   "smollm2-1.7b", "llama-3b", "qwen2.5-3b"]
ROWS = (1, 8, 32, 64, 128)


def grid(max_context: int, quick: bool) -> list[tuple[str, int, int, int]]:
    """(path, rows, new tokens per row, context per row)."""
    contexts = [16, 512, 2048, max_context] if not quick else [16, 2048, max_context]
    rows = ROWS if not quick else (1, 32, 128)
    shapes = []
    for n in rows:
        for ctx in contexts:
            shapes.append(("eager", n, 1, ctx))
            shapes.append(("graphed", n, 1, ctx))
    for n, new, ctx in ((1, 2048, 2048), (1, 2048, max_context), (1, 512, 512), (8, 256, 256),
                        (28, 73, 73), (32, 64, 2048), (4, 512, 4096), (16, 128, max_context),
                        (64, 32, 1024), (128, 16, 512)):
        if ctx <= max_context and (not quick or n in (1, 28, 16)):
            shapes.append(("eager", n, new, ctx))
    return shapes


def run_model(name: str, args, device: torch.device) -> dict:
    from services.worker.decode_graphs import DecodeGraphs
    from services.worker.kv_storage import KVStorage
    from services.worker.models import default_cache_dir, load_model
    from services.worker import paged_kernels
    from services.worker.runner import ModelRunner, StepItem, step_shape
    from services.worker.sampling import SamplingParams, sample
    from services.worker.quantize import QuantSpec, step_dims
    from services.worker.step_memory import ModelDims, StepMemoryPlan

    torch.cuda.empty_cache()
    quant = QuantSpec(getattr(args, "quantize", "none"), getattr(args, "group_size", 32))
    loaded = load_model(name, cache=default_cache_dir(), device=device, dtype=torch.bfloat16,
                        quant=quant)
    config = loaded.model.config
    dims = ModelDims.from_config(config, 2)
    dims = step_dims(dims, quant, device, torch.bfloat16)
    plan = StepMemoryPlan(dims)
    window = loaded.max_context
    slots_per_chunk = window // 2              # two chunks: the multi-chunk gather
    storage = KVStorage(loaded.kv_shape, slots_per_chunk, device)
    for _ in range(2):
        storage.add_chunk()
    # Compiled as the worker compiles it (--compile-decode auto): Inductor's
    # code is what the graphs' pool holds.
    compile = getattr(args, "compile_decode", "auto") == "auto"
    graphs = DecodeGraphs(loaded, storage, block_size=16, max_batch=max(ROWS), compile=compile)
    runner = ModelRunner(loaded, storage, graphs, plan)
    greedy = SamplingParams(max_tokens=1)
    sampled = SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9, seed=1)

    def items(rows: int, new: int, ctx: int) -> list[StepItem]:
        slots = list(range(ctx))
        out = []
        for row in range(rows):
            params = greedy if row % 2 == 0 else sampled
            generator = None
            if not params.greedy:
                generator = torch.Generator(device=device)
                generator.manual_seed(row)
            out.append(StepItem(list(range(100, 100 + new)), slots[ctx - new:], slots, params,
                                generator))
        return out

    # The pool: every bucket captured, the largest first, as the worker does.
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved(device)
    graphs.capture_all()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    pool = torch.cuda.memory_reserved(device) - reserved
    pool_estimate = plan.graph_pool_bytes(graphs.sizes, paged_kernels.PARTS)
    graphs.checked = True          # the check step is planned apart (shape.checked)
    results = []
    free_bytes = torch.cuda.mem_get_info(device)[0]
    for path, rows, new, ctx in grid(window, args.quick):
        graphed = path == "graphed"
        batch = items(rows, new, ctx)
        planned = plan.step_bytes(step_shape(batch, graphed))
        if planned > 0.8 * free_bytes:
            results.append(dict(path=path, rows=rows, new=new, ctx=ctx, planned=planned,
                                skipped="the plan exceeds the free memory"))
            continue
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        with torch.inference_mode():
            logits = graphs.run(batch) if graphed else runner._eager(batch)
            sample(logits, [i.params for i in batch], [i.generator for i in batch],
                   loaded.vocab_limit)
            del logits
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        measured = torch.cuda.max_memory_allocated(device) - before
        results.append(dict(path=path, rows=rows, new=new, ctx=ctx, planned=planned,
                            measured=measured, ratio=round(planned / max(measured, 1), 3),
                            ok=measured <= planned, seconds=round(seconds, 4)))
        flag = "" if measured <= planned else "   <-- PLAN BELOW MEASURED"
        print(f"{name:>14} {path:>7} rows {rows:>3} new {new:>4} ctx {ctx:>5}: planned "
              f"{planned / 2**20:8.1f} MiB, measured {measured / 2**20:8.1f} MiB{flag}",
              flush=True)
    workspace = plan.workspace_bytes(max_batch=64, max_prefill_tokens=2048, max_context=window,
                                     graphs=True)
    report = dict(model=name, weights=loaded.weights, window=window,
                  weight_bytes=loaded.weight_bytes,
                  kv_bytes=storage.num_bytes, graph_pool_measured=pool,
                  graph_pool_estimate=pool_estimate, graph_pool_ok=pool <= pool_estimate,
                  graphs=graphs.sizes, graphs_broken=graphs.broken,
                  compiled=graphs.forward.on, compile_broken=graphs.forward.broken,
                  workspace_default=workspace, steps=results)
    print(f"{name}: graph pool measured {pool / 2**20:.1f} MiB, estimated "
          f"{pool_estimate / 2**20:.1f} MiB; default workspace {workspace / 2**20:.1f} MiB",
          flush=True)
    graphs.invalidate()
    del runner, graphs, storage, loaded
    torch.cuda.empty_cache()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(f"synthetic:{s}" for s in SHAPES_UP_TO_3B))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--quantize", default="none", help="none | int8 | int4 (the weights)")
    parser.add_argument("--group-size", type=int, default=32, help="int4's group size")
    parser.add_argument("--compile-decode", choices=("auto", "off"), default="auto",
                        help="the decode graphs capture the compiled step (auto, the "
                             "worker's default) or the model as it runs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("needs a CUDA device: the plan bounds what the CUDA allocator gives out")
        return 2
    card = torch.cuda.get_device_name(device)
    names = [name.strip() for name in args.models.split(",")]
    models = []
    slug = card_slug(card)
    suffix = "" if args.quantize == "none" else f"-{args.quantize}"
    path = Path(args.out) / f"step-memory-{slug}{suffix}-{dt.date.today().isoformat()}.json"
    for name in names:
        models.append(run_model(name, args, device))
        misses = [dict(model=m["model"], **s) for m in models for s in m["steps"]
                  if s.get("ok") is False]
        pools = [m["model"] for m in models if not m["graph_pool_ok"]]
        report = dict(benchmark="step_memory", card=card, torch=torch.__version__,
                      date=dt.date.today().isoformat(), commit=git_commit(), models=models,
                      complete=len(models) == len(names),
                      steps=sum(len(m["steps"]) for m in models), plan_below_measured=misses,
                      graph_pool_below_measured=pools)
        # Written after every model: a run stopped at its time limit keeps what it measured.
        write_report(report, path)
    print(f"{report['steps']} steps; plan below measured: {len(misses)}; graph pool estimate "
          f"below measured: {pools or 'none'}")
    return 1 if misses or pools else 0


if __name__ == "__main__":
    sys.exit(main())
