"""Chunked prefill: how long a long prompt holds up the sessions that are
decoding when it arrives, with and without chunking.

The worker's engine in this process (the same engine the worker service
runs; no gRPC, whose cost is not what is measured here): D sessions decode
greedily; once each has its first tokens, one more session sends a prompt of
P tokens. Measured, for each --max-prefill-tokens value (the most prompt
tokens one step computes; a value >= P is no chunking):

  stall          the longest gap between two tokens of a decoding session
                 while the prompt is computed (from its arrival to its first
                 token)
  gap p50        the median gap between the decoding sessions' tokens then
  prompt TTFT    from the prompt's arrival to its first token
  decode tok/s   the decoding sessions' tokens in that window / its length

    .venv/bin/python bench/chunked_prefill.py                    # CPU, smollm2-135m
    python3 bench/chunked_prefill.py --device cuda --model synthetic:llama-1b --prompt-tokens 8192

Writes bench/results/chunked-prefill-<device>-<model>-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("LMX_CACHE", str(ROOT / ".cache" / "lmx"))

import torch  # noqa: E402
from benchkit import cpu_model, git_commit, write_report  # noqa: E402

from services.worker.attention import register as register_attention  # noqa: E402
from services.worker.engine import Delta, Engine  # noqa: E402
from services.worker.memory import FixedMemory  # noqa: E402
from services.worker.models import default_cache_dir, load_model  # noqa: E402
from services.worker.sampling import SamplingParams  # noqa: E402
from services.worker.sessions import SessionTable  # noqa: E402

STORY = "Agent {i} writes a long story about the sea, the ships and their crews:"


def prompt_ids(loaded, num_tokens: int) -> list[int]:
    """num_tokens tokens of real text (this repository's README, repeated)."""
    text = (ROOT / "README.md").read_text()
    ids = loaded.tokenizer(text)["input_ids"]
    while len(ids) < num_tokens:
        ids = ids + ids
    return ids[:num_tokens]


async def one_run(loaded, max_prefill: int, decoders: int, prompt: list[int],
                  decode_tokens: int) -> dict:
    engine = Engine(loaded, FixedMemory(1 << 40), kv_wait_s=120,
                    max_prefill_tokens=max_prefill, max_batch=64)
    engine.start()
    table = SessionTable()
    arrivals: list[list[float]] = [[] for _ in range(decoders)]
    started = asyncio.Event()

    async def decode(i: int) -> None:
        session = table.open()
        request = engine.submit(session, SamplingParams(max_tokens=decode_tokens),
                                prompt=STORY.format(i=i))
        while True:
            event = await request.out.get()
            if not isinstance(event, Delta):
                return
            arrivals[i].append(time.perf_counter())
            engine.delivered(request, 1)
            if all(len(a) >= 3 for a in arrivals):
                started.set()

    async def long_prompt() -> tuple[float, float]:
        await started.wait()
        sent = time.perf_counter()
        request = engine.submit_tokens(table.open(), SamplingParams(max_tokens=2), prompt)
        first = None
        while True:
            event = await request.out.get()
            if not isinstance(event, Delta):
                return sent, first
            if first is None:
                first = time.perf_counter()
            engine.delivered(request, 1)

    try:
        results = await asyncio.gather(*(decode(i) for i in range(decoders)), long_prompt())
    finally:
        await engine.close()
    sent, first = results[-1]
    gaps, stall, tokens = [], 0.0, 0
    for times in arrivals:
        before = [t for t in times if t <= sent]
        window = [t for t in times if sent < t <= first]
        after = [t for t in times if t > first]
        points = before[-1:] + window + after[:1]   # the gaps that span the window
        steps = [b - a for a, b in zip(points, points[1:])]
        gaps.extend(steps)
        stall = max([stall, *steps])
        tokens += len(window)
        if not after:
            raise SystemExit(f"a decoding session ended before the prompt's first token: "
                             f"raise --decode-tokens (now {decode_tokens})")
    ttft = first - sent
    return {"max_prefill_tokens": max_prefill, "chunks": -(-len(prompt) // max_prefill),
            "stall_ms": round(stall * 1000, 1),
            "gap_p50_ms": round(statistics.median(gaps) * 1000, 1),
            "prompt_ttft_ms": round(ttft * 1000, 1),
            "decode_tokens_per_s_during_prompt": round(tokens / ttft, 1),
            "prefill_chunks": engine.stats().prefill_chunks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--decoders", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=0,
                        help="tokens each decoding session generates (default: enough to outlast "
                             "the prompt without chunking)")
    parser.add_argument("--chunks", default="0,512,256,128",
                        help="max_prefill_tokens values; 0 means the whole prompt in one step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    register_attention()
    loaded = load_model(args.model, cache=default_cache_dir(), device=device, dtype=dtype)
    prompt = prompt_ids(loaded, args.prompt_tokens)
    decode_tokens = args.decode_tokens or 400
    values = [int(v) or args.prompt_tokens for v in args.chunks.split(",")]
    asyncio.run(one_run(loaded, values[-1], args.decoders, prompt[:256], 16))   # warm-up
    rows = []
    for value in values:
        runs = [asyncio.run(one_run(loaded, value, args.decoders, prompt, decode_tokens))
                for _ in range(args.repeats)]
        row = dict(runs[0])
        for key in ("stall_ms", "gap_p50_ms", "prompt_ttft_ms",
                    "decode_tokens_per_s_during_prompt"):
            row[key] = round(statistics.median(r[key] for r in runs), 1)
        row["runs"] = runs
        rows.append(row)
        print(f"max_prefill_tokens {value:>6} ({row['chunks']:>3} chunks): stall "
              f"{row['stall_ms']:8.1f} ms  gap p50 {row['gap_p50_ms']:7.1f} ms  prompt TTFT "
              f"{row['prompt_ttft_ms']:8.1f} ms  decode "
              f"{row['decode_tokens_per_s_during_prompt']:7.1f} tok/s", flush=True)
    today = dt.date.today().isoformat()
    report = {
        "bench": "chunked_prefill", "date": today, "commit": git_commit(),
        "model": args.model, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "machine": (torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()),
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "prompt_tokens": args.prompt_tokens, "decoders": args.decoders,
        "decode_tokens": decode_tokens, "repeats": args.repeats,
        "definitions": {
            "stall_ms": "longest gap between two tokens of a decoding session while the prompt "
                        "is computed (median over repeats)",
            "gap_p50_ms": "median gap between the decoding sessions' tokens in that window",
            "prompt_ttft_ms": "the long prompt's arrival to its first token",
        },
        "rows": rows,
    }
    write_report(report, args.out or (
        ROOT / "bench" / "results" /
        f"chunked-prefill-{device.type}-{args.model.replace(':', '-')}-{today}.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
