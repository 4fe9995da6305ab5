"""Where a GPU park or restore spends its time: the copy between a kvstore
segment (a /dev/shm file, mapped and registered with cudaHostRegister, as
services/worker/kv_transfer.py does) and the GPU, taken apart step by step.
Times are CUDA-event medians of --repeats runs after a warm-up; one context of
--mib MiB of KV of --shape (bench/kvstore.py's: llama-1b, 16 layers, 8 KV
heads, head dim 64, bf16; smollm2-135m, 30 layers, 3 KV heads, float32) in
32 MiB pool chunks, like the engine's.

    python bench/kv_copy_probe.py --mib 256 --shape smollm2-135m   # on a CUDA host

Prints one line per variant; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from services.worker import kv_copy_kernels  # noqa: E402
from services.worker.kv_storage import KVShape, KVStorage, SlotGroups  # noqa: E402
from services.worker.kv_transfer import HostSegments, KVTransfer, sum64  # noqa: E402


SHAPES = {   # name: (layers, KV heads, head dim, dtype), as bench/kvstore.py's
    "llama-1b": (16, 8, 64, torch.bfloat16),
    "smollm2-135m": (30, 3, 64, torch.float32),
}


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    args = argparse.ArgumentParser()
    args.add_argument("--mib", type=int, default=256)
    args.add_argument("--repeats", type=int, default=10)
    args.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    args = args.parse_args()
    dev = torch.device("cuda")
    shape = KVShape(*SHAPES[args.shape])
    tokens = (args.mib << 20) // shape.bytes_per_token
    per_chunk = max(1, (32 << 20) // (16 * shape.bytes_per_token)) * 16   # the engine's chunks
    storage = KVStorage(shape, per_chunk, dev)
    while storage.num_chunks * per_chunk < tokens:
        storage.add_chunk()
    for t in storage._k + storage._v:
        t.normal_()
    num_bytes = tokens * shape.bytes_per_token
    shm = Path(tempfile.mkdtemp(prefix="lmx-probe-", dir="/dev/shm"))
    path = shm / "lmx-probe-0"
    with open(path, "wb") as fh:
        fh.truncate(num_bytes)
    region = type("R", (), {"segment": str(path), "offset": 0, "length": num_bytes})()
    segments = HostSegments(pin=True)
    gpu = torch.empty(num_bytes, dtype=torch.uint8, device=dev)
    pinned = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    gb = num_bytes / 1e9
    rows = []
    with segments.region(region) as host:
        print(f"{args.shape}: {args.mib} MiB, {tokens} tokens in {storage.num_chunks} chunks; "
              f"segment pinned: {host.is_pinned()}")
        piece = 32 << 20

        def pieces(dst, src):
            for off in range(0, num_bytes, piece):
                dst[off:off + piece].copy_(src[off:off + piece], non_blocking=True)

        rows.append(("pinned torch H2D, one copy", timed(lambda: gpu.copy_(pinned, non_blocking=True), args.repeats)))
        rows.append(("segment H2D, one copy", timed(lambda: gpu.copy_(host, non_blocking=True), args.repeats)))
        rows.append(("segment D2H, one copy", timed(lambda: host.copy_(gpu, non_blocking=True), args.repeats)))
        rows.append(("segment H2D, 32 MiB pieces", timed(lambda: pieces(gpu, host), args.repeats)))
        rows.append(("segment D2H, 32 MiB pieces", timed(lambda: pieces(host, gpu), args.repeats)))
        rows.append(("sum64 of the whole on the GPU", timed(lambda: sum64(gpu), args.repeats)))
        slots = list(range(tokens))
        layers = shape.num_layers
        groups = SlotGroups.build(slots, per_chunk, dev)
        rows.append(("gather K of all layers", timed(lambda: storage.gather_layers(0, 0, layers, groups, tokens), args.repeats)))
        data = storage.gather_layers(0, 0, layers, groups, tokens)
        rows.append(("write K of all layers", timed(lambda: storage.write_layers(0, 0, layers, groups, data), args.repeats)))
        rows.append(("SlotGroups.build (host)", timed(lambda: SlotGroups.build(slots, per_chunk, dev), args.repeats)))
        blocks = kv_copy_kernels.blocks_of(slots, 16, dev)
        ptrs = torch.tensor(storage.chunk_addresses(0), dtype=torch.int64, device=dev)

        def kernel(gather: bool) -> None:
            kv_copy_kernels.copy_blocks(ptrs, blocks, data, first=0, slots_per_chunk=per_chunk,
                                        block_size=16, gather=gather)
        rows.append(("gather K of all layers, one launch", timed(lambda: kernel(True), args.repeats)))
        rows.append(("write K of all layers, one launch", timed(lambda: kernel(False), args.repeats)))
    transfer = KVTransfer(storage)
    crc = transfer.park(slots, region)
    rows.append(("KVTransfer.park (host clock incl.)", timed(lambda: transfer.park(slots, region), args.repeats)))
    rows.append(("KVTransfer.restore (host clock incl.)", timed(lambda: transfer.restore(slots, region, crc), args.repeats)))
    for name, ms in rows:
        print(f"{name:40s} {ms:8.3f} ms  {gb / ms * 1e3:7.1f} GB/s")
    transfer.close()
    segments.close()
    os.unlink(path)
    shm.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
