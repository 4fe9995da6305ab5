"""The GPU stress stage: many sessions, long prompts, a cap that makes KV
short, and every byte the worker holds checked against its leases.

For each model shape, admission runs on NVML with a cap just above what the
worker needs to start (so KV is short), and one worker runs under it with
its defaults (CUDA graphs on, unless --cuda-graphs off). Then for N in
--sessions, N sessions generate at once, each from a prompt of 16 to
--max-prompt tokens (spread over that range), --max-tokens tokens each.
Meanwhile a sampler reads, every 50 ms, NVML's per-process device memory of
the worker and the leases admission holds for that pid (read before and
after, the larger kept, so that a growth in between is not counted against
it).

Counted per N: generations finished, refused with RESOURCE_EXHAUSTED (and
whether they carried a retry hint), any other status (INTERNAL is a bug),
out-of-memory errors and plan misses in the worker's log, leases lost or
expired, and NVML samples above the leases.

    python3 bench/stress.py                              # 3 shapes, N = 1..128
    python3 bench/stress.py --models synthetic:smollm2-135m --sessions 1,16
    python3 bench/stress.py --device cpu --models synthetic:llama-tiny --sessions 1,8 \
        --max-prompt 300                                  # the script itself, on a CPU

Writes bench/results/stress-<card>-<date>.json; exits 1 when any failure
that the issue forbids was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("LMX_CACHE", str(ROOT / ".cache" / "lmx"))

import grpc  # noqa: E402

from benchkit import card_slug, git_commit, write_report  # noqa: E402
from lmx.v1 import admission_pb2 as apb  # noqa: E402
from lmx.v1 import admission_pb2_grpc  # noqa: E402
from lmx.v1 import worker_pb2 as wpb  # noqa: E402
from lmx.v1 import worker_pb2_grpc  # noqa: E402
from services.admission.app import SERVICE_NAME as ADMISSION  # noqa: E402
from services.admission.client import error_details  # noqa: E402
from services.common.launch import start_service  # noqa: E402
from services.worker.app import SERVICE_NAME as WORKER  # noqa: E402

GIB = 1 << 30
#: Each shape's cap: its weights and a little KV (GiB), on top of what the
#: idle card already uses.
#: The worker's start needs weights, CUDA context (about 0.5 GiB), workspace
#: and the graphs' pool estimate; what is left after the pool is measured
#: holds the KV of a fraction of the sessions' prompts only.
CAPS_GIB = {"synthetic:smollm2-135m": 1.75, "synthetic:llama-1b": 4.5,
            "synthetic:qwen2.5-1.5b": 5.0, "synthetic:gemma3-270m": 2.25}
LOG_COUNTS = {"out_of_memory": ("step_out_of_memory", "OutOfMemoryError"),
              "plan_below_measured": ("step_plan_below_measured",),
              "lease_lost": ("worker_lease_lost", "\"lease_lost\"", "lease_lost "),
              "lease_expired": ("lease_expired",),
              "step_failed": ("step_failed",),
              "over_lease": ("holders_over_lease", "allocator_over_lease")}


class Sampler(threading.Thread):
    """NVML's device memory of one pid against its leases, every period."""

    def __init__(self, admission: str, pid: int, period_s: float = 0.05):
        super().__init__(daemon=True)
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.channel = grpc.insecure_channel(admission)
        self.stub = admission_pb2_grpc.AdmissionServiceStub(self.channel)
        self.pid = pid
        self.period_s = period_s
        self.stop_event = threading.Event()
        self.samples = 0
        self.over = 0
        self.max_over = 0
        self.max_used = 0
        self.errors = 0

    def _leased(self) -> int:
        status = self.stub.Status(apb.StatusRequest(), timeout=2)
        return sum(lease.bytes for lease in status.leases if lease.holder.pid == self.pid)

    def _used(self) -> int:
        for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if int(proc.pid) == self.pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        return 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                before = self._leased()
                used = self._used()
                after = self._leased()
            except Exception:  # noqa: BLE001 - counted, the run goes on
                self.errors += 1
                time.sleep(self.period_s)
                continue
            leased = max(before, after)
            self.samples += 1
            self.max_used = max(self.max_used, used)
            if used > leased:
                self.over += 1
                self.max_over = max(self.max_over, used - leased)
            time.sleep(self.period_s)

    def finish(self) -> dict:
        self.stop_event.set()
        self.join(timeout=5)
        self.channel.close()
        return dict(samples=self.samples, over_lease=self.over, max_over_bytes=self.max_over,
                    max_used_bytes=self.max_used, sample_errors=self.errors)


def prompt_of(tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    words = ("alpha", "river", "stone", "cloud", "maple", "orbit", "quartz", "delta")
    return " ".join(rng.choice(words) for _ in range(tokens))


async def one(stub, index: int, prompt_tokens: int, max_tokens: int) -> dict:
    started = time.perf_counter()
    outcome = dict(prompt_tokens=prompt_tokens, tokens=0, code="OK", retry_hint=False)
    session = None
    try:
        session = await stub.OpenSession(wpb.OpenSessionRequest())
        async for reply in stub.Generate(wpb.GenerateRequest(
                session_id=session.session_id, token=session.token,
                prompt=prompt_of(prompt_tokens, index),
                sampling=wpb.SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=index))):
            if reply.HasField("delta"):
                outcome["tokens"] += len(reply.delta.token_ids)
    except grpc.aio.AioRpcError as exc:
        details = error_details(exc)
        outcome.update(code=exc.code().name, message=(exc.details() or "")[:200],
                       retry_hint=details.retry_after_s is not None)
    finally:
        if session is not None:
            try:
                await asyncio.shield(stub.CloseSession(wpb.CloseSessionRequest(
                    session_id=session.session_id, token=session.token)))
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass
    outcome["seconds"] = round(time.perf_counter() - started, 3)
    return outcome


async def wave(address: str, sessions: int, max_prompt: int, max_tokens: int,
               timeout_s: float) -> list[dict]:
    lengths = [16 + (max_prompt - 16) * i // max(1, sessions - 1) for i in range(sessions)]
    random.Random(sessions).shuffle(lengths)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        tasks = [asyncio.create_task(one(stub, i, lengths[i], max_tokens))
                 for i in range(sessions)]
        done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        # Their sessions are closed before the channel is.
        await asyncio.gather(*pending, return_exceptions=True)
        results = [t.result() for t in done]
        results += [dict(prompt_tokens=0, tokens=0, code="BENCH_TIMEOUT")] * len(pending)
        return results


def count_logs(*paths: Path) -> dict[str, int]:
    text = "".join(p.read_text(errors="replace") for p in paths if p.exists())
    return {name: sum(text.count(needle) for needle in needles)
            for name, needles in LOG_COUNTS.items()}


def gpu_info() -> tuple[str, int]:
    """The card's name and total bytes, from another process (a CUDA context
    left in this one would be foreign memory to admission)."""
    code = ("import json, torch; p = torch.cuda.get_device_properties(0); "
            "print(json.dumps([p.name, p.total_memory]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    name, total = json.loads(out.strip().splitlines()[-1])
    return name, int(total)


def idle_used_bytes() -> int:
    """NVML's used memory of the card with no process of ours on it (about
    0.5 GiB on an idle H100): admission counts it as foreign, so the cap
    is set above it and the shape's cap is what lmx may lease."""
    import pynvml

    pynvml.nvmlInit()
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    finally:
        pynvml.nvmlShutdown()


def run_model(model: str, args, total: int, logs: Path) -> dict:
    cap = CAPS_GIB.get(model, args.cpu_cap_gib if args.device == "cpu" else 4.0) * GIB
    admission_log, worker_log = logs / f"{model[10:]}-admission.log", logs / f"{model[10:]}-worker.log"
    idle = idle_used_bytes() if args.device == "cuda" else 0
    devices = (["--device-backend", "nvml", "--cap-fraction", f"{(cap + idle) / total:.6f}"]
               if args.device == "cuda" else ["--device", f"cpu:0={int(cap / 0.9)}"])
    admission = start_service("services.admission", ADMISSION,
                              [*devices, "--poll-interval-s", "0.2", "--log-format", "json"],
                              log_path=admission_log, timeout_s=60)
    worker = None
    report: dict = dict(model=model, cap_bytes=int(cap), idle_used_bytes=idle,
                        cuda_graphs=args.cuda_graphs, waves=[])
    try:
        started = time.perf_counter()
        worker = start_service("services.worker", WORKER,
                               ["--model", model, "--device", args.device, "--admission",
                                admission.address, "--kvstore", "none", "--log-format", "json",
                                "--cuda-graphs", args.cuda_graphs],
                               log_path=worker_log, timeout_s=args.start_timeout_s)
        report["ready_s"] = round(time.perf_counter() - started, 1)
        print(f"{model}: ready in {report['ready_s']} s (cap {cap / GIB:.2f} GiB)", flush=True)
        for sessions in args.sessions:
            before = count_logs(admission_log, worker_log)
            sampler = (Sampler(admission.address, worker.process.pid) if args.device == "cuda"
                       else None)
            if sampler is not None:
                sampler.start()
            t0 = time.perf_counter()
            results = asyncio.run(wave(worker.address, sessions, args.max_prompt, args.max_tokens,
                                       args.wave_timeout_s))
            wall = time.perf_counter() - t0
            memory = sampler.finish() if sampler is not None else dict(samples=0, over_lease=0)
            after = count_logs(admission_log, worker_log)
            codes: dict[str, int] = {}
            for r in results:
                codes[r["code"]] = codes.get(r["code"], 0) + 1
            exhausted = [r for r in results if r["code"] == "RESOURCE_EXHAUSTED"]
            row = dict(sessions=sessions, wall_s=round(wall, 2), codes=codes,
                       finished=codes.get("OK", 0),
                       resource_exhausted=len(exhausted),
                       exhausted_without_hint=sum(1 for r in exhausted if not r["retry_hint"]),
                       tokens=sum(r["tokens"] for r in results),
                       prompt_tokens=sum(r["prompt_tokens"] for r in results),
                       logs={k: after[k] - before[k] for k in after}, memory=memory,
                       errors=[r.get("message") for r in results
                               if r["code"] not in ("OK", "RESOURCE_EXHAUSTED")][:5])
            report["waves"].append(row)
            print(f"{model} N={sessions}: {codes} in {wall:.1f} s; logs {row['logs']}; memory "
                  f"{memory}", flush=True)
        with grpc.insecure_channel(worker.address) as channel:
            status = worker_pb2_grpc.WorkerServiceStub(channel).GetStatus(
                wpb.GetStatusRequest(), timeout=10)
        report["worker"] = dict(leased_bytes=status.leased_bytes, held_bytes=status.held_bytes,
                                weight_bytes=status.weight_bytes, steps=status.steps,
                                overhead_bytes=status.overhead_bytes,
                                workspace_bytes=status.workspace_bytes,
                                steps_split=status.steps_split,
                                steps_out_of_memory=status.steps_out_of_memory,
                                step_plan_misses=status.step_plan_misses)
    except Exception as exc:  # noqa: BLE001 - a failed start is a result too
        report["error"] = f"{type(exc).__name__}: {exc}"
        print(f"{model}: {report['error']}", flush=True)
    finally:
        if worker is not None:
            report["worker_exit"] = worker.stop()
        admission.stop()
    for line in worker_log.read_text(errors="replace").splitlines() if worker_log.exists() else []:
        if "worker_workspace_measured" in line or "worker_lease_needed" in line:
            try:
                report.setdefault("sizing", []).append(json.loads(line))
            except ValueError:
                pass
    return report


def bad(report: dict) -> list[str]:
    problems = []
    for model in report["models"]:
        if "error" in model:
            problems.append(f"{model['model']}: {model['error']}")
        for row in model["waves"]:
            tag = f"{model['model']} N={row['sessions']}"
            others = {c: n for c, n in row["codes"].items() if c not in ("OK", "RESOURCE_EXHAUSTED")}
            if others:
                problems.append(f"{tag}: {others}")
            if row["exhausted_without_hint"]:
                problems.append(f"{tag}: RESOURCE_EXHAUSTED without a retry hint")
            for key in ("out_of_memory", "lease_lost", "lease_expired", "step_failed"):
                if row["logs"][key]:
                    problems.append(f"{tag}: {key} {row['logs'][key]}")
            if row["memory"]["over_lease"]:
                problems.append(f"{tag}: {row['memory']['over_lease']} samples over the leases "
                                f"(max {row['memory']['max_over_bytes']} bytes)")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="synthetic:smollm2-135m,synthetic:llama-1b,"
                                            "synthetic:qwen2.5-1.5b")
    parser.add_argument("--sessions", default="1,8,16,32,64,128")
    parser.add_argument("--max-prompt", type=int, default=4000)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--cuda-graphs", choices=("auto", "off"), default="auto")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a simulated device, no NVML samples (checks the script)")
    parser.add_argument("--cpu-cap-gib", type=float, default=1.0)
    parser.add_argument("--wave-timeout-s", type=float, default=60.0)
    parser.add_argument("--start-timeout-s", type=float, default=180.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--log-dir", default=None)
    args = parser.parse_args()
    args.sessions = [int(n) for n in args.sessions.split(",")]
    card, total = gpu_info() if args.device == "cuda" else ("cpu", 0)
    logs = Path(args.log_dir or tempfile.mkdtemp(prefix="lmx-stress-"))
    logs.mkdir(parents=True, exist_ok=True)
    report = dict(benchmark="stress", card=card, date=dt.date.today().isoformat(),
                  commit=git_commit(), total_bytes=total, sessions=args.sessions,
                  max_prompt=args.max_prompt, max_tokens=args.max_tokens, models=[])
    slug = card_slug(card)
    suffix = ("" if args.cuda_graphs == "auto" else "-eager") + ("" if args.device == "cuda" else "-cpu")
    models = [model.strip() for model in args.models.split(",")]
    for model in models:
        report["models"].append(run_model(model, args, total, logs))
        report["complete"] = len(report["models"]) == len(models)
        report["problems"] = bad(report)
        # Written after every model: a run stopped at its time limit keeps what it measured.
        write_report(report, Path(args.out) / f"stress-{slug}{suffix}-{report['date']}.json")
    print("problems:", report["problems"] or "none")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
