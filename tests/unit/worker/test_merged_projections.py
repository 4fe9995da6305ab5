"""Merged projections (merged_projections.py): each decoder layer's q, k, v
as one matrix and gate, up as another compute what the stock modules do,
for the three families merged (Llama, Qwen2 with its biases, Gemma 3 with
its q/k norms and sliding window); split gives the stock modules back on
the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.worker import merged_projections
from services.worker.models import build_synthetic, model_config

CPU = torch.device("cpu")


def small(name: str):
    config, _ = model_config(name, Path("/nonexistent"))
    text = config.get_text_config()
    text.num_hidden_layers = 2
    text.vocab_size = 512
    if name != "synthetic:llama-tiny" and name != "synthetic:gemma3-tiny":
        text.hidden_size, text.intermediate_size = 128, 256
        text.num_attention_heads, text.num_key_value_heads, text.head_dim = 4, 2, 32
    return config


def stock(name: str, seed: int = 0):
    model = build_synthetic(small(name), CPU, torch.float32, seed=seed)
    merged_projections.split(model)
    return model


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("name", ["synthetic:llama-tiny", "synthetic:qwen2.5-1.5b",
                                  "synthetic:gemma3-tiny"])
def test_merged_layers_compute_what_the_stock_ones_do(name):
    model = stock(name)
    model.set_attn_implementation("sdpa")
    if "qwen" in name:   # random biases, so that merging them is checked too
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    ids = torch.randint(0, 512, (1, 24))
    want = logits(model, ids)
    assert merged_projections.merge(model) == 4          # 2 layers x (attention, MLP)
    layer = model.model.layers[0]
    assert hasattr(layer.self_attn, "qkv_proj") and not hasattr(layer.self_attn, "q_proj")
    assert hasattr(layer.mlp, "gate_up_proj") and not hasattr(layer.mlp, "gate_proj")
    got = logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    merged_projections.split(model)
    assert hasattr(layer.self_attn, "q_proj") and not hasattr(layer.self_attn, "qkv_proj")
    torch.testing.assert_close(logits(model, ids), want, rtol=1e-5, atol=1e-5)


def test_a_synthetic_model_is_built_merged_and_unknown_classes_are_left_alone():
    model = build_synthetic(small("synthetic:llama-tiny"), CPU, torch.float32, seed=0)
    attention = model.model.layers[0].self_attn
    assert attention.qkv_proj.weight.shape == (
        (4 + 2 + 2) * 16, 64), "q (4 heads) + k and v (2 heads each) of 16 dims, by 64"

    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(8, 8)

    model.model.layers[0].self_attn = Other()
    assert merged_projections.merge(model) == 0
    assert hasattr(model.model.layers[0].self_attn, "q_proj")


def test_generate_with_a_kv_cache_is_the_stock_models():
    """Through transformers' own KV cache (generate), as the quality check
    and the benchmarks' references use the merged model."""
    model = stock("synthetic:gemma3-tiny")
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 512, (1, 12))
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        merged_projections.merge(model)
        got = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
