"""Synthetic models (random weights of a published shape) are built with no
more memory than their weights, ties kept, seeded and initialised like
transformers' own from_config."""

from __future__ import annotations

from pathlib import Path

import torch

from services.worker import merged_projections
from services.worker.models import build_synthetic, model_config

CPU = torch.device("cpu")


def small(name: str, layers: int = 2):
    config, _ = model_config(name, Path("/nonexistent"))
    config.num_hidden_layers = layers
    config.vocab_size = 1024     # the shape of the layers, a small embedding: quick
    return config


def test_tied_embeddings_stay_one_tensor_and_nothing_is_left_on_meta():
    model = build_synthetic(small("synthetic:llama-tiny"), CPU, torch.float32, seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight, "the tie was lost"
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    assert not any(p.requires_grad for p in model.parameters())


def test_same_seed_same_weights_other_seed_other_weights():
    config = small("synthetic:llama-tiny")
    a = build_synthetic(config, CPU, torch.float32, seed=3).state_dict()
    b = build_synthetic(config, CPU, torch.float32, seed=3).state_dict()
    c = build_synthetic(config, CPU, torch.float32, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "a seed must give the same weights"
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_initialised_like_from_config():
    """Same distributions as transformers' own from_config: normal(0, 0.02)
    matrices, RMSNorm weights of one (Llama) or zero (Gemma's 1 + w), real
    rotary frequencies."""
    from transformers import AutoModelForCausalLM

    for name, norm_value in (("synthetic:llama-1b", 1.0), ("synthetic:gemma3-1b", 0.0)):
        config = small(name, layers=1)
        model = build_synthetic(config, CPU, torch.float32, seed=0)
        merged_projections.split(model)      # the stock modules, to compare name by name
        torch.manual_seed(0)
        reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        ours, theirs = model.state_dict(), reference.state_dict()
        assert ours.keys() == theirs.keys()
        for key, ref in theirs.items():
            got = ours[key]
            assert torch.isfinite(got).all(), f"{name} {key} has non-finite values"
            if ref.dim() >= 2:
                assert abs(got.std().item() - ref.std().item()) < 0.1 * ref.std().item(), (
                    f"{name} {key}: std {got.std().item():.4f}, from_config "
                    f"{ref.std().item():.4f}")
            else:
                assert torch.allclose(got, ref), f"{name} {key} differs from from_config's"
        norm = model.model.layers[0].input_layernorm.weight
        assert torch.all(norm == norm_value), f"{name}: norm weights {norm[:4]}"


def test_layers_are_made_one_at_a_time_with_the_same_weights(monkeypatch):
    """`each_layer` sees each decoder layer whole while the next ones are
    still on the meta device (a quantized build holds one 16-bit layer at a
    time), and the weights are the plain build's, layer by layer (each has
    a seed of its own)."""
    from services.worker import streaming

    config = small("synthetic:llama-tiny", layers=3)
    plain = build_synthetic(config, CPU, torch.float32, seed=5).state_dict()
    layers, seen = [], []
    real = streaming.decoder_layers
    monkeypatch.setattr(streaming, "decoder_layers", lambda model: layers or layers.extend(
        real(model)) or layers)

    def each(layer):
        index = len(seen)
        seen.append({k: v.clone() for k, v in layer.state_dict().items()})
        assert all(p.is_meta for later in layers[index + 1:] for p in later.parameters())

    build_synthetic(config, CPU, torch.float32, seed=5, each_layer=each)
    assert len(seen) == 3
    for index, state in enumerate(seen):
        for key, value in state.items():
            assert torch.equal(value, plain[f"model.layers.{index}.{key}"]), (index, key)


def test_a_layers_replaced_weights_are_freed_at_once():
    """A layer's 16-bit weights go as soon as `each_layer` replaced them (a
    quantized load on a GPU kept the whole 16-bit model there until the build
    returned: 3.8 GB for Qwen2.5-1.5B's shape, measured on an H100)."""
    import gc
    import weakref

    from services.worker.quantize import QuantSpec, quantize_layer

    replaced = []

    def quantize(layer):
        replaced.extend(weakref.ref(p) for p in layer.parameters() if p.dim() == 2)
        quantize_layer(layer, QuantSpec("int4"), CPU)
        gc.collect()
        assert all(ref() is None for ref in replaced), "a replaced 16-bit matrix is still held"

    build_synthetic(small("synthetic:llama-tiny", layers=3), CPU, torch.float32, seed=5,
                    each_layer=quantize)
    assert len(replaced) > 3
