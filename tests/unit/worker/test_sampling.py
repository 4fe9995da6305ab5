"""SamplingParams validation and choosing tokens from logits."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import InvalidArgument
from services.worker.limits import MAX_STOP_CHARS, MAX_STOP_STRINGS
from services.worker.sampling import (
    SamplingParams,
    make_generator,
    sample,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("fields, field_name", [
    (dict(max_tokens=0), "sampling.max_tokens"),
    (dict(max_tokens=-3), "sampling.max_tokens"),
    (dict(temperature=-0.1), "sampling.temperature"),
    (dict(temperature=100.5), "sampling.temperature"),
    (dict(temperature=float("nan")), "sampling.temperature"),
    (dict(top_p=0.0), "sampling.top_p"),
    (dict(top_p=1.01), "sampling.top_p"),
    (dict(top_k=-1), "sampling.top_k"),
    (dict(stop=("",)), "sampling.stop"),
    (dict(stop=("x" * (MAX_STOP_CHARS + 1),)), "sampling.stop"),
    (dict(stop=tuple("abcdefghijklmnopq"[: MAX_STOP_STRINGS + 1])), "sampling.stop"),
    (dict(frequency_penalty=2.5), "sampling.frequency_penalty"),
    (dict(presence_penalty=float("nan")), "sampling.presence_penalty"),
])
def test_invalid_params_name_the_field(fields, field_name):
    with pytest.raises(InvalidArgument) as caught:
        SamplingParams(**fields)
    assert caught.value.field == field_name, (
        f"{fields} should be refused naming {field_name}, named {caught.value.field}")


def test_valid_edges_are_accepted():
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0)
    SamplingParams(temperature=100.0, top_p=1e-9, top_k=1, seed=0,
                   stop=tuple("x" * MAX_STOP_CHARS for _ in range(MAX_STOP_STRINGS)))
    assert SamplingParams().greedy, "the default (temperature 0) should be greedy"
    assert not SamplingParams(temperature=0.5).greedy, "temperature 0.5 should sample"
    assert make_generator(SamplingParams(), CPU) is None, "greedy needs no generator"


def logits_batch(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = logits_batch()
    chosen = sample(logits, [SamplingParams()] * 4, [None] * 4, vocab_limit=50)
    assert chosen == logits.argmax(dim=-1).tolist(), f"greedy picks {chosen}, argmax differs"


def test_vocab_limit_is_respected():
    logits = logits_batch()
    logits[:, 45:] += 100.0  # the best ids are all beyond the tokenizer's vocabulary
    greedy = sample(logits, [SamplingParams()] * 4, [None] * 4, vocab_limit=45)
    assert greedy == logits[:, :45].argmax(dim=-1).tolist(), f"greedy went past the limit: {greedy}"
    params = SamplingParams(temperature=5.0, seed=1)
    for _ in range(20):
        chosen = sample(logits, [params] * 4, [make_generator(params, CPU) for _ in range(4)], 45)
        assert all(t < 45 for t in chosen), f"sampled an id at or above vocab_limit 45: {chosen}"


def test_seeded_sampling_is_reproducible():
    logits = logits_batch(vocab=1000)
    params = SamplingParams(temperature=1.5, top_p=0.95, top_k=200, seed=1234)

    def draw() -> list[int]:
        generator = make_generator(params, CPU)
        return [sample(logits[i % 4:i % 4 + 1], [params], [generator], 1000)[0] for i in range(40)]

    first, second = draw(), draw()
    assert first == second, "the same seed should give the same tokens"
    assert len(set(first)) > 1, f"temperature 1.5 should give varied tokens: {first}"
    other = SamplingParams(temperature=1.5, top_p=0.95, top_k=200, seed=99)
    generator = make_generator(other, CPU)
    third = [sample(logits[i % 4:i % 4 + 1], [other], [generator], 1000)[0] for i in range(40)]
    assert third != first, "another seed should give other tokens"


def test_top_k_one_equals_greedy():
    logits = logits_batch(vocab=500)
    params = SamplingParams(temperature=2.0, top_k=1, seed=7)
    for _ in range(10):
        chosen = sample(logits, [params] * 4, [make_generator(params, CPU) for _ in range(4)], 500)
        assert chosen == logits.argmax(dim=-1).tolist(), f"top_k=1 picked {chosen}, not the argmax"


def test_tiny_top_p_keeps_only_the_top_token():
    logits = logits_batch(vocab=500)
    params = SamplingParams(temperature=3.0, top_p=1e-6, seed=7)
    for _ in range(10):
        chosen = sample(logits, [params] * 4, [make_generator(params, CPU) for _ in range(4)], 500)
        assert chosen == logits.argmax(dim=-1).tolist(), f"top_p=1e-6 picked {chosen}, not the top"


def test_top_k_limits_the_candidates():
    logits = logits_batch(rows=1, vocab=100)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    params = SamplingParams(temperature=50.0, top_k=3, seed=5)
    generator = make_generator(params, CPU)
    seen = {sample(logits, [params], [generator], 100)[0] for _ in range(60)}
    assert seen <= top3, f"top_k=3 sampled outside the top 3 {top3}: {seen - top3}"
    assert len(seen) > 1, "a high temperature over 3 candidates should pick more than one"


def test_greedy_and_sampled_rows_mix_in_one_batch():
    logits = logits_batch(vocab=300)
    sampled = SamplingParams(temperature=1.0, top_k=1, seed=3)
    params = [SamplingParams(), sampled, SamplingParams(), sampled]
    generators = [make_generator(p, CPU) for p in params]
    chosen = sample(logits, params, generators, 300)
    assert chosen == logits.argmax(dim=-1).tolist(), f"mixed batch picked {chosen}"


def test_penalties_lower_the_tokens_an_answer_already_holds():
    """OpenAI's: minus frequency_penalty x count, minus presence_penalty
    once; rows without penalties, and tokens not generated, are untouched."""
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0], [0.0, 5.0, 4.0, 3.0]])
    plain = SamplingParams(max_tokens=4)
    frequency = SamplingParams(max_tokens=4, frequency_penalty=0.6)
    presence = SamplingParams(max_tokens=4, presence_penalty=1.5)
    history = [1, 1]                      # token 1 twice
    assert sample(logits, [plain, frequency], [None, None], 4, None,
                  [history, history]) == [1, 2], "5 - 2 x 0.6 = 3.8 < 4"
    assert sample(logits, [presence, plain], [None, None], 4, None,
                  [history, history]) == [2, 1], "5 - 1.5 = 3.5 < 4, whatever the count"
    assert sample(logits, [frequency, presence], [None, None], 4, None,
                  [[], [3]]) == [1, 1], "nothing generated yet, or other tokens"
    assert torch.equal(logits, torch.tensor([[0.0, 5.0, 4.0, 3.0]] * 2)), "the logits are kept"
    negative = SamplingParams(max_tokens=4, presence_penalty=-2.0)
    assert sample(logits[:1], [negative], [None], 4, None, [[2]]) == [2], (
        "a negative penalty favours what was said: 4 + 2 = 6 > 5")
