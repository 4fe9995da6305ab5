"""The worker's decode path against the same weights computed plainly: the
engine's greedy tokens for several sessions at once (paged KV, batched
decode steps through the static-buffer path the CUDA graphs replay),
teacher-forced through the model with PyTorch's own attention, in float32 on
the CPU (the Triton kernels interpreted: about 10 s a model): every token is
the reference's choice. And the check itself sees a wrong token
(services/worker/quality.py `choices`)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.worker.engine import Delta, Engine, Finished
from services.worker.memory import FixedMemory
from services.worker.quality import Choices, choices
from services.worker.sampling import SamplingParams
from services.worker.sessions import SessionTable

CPU = torch.device("cpu")
PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a",
           "def fibonacci(n):", "1, 2, 3, 4,"]
TOKENS = 8


def generate(loaded, max_tokens: int = TOKENS) -> list[list[int]]:
    """Greedy tokens of PROMPTS, decoded together; fails unless the decode
    steps went through the graphs' static-buffer path."""
    async def main():
        engine = Engine(loaded, FixedMemory(1 << 30), decode_graphs=True, max_batch=8,
                        chunk_bytes=1 << 16)
        engine.start()
        try:
            sessions = SessionTable()
            requests = [engine.submit(sessions.open(), SamplingParams(max_tokens=max_tokens),
                                      prompt=p) for p in PROMPTS]
            outs = []
            for request in requests:
                tokens = []
                while True:
                    event = await request.out.get()
                    if not isinstance(event, Delta):
                        assert isinstance(event, Finished), event
                        break
                    tokens.extend(event.token_ids)
                    engine.delivered(request, len(event.token_ids))
                outs.append(tokens)
            assert engine.runner.graphed_steps >= max_tokens - 1, (
                f"{engine.runner.graphed_steps} decode steps through the graphs' path")
            return outs
        finally:
            await engine.close()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def tiny_outputs(tiny) -> list[list[int]]:
    return generate(tiny)


@pytest.mark.parametrize("fixture", ["tiny", pytest.param("gemma_tiny", marks=pytest.mark.slow)])
def test_decoded_tokens_are_the_references_choices(fixture, request):
    loaded = request.getfixturevalue(fixture)
    outputs = request.getfixturevalue("tiny_outputs") if fixture == "tiny" else generate(loaded)
    total = Choices(0, 0, 0)
    for prompt, tokens in zip(PROMPTS, outputs):
        total += choices(loaded.model, loaded.tokenizer(prompt)["input_ids"], tokens, CPU,
                         loaded.vocab_limit)
    assert total.positions == TOKENS * len(PROMPTS), f"sessions ended early: {outputs}"
    assert total.same == total.positions, (
        f"{fixture}: the engine's float32 tokens are the reference's choice at {total.same} of "
        f"{total.positions} positions: {total.as_dict()}")


def test_the_check_sees_tokens_the_reference_would_not_choose(tiny, tiny_outputs):
    prompt = tiny.tokenizer(PROMPTS[0])["input_ids"]
    right = tiny_outputs[0]
    wrong = [(t + 1) % tiny.vocab_limit for t in right]
    assert choices(tiny.model, prompt, right, CPU, tiny.vocab_limit).agreement == 1.0
    checked = choices(tiny.model, prompt, wrong, CPU, tiny.vocab_limit)
    assert checked.same == 0 and checked.agreement_near_ties < 0.5, checked.as_dict()
