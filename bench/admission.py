"""Admission benchmark: Acquire+Release pairs on loopback.

Starts a real admission server as its own process (a simulated 64 GiB device,
log level warning), waits for health SERVING, then for each concurrency N runs
N client loops (Acquire a random-size lease that always fits, then Release
it) for a warm-up and a measured window. The clients run in other processes
than the server (`--client-procs`, spawned, each with one grpc.aio channel and
N/P tasks). At the end the server gets SIGTERM and must exit 0. The same is
then done against bench/null_server.py, a do-nothing server: what grpc.aio
itself costs on this machine, the floor under the real server's numbers.

    .venv/bin/python bench/admission.py                     # make bench
    .venv/bin/python bench/admission.py --concurrency 1,16 --duration-s 2

Only pairs that finish inside the measured window count; a pair's latency runs
from sending Acquire to Release's answer. The CPU used by the server, the
clients and everything else on the machine is measured for each window: on a
shared machine a level is measured again when other processes took CPU.
Writes bench/results/admission-<date>.json and admission-latest.json, prints a
table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import BinaryIO

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchkit import busy_cpu_seconds, cpu_model, cpu_seconds, git_commit, wait_quiet  # noqa: E402
import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from lmx.v1 import admission_pb2 as pb  # noqa: E402
from lmx.v1 import admission_pb2_grpc  # noqa: E402

SERVICE = "lmx.v1.AdmissionService"
MiB = 1 << 20
GiB = 1 << 30
PURPOSES = (pb.PURPOSE_WEIGHTS, pb.PURPOSE_KV, pb.PURPOSE_WORKSPACE, pb.PURPOSE_OTHER)


# ---- the machine ----------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the servers ----------------------------------------------------------
SERVERS = ("admission", "null")


def server_command(kind: str, port: int, device_gib: int, extra: list[str]) -> list[str]:
    if kind == "admission":
        return [sys.executable, "-m", "services.admission", "--listen", f"127.0.0.1:{port}",
                "--device", f"cpu:0={device_gib}GiB", "--log-level", "warning",
                "--log-format", "json", "--grace-s", "2", *extra]
    return [sys.executable, "bench/null_server.py", "--listen",
            f"127.0.0.1:{port}"]


def start_server(cmd: list[str], log: BinaryIO) -> subprocess.Popen:
    # stderr to a file, not a pipe: a pipe nobody reads could fill and stall the server.
    return subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=log)


def read_log(log: BinaryIO) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")


async def wait_serving(address: str, proc: subprocess.Popen, log: BinaryIO,
                       timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {read_log(log)}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                         timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not SERVING after {timeout_s} s")
            await asyncio.sleep(0.05)


def stop_server(proc: subprocess.Popen, timeout_s: float = 15.0) -> int:
    """SIGTERM, then the exit code (-9 if it had to be killed)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# ---- the clients (each in its own process) ------------------------------------
async def _client_loops(address: str, num_tasks: int, max_bytes: int, seed: int,
                        measure_from: float, measure_to: float) -> dict:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    pid = os.getpid()
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = admission_pb2_grpc.AdmissionServiceStub(channel)
        acquire, release = stub.Acquire, stub.Release

        async def loop(index: int) -> None:
            rng = random.Random(seed * 100_003 + index)
            holder = pb.Holder(name=f"bench/client-{pid}-{index}", pid=pid)
            perf = time.perf_counter
            clock = time.monotonic
            while True:
                now = clock()
                if now >= measure_to:
                    return
                request = pb.AcquireRequest(holder=holder, bytes=rng.randint(MiB, max_bytes),
                                            purpose=rng.choice(PURPOSES))
                start = perf()
                try:
                    lease = (await acquire(request, timeout=10)).lease
                    await release(pb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch),
                                  timeout=10)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1  # in the warm-up too: there should be none
                    continue
                elapsed = perf() - start
                if measure_from <= clock() < measure_to:
                    latencies.append(elapsed)

        await asyncio.gather(*(loop(i) for i in range(num_tasks)))
    return {"latencies": latencies, "errors": dict(errors)}


def client_process(address: str, num_tasks: int, max_bytes: int, seed: int,
                   measure_from: float, measure_to: float, out: mp.Queue) -> None:
    out.put(asyncio.run(_client_loops(address, num_tasks, max_bytes, seed,
                                      measure_from, measure_to)))


# ---- one concurrency level ------------------------------------------------
def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def run_level(address: str, server_pid: int | None, concurrency: int, num_procs: int,
              warmup_s: float, duration_s: float, max_bytes: int, seed: int) -> dict:
    ctx = mp.get_context("spawn")  # no fork after grpc has started in this process
    queue: mp.Queue = ctx.Queue()
    num_procs = min(num_procs, concurrency)
    shares = [concurrency // num_procs + (1 if i < concurrency % num_procs else 0)
              for i in range(num_procs)]
    # Spawning takes a moment: leave time for it before the warm-up starts.
    start_at = time.monotonic() + 1.5
    measure_from = start_at + warmup_s
    measure_to = measure_from + duration_s
    procs = [ctx.Process(target=client_process,
                         args=(address, share, max_bytes, seed + i, measure_from, measure_to,
                               queue), daemon=True)
             for i, share in enumerate(shares)]
    for proc in procs:
        proc.start()

    def sample() -> tuple[float, float, float]:
        return (cpu_seconds(server_pid) if server_pid else 0.0,
                sum(cpu_seconds(proc.pid) for proc in procs), busy_cpu_seconds())

    time.sleep(max(0.0, measure_from - time.monotonic()))
    server0, clients0, busy0 = sample()
    time.sleep(max(0.0, measure_to - time.monotonic()))
    server1, clients1, busy1 = sample()
    results = [queue.get(timeout=60 + warmup_s + duration_s) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        if proc.exitcode != 0:
            raise RuntimeError(f"client process exited with {proc.exitcode}")

    latencies = sorted(x for r in results for x in r["latencies"])
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    ms = [x * 1000 for x in latencies]
    return {
        "concurrency": concurrency,
        "client_procs": num_procs,
        "pairs": len(ms),
        "pairs_per_s": round(len(ms) / duration_s, 1),
        "latency_ms": {
            "p50": _round(percentile(ms, 50)),
            "p90": _round(percentile(ms, 90)),
            "p99": _round(percentile(ms, 99)),
            "max": round(ms[-1], 3) if ms else None,
            "mean": round(sum(ms) / len(ms), 3) if ms else None,
        },
        # Failed calls during the warm-up and the window.
        "errors": sum(errors.values()),
        "errors_by_code": dict(errors),
        # CPU use during the measured window, in cores (1.0 = one core busy):
        # the server, the client processes, and everything else on the machine
        # (anything well above 0 means the numbers were disturbed).
        "cpu_cores": {
            "server": round((server1 - server0) / duration_s, 2) if server_pid else None,
            "clients": round((clients1 - clients0) / duration_s, 2),
            "other": round((busy1 - busy0 - (server1 - server0) - (clients1 - clients0))
                           / duration_s, 2),
        },
        # CPU time per pair, a figure that other load on the machine disturbs less.
        "cpu_us_per_pair": {
            "server": round((server1 - server0) / len(ms) * 1e6) if server_pid and ms else None,
            "clients": round((clients1 - clients0) / len(ms) * 1e6) if ms else None,
        },
    }


# ---- main -----------------------------------------------------------------
TARGET = {"p99_ms_below": 2.0, "pairs_per_s_at_least": 5000}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4,16,64",
                        help="comma-separated numbers of concurrent clients [1,4,16,64]")
    parser.add_argument("--client-procs", type=int, default=1,
                        help="client processes sharing the N clients (each at most N) [1]")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="per N, not counted [1]")
    parser.add_argument("--duration-s", type=float, default=5.0, help="measured, per N [5]")
    parser.add_argument("--device-gib", type=int, default=64,
                        help="simulated device size in GiB [64]")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the do-nothing server (bench/null_server.py) that shows "
                             "what grpc.aio alone costs on this machine")
    parser.add_argument("--quiet-wait-s", type=float, default=60.0,
                        help="before each N, wait up to this long for other load on the "
                             "machine to stop [60]")
    parser.add_argument("--max-other-cores", type=float, default=0.15,
                        help="a level during which other processes used more CPU than this "
                             "is disturbed, and measured again [0.15]")
    parser.add_argument("--attempts", type=int, default=4,
                        help="at most this many measurements of a level [4]")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"),
                        help="folder for the JSON results [bench/results]")
    parser.add_argument("--address", default="",
                        help="measure this running server (HOST:PORT) instead, e.g. one under "
                             "a profiler")
    parser.add_argument("--server-pid", type=int, default=0,
                        help="with --address: the server's process id, to measure its CPU use")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra flag for the admission server (repeatable), "
                             "e.g. --server-arg=--cap-fraction=0.5")
    return parser.parse_args(argv)


class Target:
    """A server under test: started here (or given by --address)."""

    def __init__(self, kind: str, args: argparse.Namespace):
        self.kind = kind
        self.rows: list[dict] = []
        self.exit_code: int | None = None
        if args.address:
            self.cmd, self.address, self.proc = None, args.address, None
            self.pid = args.server_pid or None
        else:
            port = free_port()
            self.address = f"127.0.0.1:{port}"
            self.cmd = server_command(kind, port, args.device_gib, args.server_arg)
            self.log = tempfile.TemporaryFile()
            self.proc = start_server(self.cmd, self.log)
            self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.exit_code is None:
            self.exit_code = stop_server(self.proc)
            if self.exit_code:
                print(f"{self.kind} server exited with {self.exit_code}:\n{read_log(self.log)}",
                      file=sys.stderr)
            self.log.close()

    def report(self) -> dict:
        command = (" ".join(self.cmd).replace(sys.executable, "python") if self.cmd
                   else self.address)
        return {"server": command, "exit_code_after_sigterm": self.exit_code,
                "results": self.rows}


def measure_level(target: Target, n: int, args: argparse.Namespace, max_bytes: int) -> dict:
    """One level against one server. On a shared machine: wait for quiet, and
    measure again (a few times) when something else took CPU in the window."""
    earlier_errors = 0
    for attempt in range(1, args.attempts + 1):
        busy_before = wait_quiet(args.quiet_wait_s)
        row = run_level(target.address, target.pid, n, args.client_procs, args.warmup_s,
                        args.duration_s, max_bytes, args.seed)
        row["machine_busy_before_cores"] = busy_before
        row["attempt"] = attempt
        row["errors_in_earlier_attempts"] = earlier_errors
        earlier_errors += row["errors"]
        row["disturbed"] = row["cpu_cores"]["other"] > args.max_other_cores
        if not row["disturbed"]:
            break
        print(f"{target.kind:>9} N={n:<3} disturbed: other processes used "
              f"{row['cpu_cores']['other']:.2f} cores (attempt {attempt})",
              file=sys.stderr, flush=True)
    lat = row["latency_ms"]
    print(f"{target.kind:>9} N={n:<3} {row['pairs_per_s']:>7.0f} pairs/s  p50 {lat['p50']:.2f}  "
          f"p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  max {lat['max']:.2f} ms  "
          f"errors {row['errors']}  cpu cores {row['cpu_cores']}", file=sys.stderr, flush=True)
    return row


def measure(kinds: list[str], args: argparse.Namespace, levels: list[int],
            max_bytes: int) -> dict[str, dict]:
    """Start the servers, run each level against each in turn (so that a
    slow spell of the machine hits both alike), stop them."""
    targets: list[Target] = []
    try:
        for kind in kinds:
            targets.append(Target(kind, args))
        for target in targets:
            if target.proc is not None:
                asyncio.run(wait_serving(target.address, target.proc, target.log))
        for n in levels:
            for target in targets:
                target.rows.append(measure_level(target, n, args, max_bytes))
    finally:
        for target in targets:
            target.stop()
    return {target.kind: target.report() for target in targets}


def target_met(rows: list[dict]) -> list[int]:
    """The concurrencies at which both targets were met."""
    return [row["concurrency"] for row in rows
            if row["latency_ms"]["p99"] is not None
            and row["latency_ms"]["p99"] < TARGET["p99_ms_below"]
            and row["pairs_per_s"] >= TARGET["pairs_per_s_at_least"]]


def print_table(title: str, rows: list[dict]) -> None:
    print(title)
    print(f"{'N':>4} {'pairs/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'errors':>6} {'server cpu':>10} {'other cpu':>9}")
    for row in rows:
        lat, cpu = row["latency_ms"], row["cpu_cores"]
        server_cpu = "-" if cpu["server"] is None else f"{cpu['server']:.2f}"
        print(f"{row['concurrency']:>4} {row['pairs_per_s']:>9.0f} {lat['p50']:>8.2f} "
              f"{lat['p90']:>8.2f} {lat['p99']:>8.2f} {lat['max']:>8.2f} {row['errors']:>6} "
              f"{server_cpu:>10} {cpu['other']:>9.2f}"
              + ("  (disturbed by other load)" if row.get("disturbed") else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(n) for n in args.concurrency.split(",") if n.strip()]
    # Every client holds at most one lease at a time, each at most max_bytes:
    # all of them always fit under the 0.9 cap, so no request ever has to wait.
    max_bytes = min(512 * MiB, int(args.device_gib * GiB * 0.9) // max(levels))
    started = dt.datetime.now(dt.timezone.utc)
    kinds = ["admission"] if args.no_baseline or args.address else list(SERVERS)
    runs = measure(kinds, args, levels, max_bytes)
    admission = runs["admission"]

    report = {
        "benchmark": "admission: Acquire+Release pairs on loopback",
        "date": started.isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": {
            "cpu_model": cpu_model(),
            "cores": os.cpu_count(),
            "gpu": "none needed (simulated device)",
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "platform": platform.platform(),
        },
        "parameters": {
            "concurrency": levels,
            "client_procs": args.client_procs,
            "warmup_s": args.warmup_s,
            "duration_s": args.duration_s,
            "device": f"cpu:0={args.device_gib}GiB (simulated), cap fraction 0.9",
            "lease_bytes": [MiB, max_bytes],
            "wait_ms": 0,
            "client": "grpc.aio in spawned client processes (one channel each, N/P tasks), "
                      "separate from the server process",
            "pair_latency": "from sending Acquire to Release's answer; pairs finishing in the "
                            "measured window",
            "seed": args.seed,
            "max_other_cores": args.max_other_cores,
            "attempts": args.attempts,
        },
        "target": {**TARGET, "met_at_concurrency": target_met(admission["results"])},
        "admission": admission,
        "baseline_null_server": runs.get("null"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    dated = out / f"admission-{started.strftime('%Y-%m-%d')}.json"
    for path in (dated, out / "admission-latest.json"):
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)

    print(f"\nAcquire+Release on loopback: {cpu_model()}, {os.cpu_count()} cores, "
          f"{args.client_procs} client process(es), {args.duration_s:g} s per N "
          f"after {args.warmup_s:g} s warm-up; commit {report['git_commit']}")
    print_table("admission server:", admission["results"])
    if "null" in runs:
        print_table("baseline, do-nothing grpc.aio server:", runs["null"]["results"])
    met = report["target"]["met_at_concurrency"]
    print(f"target (p99 < {TARGET['p99_ms_below']:g} ms and >= "
          f"{TARGET['pairs_per_s_at_least']} pairs/s): "
          + (f"met at N = {', '.join(map(str, met))}" if met else "not met"))
    shown = dated.relative_to(ROOT) if dated.is_relative_to(ROOT) else dated
    print(f"results: {shown}")
    failed = any(run["exit_code_after_sigterm"] not in (0, None) or
                 any(row["errors"] or row["errors_in_earlier_attempts"]
                     for row in run["results"]) for run in runs.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
