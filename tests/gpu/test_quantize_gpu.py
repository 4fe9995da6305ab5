"""Quantized weights on a real GPU (services/worker/quantize.py): the
tinygemm int4 kernel computes what the de-quantized matrix computes, for
the widths of the published shapes; a quantized model loads within its
packed bytes plus one 16-bit matrix; and the step memory plan stays above
every measured step with int4 (tinygemm) and int8 (converted per product)
weights.

Run on a CUDA host with `pytest -m gpu tests/gpu`. Skipped without a GPU.
"""

from __future__ import annotations

import argparse

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")


@pytest.mark.parametrize("out_features, in_features", [
    (1536, 576),     # smollm2-135m's MLP up (K a multiple of 64, not 128)
    (8960, 1536),    # qwen2.5-1.5b's MLP up
    (1536, 8960),    # and down
    (256, 2048),     # llama-1b's K and V projections
])
@pytest.mark.parametrize("group", [32, 128])
def test_tinygemm_computes_the_dequantized_product(out_features, in_features, group):
    from services.worker.quantize import Int4Linear, tinygemm_supported

    if not tinygemm_supported(CUDA, torch.bfloat16):
        pytest.skip("this card has no tinygemm (compute capability below 8.0)")
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=False).to(CUDA, torch.bfloat16)
    fast = Int4Linear.from_linear(linear, CUDA, group)
    assert fast.kernel == "tinygemm"
    import services.worker.quantize as quantize

    original = quantize._int4_kernel
    quantize._int4_kernel = lambda *args: ("dequant", 0)
    try:
        slow = Int4Linear.from_linear(linear, CUDA, group)
    finally:
        quantize._int4_kernel = original
    for rows in (1, 7, 64, 300):
        x = torch.randn(rows, in_features, device=CUDA, dtype=torch.bfloat16)
        want = x.float() @ slow.dequantized(torch.float32).T
        got = fast(x).float()
        error = ((got - want).norm() / want.norm()).item()
        assert error < 0.01, f"rows {rows}: relative error {error:.4f}"


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_a_quantized_model_loads_within_its_packed_bytes(mode):
    from services.worker.models import default_cache_dir, load_model, weight_plan
    from services.worker.quantize import QuantSpec

    spec = QuantSpec(mode)
    name = "synthetic:qwen2.5-1.5b"
    plan = weight_plan(name, default_cache_dir(), torch.bfloat16, spec)
    full = weight_plan(name, default_cache_dir(), torch.bfloat16)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(CUDA)
    before = torch.cuda.memory_allocated(CUDA)
    loaded = load_model(name, cache=default_cache_dir(), device=CUDA, dtype=torch.bfloat16,
                        quant=spec)
    held = torch.cuda.memory_allocated(CUDA) - before
    peak = torch.cuda.max_memory_allocated(CUDA) - before
    assert loaded.weight_bytes == plan.total_bytes
    # What the allocator handed out is the packed bytes plus its block
    # rounding: a block is not split when less than 1 MiB would remain, so
    # at most 1 MiB more per tensor of 1 MiB or more (measured on an H100:
    # 17.8 MB for int4, 36.8 MB for int8). The worker counts that measured
    # figure in its lease (LoadedModel.allocated_bytes).
    assert loaded.allocated_bytes == held
    large = sum(1 for p in loaded.model.parameters() if p.numel() * p.element_size() >= 1 << 20)
    assert held <= plan.total_bytes + large * (1 << 20), (
        f"{held} bytes held, planned {plan.total_bytes} and {large} tensors of 1 MiB or more")
    # A synthetic model's layers are drawn on the device one at a time and
    # quantized before the next (models.build_synthetic): at most one 16-bit
    # layer beside the quantized ones, the float32 transients of the matrix
    # being quantized (near 64 MiB at most: quantize.BLOCK_ELEMENTS), and the
    # allocator's rounding.
    assert peak <= plan.total_bytes + full.layer_bytes + large * (1 << 20) + (64 << 20), (
        f"loading peaked at {peak} bytes: more than one 16-bit layer "
        f"({full.layer_bytes} bytes) beside the quantized model ({plan.total_bytes})")
    assert plan.total_bytes < full.total_bytes * (0.45 if mode == "int4" else 0.65)
    del loaded
    torch.cuda.empty_cache()


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.timeout(300)     # compiles the step as the worker does
def test_the_step_plan_holds_for_quantized_weights(mode, step_memory_bench):
    report = step_memory_bench.run_model(
        "synthetic:llama-1b", argparse.Namespace(quick=True, quantize=mode, group_size=32), CUDA)
    assert report["weights"] == ("int4-g32" if mode == "int4" else "int8")
    ran = [s for s in report["steps"] if "measured" in s]
    assert len(ran) >= 10, report["steps"]
    below = [s for s in ran if s["measured"] > s["planned"]]
    assert not below, f"{mode}: the plan is below the measured peak for {below}"
    assert report["graph_pool_measured"] <= report["graph_pool_estimate"]
