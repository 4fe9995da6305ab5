"""Layer streaming on a real GPU: the streamed layers' device memory is
freed (only the ring stays), the host copies are pinned, the copies run on a
side stream, and the output equals the resident model's bit for bit (same
weights, same kernels), over several passes.

Run on a CUDA host with `pytest -m gpu tests/gpu -s` (LMX_CACHE must hold the
smollm2 tokenizer: the synthetic models use it). Skipped without a GPU.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_streamed_llama_1b_equals_resident_and_frees_the_streamed_layers():
    from pathlib import Path

    from services.worker.models import build_synthetic, model_config
    from services.worker.streaming import LayerStreamer, streamed_indices

    device = torch.device("cuda")
    config, _ = model_config("synthetic:llama-1b", Path("/nonexistent"))
    model = build_synthetic(config, device, torch.bfloat16, seed=0)
    model.set_attn_implementation("sdpa")
    model.eval()
    prompts = [torch.randint(0, 32000, (1, n), device=device) for n in (7, 64, 1)]
    with torch.inference_mode():
        want = [model(input_ids=ids, use_cache=False).logits for ids in prompts]
    torch.cuda.synchronize()
    resident_bytes = torch.cuda.memory_allocated(device)
    streamer = LayerStreamer(model, device, streamed_indices(16, 0.3), ring_slots=2)
    streamer.attach()
    info = streamer.info()
    torch.cuda.synchronize()
    streamed_bytes = torch.cuda.memory_allocated(device)
    freed = resident_bytes - streamed_bytes
    print(f"streamed {info.streamed} of 16 layers ({info.host_bytes / 1e9:.2f} GB to pinned host "
          f"memory), ring {info.ring_bytes / 1e6:.0f} MB; freed {freed / 1e9:.2f} GB")
    assert freed >= 0.95 * (info.host_bytes - info.ring_bytes)
    assert all(flat.is_pinned() for flat in streamer.host)
    for _ in range(3):
        with torch.inference_mode():
            got = [model(input_ids=ids, use_cache=False).logits for ids in prompts]
        for a, b in zip(got, want):
            assert torch.equal(a, b), "a streamed pass differs from the resident model"
