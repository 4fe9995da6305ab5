"""A model put to sleep on a real GPU: its device memory is freed, the
weights come back in one pinned copy, unchanged, and the wake is timed.

Run on a CUDA host with `pytest -m gpu tests/gpu -s` (LMX_CACHE must hold the
smollm2 tokenizer: the synthetic models use it). Skipped without a GPU.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _live_blocks(limit: int = 12) -> str:
    """The blocks still allocated on the device, largest first, with where
    they were allocated (memory history is recorded by the test)."""
    snapshot = torch.cuda.memory._snapshot()
    blocks = [block for segment in snapshot["segments"] for block in segment["blocks"]
              if block["state"] == "active_allocated"]
    blocks.sort(key=lambda block: -block["size"])
    lines = []
    for block in blocks[:limit]:
        frames = [f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}"
                  for f in block.get("frames", []) if "/torch/" not in f["filename"]][:6]
        lines.append(f"{block['size'] / 1e6:.1f} MB: " + " <- ".join(frames))
    segments = [(s["total_size"], s["allocated_size"]) for s in snapshot["segments"]]
    return (f"{len(segments)} segments (total, allocated MB): "
            f"{[(round(t / 1e6), round(a / 1e6)) for t, a in segments][:20]}\n"
            + "\n".join(lines))


def test_sleep_frees_the_gpu_and_wake_restores_the_weights():
    from services.worker.models import default_cache_dir, load_model
    from services.worker.sleep import WeightStash

    import gc

    device = torch.device("cuda")
    # What earlier tests of this process left reserved (their graphs' pools,
    # KV, cached blocks) is not this model's: the checks below are against
    # what was reserved before it was loaded. The failure of this test on an
    # H100 at 844933a (1.26 GB still reserved) was read against zero, after
    # test_decode_graphs_gpu.py and test_kv_transfer_gpu.py had run here.
    gc.collect()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_reserved(device)
    torch.cuda.memory._record_memory_history(max_entries=100000)
    loaded = load_model("synthetic:llama-1b", cache=default_cache_dir(), device=device,
                        dtype=torch.bfloat16)
    # The snapshot lives in host memory: on the device it would stay reserved.
    before = {name: t.detach().to("cpu", copy=True)
              for name, t in loaded.model.state_dict().items()}
    torch.cuda.synchronize()
    awake_bytes = torch.cuda.memory_allocated(device)
    snapshot_bytes = sum(t.numel() * t.element_size() for t in before.values())
    stash = WeightStash(loaded.model, device)
    slept = stash.sleep()
    asleep_bytes = torch.cuda.memory_allocated(device)
    freed = awake_bytes - asleep_bytes
    print(f"weights {slept.num_bytes / 1e9:.2f} GB to host in {slept.seconds * 1e3:.1f} ms; "
          f"freed {freed / 1e9:.2f} GB on the GPU")
    assert freed >= 0.95 * slept.num_bytes, (
        f"sleeping freed {freed} bytes of the GPU for {slept.num_bytes} bytes of weights")
    woke = [stash.wake()]
    for _ in range(3):                       # the first wake pins nothing new; time a few
        stash.sleep()
        woke.append(stash.wake())
    best = min(w.seconds for w in woke[1:])
    print(f"wake: {[round(w.seconds * 1e3, 1) for w in woke]} ms; best "
          f"{woke[0].num_bytes / best / 1e9:.1f} GB/s")
    after = loaded.model.state_dict()
    assert all(torch.equal(after[name].cpu(), t) for name, t in before.items()), (
        "a weight changed through sleep and wake")
    del after                                # views of the woken weights: they would stay
    assert torch.cuda.memory_allocated(device) - asleep_bytes >= 0.95 * slept.num_bytes
    # After a wake every weight is a view of one buffer: a sleep must give all
    # of it back to the driver (what admission and NVML see), not only to
    # torch's cache. A stray reference kept the whole buffer reserved once.
    # Many cycles: none may leave anything behind.
    for cycle in range(20):
        stash.sleep()
        reserved = torch.cuda.memory_reserved(device) - baseline
        if cycle == 0:
            print(f"reserved after a sleep that followed a wake: {reserved / 1e6:.0f} MB beyond "
                  f"the {baseline / 1e6:.0f} MB reserved before the model was loaded")
        assert reserved < 0.05 * slept.num_bytes + (64 << 20), (
            f"cycle {cycle}: {reserved} bytes still reserved after the weights "
            f"({slept.num_bytes}) left; live blocks:\n{_live_blocks()}")
        stash.wake()
    torch.cuda.memory._record_memory_history(enabled=None)
    del before, snapshot_bytes
