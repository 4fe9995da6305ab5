"""A start whose measured base lease admission cannot grow fits what it
holds (services/worker/sizing.py, LeaseSizing.fit): the prefill per step
halved to PREFILL_FLOOR_TOKENS first, then (on a GPU) fewer decode graphs,
then more layers streamed where the worker may, then the prefill down to
MIN_PREFILL_TOKENS; only then does the start fail. Found on an H100
(0269351): `lmx demo`'s llama-3b worker, started on a full 8 GiB cap,
measured 230 MB more than its first grant and exited.

The engine is the real one over llama-tiny; the memory is the worker's
FixedMemory (a budget that refuses a growth past it, as admission does)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.common.errors import CapacityExhausted
from services.worker.engine import Engine
from services.worker.kv_transfer import STAGING_BYTES
from services.worker.memory import FixedMemory
from services.worker.settings import load_settings
from services.worker.sizing import (
    CONTEXT_WARMUP_BYTES,
    MIN_PREFILL_TOKENS,
    PREFILL_FLOOR_TOKENS,
    RETRY_WAIT_S,
    SIZING_WAIT_S,
    LeaseSizing,
)
from services.worker.step_memory import BaseLease

WEIGHTS = 500 << 20
MIB = 1 << 20


def sizing_for(model_cache, device: str = "cpu") -> LeaseSizing:
    # A 1,024-token window and one row: the prefill's term is the largest,
    # and shrinks with the prefill down to 64 tokens.
    settings = load_settings(["--model", "synthetic:llama-tiny", "--device", "cpu",
                              "--max-context", "1024", "--max-batch", "1"], {})
    return LeaseSizing(settings, torch.device(device), torch.float32, model_cache)


def workspace_at(sizing: LeaseSizing, tokens: int) -> int:
    kept = sizing.max_prefill_tokens
    sizing.max_prefill_tokens = tokens
    try:
        return sizing.workspace()
    finally:
        sizing.max_prefill_tokens = kept


class Weights:
    """What the worker's streamer does for `shed_weights`: more layers
    streamed, `layer` bytes each, the fewest that free what is asked."""

    def __init__(self, allowed: bool, layer: int = 64 << 20):
        self.bytes = WEIGHTS
        self.allowed = allowed
        self.layer = layer
        self.asked: list[int] = []

    async def shed(self, needed: int) -> bool:
        self.asked.append(needed)
        if not self.allowed:
            return False
        self.bytes -= -(-needed // self.layer) * self.layer
        return True


class Budget(FixedMemory):
    """The worker's FixedMemory, with how long each growth would have
    waited in admission's queue."""

    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self.waits: list[float] = []

    async def resize_base(self, num_bytes: int, wait_forever: bool = False,
                          wait_s: float = 60.0) -> None:
        self.waits.append(wait_s)
        await super().resize_base(num_bytes, wait_forever, wait_s)


def fit(tiny, sizing: LeaseSizing, capacity: int, weights: Weights):
    async def main():
        memory = Budget(capacity)
        await memory.acquire_base(capacity)     # the first grant: all there was
        engine = Engine(tiny, memory, max_batch=1, max_prefill_tokens=sizing.max_prefill_tokens)
        terms = BaseLease(weights.bytes, 0, sizing.workspace())
        try:
            fitted = await sizing.fit(engine, memory, terms, lambda: weights.bytes, weights.shed)
        finally:
            await engine.close()
        return fitted, engine, memory
    return asyncio.run(main())


def test_the_prefill_is_cut_before_any_layer_is_streamed(tiny, model_cache):
    sizing = sizing_for(model_cache)
    assert sizing.max_prefill_tokens == 2048
    weights = Weights(allowed=True)
    capacity = WEIGHTS + workspace_at(sizing, PREFILL_FLOOR_TOKENS) + MIB
    terms, engine, memory = fit(tiny, sizing, capacity, weights)
    assert engine.max_prefill_tokens == sizing.max_prefill_tokens == PREFILL_FLOOR_TOKENS
    assert weights.asked == [], "no layer streamed while a smaller prefill fits"
    assert terms.workspace == workspace_at(sizing, PREFILL_FLOOR_TOKENS)
    assert memory.granted()["weights"] == terms.total <= capacity
    # 2,048 tokens, then 1,024, 512 and 256: only the first try waits for
    # admission to reclaim from others
    assert memory.waits == [SIZING_WAIT_S, RETRY_WAIT_S, RETRY_WAIT_S, RETRY_WAIT_S]


def test_below_the_floor_layers_are_streamed_before_the_prefill_is_cut_again(tiny, model_cache):
    sizing = sizing_for(model_cache)
    weights = Weights(allowed=True)
    floor_total = WEIGHTS + workspace_at(sizing, PREFILL_FLOOR_TOKENS)
    capacity = floor_total - 100 * MIB
    terms, engine, memory = fit(tiny, sizing, capacity, weights)
    assert engine.max_prefill_tokens == PREFILL_FLOOR_TOKENS
    # Asked for what was missing against what the worker held, and no more
    # layers than that: two of 64 MiB for the 100 MiB short.
    assert weights.asked == [100 * MIB]
    assert weights.bytes == WEIGHTS - 2 * weights.layer
    assert terms.weights == weights.bytes
    assert memory.granted()["weights"] == terms.total <= capacity


def test_a_share_that_was_set_keeps_its_layers_and_cuts_the_prefill(tiny, model_cache):
    sizing = sizing_for(model_cache)
    weights = Weights(allowed=False)
    capacity = WEIGHTS + workspace_at(sizing, 128) + MIB
    terms, engine, memory = fit(tiny, sizing, capacity, weights)
    assert len(weights.asked) == 1 and weights.bytes == WEIGHTS
    assert engine.max_prefill_tokens == 128
    assert memory.granted()["weights"] == terms.total <= capacity


def test_when_nothing_left_to_cut_fits_the_start_fails_with_admissions_refusal(tiny, model_cache):
    sizing = sizing_for(model_cache)
    weights = Weights(allowed=False)
    capacity = WEIGHTS + workspace_at(sizing, MIN_PREFILL_TOKENS) - MIB
    with pytest.raises(CapacityExhausted, match="the model needs"):
        fit(tiny, sizing, capacity, weights)
    assert sizing.max_prefill_tokens == MIN_PREFILL_TOKENS


def test_the_first_estimate_counts_the_contexts_growth_and_a_parks_staging(model_cache,
                                                                          monkeypatch):
    """Before the load on a GPU: the context as measured at start, plus what
    the first steps' kernels add (145-195 MB on an H100, with 64 MiB of
    room), and the staging buffers every park and restore takes; the profile
    run measured both later, and the lease had to grow by them."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    sizing = sizing_for(model_cache, "cuda:0")
    terms = sizing.initial(640 << 20)
    assert terms.overhead == (640 << 20) + CONTEXT_WARMUP_BYTES
    assert CONTEXT_WARMUP_BYTES >= 195_000_000 + (64 << 20)
    assert terms.staging == STAGING_BYTES == 96 << 20
    assert sizing_for(model_cache).initial(0) == BaseLease(0, 0, 0)
