"""Diagnostic: per-turn decode speed of one session over several turns, in
process (no gRPC, no admission), to tell whether steps slow down as a
session's context grows. Prints one JSON line per turn."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from services.worker.engine import Delta, Engine  # noqa: E402
from services.worker.memory import FixedMemory  # noqa: E402
from services.worker.models import default_cache_dir, load_model  # noqa: E402
from services.worker.sampling import SamplingParams  # noqa: E402
from services.worker.sessions import SessionTable  # noqa: E402

TURNS = ("Write a Python function that adds two numbers.", "Now add type hints to it.",
         "Add a one-line docstring.")


async def main(args) -> None:
    device = torch.device(args.device)
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    loaded = load_model(args.model, cache=default_cache_dir(), device=device,
                        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    for chunk in args.chunks:
        engine = Engine(loaded, FixedMemory(1 << 40), chunk_bytes=chunk << 20, kv_wait_s=60)
        engine.start()
        table = SessionTable()
        for name in ("first", "second", "third")[:args.sessions]:
            session = table.open()
            for i, turn in enumerate(TURNS):
                prompt = f"{'' if i == 0 else chr(10)}Question: {turn}\nAnswer:"
                steps0 = engine.stats().steps
                t0 = time.perf_counter()
                request = engine.submit(session, SamplingParams(max_tokens=args.tokens),
                                        prompt=prompt)
                n = 0
                while True:
                    event = await request.out.get()
                    if not isinstance(event, Delta):
                        break
                    engine.delivered(request, 1)
                    n += 1
                wall = time.perf_counter() - t0
                steps = engine.stats().steps - steps0
                print(json.dumps({"chunk_mib": chunk, "session": name, "turn": i,
                                  "context": len(session.tokens), "tokens": n,
                                  "turn_s": round(wall, 3),
                                  "ms_per_step": round(wall / max(steps, 1) * 1e3, 2)}),
                      flush=True)
            engine.release_kv(session)
        await engine.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="synthetic:smollm2-1.7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--no-cudnn-sdp", action="store_true")
    p.add_argument("--sessions", type=int, default=3)
    p.add_argument("--chunks", type=int, nargs="+", default=[32, 4])
    asyncio.run(main(p.parse_args()))
