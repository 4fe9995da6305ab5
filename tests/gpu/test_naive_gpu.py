"""The naive launch on a real GPU (services/naive.py): a ballast makes the
card small, engines really allocate their weights and a KV cache of their
whole window on it, and the card's own out-of-memory error ends the ones
that do not fit, while the first answers.

Run on a CUDA host with `pytest -m gpu tests/gpu`. Skipped without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GIB = 1 << 30


@dataclass(frozen=True)
class Agent:
    name: str
    model: str
    turns: tuple[str, ...]


def test_on_a_small_card_the_second_naive_engine_dies_out_of_memory():
    from services.naive import emulated_card, run_naive

    card = int(1.5 * GIB)   # one SmolLM2-135M engine takes about 1 GB: context, weights, window
    agents = [Agent("first", "synthetic:smollm2-135m", ("Hello", " again")),
              Agent("second", "synthetic:smollm2-135m", ("Hello",))]
    with emulated_card(card) as said:
        assert abs(said["free_bytes"] - card) < 64 << 20, said
        first, second = run_naive(agents, 4, device="cuda", timeout_s=300)
    assert first.outcome == "ran", first.stderr[-2000:]
    assert len(first.reply["token_ids"]) == 2
    assert all(0 < len(ids) <= 4 for ids in first.reply["token_ids"])
    assert first.reply["dtype"] == "bfloat16"
    assert first.reply["kv_bytes"] > 0 and first.reply["reserved_bytes"] >= first.reply["kv_bytes"]
    assert second.outcome == "out of memory", second.stderr[-2000:]
    assert "out of memory" in second.reply["detail"].lower()
    # The ballast is gone with the block: the card is whole again.
    assert torch.cuda.mem_get_info(0)[0] > 4 * card
