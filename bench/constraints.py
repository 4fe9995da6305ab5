"""What constrained decoding costs (services/worker/constraints.py): one
session of a real model generating greedily, free and under a grammar (the
front's forced tool call, and a JSON schema), in-process through the
engine. Reports tokens per second of each, the time spent computing masks
per constrained token, and the grammar's compile time.

    python bench/constraints.py                          # smollm2-135m on the CPU
    python bench/constraints.py --device cuda --model synthetic:llama-1b

Writes bench/results/constraints-<device>-<model>-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.benchkit import cpu_model, git_commit, write_report  # noqa: E402

TOOLS = json.dumps([
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"},
                                         "limit": {"type": "integer"}},
        "required": ["query"]}}}])
SCHEMA = json.dumps({"type": "object", "required": ["name", "age", "tags"],
                     "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                    "tags": {"type": "array", "items": {"type": "string"}}}})


async def one(loaded, engine, constraint, tokens: int) -> dict:
    from services.worker.engine import Delta
    from services.worker.prompts import prepare
    from services.worker.sampling import SamplingParams
    from services.worker.sessions import SessionTable

    session = SessionTable().open()
    started = time.perf_counter()
    request = engine.submit_prepared(
        session, SamplingParams(max_tokens=tokens),
        prepare(loaded, session, prompt="Call a tool to look up the weather in Paris:"),
        constraint)
    first = None
    count = 0
    while True:
        event = await request.out.get()
        if not isinstance(event, Delta):
            break
        if first is None:
            first = time.perf_counter()
        count += len(event.token_ids)
        engine.delivered(request, len(event.token_ids))
    end = time.perf_counter()
    decode = (count - 1) / (end - first) if count > 1 and first else None
    return dict(tokens=count, seconds=round(end - started, 3),
                decode_tokens_per_s=round(decode, 1) if decode else None,
                finish=event.reason,
                mask_ms_per_token=round(constraint.mask_seconds / max(1, constraint.num_masks)
                                        * 1e3, 3) if constraint is not None else None)


async def run(args) -> dict:
    import torch

    from services.front.tool_calls import forced_grammar
    from services.worker.constraints import Grammars, GrammarSpec
    from services.worker.engine import Engine
    from services.worker.memory import FixedMemory
    from services.worker.models import default_cache_dir, load_model

    device = torch.device(args.device)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    loaded = load_model(args.model, cache=default_cache_dir(), device=device, dtype=dtype,
                        max_context=2048)
    grammars = Grammars(loaded.tokenizer, loaded.eos_token_ids)
    specs = {"free": None, "forced_tool_call": GrammarSpec("lark", forced_grammar(TOOLS, None)),
             "json_schema": GrammarSpec("json_schema", SCHEMA)}
    engine = Engine(loaded, FixedMemory(8 << 30))
    engine.start()
    results = {}
    try:
        await one(loaded, engine, None, 8)            # warm-up
        for name, spec in specs.items():
            rows = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                constraint = grammars.compile(spec) if spec is not None else None
                compile_ms = (time.perf_counter() - started) * 1e3
                row = await one(loaded, engine, constraint, args.tokens)
                row["compile_ms"] = round(compile_ms, 2) if spec is not None else None
                rows.append(row)
            results[name] = rows
            print(name, rows[-1], flush=True)
    finally:
        await engine.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = asyncio.run(run(args))
    card = cpu_model()
    if args.device == "cuda":
        import torch
        card = torch.cuda.get_device_name(0)
    report = dict(benchmark="constraints", model=args.model, device=args.device, machine=card,
                  date=time.strftime("%Y-%m-%d"), commit=git_commit(), tokens=args.tokens,
                  results=results,
                  note="greedy, one session; free is unconstrained; a constrained answer "
                       "stops where its grammar is complete, so its token count may be lower")
    name = args.model.replace(":", "-")
    write_report(report, ROOT / "bench" / "results" /
                        f"constraints-{args.device}-{name}-{report['date']}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
