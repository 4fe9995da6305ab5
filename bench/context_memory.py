"""What a worker process holds on the GPU outside torch's allocator, stage by
stage: the CUDA context and what loading kernels adds to it.

A worker's base lease counts its CUDA context (NVML's figure for the
process minus what torch's allocator reserves). On an H100 it measured
0.82-0.88 GB per worker after the warm-up, so three workers' contexts took
2.6 GB of an 8 GiB cap (docs/benchmarks.md, issue 20). This runs, in a
fresh process each, the stages a worker goes through and reports the
context after each:

  bare        torch.zeros on the device
  cublas      a bfloat16 matrix product (cuBLAS/cuBLASLt handles)
  sdpa        scaled_dot_product_attention (flash / memory-efficient kernels)
  triton      the worker's paged Triton kernels (write + decode attention)
  model       a synthetic model's eager forward pass (its kernels)
  graphs      the worker's decode graphs captured (compiled: --compile-decode auto)

each with CUDA's default stack size per thread and with a smaller one
(cudaLimitStackSize: the driver reserves stack for every thread the card
can hold at once, 132 SMs x 2048 threads on an H100), to see what that
reservation costs.

    python bench/context_memory.py [--model synthetic:qwen2.5-1.5b]   # GPU only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchkit import write_cuda_report  # noqa: E402

STAGES = ("bare", "cublas", "sdpa", "triton", "model", "graphs")


def child(stage_limit: str, stack: int, model_name: str, compile: bool,
          quantize: str = "none") -> dict:
    """Run the stages up to `stage_limit` in this process; NVML after each."""
    import torch

    from services.worker import device as devices

    cuda = torch.device("cuda")
    report: dict = {"stack_bytes": stack, "compile": compile, "stages": {}}

    def note(stage: str) -> None:
        torch.cuda.synchronize()
        used = devices.process_device_bytes(cuda)
        reserved = torch.cuda.memory_reserved(cuda)
        report["stages"][stage] = {"nvml_bytes": used, "reserved_bytes": reserved,
                                   "context_bytes": None if used is None else used - reserved}

    torch.zeros(1, device=cuda)
    now = devices.set_stack_limit(stack) if stack else None
    report["stack_limit"] = {"asked_bytes": stack, "bytes_per_thread": now}
    note("bare")
    if stage_limit == "bare":
        return report
    a = torch.randn(512, 2048, device=cuda, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, device=cuda, dtype=torch.bfloat16)
    (a @ b).sum().item()
    note("cublas")
    if stage_limit == "cublas":
        return report
    q = torch.randn(1, 16, 128, 64, device=cuda, dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().item()
    note("sdpa")
    if stage_limit == "sdpa":
        return report
    from services.worker import paged_kernels

    if paged_kernels.AVAILABLE:
        kv = [torch.zeros((1, 64, 2, 64), device=cuda, dtype=torch.bfloat16) for _ in range(2)]
        ptrs = [torch.tensor([t.data_ptr()], device=cuda) for t in kv]
        new = torch.randn(1, 2, 64, device=cuda, dtype=torch.bfloat16)
        qd = torch.randn(1, 4, 64, device=cuda, dtype=torch.bfloat16)
        paged_kernels.paged_decode(qd, new, new, torch.tensor([0], device=cuda), ptrs[0], ptrs[1],
                                   torch.zeros((1, 4), dtype=torch.int32, device=cuda),
                                   torch.tensor([1], device=cuda), 0, 64, 16, 0.125, 0)
    note("triton")
    if stage_limit == "triton":
        return report
    from services.worker.engine import Engine
    from services.worker.memory import FixedMemory
    from services.worker.models import default_cache_dir, load_model
    from services.worker.quantize import QuantSpec
    from services.worker.runner import StepItem
    from services.worker.sampling import SamplingParams

    loaded = load_model(model_name, cache=default_cache_dir(), device=cuda, dtype=torch.bfloat16,
                        quant=QuantSpec(quantize))
    engine = Engine(loaded, FixedMemory(64 << 30), decode_graphs=stage_limit == "graphs",
                    compile_decode=compile, max_batch=8)
    engine.pool.add_chunk()
    engine.storage.add_chunk()
    slots = engine.pool.append("s", 64)
    item = StepItem([5] * 64, slots, slots, SamplingParams(max_tokens=8), None)
    engine.runner.step([item])
    note("model")
    if stage_limit == "model":
        return report
    every = engine.pool.append("s", 1)          # the session's slots, the new one last
    engine.runner.step([StepItem([5], every[-1:], every, SamplingParams(max_tokens=8), None)])
    report["graphed_steps"] = engine.runner.graphed_steps
    note("graphs")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic:qwen2.5-1.5b")
    parser.add_argument("--stacks", default="0,256",
                        help="cudaLimitStackSize per thread to try (0: CUDA's default)")
    parser.add_argument("--quantize", default="int4",
                        help="the model's weights: none | int8 | int4 (the seed scenario's "
                             "three-model run is int4: tinygemm's kernels load with it)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.child:
        stage, stack, compile = args.child.split(":")
        print(json.dumps(child(stage, int(stack), args.model, compile == "1", args.quantize)))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    runs = []
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # the worker's
    for stack in (int(s) for s in args.stacks.split(",")):
        for compile in ("0", "1"):
            out = subprocess.run([sys.executable, __file__, "--model", args.model,
                                  "--quantize", args.quantize,
                                  "--child", f"graphs:{stack}:{compile}"],
                                 capture_output=True, text=True, env=env, timeout=300)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode != 0 or not lines:
                runs.append({"stack_bytes": stack, "compile": compile == "1",
                             "error": out.stderr.strip().splitlines()[-1:]})
            else:
                runs.append(json.loads(lines[-1]))
            print(json.dumps(runs[-1]), flush=True)
    write_cuda_report("context_memory", {
        "model": args.model, "quantize": args.quantize,
        "method": "a fresh process per configuration, the worker's stages in order; "
                  "context = NVML's figure for the process - torch's reserved bytes",
        "runs": runs}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
