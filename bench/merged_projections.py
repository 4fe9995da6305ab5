"""What merging a decoder layer's projections would win on this GPU.

A decode step multiplies each layer's input by q, k and v, then by gate and
up: five matrix products of one input, two of them small (k and v of a
grouped-query model are a quarter of q or less). Merged, they are two
products (qkv, gate_up). This replays, in a CUDA graph of many layers'
worth, the separate and the merged products at the shapes of published
models and the batch sizes a worker decodes, and reports the time per
layer of each and the bytes-read floor (weights / device bandwidth).

    python bench/merged_projections.py            # GPU only; JSON to bench/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchkit import write_cuda_report  # noqa: E402
from services.worker.models import SYNTHETIC_SHAPES  # noqa: E402


def dims(shape: str) -> tuple[int, int, int, int]:
    c = SYNTHETIC_SHAPES[shape]
    head_dim = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    return (c["hidden_size"], c["num_attention_heads"] * head_dim,
            c["num_key_value_heads"] * head_dim, c["intermediate_size"])


def graphed_ms(fn, reps: int) -> float:
    """Milliseconds per call of `fn`, replayed `reps` times in one graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def bandwidth_gbs() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * 10 * a.numel() / (time.perf_counter() - started) / 1e9


def measure(shape: str, batch: int, dtype: torch.dtype) -> dict:
    hidden, q, kv, inter = dims(shape)
    layers = 8         # distinct weights, so that no layer's product reads from cache

    def make(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, device="cuda", dtype=dtype) * 0.02

    sep = [[make(q, hidden), make(kv, hidden), make(kv, hidden), make(inter, hidden),
            make(inter, hidden)] for _ in range(layers)]
    merged = [[torch.cat(w[:3]), torch.cat(w[3:])] for w in sep]
    x = torch.randn(batch, hidden, device="cuda", dtype=dtype)
    linear = torch.nn.functional.linear

    def separate():
        for ws in sep:
            for w in ws:
                linear(x, w)

    def together():
        for ws in merged:
            for w in ws:
                linear(x, w)

    sep_ms = graphed_ms(separate, 20) / layers
    merged_ms = graphed_ms(together, 20) / layers
    weight_bytes = sum(w.numel() * w.element_size() for w in sep[0])
    return {"shape": shape, "batch": batch, "separate_us_per_layer": round(sep_ms * 1000, 2),
            "merged_us_per_layer": round(merged_ms * 1000, 2),
            "speedup": round(sep_ms / merged_ms, 3), "weight_bytes_per_layer": weight_bytes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-1b,qwen2.5-1.5b,smollm2-135m,llama-8b")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    gbs = bandwidth_gbs()
    rows = []
    for shape in args.shapes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            row = measure(shape, batch, torch.bfloat16)
            row["floor_us_per_layer"] = round(row["weight_bytes_per_layer"] / gbs / 1e3, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    write_cuda_report("merged_projections", {
        "copy_bandwidth_gbs": round(gbs, 1), "dtype": "bfloat16",
        "method": "q,k,v,gate,up as five F.linear calls against qkv and gate_up as two, "
                  "8 layers of distinct weights, 20 repeats in one CUDA graph, best of 5 "
                  "replays; floor: the layer's five matrices read once at the copy bandwidth",
        "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
