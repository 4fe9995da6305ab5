"""A context moved between two workers of one model, end to end through the
real services, against recomputing it (issue 22).

Starts admission, a kvstore and two workers of --model on --device (one
card: both workers on it), each as its own process, like
tests/gpu/test_kv_transfer_gpu.py. For each context length: a session on
worker 1 reads a prompt of about that many tokens, is parked there
(ParkSession) and restored on worker 2 (RestoreSession), the restored
session's next tokens checked against a control session that never moved;
against that, the same prompt read afresh by a new session on worker 2
(prefill: the time to its first token of a one-token Generate), each from
an empty KV pool there. Timed
through gRPC as a client sees it, median of --repeats rounds after one
warm-up round.

    python bench/kv_move.py --device cuda --model synthetic:llama-1b
    python bench/kv_move.py --device cpu --model synthetic:llama-tiny --contexts 256

Writes bench/results/kv-move-<device>-<model>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402

from benchkit import git_commit, write_report  # noqa: E402
from lmx.v1 import worker_pb2 as pb  # noqa: E402
from lmx.v1 import worker_pb2_grpc  # noqa: E402
from services.admission.app import SERVICE_NAME as ADMISSION  # noqa: E402
from services.common.launch import start_service  # noqa: E402
from services.kvstore.app import SERVICE_NAME as KVSTORE  # noqa: E402
from services.worker.app import SERVICE_NAME as WORKER  # noqa: E402

SENTENCE = "The traffic controller of a GPU shared by three agents keeps every one of them alive. "


def generate(stub, session, prompt: str, max_tokens: int) -> tuple[list[int], float]:
    """(token ids, seconds to the first one)."""
    ids, first = [], None
    started = time.perf_counter()
    for reply in stub.Generate(pb.GenerateRequest(
            session_id=session.session_id, token=session.token, prompt=prompt,
            sampling=pb.SamplingParams(max_tokens=max_tokens)), timeout=300):
        if reply.HasField("delta"):
            if first is None:
                first = time.perf_counter() - started
            ids.extend(reply.delta.token_ids)
    return ids, first or 0.0


def one_round(w1, w2, prompt: str) -> dict:
    """Recompute first, then the move: worker 2's KV pool is empty (shrunk
    at the last CloseSession) before each, so both grow it alike."""
    fresh = w2.OpenSession(pb.OpenSessionRequest(), timeout=30)
    _, recompute = generate(w2, fresh, prompt, 1)
    w2.CloseSession(pb.CloseSessionRequest(session_id=fresh.session_id, token=fresh.token),
                    timeout=30)
    control = w1.OpenSession(pb.OpenSessionRequest(), timeout=30)
    moved = w1.OpenSession(pb.OpenSessionRequest(), timeout=30)
    generate(w1, control, prompt, 1)
    generate(w1, moved, prompt, 1)
    t0 = time.perf_counter()
    parked = w1.ParkSession(pb.ParkSessionRequest(session_id=moved.session_id,
                                                  token=moved.token), timeout=120)
    t1 = time.perf_counter()
    restored = w2.RestoreSession(pb.RestoreSessionRequest(entry_id=parked.entry_id,
                                                          token=moved.token), timeout=120)
    t2 = time.perf_counter()
    again = SimpleNamespace(session_id=restored.session_id, token=moved.token)
    expected, _ = generate(w1, control, " and then", 8)
    went_on, _ = generate(w2, again, " and then", 8)
    for stub, session in ((w1, control), (w2, again)):
        stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id,
                                                 token=session.token), timeout=30)
    return {"tokens": parked.parked_tokens, "park": t1 - t0, "restore": t2 - t1,
            "move": t2 - t0, "recompute": recompute, "same_tokens": went_on == expected}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="synthetic:llama-1b")
    parser.add_argument("--contexts", default="1024,4096",
                        help="about this many tokens of prompt each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--log-dir", default="",
                        help="keep the services' logs here (default: removed with the run)")
    args = parser.parse_args(argv)
    contexts = [int(x) for x in args.contexts.split(",") if x]
    started = dt.datetime.now(dt.timezone.utc)
    tmp = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="lmx-kv-move-"))
    tmp.mkdir(parents=True, exist_ok=True)
    shm = Path(tempfile.mkdtemp(prefix="lmx-kv-move-", dir="/dev/shm"))
    backend = "nvml" if args.device == "cuda" else "simulated"
    procs = {}
    rows = []
    try:
        procs["admission"] = start_service(
            "services.admission", ADMISSION, ["--device-backend", backend, "--log-format", "json"],
            log_path=tmp / "admission.log")
        procs["kvstore"] = start_service(
            "services.kvstore", KVSTORE,
            ["--store-id", f"mv{secrets.token_hex(4)}", "--shm-dir", str(shm),
             "--state-dir", str(tmp / "kv"), "--keep-on-stop", "false",
             "--segment-bytes", "1GiB", "--log-format", "json"],
            log_path=tmp / "kvstore.log")
        for name in ("w1", "w2"):
            procs[name] = start_service(
                "services.worker", WORKER,
                ["--model", args.model, "--device", args.device,
                 "--max-context", str(max(contexts) * 2 + 256),
                 "--admission", procs["admission"].address,
                 "--kvstore", procs["kvstore"].address, "--log-format", "json"],
                log_path=tmp / f"{name}.log", timeout_s=600)
        with grpc.insecure_channel(procs["w1"].address) as c1, \
                grpc.insecure_channel(procs["w2"].address) as c2:
            w1, w2 = worker_pb2_grpc.WorkerServiceStub(c1), worker_pb2_grpc.WorkerServiceStub(c2)
            for n in contexts:
                prompt = SENTENCE * max(1, n // 18)
                one_round(w1, w2, prompt)            # warm-up: graphs checked, segment pinned
                rounds = [one_round(w1, w2, prompt) for _ in range(args.repeats)]
                mid = sorted(rounds, key=lambda r: r["move"])[(len(rounds) - 1) // 2]
                row = {"tokens": mid["tokens"],
                       **{f"{k}_ms": round(mid[k] * 1000, 2)
                          for k in ("park", "restore", "move", "recompute")},
                       "recompute_over_restore": round(mid["recompute"] / mid["restore"], 2),
                       "recompute_over_move": round(mid["recompute"] / mid["move"], 2),
                       "same_tokens": all(r["same_tokens"] for r in rounds),
                       "move_ms_runs": [round(r["move"] * 1000, 2) for r in rounds]}
                rows.append(row)
                print(f"{args.model} {row['tokens']} tokens: park {row['park_ms']} ms, restore "
                      f"{row['restore_ms']} ms on the other worker (move {row['move_ms']} ms); "
                      f"recompute there {row['recompute_ms']} ms ({row['recompute_over_restore']}x "
                      f"the restore); same tokens after the move: {row['same_tokens']}",
                      flush=True)
    finally:
        codes = {name: procs[name].stop() for name in ("w2", "w1", "kvstore", "admission")
                 if name in procs}
        shutil.rmtree(shm, ignore_errors=True)
        if not args.log_dir:
            shutil.rmtree(tmp, ignore_errors=True)
    report = {"benchmark": "kv_move", "date": started.isoformat(timespec="seconds"),
              "commit": git_commit(), "device": args.device, "model": args.model,
              "card": _card(args.device), "exit_codes": codes, "rows": rows}
    name = args.model.replace(":", "-")
    write_report(report, Path(args.out_dir) / f"kv-move-{args.device}-{name}-"
                                              f"{started.date().isoformat()}.json")
    return 0 if rows and all(r["same_tokens"] for r in rows) else 1


def _card(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
