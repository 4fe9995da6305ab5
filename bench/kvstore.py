"""KV store benchmark: park and restore bandwidth against context size, and
restore time against recomputing the same context (prefill), in one run, on
the CPU or a CUDA GPU (--device; default cuda when there is one).

Starts a real kvstore as its own process (`python -m services.kvstore` on a
free loopback port, a unique --store-id, a fresh --shm-dir under /dev/shm and
a temporary --state-dir, all removed at the end, even on failure) and drives
it with the worker's own code: the worker's KVStoreLink makes the RPCs and
services/worker/kv_transfer.py's KVTransfer copies between a KVStorage (on
the device) and the shared-memory region, computing the sum64 checksum on the
device, exactly as Parking does. Stages, timed one by one:

  park     = Reserve RPC + KVTransfer.park (gather, checksum, copy into the
             region; on a GPU asynchronous on a side stream, from pinned
             segments) + Commit RPC
  restore  = Open RPC + KVTransfer.restore (copy out of the region, checksum,
             scatter into the pool)
  own restore = KVTransfer.restore from where the park wrote the entry, beside
             the Open RPC (a worker unparking its own session:
             Parking._fill_where_parked)

GB/s = entry bytes / stage time (10^9 bytes). Each size: one warm-up round
(its park maps the segment and, on a GPU, registers it with cudaHostRegister:
reported as first_park_ms), then --repeats timed rounds; the median round (by
park + restore) is shown. Baselines on the same machine: on the CPU a plain
memcpy and numpy's sum64 of the same bytes; on a GPU a pinned host<->device
copy of the same bytes (torch, cudaMemcpyAsync), the ceiling.

Restore stall: --stall-sessions sessions decode through the worker's own
WorkerCore while a parked session of --stall-context tokens is restored;
the longest gap between two of their tokens during the restore, in median
gaps before it (1: no stall).

Recompute: one prefill step of N tokens (the first N tokens of README.md)
through the worker's Engine/ModelRunner into a KVStorage (one untimed warm-up
step, then --repeats timed, median), against parking that very KV and
restoring it into a second KVStorage (checked equal). --model: smollm2-135m
(real weights from LMX_CACHE) or a synthetic:<shape> (random weights, real
architecture).

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

from services.common.launch import start_service  # noqa: E402
from services.kvstore.checksum import checksum  # noqa: E402
from services.kvstore.entry import Layout  # noqa: E402
from services.worker.kv_link import KVStoreLink  # noqa: E402
from services.worker.kv_storage import KVShape, KVStorage  # noqa: E402
from services.worker.kv_transfer import KVTransfer  # noqa: E402
from services.worker.parking import DTYPE_NAMES  # noqa: E402

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
    gen = torch.Generator(device=storage.device).manual_seed(0)
    for tensors in (storage._k, storage._v):
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=gen, device=storage.device).to(t.dtype))


def layout_of(shape: KVShape, model: str, num_tokens: int) -> Layout:
    return Layout(model=model, model_version="bench", dtype=DTYPE_NAMES[shape.dtype],
                  num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads,
                  head_dim=shape.head_dim, num_tokens=num_tokens, block_size=BLOCK_SIZE)


async def park_restore(link: KVStoreLink, transfer: KVTransfer, slots: list[int],
                       layout: Layout, target: KVTransfer, target_slots: list[int],
                       ahead=None) -> dict:
    """One park and one restore, stage by stage, as Parking.park and _fill do
    them (without the to_thread hops); with `ahead` (a region held ahead,
    kv_link.Held), a second park through it as a worker parks into its held
    region (copy, then one Place); t["ahead"] is the next hold."""
    secret = uuid.uuid4().hex
    t = {}
    if ahead is not None:
        t0 = time.perf_counter()
        crc = transfer.park(slots, ahead.region.prefix(layout.num_bytes))
        t1 = time.perf_counter()
        entry_id, t["ahead"] = await link.place(ahead, layout, "bench-" + secret[:8], secret,
                                                list(range(len(slots))), b"{}", crc)
        t2 = time.perf_counter()
        t.update(park_held_copy=t1 - t0, park_place_rpc=t2 - t1, park_held_total=t2 - t0)
        await link.delete(entry_id, secret)
    t0 = time.perf_counter()
    reserved = await link.reserve(layout, "bench-" + secret[:8], secret,
                                  list(range(len(slots))), b"{}")
    t1 = time.perf_counter()
    crc = transfer.park(slots, reserved.region)
    t2 = time.perf_counter()
    await link.commit(reserved.entry_id, secret, crc)
    t3 = time.perf_counter()
    t.update(park_reserve_rpc=t1 - t0, park_copy=t2 - t1, park_commit_rpc=t3 - t2,
             park_total=t3 - t0)
    t0 = time.perf_counter()
    opened = await link.open(reserved.entry_id, secret)
    t1 = time.perf_counter()
    target.restore(target_slots, opened.region, opened.checksum)
    t2 = time.perf_counter()
    t.update(restore_open_rpc=t1 - t0, restore_copy=t2 - t1, restore_total=t2 - t0)
    # A worker's own parked session (Parking._fill_where_parked): the copy from
    # where the park wrote it runs while Open confirms the entry is there.
    t0 = time.perf_counter()
    again, _ = await asyncio.gather(
        link.open(reserved.entry_id, secret, contents=False),
        asyncio.to_thread(target.restore, target_slots, reserved.region, crc))
    t["restore_own_total"] = time.perf_counter() - t0
    assert again.region == reserved.region and again.checksum == crc
    await link.delete(reserved.entry_id, secret)
    t["bytes"] = layout.num_bytes
    return t


def restored_equal(a: KVStorage, b: KVStorage, slots_a: list[int],
                   slots_b: list[int] | None = None) -> bool:
    ka, va = a.read_tokens(torch.tensor(slots_a))
    kb, vb = b.read_tokens(torch.tensor(slots_b if slots_b is not None else slots_a))
    return torch.equal(ka, kb) and torch.equal(va, vb)


def raw_baselines(num_bytes: int, device: torch.device) -> dict:
    """The same bytes on the same machine, best of 5: on the CPU a plain
    single-threaded memcpy between two buffers already faulted in
    (numpy.copyto) and numpy's sum64; on a GPU a pinned host-to-device and
    device-to-host copy (torch; cudaMemcpyAsync, then a sync)."""
    import numpy as np

    if device.type == "cuda":
        host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
        host.random_(0, 255)
        dev = torch.empty(num_bytes, dtype=torch.uint8, device=device)

        def copy(dst, src):
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)

        copy(dev, host)
        return {"h2d_s": min(_timed(lambda: copy(dev, host)) for _ in range(5)),
                "d2h_s": min(_timed(lambda: copy(host, dev)) for _ in range(5))}
    src = np.random.default_rng(0).integers(0, 255, num_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best_copy = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
    view = memoryview(src)
    best_sum = min(_timed(lambda: checksum(view)) for _ in range(5))
    return {"memcpy_s": best_copy, "sum64_s": best_sum}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summarise(rounds: list[dict]) -> dict:
    ordered = sorted(rounds, key=lambda r: r["park_total"] + r["restore_total"])
    mid = ordered[(len(ordered) - 1) // 2]
    n = mid["bytes"]
    out = {k: round(v * 1000, 3) for k, v in mid.items() if k not in ("bytes", "ahead")}
    out = {k + "_ms": v for k, v in out.items()}
    out["park_gb_s"] = round(n / mid["park_total"] / 1e9, 3)
    out["restore_gb_s"] = round(n / mid["restore_total"] / 1e9, 3)
    out["restore_own_gb_s"] = round(n / mid["restore_own_total"] / 1e9, 3)
    if "park_held_total" in mid:
        out["park_held_gb_s"] = round(n / mid["park_held_total"] / 1e9, 3)
    out["park_total_ms_runs"] = [round(r["park_total"] * 1000, 2) for r in rounds]
    out["restore_total_ms_runs"] = [round(r["restore_total"] * 1000, 2) for r in rounds]
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


async def bandwidth(address: str, device: torch.device, repeats: int, sizes_mib: list[int],
                    quiet_wait_s: float) -> list[dict]:
    rows = []
    link = KVStoreLink(address, owner="bench")
    try:
        for name, (layers, heads, dim, dtype) in SHAPES.items():
            shape = KVShape(layers, heads, dim, dtype)
            for mib in sizes_mib:
                tokens = -(-(mib << 20) // shape.bytes_per_token)
                source = storage_for(shape, tokens, device)
                fill_random(source)
                target = storage_for(shape, tokens, device)
                park_with, restore_with = KVTransfer(source), KVTransfer(target)
                slots = list(range(tokens))
                layout = layout_of(shape, name, tokens)
                _sync(device)
                # A region held ahead, as a worker holds one (Parking.hold_ahead;
                # the kvstore gives at most 1/8 of its capacity a hold).
                ahead = await link.hold(layout.num_bytes, uuid.uuid4().hex)
                if ahead.region.length < layout.num_bytes:
                    await link.release_hold(ahead)
                    ahead = None
                else:
                    park_with.prepare(ahead.region)
                first = await park_restore(link, park_with, slots, layout, restore_with, slots,
                                           ahead)
                ahead = first.get("ahead")
                busy = wait_quiet(quiet_wait_s)
                load = load_average()
                rounds = []
                for _ in range(repeats):
                    rounds.append(await park_restore(link, park_with, slots, layout,
                                                     restore_with, slots, ahead))
                    ahead = rounds[-1].get("ahead")
                if ahead is not None:
                    await link.release_hold(ahead)
                ok = restored_equal(source, target, slots)
                row = {"shape": name, "tokens": tokens, "bytes": rounds[0]["bytes"],
                       "bytes_per_token": shape.bytes_per_token, **summarise(rounds),
                       "first_park_ms": round(first["park_total"] * 1000, 2),
                       "first_restore_ms": round(first["restore_total"] * 1000, 2),
                       "restored_equal": ok, "load_average_before": load,
                       "machine_busy_before_cores": busy,
                       "segments_pinned": park_with.segments.pin and not park_with.segments.pin_failed}
                raw = raw_baselines(row["bytes"], device)
                row.update({f"raw_{k[:-2]}_ms": round(v * 1000, 3) for k, v in raw.items()})
                if device.type == "cuda":   # end to end against the bare copy of the same bytes
                    row["park_of_raw"] = round(raw["d2h_s"] * 1000 / row["park_total_ms"], 3)
                    if "park_held_total_ms" in row:
                        row["park_held_of_raw"] = round(raw["d2h_s"] * 1000
                                                        / row["park_held_total_ms"], 3)
                    row["restore_of_raw"] = round(raw["h2d_s"] * 1000 / row["restore_total_ms"], 3)
                    row["restore_own_of_raw"] = round(raw["h2d_s"] * 1000
                                                      / row["restore_own_total_ms"], 3)
                rows.append(row)
                print(f"{name:13} {tokens:6d} tok {row['bytes'] / 2**20:7.1f} MiB  park "
                      f"{row['park_total_ms']:8.2f} ms {row['park_gb_s']:6.2f} GB/s  restore "
                      f"{row['restore_total_ms']:8.2f} ms {row['restore_gb_s']:6.2f} GB/s  "
                      f"(first park {row['first_park_ms']:.1f} ms; raw "
                      f"{', '.join(f'{k[:-2]}={v * 1000:.2f} ms' for k, v in raw.items())}) equal={ok}",
                      file=sys.stderr, flush=True)
                park_with.close()
                restore_with.close()
                del source, target, park_with, restore_with
    finally:
        await link.close()
    return rows


async def control_path(address: str, kept: list[int], tokens: list[int],
                       rounds: int) -> list[dict]:
    """The RPCs around the copies, alone: Reserve, Commit, Place (into a
    region held ahead: a worker's park in one round trip), Open (as a worker
    restoring its own parked session: no token ids back), Open with the
    contents (a session restored on another worker) and Delete of an entry
    of `tokens` token ids (1 MiB of llama-1b's layout, never written),
    median of `rounds`, with `kept` other entries of 4,096 tokens
    parked meanwhile (1 MiB each: their token ids are what the store's
    bookkeeping grows with); and a
    GetStoreStatus, the round trip's floor on this machine."""
    from lmx.v1 import kvstore_pb2 as kpb

    rows = []
    link = KVStoreLink(address, owner="bench-control")
    held: list[tuple[str, str]] = []
    try:
        shape = KVShape(*SHAPES["llama-1b"])
        for count in kept:
            while len(held) < count:
                secret = uuid.uuid4().hex
                # 4,096 token ids in 1 MiB (one layer, one head): the ids are
                # what the store's bookkeeping grows with, not the bytes.
                reserved = await link.reserve(layout_of(KVShape(1, 1, 64, torch.bfloat16),
                                                        "kept", 4096), "kept", secret,
                                              list(range(4096)), b"{}")
                await link.commit(reserved.entry_id, secret, 0)
                held.append((reserved.entry_id, secret))
            for num_tokens in tokens:
                layout = layout_of(shape, "control", num_tokens)
                times: dict[str, list[float]] = {
                    k: [] for k in ("reserve", "commit", "open", "open_contents", "delete",
                                    "status", "place")}
                # A worker's park through its region held ahead: one Place,
                # whose reply holds the next region (Parking._park_in_hold).
                ahead = await link.hold(layout.num_bytes, uuid.uuid4().hex)
                for _ in range(rounds):
                    secret = uuid.uuid4().hex
                    t0 = time.perf_counter()
                    reserved = await link.reserve(layout, "control", secret,
                                                  list(range(num_tokens)), b"{}")
                    t1 = time.perf_counter()
                    await link.commit(reserved.entry_id, secret, 0)
                    t2 = time.perf_counter()
                    await link.open(reserved.entry_id, secret, contents=False)
                    t3 = time.perf_counter()
                    await link.open(reserved.entry_id, secret)
                    t4 = time.perf_counter()
                    await link.delete(reserved.entry_id, secret)
                    t5 = time.perf_counter()
                    await link.stub.GetStoreStatus(kpb.GetStoreStatusRequest(), timeout=30)
                    t6 = time.perf_counter()
                    entry_id, ahead = await link.place(ahead, layout, "control", secret,
                                                       list(range(num_tokens)), b"{}", 0)
                    t7 = time.perf_counter()
                    await link.delete(entry_id, secret)
                    for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4,
                                                  t6 - t5, t7 - t6)):
                        times[key].append(value)
                await link.release_hold(ahead)
                row = {"kept_entries": count, "tokens": num_tokens, "rounds": rounds,
                       **{f"{k}_ms": round(statistics.median(v) * 1000, 3)
                          for k, v in times.items()}}
                row["park_fixed_ms"] = round(row["reserve_ms"] + row["commit_ms"], 3)
                row["park_held_fixed_ms"] = row["place_ms"]
                row["restore_fixed_ms"] = row["open_ms"]
                rows.append(row)
                print(f"control: {count:3d} kept, {num_tokens:5d} tokens: "
                      + ", ".join(f"{k} {row[k + '_ms']:.2f} ms" for k in times),
                      file=sys.stderr, flush=True)
    finally:
        for entry_id, secret in held:
            await link.delete(entry_id, secret)
        await link.close()
    return rows


async def recompute(address: str, kvstore_pid: int, model_name: str, device: torch.device,
                    contexts: list[int], repeats: int, quiet_wait_s: float) -> tuple[list[dict], dict]:
    from services.worker.engine import Engine
    from services.worker.memory import FixedMemory
    from services.worker.models import default_cache_dir, load_model
    from services.worker.runner import StepItem
    from services.worker.sampling import SamplingParams

    started = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load_model(model_name, cache=default_cache_dir(), device=device, dtype=dtype,
                        max_context=max(contexts) + 16)
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
            _sync(device)
            busy = wait_quiet(quiet_wait_s)
            load = load_average()
            prefill = []
            kv0, busy0, w0 = cpu_seconds(kvstore_pid), busy_cpu_seconds(), time.perf_counter()
            for _ in range(repeats):
                t0 = time.perf_counter()
                engine.runner.step([item])
                _sync(device)
                prefill.append(time.perf_counter() - t0)
            wall = time.perf_counter() - w0
            kv_cores = round((cpu_seconds(kvstore_pid) - kv0) / wall, 2)
            machine_cores = round((busy_cpu_seconds() - busy0) / wall, 2)
            target = storage_for(loaded.kv_shape, n, device)
            layout = layout_of(loaded.kv_shape, model_name, n)
            tslots = list(range(n))
            park_with, restore_with = KVTransfer(engine.storage), KVTransfer(target)
            await park_restore(link, park_with, slots, layout, restore_with, tslots)  # warm-up
            rounds = [await park_restore(link, park_with, slots, layout, restore_with, tslots)
                      for _ in range(repeats)]
            ok = restored_equal(engine.storage, target, slots, tslots)
            s = summarise(rounds)
            pre = statistics.median(prefill)
            row = {"model": model_name, "device": str(device), "dtype": DTYPE_NAMES[dtype],
                   "tokens": n, "bytes": rounds[0]["bytes"],
                   "prefill_ms": round(pre * 1000, 2),
                   "prefill_ms_min": round(min(prefill) * 1000, 2),
                   "prefill_ms_runs": [round(p * 1000, 2) for p in prefill],
                   "restore_ms": s["restore_total_ms"], "park_ms": s["park_total_ms"],
                   "restore_detail": s,
                   "prefill_over_restore": round(pre * 1000 / s["restore_total_ms"], 1),
                   "restore_own_ms": s["restore_own_total_ms"],
                   "prefill_over_restore_own": round(pre * 1000 / s["restore_own_total_ms"], 1),
                   "restored_equal": ok, "load_average_before": load,
                   "machine_busy_before_cores": busy,
                   "during_prefill_cores": {"kvstore": kv_cores, "machine": machine_cores}}
            rows.append(row)
            print(f"{model_name} {n:5d} tok  prefill {row['prefill_ms']:8.2f} ms  restore "
                  f"{row['restore_ms']:7.2f} ms  park {row['park_ms']:7.2f} ms  "
                  f"prefill/restore {row['prefill_over_restore']}x  equal={ok}",
                  file=sys.stderr, flush=True)
            park_with.close()
            restore_with.close()
            del engine, target, park_with, restore_with
    finally:
        await link.close()
    return rows, {"load_s": round(load_s, 1), "torch_threads": torch.get_num_threads()}


async def restore_stall(address: str, model_name: str, device: torch.device, context: int,
                        background: int, tokens: int) -> dict:
    """Other sessions' decode while one session's KV is restored (issue 22):
    `background` sessions generate `tokens` tokens each through WorkerCore
    (decode graphs on a GPU, not compiled), a session of `context` tokens
    parked in the real kvstore is unparked meanwhile (Parking.unpark, as a
    Generate on it does first), and each token's arrival is timed. The
    stall: the longest gap between two tokens of one background session
    that overlaps the restore, in units of the median gap before it."""
    from services.worker.core import WorkerCore
    from services.worker.engine import Engine, Finished
    from services.worker.memory import FixedMemory
    from services.worker.models import default_cache_dir, load_model
    from services.worker.parking import Parking
    from services.worker.sampling import SamplingParams
    from services.worker.sessions import SessionTable

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    loaded = load_model(model_name, cache=default_cache_dir(), device=device, dtype=dtype,
                        max_context=context + 512)
    ids = loaded.tokenizer((ROOT / "README.md").read_text() * 20)["input_ids"][:context]
    long_prompt = loaded.tokenizer.decode(ids)
    engine = Engine(loaded, FixedMemory(1 << 40), decode_graphs=cuda, compile_decode=False,
                    max_batch=max(8, background + 1), max_prefill_tokens=max(2048, context))
    engine.start()
    sessions = SessionTable()
    link = KVStoreLink(address, owner="bench-stall")
    parking = Parking(loaded, engine, sessions, link)
    core = WorkerCore(loaded, engine, sessions, parking)

    async def run(session, prompt, max_tokens, times=None):
        async for event in core.generate(session.session_id, session.token,
                                         SamplingParams(max_tokens=max_tokens), prompt=prompt):
            if times is not None and not isinstance(event, Finished):
                now = time.perf_counter()
                times.extend([now] * len(event.token_ids))

    try:
        parked = core.open_session().session
        await run(parked, long_prompt, 1)
        num_tokens = len(engine.kv_slots(parked))
        await core.park_session(parked.session_id, parked.token)
        others = [core.open_session().session for _ in range(background)]
        for session in others:        # their prompts in, graphs captured
            await run(session, "Once upon a time", 4)
        arrivals: list[list[float]] = [[] for _ in others]
        tasks = [asyncio.create_task(run(s, " and then", tokens, times))
                 for s, times in zip(others, arrivals)]
        while min(len(t) for t in arrivals) < tokens // 3:
            await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        await parking.unpark(parked)
        t1 = time.perf_counter()
        await asyncio.gather(*tasks)
    finally:
        parking.close()
        await engine.close()
        await link.close()
    before, during = [], []
    for times in arrivals:
        for a, b in zip(times, times[1:]):
            if b < t0:
                before.append(b - a)
            elif a < t1 and b > t0:
                during.append(b - a)
    step = statistics.median(before)
    worst = max(during, default=0.0)
    row = {"model": model_name, "device": str(device), "dtype": DTYPE_NAMES[dtype],
           "context_tokens": num_tokens, "bytes": parking.transfer.num_bytes(num_tokens),
           "background_sessions": background, "restore_ms": round((t1 - t0) * 1000, 2),
           "median_gap_before_ms": round(step * 1000, 3),
           "longest_gap_during_ms": round(worst * 1000, 3),
           "stall_steps": round(worst / step, 2) if step else None,
           "gaps_during": len(during)}
    print(f"stall: {model_name} restore of {num_tokens} tokens in {row['restore_ms']} ms beside "
          f"{background} decoding sessions: median gap {row['median_gap_before_ms']} ms before, "
          f"longest {row['longest_gap_during_ms']} ms during ({row['stall_steps']} steps)",
          file=sys.stderr, flush=True)
    return row


def machine_info() -> dict:
    import transformers
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "grpcio": grpc.__version__, "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def print_tables(result: dict) -> None:
    gpu = result["device"] == "cuda"
    raw = ("raw H2D | raw D2H" if gpu else "raw memcpy | raw sum64")
    print("\nThe control path alone (median ms; park = Reserve + Commit, or Place into a "
          "region held ahead; restore = Open of one's own entry, without its token ids)")
    print("| entries kept | tokens | Reserve | Commit | Place | Open | Open with contents | "
          "Delete | park | park held ahead | restore | GetStoreStatus |")
    print("| ---: |" + " ---: |" * 11)
    for r in result.get("control_path", []):
        print(f"| {r['kept_entries']} | {r['tokens']:,} | {r['reserve_ms']:.2f} | "
              f"{r['commit_ms']:.2f} | {r.get('place_ms', float('nan')):.2f} | "
              f"{r['open_ms']:.2f} | {r['open_contents_ms']:.2f} | {r['delete_ms']:.2f} | "
              f"{r['park_fixed_ms']:.2f} | {r.get('park_held_fixed_ms', float('nan')):.2f} | "
              f"{r['restore_fixed_ms']:.2f} | {r['status_ms']:.2f} |")
    print("\nPark and restore through the kvstore (median round; ms and GB/s; own restore: "
          "the copy from where the park wrote it beside Open, as a worker unparks its session)")
    print("| shape | tokens | MiB | park ms | park GB/s | park held ahead ms | GB/s | Place | "
          "restore ms | restore GB/s | own restore ms | own restore GB/s | "
          f"Reserve+Commit | park copy | Open | restore copy | first park | {raw} |")
    print("| --- |" + " ---: |" * 18)
    for r in result["bandwidth"]:
        base = ((r["raw_h2d_ms"], r["raw_d2h_ms"]) if gpu else (r["raw_memcpy_ms"], r["raw_sum64_ms"]))
        print(f"| {r['shape']} | {r['tokens']:,} | {r['bytes'] / 2**20:.1f} | "
              f"{r['park_total_ms']:.2f} | {r['park_gb_s']:.1f} | "
              f"{r.get('park_held_total_ms', float('nan')):.2f} | "
              f"{r.get('park_held_gb_s', float('nan')):.1f} | "
              f"{r.get('park_place_rpc_ms', float('nan')):.2f} | {r['restore_total_ms']:.2f} | "
              f"{r['restore_gb_s']:.1f} | {r['restore_own_total_ms']:.2f} | "
              f"{r['restore_own_gb_s']:.1f} | "
              f"{r['park_reserve_rpc_ms'] + r['park_commit_rpc_ms']:.2f} | {r['park_copy_ms']:.2f} | "
              f"{r['restore_open_rpc_ms']:.2f} | {r['restore_copy_ms']:.2f} | "
              f"{r['first_park_ms']:.1f} | {base[0]:.2f} | {base[1]:.2f} |")
    stall = result.get("restore_stall")
    if stall:
        print("\nA restore beside other sessions' decode: the longest gap between two tokens of "
              "one of them during the restore, in median gaps before it")
        print("| model | context tokens | MiB | decoding sessions | restore ms | median gap ms | "
              "longest gap ms | stall (steps) |")
        print("| --- |" + " ---: |" * 7)
        print(f"| {stall['model']} | {stall['context_tokens']:,} | {stall['bytes'] / 2**20:.1f} | "
              f"{stall['background_sessions']} | {stall['restore_ms']:.2f} | "
              f"{stall['median_gap_before_ms']:.2f} | {stall['longest_gap_during_ms']:.2f} | "
              f"{stall['stall_steps']} |")
    print("\nRestore against recomputing (prefill) the same context")
    print("| model | tokens | MiB | prefill ms | restore ms | prefill / restore | own restore ms | "
          "prefill / own restore | park ms |")
    print("| --- |" + " ---: |" * 8)
    for r in result["recompute"]:
        print(f"| {r['model']} | {r['tokens']:,} | {r['bytes'] / 2**20:.1f} | {r['prefill_ms']:.2f} | "
              f"{r['restore_ms']:.2f} | {r['prefill_over_restore']:.1f} | "
              f"{r['restore_own_ms']:.2f} | {r['prefill_over_restore_own']:.1f} | "
              f"{r['park_ms']:.2f} |")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mib", default=",".join(map(str, SIZES_MIB)))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="smollm2-135m",
                   help="comma-separated: smollm2-135m (real weights) or synthetic:<shape>")
    p.add_argument("--contexts", default="512,1024,2048")
    p.add_argument("--segment-bytes", default="256MiB", help="the kvstore's --segment-bytes")
    p.add_argument("--quiet-wait-s", type=float, default=10.0)
    p.add_argument("--skip-recompute", action="store_true")
    p.add_argument("--control-kept", default="0,64",
                   help="other entries parked while the control path is timed")
    p.add_argument("--control-tokens", default="32,4096",
                   help="token ids of the entry the control path parks")
    p.add_argument("--control-rounds", type=int, default=200)
    p.add_argument("--stall-model", default="",
                   help="model of the restore-stall stage (default: the first of --model; "
                        "'none': skip it)")
    p.add_argument("--stall-context", type=int, default=4096,
                   help="tokens of the session restored while others decode")
    p.add_argument("--stall-sessions", type=int, default=8,
                   help="sessions decoding meanwhile")
    p.add_argument("--stall-tokens", type=int, default=96)
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = [int(x) for x in args.sizes_mib.split(",") if x]
    contexts = [int(x) for x in args.contexts.split(",") if x]
    device = torch.device(args.device)
    store_id = "bench_" + uuid.uuid4().hex[:10]
    shm_dir = Path(tempfile.mkdtemp(prefix="lmx-bench-kvstore-", dir="/dev/shm"))
    state_dir = Path(tempfile.mkdtemp(prefix="lmx-bench-kvstore-state-"))
    log_path = state_dir / "kvstore.log"
    kv_args = ["--store-id", store_id, "--shm-dir", str(shm_dir), "--state-dir", str(state_dir),
               "--capacity-bytes", "8GiB", "--segment-bytes", args.segment_bytes, "--when-full", "refuse", "--keep-on-stop", "false",
               "--log-format", "json", "--log-level", "warning"]
    started = dt.datetime.now(dt.timezone.utc)
    result = {"benchmark": "kvstore", "date": started.isoformat(timespec="seconds"),
              "commit": git_commit(), "machine": machine_info(), "device": device.type,
              "load_average_start": load_average(),
              "kvstore_command": "python -m services.kvstore --listen 127.0.0.1:PORT "
                                 + " ".join(kv_args)}
    kvstore = None
    exit_code = None
    leftover: list[str] = []
    try:
        kvstore = start_service("services.kvstore", KVSTORE_SERVICE, kv_args,
                                log_path=log_path, timeout_s=60)
        result["control_path"] = asyncio.run(control_path(
            kvstore.address, [int(x) for x in args.control_kept.split(",") if x],
            [int(x) for x in args.control_tokens.split(",") if x], args.control_rounds))
        result["bandwidth"] = asyncio.run(bandwidth(kvstore.address, device, args.repeats, sizes,
                                                    args.quiet_wait_s))
        stall_model = args.stall_model or args.model.split(",")[0]
        if stall_model != "none":
            result["restore_stall"] = asyncio.run(restore_stall(
                kvstore.address, stall_model, device, args.stall_context, args.stall_sessions,
                args.stall_tokens))
        if args.skip_recompute:
            result["recompute"] = []
        else:
            result["recompute"], result["recompute_info"] = [], {}
            for model in args.model.split(","):
                rows, info = asyncio.run(recompute(
                    kvstore.address, kvstore.process.pid, model, device, contexts,
                    args.repeats, args.quiet_wait_s))
                result["recompute"] += rows
                result["recompute_info"][model] = info
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
    dev = device.type
    for name in (f"kvstore-{dev}-{started.date().isoformat()}.json", f"kvstore-{dev}-latest.json"):
        (out_dir / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out_dir}/kvstore-{dev}-{started.date().isoformat()}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
