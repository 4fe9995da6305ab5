"""Weight-only quantization (services/worker/quantize.py): each weight lands
within half a step of its value, the products are those of the
de-quantized matrices, the bytes counted before loading are the bytes
loaded, layers stream and sleep like 16-bit ones, and a card without
tinygemm (simulated) de-quantizes instead, with the transient planned."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.worker import quantize
from services.worker.models import build_synthetic, load_model, model_config, weight_plan
from services.worker.quantize import (Int4Linear, Int8Embedding, Int8Head, Int8Linear, QuantSpec,
                                      module_bytes, quantize_model)
from services.worker.settings import load_settings
from services.worker.step_memory import ModelDims
from services.worker.streaming import LayerStreamer, decoder_layers

CPU = torch.device("cpu")


def linear(out_features: int = 96, in_features: int = 128, bias: bool = True,
           dtype: torch.dtype = torch.float32) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(in_features, out_features, bias=bias).to(dtype)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_weights_are_within_half_a_step_and_products_match(group):
    lin = linear()
    q = Int4Linear.from_linear(lin, CPU, group)
    assert (q.kernel, q.group_size) == ("dequant", group)
    w = q.dequantized(torch.float32)
    steps = q.scales_and_zeros[..., 0].transpose(0, 1).repeat_interleave(group, dim=1)
    error = (w - lin.weight).abs()
    assert bool((error <= steps / 2 + 1e-6).all()), f"worst {float((error - steps / 2).max())}"
    x = torch.randn(3, 5, 128)
    assert torch.allclose(q(x), torch.nn.functional.linear(x, w, lin.bias), atol=1e-5)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (96, 64), "two weights a byte"


def test_int4_takes_the_largest_group_that_divides_and_refuses_none():
    assert Int4Linear.from_linear(linear(in_features=96), CPU, 128).group_size == 32
    assert Int4Linear.from_linear(linear(in_features=48), CPU, 32) is None


def test_int8_weights_are_within_half_a_step():
    lin = linear(dtype=torch.bfloat16)
    q = Int8Linear.from_linear(lin, CPU)
    assert q.weight.dtype == torch.int8 and q.scale.dtype == torch.bfloat16
    w = q.weight.float() * q.scale.float()[:, None]
    assert bool(((w - lin.weight.float()).abs() <= q.scale.float()[:, None] * 0.51).all())
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    assert torch.allclose(q(x).float(), (x.float() @ w.T + lin.bias.float()), atol=0.1, rtol=0.02)


def tiny_model(shape: str = "llama-tiny", layers: int = 4):
    config, _ = model_config(f"synthetic:{shape}", Path("/nonexistent"))
    config.num_hidden_layers = layers
    model = build_synthetic(config, CPU, torch.float32, seed=0)
    model.set_attn_implementation("sdpa")
    return model.eval()


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


@pytest.mark.parametrize("shape", ["llama-tiny", "gemma3-tiny"])
@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4", 32),
                                  QuantSpec("int4", 128), QuantSpec("int4", embeddings="none")])
def test_the_plan_counts_the_bytes_that_load(shape, spec, model_cache):
    loaded = load_model(f"synthetic:{shape}", cache=model_cache, device=CPU,
                        dtype=torch.float32, quant=spec)
    plan = weight_plan(f"synthetic:{shape}", model_cache, torch.float32, spec)
    assert plan.total_bytes == loaded.weight_bytes
    assert plan.layer_bytes == module_bytes(decoder_layers(loaded.model)[0])
    full = weight_plan(f"synthetic:{shape}", model_cache, torch.float32)
    assert plan.layer_bytes < full.layer_bytes / (3 if spec.mode == "int8" else 5), (
        "the decoder layers' matrices should shrink 4x (int8) or about 7x (int4) from float32")
    assert loaded.weights == str(spec)
    layer = decoder_layers(loaded.model)[0]
    kinds = {type(m) for m in layer.modules()}
    assert torch.nn.Linear not in kinds, "every decoder matrix should be quantized"
    embed = loaded.model.get_input_embeddings()
    head = loaded.model.get_output_embeddings()
    if spec.embeddings_on:
        assert isinstance(embed, Int8Embedding) and embed.weight.dtype == torch.int8
        assert head.weight is embed.weight and head.scale is embed.scale, (
            "tied embeddings stay one tensor in int8")
    else:
        assert embed.weight.dtype == torch.float32, "embeddings stay in the dtype"
        assert type(head) is torch.nn.Linear


@pytest.mark.parametrize("shape", ["llama-tiny", "gemma3-tiny"])
def test_int8_embeddings_and_head_match_the_model_within_a_step(shape, monkeypatch):
    model = tiny_model(shape, layers=2)
    ids = list(range(3, 40))
    want = logits(model, ids)
    embed = model.get_input_embeddings()
    rows_want = embed(torch.tensor([ids]))
    before, after = quantize.quantize_embeddings(model, CPU)
    new = model.get_input_embeddings()
    assert isinstance(new, Int8Embedding) and isinstance(model.get_output_embeddings(), Int8Head)
    assert after < before / 3, "float32 rows become int8 rows and one scale each"
    assert quantize.model_bytes(model) == sum(
        p.numel() * p.element_size() for p in {id(p): p for p in
                                                [*model.parameters(), *model.buffers()]}.values())
    rows = new(torch.tensor([ids]))
    # Within half a step of each group's scale (Gemma's embed_scale kept).
    grouped = rows_want.view(*rows_want.shape[:-1], -1, quantize.EMBEDDING_GROUP)
    step = (grouped.abs().amax(dim=-1, keepdim=True) / 127).expand_as(grouped).flatten(-2)
    assert ((rows - rows_want).abs() <= step * 0.51 + 1e-6).all()
    got = logits(model, ids)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    # The head converts its rows a chunk at a time; chunks change nothing.
    monkeypatch.setattr(quantize, "HEAD_CHUNK_BYTES", 1)
    assert quantize.head_chunk_rows(64, 4) == 128 < model.config.vocab_size
    assert torch.allclose(logits(model, ids), got, atol=1e-5, rtol=1e-5)


def test_an_untied_head_gets_its_own_int8_rows():
    model = tiny_model(layers=1)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone() * 2, requires_grad=False)
    x = torch.randn(3, head.in_features)
    want = head(x)
    quantize.quantize_embeddings(model, CPU)
    new = model.get_output_embeddings()
    assert isinstance(new, Int8Head) and new.weight is not model.get_input_embeddings().weight
    assert torch.allclose(new(x), want, atol=0.05 * want.abs().max().item())
    assert quantize.quantize_embeddings(model, CPU) == (0, 0), "done once"


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4", 32)])
def test_a_quantized_model_streams_exactly_as_it_runs_resident(spec):
    model = tiny_model(layers=5)
    quantize_model(model, spec, CPU)
    prompts = [[1, 2, 3, 4, 5], list(range(20, 40)), [9]]
    expected = [logits(model, ids) for ids in prompts]
    streamer = LayerStreamer(model, CPU, [1, 2, 3], ring_slots=2)
    streamer.attach()
    for _ in range(2):
        for ids, want in zip(prompts, expected):
            assert torch.equal(logits(model, ids), want), "a streamed pass differs"
    assert len(set(streamer.dtypes)) > 1, "a quantized layer mixes dtypes"
    streamer.stream_more(1)
    assert torch.equal(logits(model, prompts[1]), expected[1])
    streamer.detach()
    assert torch.equal(logits(model, prompts[0]), expected[0])


def test_sleep_and_wake_keep_a_quantized_model(model_cache):
    from services.worker.sleep import WeightStash

    loaded = load_model("synthetic:llama-tiny", cache=model_cache, device=CPU,
                        dtype=torch.float32, quant=QuantSpec("int4"))
    loaded.model.set_attn_implementation("sdpa")
    want = logits(loaded.model, [5, 6, 7])
    stash = WeightStash(loaded.model, CPU, moves=True)
    assert stash.sleep().num_bytes >= loaded.weight_bytes
    assert all(p.numel() == 0 for p in loaded.model.parameters()), "the weights left"
    stash.wake()
    assert torch.equal(logits(loaded.model, [5, 6, 7]), want)


def dims(**kw) -> ModelDims:
    base = dict(hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64,
                vocab=128256, itemsize=2)
    return ModelDims(**{**base, **kw})


def test_a_card_without_tinygemm_dequantizes_and_the_step_plan_says_so(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not quantize.tinygemm_supported(cuda, torch.bfloat16)
    assert quantize._int4_kernel(cuda, torch.bfloat16, 8192, 2048)[0] == "dequant"
    old = quantize.dequant_bytes(dims(), QuantSpec("int4"), cuda, torch.bfloat16)
    assert old >= 8192 * 2048 * 2, "the largest matrix in bfloat16, at least"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert quantize._int4_kernel(cuda, torch.bfloat16, 8192, 2048) == ("tinygemm", 8)
    assert quantize._int4_kernel(cuda, torch.float16, 8192, 2048)[0] == "dequant"
    assert quantize.layer_dequant_bytes(dims(), QuantSpec("int4"), cuda, torch.bfloat16) == 0
    # the largest matrix in bfloat16: gate and up merged (merged_projections.py)
    assert quantize.layer_dequant_bytes(dims(), QuantSpec("int8"), cuda, torch.bfloat16) == \
        2 * 8192 * 2048 * 2
    assert quantize.dequant_bytes(dims(), QuantSpec(), cuda, torch.bfloat16) == 0
    # the int8 head's chunk: 16 MiB of its rows in bfloat16
    assert quantize.head_bytes(dims(), QuantSpec("int4")) == 16 << 20
    head = quantize.head_bytes(dims(), QuantSpec("int4"))
    assert quantize.dequant_bytes(dims(), QuantSpec("int4"), cuda, torch.bfloat16) == head
    assert quantize.head_bytes(dims(), QuantSpec("int4", embeddings="none")) == 0


def test_settings_refuse_an_unknown_mode_or_group():
    from services.common.errors import ConfigError

    assert load_settings(["--model", "m", "--quantize", "int4"], {}).quantize_group_size == 32
    with pytest.raises(ConfigError) as caught:
        load_settings(["--model", "m", "--quantize", "int3"], {})
    assert caught.value.setting == "quantize"
    with pytest.raises(ConfigError) as caught:
        load_settings(["--model", "m", "--quantize", "int4", "--quantize-group-size", "48"], {})
    assert caught.value.setting == "quantize_group_size"
    settings = load_settings(["--model", "m", "--quantize", "int4"], {})
    assert QuantSpec.of(settings) == QuantSpec("int4", 32, "int8")
    with pytest.raises(ConfigError) as caught:
        load_settings(["--model", "m", "--quantize-embeddings", "int4"], {})
    assert caught.value.setting == "quantize_embeddings"


@pytest.mark.parametrize("make", [lambda lin: Int8Linear.from_linear(lin, CPU),
                                  lambda lin: Int4Linear.from_linear(lin, CPU, 32)])
def test_quantizing_in_row_blocks_changes_nothing_and_leaves_the_source(make, monkeypatch):
    lin = linear(out_features=100, in_features=64)
    source = lin.weight.detach().clone()
    whole = make(lin)
    monkeypatch.setattr(quantize, "BLOCK_ELEMENTS", 64 * 7)     # blocks of 7 rows, one short
    blocked = make(lin)
    assert torch.equal(lin.weight, source), "quantizing changed the 16-bit weights"
    for a, b in zip(whole.parameters(), blocked.parameters()):
        assert torch.equal(a, b)
