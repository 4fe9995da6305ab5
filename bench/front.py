"""OpenAI front benchmark: what the HTTP front costs over the gRPC path, and
what prefix reuse saves when agents resend their histories.

Starts admission (a simulated device, --device-size), a kvstore, one worker
(--model) and `lmx front`, all on loopback, all stopped at the end. Then:

  overhead   one session at a time, --repeats times: the same greedy turn of
             --max-tokens tokens through the worker's gRPC Generate and
             through POST /v1/chat/completions (streamed): time to first
             token and tokens per second of each, median.
  agents     --agents agents at once, each --turns turns, every turn resending
             its whole history through the front (as agent frameworks do):
             the context tokens the worker computed against those it kept
             (usage.prompt_tokens_details.cached_tokens), turn time by turn
             number.

    .venv/bin/python bench/front.py

Writes bench/results/front-<device>-<date>.json and prints a summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402

from benchkit import cpu_model, git_commit  # noqa: E402
from lmx.v1 import worker_pb2 as wpb  # noqa: E402
from lmx.v1 import worker_pb2_grpc  # noqa: E402
from services.common.launch import HTTP_HEALTH, free_port, start_service, wait_serving  # noqa: E402

QUESTIONS = ["Write a Python function that adds two numbers.", "Now add type hints to it.",
             "Add a one-line docstring.", "Write a test for it.", "Explain it in one line.",
             "Name a risk in it."]


def stream_chat(base: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(base + "/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, text, usage = None, [], {}
    with urllib.request.urlopen(request, timeout=600) as reply:
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    first = first or time.perf_counter() - t0
                    text.append(piece)
            usage = event.get("usage") or usage
    return {"ttft_s": first, "seconds": time.perf_counter() - t0, "text": "".join(text),
            "usage": usage}


def grpc_turn(address: str, message: str, max_tokens: int) -> dict:
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        session = stub.OpenSession(wpb.OpenSessionRequest(), timeout=30)
        t0 = time.perf_counter()
        first, tokens = None, 0
        for reply in stub.Generate(wpb.GenerateRequest(
                session_id=session.session_id, token=session.token,
                message=wpb.ChatMessage(role="user", content=message),
                sampling=wpb.SamplingParams(max_tokens=max_tokens)), timeout=600):
            if reply.HasField("delta") and reply.delta.token_ids:
                first = first or time.perf_counter() - t0
                tokens += len(reply.delta.token_ids)
        seconds = time.perf_counter() - t0
        stub.CloseSession(wpb.CloseSessionRequest(session_id=session.session_id,
                                                  token=session.token), timeout=30)
    return {"ttft_s": first, "seconds": seconds, "tokens": tokens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device-size", default="4GiB")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    tmp = Path(tempfile.mkdtemp(prefix="lmx-bench-front-"))
    procs = []
    try:
        admission = start_service("services.admission", "lmx.v1.AdmissionService",
                                  ["--device", f"cpu:0={args.device_size}", "--log-format",
                                   "json", "--state-file", "none"],
                                  log_path=tmp / "admission.log")
        procs.append(admission)
        kvstore = start_service("services.kvstore", "lmx.v1.KVStoreService",
                                ["--store-id", "benchfront", "--shm-dir", str(tmp / "shm"),
                                 "--state-dir", str(tmp / "kv"), "--keep-on-stop", "false",
                                 "--log-format", "json"], log_path=tmp / "kvstore.log")
        procs.append(kvstore)
        worker = start_service("services.worker", "lmx.v1.WorkerService",
                               ["--model", args.model, "--device", "cpu", "--admission",
                                admission.address, "--kvstore", kvstore.address,
                                "--log-format", "json"],
                               log_path=tmp / "worker.log", timeout_s=600)
        procs.append(worker)
        port = free_port()
        log = open(tmp / "front.log", "wb")
        front = subprocess.Popen([sys.executable, "-m", "services.front", "--listen",
                                  f"127.0.0.1:{port}", "--admission", admission.address,
                                  "--log-format", "json"], cwd=ROOT, stdout=log,
                                 stderr=subprocess.STDOUT)
        wait_serving(f"127.0.0.1:{port}", HTTP_HEALTH, 60, front)
        base = f"http://127.0.0.1:{port}"

        # warm-up: one turn each way
        grpc_turn(worker.address, QUESTIONS[0], args.max_tokens)
        stream_chat(base, args.model, [{"role": "user", "content": QUESTIONS[0]}],
                    args.max_tokens)
        via_grpc, via_front = [], []
        for _ in range(args.repeats):
            via_grpc.append(grpc_turn(worker.address, QUESTIONS[0], args.max_tokens))
            got = stream_chat(base, args.model, [{"role": "user", "content": QUESTIONS[0]}],
                              args.max_tokens)
            got["tokens"] = got["usage"].get("completion_tokens", 0)
            via_front.append(got)

        def med(runs, key):
            return round(statistics.median(r[key] for r in runs), 4)

        overhead = {
            "grpc": {"ttft_s": med(via_grpc, "ttft_s"), "seconds": med(via_grpc, "seconds"),
                     "tokens_per_s": round(statistics.median(
                         r["tokens"] / r["seconds"] for r in via_grpc), 2)},
            "front": {"ttft_s": med(via_front, "ttft_s"), "seconds": med(via_front, "seconds"),
                      "tokens_per_s": round(statistics.median(
                          r["tokens"] / r["seconds"] for r in via_front), 2)},
        }

        def agent(index: int) -> list[dict]:
            messages, turns = [], []
            for turn in range(args.turns):
                messages.append({"role": "user",
                                 "content": f"(agent {index}) {QUESTIONS[turn % len(QUESTIONS)]}"})
                got = stream_chat(base, args.model, messages, args.max_tokens)
                messages.append({"role": "assistant", "content": got["text"]})
                usage = got["usage"]
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                turns.append({"turn": turn + 1, "seconds": round(got["seconds"], 3),
                              "ttft_s": round(got["ttft_s"] or 0, 3),
                              "context_tokens": usage.get("prompt_tokens", 0),
                              "cached_tokens": cached,
                              "computed_tokens": usage.get("prompt_tokens", 0) - cached})
            return turns

        with ThreadPoolExecutor(args.agents) as pool:
            agents = list(pool.map(agent, range(args.agents)))
        context = sum(t["context_tokens"] for a in agents for t in a)
        cached = sum(t["cached_tokens"] for a in agents for t in a)
        by_turn = [{"turn": n + 1,
                    "ttft_s_median": round(statistics.median(a[n]["ttft_s"] for a in agents), 3),
                    "context_tokens": round(statistics.mean(a[n]["context_tokens"]
                                                            for a in agents), 1),
                    "computed_tokens": round(statistics.mean(a[n]["computed_tokens"]
                                                             for a in agents), 1)}
                   for n in range(args.turns)]
        result = {
            "benchmark": "front", "date": started.isoformat(timespec="seconds"),
            "commit": os.environ.get("LMX_BENCH_COMMIT") or git_commit(),
            "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(),
                        "python": platform.python_version()},
            "args": vars(args), "overhead": overhead,
            "agents": {"context_tokens": context, "cached_tokens": cached,
                       "computed_tokens": context - cached,
                       "share_reused": round(cached / context, 3) if context else 0,
                       "by_turn": by_turn, "turns": agents},
        }
    finally:
        if "front" in locals():
            front.terminate()
            front.wait(15)
        for proc in reversed(procs):
            proc.stop()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"front-cpu-{started.date()}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({"overhead": overhead,
                      "agents": {k: v for k, v in result["agents"].items() if k != "turns"}},
                     indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
