"""KV store benchmark: park and restore bandwidth against context size, and
restore time against recomputing the same context (prefill), in one run.

Starts a real kvstore as its own process (`python -m services.kvstore` on a
free loopback port, a unique --store-id, a fresh --shm-dir under /dev/shm and
a temporary --state-dir, all removed at the end, even on failure) and drives
it with the worker's own code: services/worker/parking.py turns KVStorage
slots into bytes and back (kv_to_bytes / bytes_to_kv), and the worker's
KVStoreLink stub does the RPCs; the shared-memory copies and the CRC-32 are
services/kvstore/client.py's. The stages of KVStoreLink.park / fetch are timed
one by one:

  park     = gather (kv_to_bytes: KVStorage -> bytes) + Reserve RPC
             + copy into the shm region + CRC-32 + Commit RPC
  restore  = Open RPC + copy out of the shm region + CRC-32 check
             + scatter (bytes_to_kv: bytes -> KVStorage)

GB/s = entry bytes / stage time (10^9 bytes). Each size: one warm-up round,
then --repeats timed rounds; the median round (by park + restore) is shown.

Recompute: smollm2-135m (real weights from LMX_CACHE, CPU float32) through
the worker's Engine/ModelRunner: one prefill step of N tokens (the first N
tokens of README.md) into a KVStorage, one untimed warm-up step at the full
size, then --repeats timed (median); against parking that very KV and
restoring it into a second KVStorage (checked equal).

    .venv/bin/python bench/kvstore.py                 # make bench-kvstore

Writes bench/results/kvstore-<device>-<date>.json and kvstore-<device>-latest.json,
prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("LMX_CACHE", str(ROOT / ".cache" / "lmx"))

from benchkit import busy_cpu_seconds, cpu_model, cpu_seconds, git_commit, wait_quiet  # noqa: E402
import grpc  # noqa: E402
import torch  # noqa: E402

from lmx.v1 import kvstore_pb2 as pb  # noqa: E402
from services.common.launch import start_service  # noqa: E402
from services.kvstore.client import checksum, map_region  # noqa: E402
from services.kvstore.entry import Layout  # noqa: E402
from services.kvstore.servicer import layout_to_pb  # noqa: E402
from services.worker.kv_link import KVStoreLink  # noqa: E402
from services.worker.kv_storage import KVShape, KVStorage  # noqa: E402
from services.worker.parking import DTYPE_NAMES, bytes_to_kv, kv_to_bytes  # noqa: E402

KVSTORE_SERVICE = "lmx.v1.KVStoreService"
SHAPES = {
    # name: (layers, kv heads, head dim, dtype)
    "smollm2-135m": (30, 3, 64, torch.float32),    # 46,080 B/token
    "llama-1b": (16, 8, 64, torch.bfloat16),       # 32,768 B/token
}
SIZES_MIB = (1, 4, 16, 64, 256)
BLOCK_SIZE = 16
CHUNK_BYTES = 32 << 20  # the Engine's default chunk size


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def storage_for(shape: KVShape, num_tokens: int, device: torch.device) -> KVStorage:
    """A KVStorage chunked as the Engine chunks it, big enough for num_tokens."""
    per_block = BLOCK_SIZE * shape.bytes_per_token
    slots_per_chunk = max(1, CHUNK_BYTES // per_block) * BLOCK_SIZE
    storage = KVStorage(shape, slots_per_chunk, device)
    while storage.num_chunks * slots_per_chunk < num_tokens:
        storage.add_chunk()
    return storage


def fill_random(storage: KVStorage) -> None:
    gen = torch.Generator().manual_seed(0)
    for tensors in (storage._k, storage._v):
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))


def layout_of(shape: KVShape, model: str, num_tokens: int) -> Layout:
    return Layout(model=model, model_version="bench", dtype=DTYPE_NAMES[shape.dtype],
                  num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads,
                  head_dim=shape.head_dim, num_tokens=num_tokens, block_size=BLOCK_SIZE)


async def park_restore(link: KVStoreLink, storage: KVStorage, slots: list[int],
                       layout: Layout, target: KVStorage, target_slots: list[int]) -> dict:
    """One park and one restore, stage by stage, as KVStoreLink.park/fetch and
    Parking.park/_fill do them (without the to_thread hops)."""
    secret = uuid.uuid4().hex
    t = {}
    t0 = time.perf_counter()
    data = kv_to_bytes(storage, slots)
    t1 = time.perf_counter()
    reserved = await link.stub.Reserve(pb.ReserveRequest(
        owner="bench", session_id="bench-" + secret[:8], secret=secret,
        layout=layout_to_pb(layout), token_ids=list(range(len(slots))), metadata=b"{}"),
        timeout=60)
    t2 = time.perf_counter()
    with map_region(reserved.region, writable=True) as view:
        view[:] = data
    t3 = time.perf_counter()
    crc = checksum(data)
    t4 = time.perf_counter()
    await link.stub.Commit(pb.CommitRequest(entry_id=reserved.entry_id, secret=secret,
                                            checksum=crc), timeout=60)
    t5 = time.perf_counter()
    t.update(park_gather=t1 - t0, park_reserve_rpc=t2 - t1, park_copy_to_shm=t3 - t2,
             park_checksum=t4 - t3, park_commit_rpc=t5 - t4, park_total=t5 - t0)
    del data
    t0 = time.perf_counter()
    opened = await link.stub.Open(pb.OpenRequest(entry_id=reserved.entry_id, secret=secret),
                                  timeout=60)
    t1 = time.perf_counter()
    with map_region(opened.region) as view:
        back = bytes(view)
    t2 = time.perf_counter()
    ok = len(back) == opened.entry.num_bytes and checksum(back) == opened.entry.checksum
    t3 = time.perf_counter()
    if not ok:
        raise RuntimeError("checksum mismatch on restore")
    bytes_to_kv(target, target_slots, back)
    t4 = time.perf_counter()
    t.update(restore_open_rpc=t1 - t0, restore_copy_from_shm=t2 - t1, restore_checksum=t3 - t2,
             restore_scatter=t4 - t3, restore_total=t4 - t0)
    await link.delete(reserved.entry_id, secret)
    t["bytes"] = len(back)
    return t


def restored_equal(a: KVStorage, b: KVStorage, slots_a: list[int],
                   slots_b: list[int] | None = None) -> bool:
    ka, va = a.read_tokens(torch.tensor(slots_a))
    kb, vb = b.read_tokens(torch.tensor(slots_b if slots_b is not None else slots_a))
    return torch.equal(ka, kb) and torch.equal(va, vb)


def raw_copy_and_crc(num_bytes: int) -> dict:
    """Baselines on the same machine: a plain single-threaded memcpy of
    num_bytes between two already faulted-in buffers (numpy.copyto), and
    zlib.crc32 of them; best of 5."""
    import numpy as np

    src = np.random.default_rng(0).integers(0, 255, num_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best_copy = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
    view = memoryview(src)
    best_crc = min(_timed(lambda: checksum(view)) for _ in range(5))
    return {"memcpy_s": best_copy, "crc32_s": best_crc}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summarise(rounds: list[dict]) -> dict:
    ordered = sorted(rounds, key=lambda r: r["park_total"] + r["restore_total"])
    mid = ordered[(len(ordered) - 1) // 2]
    n = mid["bytes"]
    out = {k: round(v * 1000, 3) for k, v in mid.items() if k != "bytes"}
    out = {k + "_ms": v for k, v in out.items()}
    out["park_gb_s"] = round(n / mid["park_total"] / 1e9, 3)
    out["restore_gb_s"] = round(n / mid["restore_total"] / 1e9, 3)
    out["park_total_ms_runs"] = [round(r["park_total"] * 1000, 2) for r in rounds]
    out["restore_total_ms_runs"] = [round(r["restore_total"] * 1000, 2) for r in rounds]
    return out


async def bandwidth(address: str, repeats: int, sizes_mib: list[int], quiet_wait_s: float) -> list[dict]:
    rows = []
    link = KVStoreLink(address, owner="bench")
    device = torch.device("cpu")
    try:
        for name, (layers, heads, dim, dtype) in SHAPES.items():
            shape = KVShape(layers, heads, dim, dtype)
            for mib in sizes_mib:
                tokens = -(-(mib << 20) // shape.bytes_per_token)
                source = storage_for(shape, tokens, device)
                fill_random(source)
                target = storage_for(shape, tokens, device)
                slots = list(range(tokens))
                layout = layout_of(shape, name, tokens)
                await park_restore(link, source, slots, layout, target, slots)  # warm-up
                busy = wait_quiet(quiet_wait_s)
                load = load_average()
                rounds = [await park_restore(link, source, slots, layout, target, slots)
                          for _ in range(repeats)]
                ok = restored_equal(source, target, slots)
                row = {"shape": name, "tokens": tokens, "bytes": rounds[0]["bytes"],
                       "bytes_per_token": shape.bytes_per_token, **summarise(rounds),
                       "restored_equal": ok, "load_average_before": load,
                       "machine_busy_before_cores": busy}
                raw = raw_copy_and_crc(row["bytes"])
                row["raw_memcpy_ms"] = round(raw["memcpy_s"] * 1000, 3)
                row["raw_crc32_ms"] = round(raw["crc32_s"] * 1000, 3)
                rows.append(row)
                print(f"{name:13} {tokens:6d} tok {row['bytes'] / 2**20:7.1f} MiB  park "
                      f"{row['park_total_ms']:8.1f} ms {row['park_gb_s']:6.2f} GB/s  restore "
                      f"{row['restore_total_ms']:8.1f} ms {row['restore_gb_s']:6.2f} GB/s  "
                      f"(copy->shm {row['park_copy_to_shm_ms']:.1f}, crc {row['park_checksum_ms']:.1f}, "
                      f"gather {row['park_gather_ms']:.1f}, scatter {row['restore_scatter_ms']:.1f}) "
                      f"equal={ok}", file=sys.stderr, flush=True)
                del source, target
    finally:
        await link.close()
    return rows


async def recompute(address: str, kvstore_pid: int, model_name: str, contexts: list[int], repeats: int,
                    quiet_wait_s: float) -> tuple[list[dict], dict]:
    from services.worker.engine import Engine
    from services.worker.memory import FixedMemory
    from services.worker.models import default_cache_dir, load_model
    from services.worker.runner import StepItem
    from services.worker.sampling import SamplingParams

    started = time.perf_counter()
    loaded = load_model(model_name, cache=default_cache_dir(), device=torch.device("cpu"),
                        dtype=torch.float32)
    load_s = time.perf_counter() - started
    text = (ROOT / "README.md").read_text() * 20
    ids_all = loaded.tokenizer(text)["input_ids"]
    rows = []
    link = KVStoreLink(address, owner="bench")
    try:
        for n in contexts:
            ids = ids_all[:n]
            engine = Engine(loaded, FixedMemory(1 << 40), max_prefill_tokens=max(2048, n))
            while engine.pool.num_blocks * BLOCK_SIZE < n:
                engine.pool.add_chunk()
                engine.storage.add_chunk()
            slots = engine.pool.append("ctx", n)
            item = StepItem(ids, slots, slots, SamplingParams(max_tokens=1), None)
            engine.runner.step([item])  # warm-up at the full size
            busy = wait_quiet(quiet_wait_s)
            load = load_average()
            prefill = []
            kv0, busy0, w0 = cpu_seconds(kvstore_pid), busy_cpu_seconds(), time.perf_counter()
            for _ in range(repeats):
                t0 = time.perf_counter()
                engine.runner.step([item])
                prefill.append(time.perf_counter() - t0)
            wall = time.perf_counter() - w0
            kv_cores = round((cpu_seconds(kvstore_pid) - kv0) / wall, 2)
            machine_cores = round((busy_cpu_seconds() - busy0) / wall, 2)
            target = storage_for(loaded.kv_shape, n, torch.device("cpu"))
            layout = layout_of(loaded.kv_shape, model_name, n)
            tslots = list(range(n))
            await park_restore(link, engine.storage, slots, layout, target, tslots)  # warm-up
            rounds = [await park_restore(link, engine.storage, slots, layout, target, tslots)
                      for _ in range(repeats)]
            ok = restored_equal(engine.storage, target, slots, tslots)
            s = summarise(rounds)
            pre = statistics.median(prefill)
            row = {"model": model_name, "tokens": n, "bytes": rounds[0]["bytes"],
                   "prefill_ms": round(pre * 1000, 1),
                   "prefill_ms_min": round(min(prefill) * 1000, 1),
                   "prefill_ms_runs": [round(p * 1000, 1) for p in prefill],
                   "restore_ms": s["restore_total_ms"], "park_ms": s["park_total_ms"],
                   "restore_detail": s, "prefill_over_restore": round(pre * 1000 / s["restore_total_ms"], 1),
                   "restored_equal": ok, "load_average_before": load,
                   "machine_busy_before_cores": busy,
                   "during_prefill_cores": {"kvstore": kv_cores, "machine": machine_cores}}
            rows.append(row)
            print(f"{model_name} {n:5d} tok  prefill {row['prefill_ms']:8.1f} ms  restore "
                  f"{row['restore_ms']:7.1f} ms  park {row['park_ms']:7.1f} ms  "
                  f"prefill/restore {row['prefill_over_restore']}x  equal={ok}  "
                  f"cores during prefill {row['during_prefill_cores']}",
                  file=sys.stderr, flush=True)
            del engine, target
    finally:
        await link.close()
    return rows, {"load_s": round(load_s, 1), "torch_threads": torch.get_num_threads()}


def machine_info() -> dict:
    import transformers
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "grpcio": grpc.__version__, "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def print_tables(result: dict) -> None:
    print("\nPark and restore through the kvstore (median round; ms and GB/s)")
    print("| shape | tokens | MiB | park ms | park GB/s | restore ms | restore GB/s | "
          "gather | copy→shm | CRC park | Reserve+Commit | Open | copy←shm | CRC restore | "
          "scatter | raw memcpy | raw CRC |")
    print("| --- |" + " ---: |" * 16)
    for r in result["bandwidth"]:
        print(f"| {r['shape']} | {r['tokens']:,} | {r['bytes'] / 2**20:.1f} | "
              f"{r['park_total_ms']:.1f} | {r['park_gb_s']:.2f} | {r['restore_total_ms']:.1f} | "
              f"{r['restore_gb_s']:.2f} | {r['park_gather_ms']:.1f} | {r['park_copy_to_shm_ms']:.1f} | "
              f"{r['park_checksum_ms']:.1f} | "
              f"{r['park_reserve_rpc_ms'] + r['park_commit_rpc_ms']:.1f} | "
              f"{r['restore_open_rpc_ms']:.1f} | {r['restore_copy_from_shm_ms']:.1f} | "
              f"{r['restore_checksum_ms']:.1f} | {r['restore_scatter_ms']:.1f} | "
              f"{r['raw_memcpy_ms']:.1f} | {r['raw_crc32_ms']:.1f} |")
    print("\nRestore against recomputing (prefill) the same context")
    print("| model | tokens | MiB | prefill ms | restore ms | prefill / restore | park ms |")
    print("| --- |" + " ---: |" * 6)
    for r in result["recompute"]:
        print(f"| {r['model']} | {r['tokens']:,} | {r['bytes'] / 2**20:.1f} | {r['prefill_ms']:.1f} | "
              f"{r['restore_ms']:.1f} | {r['prefill_over_restore']:.1f} | {r['park_ms']:.1f} |")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mib", default=",".join(map(str, SIZES_MIB)))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", default="512,1024,2048")
    p.add_argument("--quiet-wait-s", type=float, default=10.0)
    p.add_argument("--skip-recompute", action="store_true")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = [int(x) for x in args.sizes_mib.split(",") if x]
    contexts = [int(x) for x in args.contexts.split(",") if x]
    store_id = "bench_" + uuid.uuid4().hex[:10]
    shm_dir = Path(tempfile.mkdtemp(prefix="lmx-bench-kvstore-", dir="/dev/shm"))
    state_dir = Path(tempfile.mkdtemp(prefix="lmx-bench-kvstore-state-"))
    log_path = state_dir / "kvstore.log"
    kv_args = ["--store-id", store_id, "--shm-dir", str(shm_dir), "--state-dir", str(state_dir),
               "--capacity-bytes", "4GiB", "--when-full", "refuse", "--keep-on-stop", "false",
               "--log-format", "json", "--log-level", "warning"]
    started = dt.datetime.now(dt.timezone.utc)
    result = {"benchmark": "kvstore", "date": started.isoformat(timespec="seconds"),
              "commit": git_commit(), "machine": machine_info(),
              "load_average_start": load_average(),
              "kvstore_command": "python -m services.kvstore --listen 127.0.0.1:PORT "
                                 + " ".join(kv_args)}
    kvstore = None
    exit_code = None
    leftover: list[str] = []
    try:
        kvstore = start_service("services.kvstore", KVSTORE_SERVICE, kv_args,
                                log_path=log_path, timeout_s=60)
        result["bandwidth"] = asyncio.run(bandwidth(kvstore.address, args.repeats, sizes,
                                                    args.quiet_wait_s))
        if args.skip_recompute:
            result["recompute"] = []
        else:
            result["recompute"], result["recompute_info"] = asyncio.run(
                recompute(kvstore.address, kvstore.process.pid, args.model, contexts, args.repeats, args.quiet_wait_s))
    finally:
        if kvstore is not None:
            exit_code = kvstore.stop(30)
        leftover = sorted(p.name for p in shm_dir.iterdir()) if shm_dir.exists() else []
        shutil.rmtree(shm_dir, ignore_errors=True)
        if kvstore is not None and log_path.exists():
            tail = log_path.read_text(errors="replace")[-2000:]
            if tail.strip():
                print("kvstore log tail:\n" + tail, file=sys.stderr)
        shutil.rmtree(state_dir, ignore_errors=True)
    result["kvstore_exit_code_after_sigterm"] = exit_code
    result["shm_files_left_after_stop"] = leftover
    result["load_average_end"] = load_average()
    print_tables(result)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if result["machine"]["gpu"] else "cpu"
    for name in (f"kvstore-{dev}-{started.date().isoformat()}.json", f"kvstore-{dev}-latest.json"):
        (out_dir / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out_dir}/kvstore-{dev}-{started.date().isoformat()}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
