"""Layer streaming: decode speed of a model whose streamed layers come from
host memory through a ring of device buffers (services/worker/streaming.py),
against the same model resident, against the bound the link sets, and (on a
GPU) against accelerate's CPU offload with the same resident layers.

For each model x resident fraction x batch, in one process:
  resident     decode step, all layers on the device (the compute time)
  copy         the streamed layers' bytes copied host -> device alone, pinned,
               on a side stream (the copy time); GB/s measured here
  streamed     decode step with the streamer attached
  accelerate   (CUDA) decode step with accelerate's dispatch_model, the same
               layers offloaded to the CPU (its hooks copy them per step)
  link bound   batch / (bytes streamed per step / the measured copy GB/s)
  overlap      max(copy time, resident step) / streamed step: 1.0 is perfect
               (the step takes no longer than the longer of its copies and
               its compute)
  exact        greedy tokens of the streamed model == the resident model's
               (every batch, the same prompt); resident_repeatable: the
               resident model == itself, run again (the control)

Decode: a prompt of --prompt tokens per sequence, then --steps steps of one
token each with Hugging Face's KV cache (sdpa attention), greedy; timed after
--warmup steps. A step is timed as a server runs it: from one step's tokens
read back to the host to the next's. Nothing else is synchronised between
steps: a device-wide synchronize would also wait for the copies the streamer
has already started for the next step's layers, and then leave the link idle
while the host launches the next step (measured so before 2026-12-02: the
1B-at-62% rows' 0.82-0.83).

    python3 bench/layer_stream.py --device cuda            # on a GPU host
    .venv/bin/python bench/layer_stream.py --device cpu --models smollm2-135m --batches 1,8

Writes bench/results/layer-stream-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("LMX_CACHE", str(ROOT / ".cache" / "lmx"))

import torch  # noqa: E402

from benchkit import cpu_model, git_commit  # noqa: E402
from services.worker.models import build_synthetic, model_config  # noqa: E402
from services.worker.streaming import LayerStreamer, decoder_layers, streamed_indices  # noqa: E402

# transformers 5.2x renames past_key_values (cache=); 5.17 on the GPU hosts knows only the old name.
warnings.filterwarnings("ignore", category=FutureWarning)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_steps(model, device, batch: int, prompt: int, steps: int,
                 warmup: int) -> tuple[list[float], list[list[int]]]:
    """Seconds per decode step (after a prefill of `prompt` tokens), and the
    greedy tokens of every step, per sequence. Each step ends when its tokens
    are on the host (what the next step needs, and what a server waits for);
    the side stream's copies for later layers go on across steps."""
    from transformers import DynamicCache

    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 32000), (batch, prompt), generator=generator).to(device)
    times, tokens = [], []
    with torch.inference_mode():
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token.view(-1).tolist())
        sync(device)       # the prefill's copies and kernels are not the first step's
        last = time.perf_counter()
        for step in range(warmup + steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token.view(-1).tolist())      # waits for this step's tokens only
            now = time.perf_counter()
            if step >= warmup:
                times.append(now - last)
            last = now
    return times, [list(row) for row in zip(*tokens)]


def copy_seconds(streamer: LayerStreamer, device: torch.device, repeats: int = 5) -> float:
    """One step's streamed bytes copied alone (host -> device buffers the
    size of the ring's, not the ring itself: that holds the next pass's
    prefetched layers), best of a few."""
    buffers = [torch.empty_like(slot) for slot in streamer.ring]
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                for index, flat in enumerate(streamer.host):
                    buffers[index % len(buffers)].copy_(flat, non_blocking=True)
            stream.synchronize()
        else:
            for index, flat in enumerate(streamer.host):
                buffers[index % len(buffers)].copy_(flat)
        best = min(best, time.perf_counter() - started)
    del buffers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return best


def accelerate_offload(model, streamed: list[int], device: torch.device):
    """accelerate's dispatch_model with the streamed layers on the CPU. They
    are moved there first: dispatch_model takes the weights it offloads
    from where they are, and weights still on the GPU would make its
    per-step copies device-to-device."""
    from accelerate import dispatch_model

    layers = decoder_layers(model)
    for index in streamed:
        layers[index].to("cpu")

    names = {name for name, _ in model.named_children()}
    device_map = {}
    for name, child in model.model.named_children():
        if name == "layers":
            for index in range(len(child)):
                device_map[f"model.layers.{index}"] = "cpu" if index in streamed else device.index or 0
        else:
            device_map[f"model.{name}"] = device.index or 0
    for name in names - {"model"}:
        device_map[name] = device.index or 0
    return dispatch_model(model, device_map=device_map, main_device=device.index or 0)


def median_step(model, device, batch: int, args, steps: int | None = None,
                warmup: int | None = None) -> tuple[float, list[list[int]]]:
    times, tokens = decode_steps(model, device, batch, args.prompt, steps or args.steps,
                                 args.warmup if warmup is None else warmup)
    return statistics.median(times), tokens


def run_case(name: str, fraction: float, batches: list[int], rings: list[int], args,
             device) -> list[dict]:
    config, _ = model_config(name if ":" in name else f"synthetic:{name}", Path("/nonexistent"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rows = []
    model = build_synthetic(config, device, dtype, seed=0)
    model.set_attn_implementation("sdpa")
    model.eval()
    layers = decoder_layers(model)
    streamed = streamed_indices(len(layers), fraction)
    median_step(model, device, batches[0], args, steps=3, warmup=2)   # kernels, allocator
    resident = {b: median_step(model, device, b, args) for b in batches}
    # The control for "exact": the resident model against itself, same batch.
    repeatable = {b: median_step(model, device, b, args, steps=args.steps, warmup=args.warmup)[1]
                  == resident[b][1] for b in batches}
    for ring in rings:
        streamer = LayerStreamer(model, device, streamed, ring_slots=ring)
        streamer.attach()
        info = streamer.info()
        copy_s = copy_seconds(streamer, device)
        gbps = info.host_bytes / copy_s / 1e9 if copy_s else 0.0
        for batch in batches:
            step, tokens = median_step(model, device, batch, args)
            compute = resident[batch][0]
            bound = batch / copy_s if copy_s else float("inf")
            rows.append({
                "model": name, "resident_fraction": round(info.resident_fraction, 3),
                "streamed_layers": info.streamed, "layers": info.num_layers, "batch": batch,
                "ring": info.ring_slots,
                "streamed_bytes_per_step": info.host_bytes, "ring_bytes": info.ring_bytes,
                "resident_step_s": round(compute, 6), "streamed_step_s": round(step, 6),
                "copy_s": round(copy_s, 6), "copy_gb_s": round(gbps, 2),
                "resident_tok_s": round(batch / compute, 1),
                "streamed_tok_s": round(batch / step, 1),
                "link_bound_tok_s": round(bound, 1),
                "of_link_bound": round((batch / step) / bound, 3) if copy_s else None,
                "overlap_efficiency": round(max(copy_s, compute) / step, 3),
                "exact": tokens == resident[batch][1],
                "resident_repeatable": repeatable[batch],
            })
            print(json.dumps(rows[-1]), flush=True)
        streamer.detach()
    if device.type == "cuda" and not args.no_accelerate:
        try:
            offloaded = accelerate_offload(model, streamed, device)
            for batch in batches:
                step, _ = median_step(offloaded, device, batch, args,
                                      steps=max(3, args.steps // 4), warmup=1)
                for row in (r for r in rows if r["batch"] == batch):
                    row["accelerate_step_s"] = round(step, 6)
                    row["accelerate_tok_s"] = round(batch / step, 2)
                    row["vs_accelerate"] = round(row["streamed_tok_s"] / row["accelerate_tok_s"],
                                                 1)
                    print(json.dumps({k: row[k] for k in ("model", "batch", "ring",
                                                         "accelerate_tok_s", "vs_accelerate")}),
                          flush=True)
        except Exception as exc:  # noqa: BLE001 - report it, keep the other numbers
            for row in rows:
                row["accelerate_error"] = f"{type(exc).__name__}: {exc}"[:300]
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--models", default=None,
                   help="synthetic shapes (default llama-1b,llama-8b on CUDA, smollm2-135m on CPU)")
    p.add_argument("--fractions", default="0.3,0.6")
    p.add_argument("--batches", default=None, help="default 1,8,32 (CUDA), 1,8 (CPU)")
    p.add_argument("--rings", default=None,
                   help="ring sizes (layers) to measure, default 2,4 (CUDA), 2 (CPU)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-accelerate", action="store_true")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    models = (args.models or ("llama-1b,llama-8b" if cuda else "smollm2-135m")).split(",")
    batches = [int(b) for b in (args.batches or ("1,8,32" if cuda else "1,8")).split(",")]
    rings = [int(r) for r in (args.rings or ("2,4" if cuda else "2")).split(",")]
    args.steps = args.steps or (20 if cuda else 8)
    started = dt.datetime.now(dt.timezone.utc)
    result = {"benchmark": "layer-stream", "date": started.isoformat(timespec="seconds"),
              "commit": git_commit(), "device": args.device,
              "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name(0) if cuda else None},
              "args": {k: v for k, v in vars(args).items()}, "rows": []}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"layer-stream-{args.device}-{started.date()}.json"
    for name in models:
        for fraction in [float(f) for f in args.fractions.split(",")]:
            result["rows"] += run_case(name.strip(), fraction, batches, rings, args, device)
            path.write_text(json.dumps(result, indent=1))     # partial results survive a kill
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
