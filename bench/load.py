"""Load: many concurrent sessions across three models on a small device,
through lmx, for a bounded time. Every request must complete or end with a
clear, retryable error (RESOURCE_EXHAUSTED, ABORTED, UNAVAILABLE); an out-of-
memory error anywhere, any other error, or a request without an answer by the
deadline counts as lost, and lost must be zero.

Starts real services on loopback, all stopped and removed at the end, even on
failure: admission (a simulated device, --device-size, cap 0.9), a kvstore
(fresh --shm-dir under /dev/shm) and one worker per model. The default models
are smollm2-135m and gemma3-270m (real) and synthetic:smollm2-135m (a real
Llama architecture with random weights): 2.1 GB of float32 weights against a
1,440 MiB budget, so the models take turns on the device while the sessions
come and go.

Each session (--sessions, spread over the models in turn) opens, runs --turns
turns of --max-tokens tokens (greedy) and closes; all start together. Every
RPC's deadline is what is left of --duration-s. Per request: time to first
token and total time; per run: requests, completed, retryable errors by code,
lost, latency p50/p99, sleeps/wakes/parks/restores (admission's Watch), the
workers' out-of-memory lines, exit codes and segments left.

    .venv/bin/python bench/load.py                     # make bench-load

Writes bench/results/load-cpu-<date>.json (and load-cpu-latest.json), prints a
summary; exits 1 if anything was lost.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("LMX_CACHE", str(ROOT / ".cache" / "lmx"))

from benchkit import cpu_model, git_commit  # noqa: E402
import grpc  # noqa: E402

from lmx.v1 import worker_pb2 as wpb  # noqa: E402
from lmx.v1 import worker_pb2_grpc  # noqa: E402
from seed_scenario import Watcher  # noqa: E402
from services.common.launch import start_service  # noqa: E402

ADMISSION = "lmx.v1.AdmissionService"
KVSTORE = "lmx.v1.KVStoreService"
WORKER = "lmx.v1.WorkerService"
RETRYABLE = {"RESOURCE_EXHAUSTED", "ABORTED", "UNAVAILABLE"}
PROMPTS = ["Write a haiku about memory.", "Name three sorting algorithms.",
           "What is a GPU?", "Explain caching in one sentence."]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m,synthetic:smollm2-135m")
    p.add_argument("--device-size", default="1600MiB")
    p.add_argument("--duration-s", type=float, default=600.0,
                   help="the bound: every RPC's deadline is what is left of it")
    p.add_argument("--kv-wait-s", type=float, default=60.0)
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--log-dir", default=None)
    return p.parse_args(argv)


def session_run(address: str, model: str, index: int, turns: int, max_tokens: int,
                deadline: float, start: threading.Barrier) -> list[dict]:
    """One session's requests; never raises: each request's outcome is recorded."""
    out: list[dict] = []

    def left() -> float:
        return max(0.1, deadline - time.monotonic())

    def record(kind: str, t0: float, exc: grpc.RpcError | None = None, **extra) -> None:
        code = "OK" if exc is None else exc.code().name
        out.append({"session": index, "model": model, "kind": kind, "code": code,
                    "message": "" if exc is None else (exc.details() or "")[:300],
                    "seconds": round(time.perf_counter() - t0, 4), **extra})

    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        start.wait()
        t0 = time.perf_counter()
        try:
            session = stub.OpenSession(wpb.OpenSessionRequest(), timeout=left())
            record("open", t0)
        except grpc.RpcError as exc:
            record("open", t0, exc)
            return out
        for turn in range(turns):
            request = wpb.GenerateRequest(
                session_id=session.session_id, token=session.token,
                prompt=("" if turn == 0 else "\n") + PROMPTS[(index + turn) % len(PROMPTS)],
                sampling=wpb.SamplingParams(max_tokens=max_tokens))
            t0 = time.perf_counter()
            ttft, tokens, finish = None, 0, None
            try:
                for reply in stub.Generate(request, timeout=left()):
                    if reply.HasField("delta"):
                        if ttft is None and reply.delta.token_ids:
                            ttft = time.perf_counter() - t0
                        tokens += len(reply.delta.token_ids)
                    elif reply.HasField("finish"):
                        finish = wpb.FinishReason.Name(reply.finish.reason)
                record("generate", t0, ttft_s=None if ttft is None else round(ttft, 4),
                       tokens=tokens, finish=finish)
            except grpc.RpcError as exc:
                record("generate", t0, exc, tokens=tokens)
        t0 = time.perf_counter()
        try:
            stub.CloseSession(wpb.CloseSessionRequest(session_id=session.session_id,
                                                      token=session.token), timeout=left())
            record("close", t0)
        except grpc.RpcError as exc:
            record("close", t0, exc)
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(q * (len(values) - 1))))], 4)


def oom_lines(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            low = line.lower()
            if "out of memory" in low or "outofmemoryerror" in low:
                found.append(f"{path.name}: {line[:300]}")
    return found


def run(args) -> dict:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    started = dt.datetime.now(dt.timezone.utc)
    result: dict = {"benchmark": "load", "date": started.isoformat(timespec="seconds"),
                    "commit": git_commit(), "args": vars(args),
                    "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(),
                                "python": platform.python_version()}}
    shm = Path(tempfile.mkdtemp(prefix="lmx-bench-load-", dir="/dev/shm"))
    tmp = Path(tempfile.mkdtemp(prefix="lmx-bench-load-state-"))
    log_dir = Path(args.log_dir) if args.log_dir else tmp
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: dict = {}
    watcher = None
    try:
        procs["admission"] = start_service(
            "services.admission", ADMISSION,
            ["--device", f"cpu:0={args.device_size}", "--reclaim-deadline-s", "2",
             "--log-format", "json"], log_path=log_dir / "admission.log", timeout_s=60)
        procs["kvstore"] = start_service(
            "services.kvstore", KVSTORE,
            ["--store-id", "benchload" + uuid.uuid4().hex[:8], "--shm-dir", str(shm),
             "--state-dir", str(tmp / "kvstate"), "--keep-on-stop", "false",
             "--log-format", "json"], log_path=log_dir / "kvstore.log", timeout_s=60)
        watcher = Watcher(procs["admission"].address)
        addresses = {}
        for i, model in enumerate(models):
            name = f"worker-{i}"
            procs[name] = start_service(
                "services.worker", WORKER,
                ["--model", model, "--admission", procs["admission"].address,
                 "--kvstore", procs["kvstore"].address, "--max-context", "512",
                 "--kv-chunk-bytes", "4MiB", "--kv-wait-s", str(args.kv_wait_s),
                 "--max-sessions", str(max(64, args.sessions)), "--log-format", "json"],
                log_path=log_dir / f"{name}.log", timeout_s=600)
            addresses[model] = procs[name].address
            print(f"{name} {model} ready", file=sys.stderr, flush=True)
        mark = watcher.mark()
        barrier = threading.Barrier(args.sessions)
        deadline = time.monotonic() + args.duration_s
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.sessions) as pool:
            futures = [pool.submit(session_run, addresses[models[i % len(models)]],
                                   models[i % len(models)], i, args.turns, args.max_tokens,
                                   deadline, barrier) for i in range(args.sessions)]
            requests = [r for f in futures for r in f.result()]
        wall = time.perf_counter() - t0
        result["activity"] = watcher.summary(mark, watcher.mark())
        result["wall_s"] = round(wall, 2)
        result["requests"] = requests
    finally:
        if watcher is not None:
            watcher.close()
        codes = {}
        for name in sorted(procs, key=lambda n: n == "admission"):   # admission last
            codes[name] = procs[name].stop(timeout_s=30)
        result["exit_codes"] = codes
        result["shm_files_left_after_stop"] = (sorted(p.name for p in shm.iterdir())
                                               if shm.exists() else [])
        result["oom_lines"] = oom_lines(sorted(log_dir.glob("worker-*.log")))
        shutil.rmtree(shm, ignore_errors=True)
        if not args.log_dir:
            shutil.rmtree(tmp, ignore_errors=True)
    summarise(result)
    return result


def summarise(result: dict) -> None:
    requests = result.get("requests", [])
    generates = [r for r in requests if r["kind"] == "generate"]
    ok = [r for r in generates if r["code"] == "OK"]
    retryable = [r for r in requests if r["code"] in RETRYABLE]
    lost = [r for r in requests if r["code"] not in RETRYABLE | {"OK"}]
    by_code: dict[str, int] = {}
    for r in requests:
        by_code[r["code"]] = by_code.get(r["code"], 0) + 1
    result["summary"] = {
        "requests": len(requests), "generates": len(generates), "completed": len(ok),
        "retryable_errors": len(retryable), "lost": len(lost), "by_code": by_code,
        "lost_examples": lost[:5], "oom": len(result.get("oom_lines", [])),
        "tokens": sum(r.get("tokens", 0) for r in ok),
        "latency_s": {"p50": percentile([r["seconds"] for r in ok], 0.5),
                      "p99": percentile([r["seconds"] for r in ok], 0.99)},
        "ttft_s": {"p50": percentile([r["ttft_s"] for r in ok if r.get("ttft_s")], 0.5),
                   "p99": percentile([r["ttft_s"] for r in ok if r.get("ttft_s")], 0.99)},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    day = result["date"][:10]
    for name in (f"load-cpu-{day}.json", "load-cpu-latest.json"):
        (out / name).write_text(json.dumps(result, indent=1))
    s = result["summary"]
    act = result.get("activity", {})
    print(f"load: {args.sessions} sessions x {args.turns} turns x {args.max_tokens} tokens on "
          f"{args.models}, device {args.device_size}, commit {result['commit']}")
    print(f"  wall {result.get('wall_s')} s; requests {s['requests']}, generates completed "
          f"{s['completed']}/{s['generates']}, retryable errors {s['retryable_errors']}, "
          f"lost {s['lost']}, out-of-memory {s['oom']}; codes {s['by_code']}")
    print(f"  generate latency p50 {s['latency_s']['p50']} s, p99 {s['latency_s']['p99']} s; "
          f"TTFT p50 {s['ttft_s']['p50']} s, p99 {s['ttft_s']['p99']} s")
    print(f"  sleeps {act.get('sleeps')}, wakes {act.get('wakes')}, parks {act.get('parks')}, "
          f"restores {act.get('restores')}; exit codes {result['exit_codes']}; "
          f"segments left {result['shm_files_left_after_stop']}")
    print(f"wrote {out / f'load-cpu-{day}.json'}")
    failed = s["lost"] or s["oom"] or any(result["exit_codes"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
