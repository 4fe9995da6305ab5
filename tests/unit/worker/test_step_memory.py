"""The step memory plan (pure) and the engine kept within a workspace by it:
steps split by the scheduler and the runner compute the same tokens as
unbounded ones, every step the runner computes fits the plan, and an
out-of-memory error in a step is survived (split and run again), or ends
only the request that cannot fit, with RESOURCE_EXHAUSTED.

Whether the plan is an upper bound of what a step really allocates is a GPU
question: tests/gpu/test_step_memory_gpu.py and bench/step_memory.py.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.common.errors import CapacityExhausted
from services.worker.engine import Finished
from services.worker.runner import StepItem, step_shape
from services.worker.sampling import SamplingParams
from services.worker.sessions import SessionTable
from services.worker.step_memory import (
    FIXED_MARGIN_BYTES,
    BaseLease,
    ModelDims,
    StepMemoryPlan,
    StepShape,
)

from test_engine import collect, each_alone, hf_greedy, reference, run, tokens_of  # noqa: F401

LLAMA_1B = ModelDims(hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64,
                     vocab=128256, itemsize=2)


# ---- the plan ------------------------------------------------------------------
def test_the_plan_grows_with_rows_tokens_and_context():
    plan = StepMemoryPlan(LLAMA_1B)
    base = StepShape(8, 8, 1, 512)
    assert plan.step_bytes(StepShape(16, 16, 1, 512)) > plan.step_bytes(base)
    assert plan.step_bytes(StepShape(8, 8, 1, 4096)) > plan.step_bytes(base)
    assert plan.step_bytes(StepShape(8, 512, 64, 512)) > plan.step_bytes(base)
    assert plan.step_bytes(StepShape(0, 0, 0, 0)) == 0


def test_a_graphed_decode_needs_only_sampling_and_its_check_the_eager_step_too():
    plan = StepMemoryPlan(LLAMA_1B)
    eager = StepShape(64, 64, 1, 8192)
    graphed = StepShape(64, 64, 1, 8192, graphed=True)
    first = StepShape(64, 64, 1, 8192, graphed=True, checked=False)
    assert plan.step_bytes(graphed) < plan.step_bytes(StepShape(1, 1, 1, 16)) + (8 << 20)
    # The check computes its first 8 rows eagerly: more than the graphed step,
    # less than all 64 rows eagerly.
    assert plan.step_bytes(eager) > plan.step_bytes(first) > 10 * plan.step_bytes(graphed)


def test_the_math_kernel_is_planned_with_its_scores():
    fused = StepMemoryPlan(LLAMA_1B)
    math = StepMemoryPlan(LLAMA_1B, math_attention=True)
    shape = StepShape(1, 2048, 2048, 8192)
    # 32 heads x 2048 queries x 8192 keys in float32, three times.
    assert math.step_bytes(shape) - fused.step_bytes(shape) > 3 * 32 * 2048 * 8192 * 4


def test_the_workspace_holds_the_steps_the_scheduler_must_run_whole():
    plan = StepMemoryPlan(LLAMA_1B)
    workspace = plan.workspace_bytes(max_batch=64, max_prefill_tokens=2048, max_context=8192,
                                     graphs=True)
    for shape in (StepShape(1, 2048, 2048, 2048), StepShape(1, 1, 1, 8192),
                  StepShape(64, 64, 1, 8192, graphed=True), StepShape(64, 64, 1, 256)):
        assert plan.fits(shape, workspace), shape
    # ... and not 64 eager rows at the longest context: those are split.
    assert not plan.fits(StepShape(64, 64, 1, 8192), workspace)


@pytest.mark.parametrize("context", [0, 1000, 7000])
def test_largest_chunk_is_the_most_that_fits(context):
    plan = StepMemoryPlan(LLAMA_1B)
    workspace = plan.step_bytes(StepShape(1, 700, 700, 3000))
    count = plan.largest_chunk(StepShape(0, 0, 0, 0), 2048, context, workspace)
    assert 0 < count < 2048
    assert plan.fits(StepShape(1, count, count, context + count), workspace)
    assert not plan.fits(StepShape(1, count + 1, count + 1, context + count + 1), workspace)
    assert plan.largest_chunk(StepShape(0, 0, 0, 0), 5, context, 1 << 40) == 5
    assert plan.largest_chunk(StepShape(0, 0, 0, 0), 5, context, FIXED_MARGIN_BYTES) == 0


def test_dims_from_a_config():
    from transformers import AutoConfig

    config = AutoConfig.for_model("gemma3_text", hidden_size=640, intermediate_size=2048,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=256, vocab_size=262144)
    dims = ModelDims.from_config(config, 2)
    assert (dims.hidden, dims.heads, dims.kv_heads, dims.head_dim, dims.vocab) == (
        640, 4, 1, 256, 262144)
    assert dims.rotary_sets == 2 and not dims.softcap


def test_the_base_lease_is_the_sum_of_its_terms():
    terms = BaseLease(weights=100, overhead=10, workspace=5, graph_pool=3, staging=2, slack=1)
    assert terms.total == 121
    assert terms.fields()["bytes"] == 121


# ---- the engine within a workspace ----------------------------------------------
PROMPTS = [[1000 + 7 * i + j for j in range(12 + 5 * i)] for i in range(4)]


def _bounded(engine, workspace: int) -> list[StepShape]:
    """Give the engine's runner a plan and a workspace; record the shape of
    every eager forward pass it runs."""
    runner = engine.runner
    runner.plan = StepMemoryPlan(ModelDims.from_config(engine.loaded.model.config, 4),
                                 math_attention=True)
    runner.workspace_bytes = workspace(runner.plan) if callable(workspace) else workspace
    shapes: list[StepShape] = []
    eager = runner._eager

    def recorded(items):
        shapes.append(step_shape(items))
        return eager(items)

    runner._eager = recorded
    return shapes


def test_decode_steps_split_to_the_workspace_compute_the_same_tokens(tiny):
    params = SamplingParams(max_tokens=12)
    alone = run(tiny, each_alone(PROMPTS, params))

    async def scenario(engine):
        shapes = _bounded(engine, lambda plan: plan.step_bytes(StepShape(2, 2, 1, 64)))
        sessions = SessionTable()
        requests = [engine.submit_tokens(sessions.open(), params, p) for p in PROMPTS]
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
        return results, shapes, engine.runner

    results, shapes, runner = run(tiny, scenario)
    for expected, (deltas, end) in zip(alone, results):
        assert isinstance(end, Finished), end
        assert tokens_of(deltas) == expected
    decodes = [s for s in shapes if s.max_new == 1]
    assert decodes and max(s.rows for s in decodes) == 2, decodes
    assert all(runner.fits(s) for s in shapes), [s for s in shapes if not runner.fits(s)]


def test_a_long_prompt_takes_chunks_its_context_leaves_room_for(tiny, reference):  # noqa: F811
    prompt = list(range(1000, 1150))
    params = SamplingParams(max_tokens=8)

    async def scenario(engine):
        shapes = _bounded(engine, lambda plan: plan.step_bytes(StepShape(1, 40, 40, 40)))
        session = SessionTable().open()
        deltas, end = await collect(engine, engine.submit_tokens(session, params, prompt))
        return tokens_of(deltas), end, shapes, engine.runner

    got, end, shapes, runner = run(tiny, scenario)
    assert isinstance(end, Finished), end
    assert got == hf_greedy(tiny, reference, prompt, 8)
    prefills = [s for s in shapes if s.max_new > 1]
    assert len(prefills) >= 4 and max(s.tokens for s in prefills) <= 40, prefills
    assert all(runner.fits(s) for s in shapes)


def test_the_runner_splits_a_step_the_workspace_cannot_hold(tiny):
    """A step built without the plan (four prompts at once) is computed in
    parts that fit, to the same next tokens."""
    async def scenario(engine):
        storage, pool, runner = engine.storage, engine.pool, engine.runner
        items = []
        for i, prompt in enumerate(PROMPTS):
            while not pool.can_append(f"s{i}", len(prompt)):
                storage.add_chunk()
                pool.add_chunk()
            slots = pool.append(f"s{i}", len(prompt))
            items.append(StepItem(prompt, slots, slots, SamplingParams(), None))
        whole = runner.step(items)
        shapes = _bounded(engine, lambda plan: plan.step_bytes(step_shape(items[:1])))
        parts = runner.step(items)
        return whole, parts, shapes, runner

    whole, parts, shapes, runner = run(tiny, scenario)
    assert parts == whole
    assert len(shapes) >= 4 and runner.split_steps >= 1
    assert all(runner.fits(s) for s in shapes)


def test_an_out_of_memory_step_is_split_and_run_again(tiny):
    params = SamplingParams(max_tokens=10)
    alone = run(tiny, each_alone(PROMPTS, params))

    async def scenario(engine):
        runner = engine.runner
        eager = runner._eager

        def short_of_memory(items):
            if len(items) > 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
            return eager(items)

        runner._eager = short_of_memory
        sessions = SessionTable()
        requests = [engine.submit_tokens(sessions.open(), params, p) for p in PROMPTS]
        return await asyncio.gather(*(collect(engine, r) for r in requests)), engine.stats()

    results, stats = run(tiny, scenario)
    for expected, (deltas, end) in zip(alone, results):
        assert isinstance(end, Finished), end
        assert tokens_of(deltas) == expected
    assert stats.steps_out_of_memory > 0


def test_a_token_that_never_fits_fails_its_request_alone_with_resource_exhausted(tiny):
    params = SamplingParams(max_tokens=6)
    doomed_prompt = [5, *PROMPTS[3]]      # token 5: no memory for it, ever

    async def scenario(engine):
        runner = engine.runner
        eager = runner._eager

        def short_of_memory(items):
            if any(5 in item.tokens for item in items):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
            return eager(items)

        runner._eager = short_of_memory
        sessions = SessionTable()
        requests = [engine.submit_tokens(sessions.open(), params, p)
                    for p in [*PROMPTS[:3], doomed_prompt]]
        return await asyncio.gather(*(collect(engine, r) for r in requests)), engine.stats()

    results, stats = run(tiny, scenario)
    *others, (deltas, end) = results
    assert all(isinstance(e, Finished) for _, e in others), others
    assert not deltas and not isinstance(end, Finished), end
    assert isinstance(end.error, CapacityExhausted), end.error
    assert end.error.retry_after_s > 0
    assert stats.steps_out_of_memory > 0
