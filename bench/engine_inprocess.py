"""The worker's engine in one process, without gRPC: decode tokens per
second at N sessions, next to HF generate at batch 1, to tell the cost of
the engine's steps from the cost of serving them over gRPC.

    python bench/engine_inprocess.py --model synthetic:llama-1b --device cuda
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchkit import git_commit  # noqa: E402

from services.worker import compiled_decode  # noqa: E402
from services.worker.engine import Delta, Engine  # noqa: E402
from services.worker.memory import FixedMemory  # noqa: E402
from services.worker.models import default_cache_dir, load_model  # noqa: E402
from services.worker.sampling import SamplingParams  # noqa: E402
from services.worker.sessions import SessionTable  # noqa: E402
from services.worker.settings import COMPILE_MODES  # noqa: E402


async def engine_rate(loaded, sessions: int, tokens: int, graphs: bool = False,
                      compile: bool = False, ahead: bool = False,
                      options: dict | None = None) -> tuple[float, float, int]:
    engine = Engine(loaded, FixedMemory(1 << 40), kv_wait_s=60, decode_graphs=graphs,
                    compile_decode=compile, compile_options=options, decode_ahead=ahead)
    engine.start()
    table = SessionTable()

    async def one(i: int) -> None:
        session = table.open()
        request = engine.submit(session, SamplingParams(max_tokens=tokens),
                                prompt=f"Agent {i} writes a long story about the sea:")
        while True:
            event = await request.out.get()
            if not isinstance(event, Delta):
                return
            engine.delivered(request, 1)

    await asyncio.gather(*(one(i) for i in range(sessions)))  # warm-up
    started = time.perf_counter()
    steps0 = engine.stats().steps
    await asyncio.gather(*(one(i) for i in range(sessions)))
    wall = time.perf_counter() - started
    steps = engine.stats().steps - steps0
    graphed = engine.runner.graphed_steps
    if engine.runner.graphs is not None and engine.runner.graphs.broken:
        print(f"decode graphs went off: {engine.runner.graphs.broken}", flush=True)
    await engine.close()
    return sessions * tokens / wall, wall / steps * 1000, graphed


def profile_steps(loaded, sessions: int, context: int = 64, steps: int = 20,
                  graphs: bool = False, compile: bool = False,
                  options: dict | None = None) -> dict:
    """torch.profiler over decode steps of the runner alone (this thread),
    replaying CUDA graphs if `graphs`; returns the kernels per step."""
    from torch.profiler import ProfilerActivity, profile

    from services.worker.runner import StepItem

    engine = Engine(loaded, FixedMemory(1 << 40), decode_graphs=graphs, compile_decode=compile,
                    compile_options=options)
    engine.pool.add_chunk()
    engine.storage.add_chunk()
    items = []
    for i in range(sessions):
        slots = engine.pool.append(f"s{i}", context)
        items.append(StepItem([5], slots[-1:], slots, SamplingParams(max_tokens=8), None))
    for _ in range(5):
        engine.runner.step(items)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if loaded.device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.runner.step(items)
    print(f"profiled N={sessions}: {(time.perf_counter() - started) / steps * 1000:.2f} ms/step "
          "(with the profiler's own cost)", flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    kernels = 0.0
    if loaded.device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12), flush=True)
        on_device = [e for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = len(on_device) / steps
        device_ms = sum(e.device_time for e in on_device) / steps / 1000
        print(f"N={sessions}: {kernels:.0f} kernels and copies per step, {device_ms:.3f} ms of "
              "device time per step", flush=True)
    plain = time.perf_counter()
    for _ in range(steps):
        engine.runner.step(items)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    step_ms = (time.perf_counter() - plain) / steps * 1000
    print(f"unprofiled runner.step N={sessions}: {step_ms:.2f} ms/step", flush=True)
    return {"sessions": sessions, "kernels_per_step": round(kernels, 1),
            "step_ms": round(step_ms, 3), "graphed_steps": engine.runner.graphed_steps}


def hf_rate(loaded, tokens: int) -> float:
    import copy

    from transformers import GenerationConfig

    from services.worker import merged_projections

    model = copy.deepcopy(loaded.model)
    merged_projections.split(model)       # transformers' own modules
    model.set_attn_implementation("sdpa")
    ids = torch.tensor([loaded.tokenizer("Agent 0 writes a long story about the sea:")["input_ids"]],
                       device=loaded.device)
    config = GenerationConfig(do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                              pad_token_id=0)
    model.generate(ids, generation_config=config)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate(ids, generation_config=config)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - started)


def loop_ms_per_step(profiler: cProfile.Profile) -> float:
    """Engine._loop's time per pass, the steps themselves (run on the
    compute thread, awaited) excluded: what the event loop spends a step."""
    stats = pstats.Stats(profiler)
    for (filename, _, name), (_, calls, _, cumulative, _) in stats.stats.items():
        if name == "_loop" and filename.endswith("engine.py"):
            return cumulative / max(1, calls) * 1000
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic:llama-1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sessions", default="1,16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cuda-graphs", choices=("auto", "off"), default="auto",
                        help="decode steps replay CUDA graphs (auto, on CUDA) or run eagerly")
    parser.add_argument("--compile-decode", choices=COMPILE_MODES, default="auto",
                        help="the graphed decode step compiled by torch.compile (auto; tuned: "
                             "with Inductor's coordinate descent tuning) or not")
    parser.add_argument("--decode-ahead", choices=("auto", "off"), default="auto",
                        help="greedy decode steps launched before the last one's tokens are "
                             "read (auto, where graphed) or one at a time")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's table of the timed run (slows it down)")
    parser.add_argument("--host-profile", action="store_true",
                        help="cProfile over the timed run: the event loop's own time per step "
                             "(scheduling, postprocessing, streaming), apart from the steps")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load_model(args.model, cache=default_cache_dir(), device=device, dtype=dtype)
    rows = []
    for n in [int(x) for x in args.sessions.split(",")]:
        graphs = args.cuda_graphs == "auto" and device.type == "cuda"
        compile = graphs and compiled_decode.enabled(args.compile_decode, graphs)
        options = compiled_decode.options(args.compile_decode)
        ahead = graphs and args.decode_ahead == "auto"
        if args.profile:
            rows.append(profile_steps(loaded, n, graphs=graphs, compile=compile,
                                      options=options))
            continue
        host = None
        if args.host_profile:
            asyncio.run(engine_rate(loaded, n, args.tokens, graphs, compile, ahead,
                                    options))  # warm
            profiler = cProfile.Profile()
            profiler.enable()
        rate, step_ms, graphed = asyncio.run(engine_rate(loaded, n, args.tokens, graphs, compile,
                                                         ahead, options))
        if args.host_profile:
            profiler.disable()
            host = loop_ms_per_step(profiler)
            print(f"event loop N={n}: {host:.2f} ms of its own a step (cProfile's cost included)",
                  flush=True)
        rows.append({"sessions": n, "engine_tokens_per_s": round(rate, 1),
                     "step_ms": round(step_ms, 2), "graphed_steps": graphed,
                     **({"event_loop_ms_per_step": round(host, 3)} if host is not None else {})})
        print(f"engine N={n:<3} {rate:8.1f} tok/s  {step_ms:6.2f} ms/step  "
              f"graphed steps {graphed}", flush=True)
    hf = 0.0 if args.profile else hf_rate(loaded, args.tokens)
    print(f"HF generate batch 1 {hf:8.1f} tok/s", flush=True)
    report = {"model": args.model, "device": str(device), "dtype": str(dtype), "rows": rows,
              "cuda_graphs": args.cuda_graphs, "compile_decode": args.compile_decode,
              "decode_ahead": args.decode_ahead, "profiled": args.profile,
              "hf_batch_1_tokens_per_s": round(hf, 1), "tokens": args.tokens,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
