"""The worker's base lease, sized from the step memory plan (step_memory.py).

Before the load, from the model's config: the plan, the workspace of the
largest step the limits allow, an estimate of the decode graphs' pool
(`initial`). After the load, vLLM's profile run against the plan
(`measure`): one full-size prefill and an eager decode step, each step's peak
beyond what was allocated before it measured by the runner and compared
with the plan (a plan below it is scaled up for every later step and logged
as step_plan_below_measured: a missing term); every decode graph captured,
the largest bucket first, and their pool measured; the CUDA context measured
again. The measured terms are what the base lease is resized to. If
admission cannot grant a growth, the worker fits what it holds instead of
failing its start (`fit`): a smaller prefill per step, fewer decode graphs,
more layers streamed (when the share was chosen automatically), the
smallest prefill; only when none of those fits does the start fail.

The estimate before the load counts what the profile run then measures: the
context as the kernels load (CONTEXT_WARMUP_BYTES) and a park's staging
buffers, so that the measured lease is rarely larger than the first grant
(an H100 at 0269351: llama-3b's measured lease was 230 MB over its grant, on a
full device, and its start failed).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
import torch

from services.common.errors import CapacityExhausted
from services.worker import device as devices
from services.worker.engine import Engine, Failed, Finished
from services.worker.kv_transfer import STAGING_BYTES
from services.worker.memory import Memory
from services.worker.sampling import SamplingParams
from services.worker.quantize import QuantSpec, step_dims
from services.worker.settings import WorkerSettings
from services.worker.step_memory import (
    ALLOCATOR_SLACK_BYTES,
    BaseLease,
    ModelDims,
    StepMemoryPlan,
    StepShape,
)

log = structlog.get_logger(__name__)

#: The smallest prefill per step the warm-up falls back to on a full device.
MIN_PREFILL_TOKENS = 64
#: The smallest prefill per step a start cuts to before it streams more
#: layers to fit its lease (below it, long prompts take many steps).
PREFILL_FLOOR_TOKENS = 256
#: Room left in the lease for kernels a later step may still load into the
#: CUDA context after the warm-up measured it.
CONTEXT_GROWTH_BYTES = 64 << 20
#: How much the CUDA context grows as the first steps load their kernels and
#: cuBLAS makes its handles, counted before the load: on an H100 (torch 2.11)
#: 145-195 MB over the 640 MB measured at start, in every worker log so far,
#: plus CONTEXT_GROWTH_BYTES of room.
CONTEXT_WARMUP_BYTES = 256 << 20
#: How long one growth of the base lease at start waits for admission to
#: reclaim memory from other holders before the lease is cut to fit (fit).
SIZING_WAIT_S = 10.0
#: How long each growth after a cut waits (fit).
RETRY_WAIT_S = 1.0


class LeaseSizing:
    def __init__(self, settings: WorkerSettings, device: torch.device, dtype: torch.dtype,
                 cache: Path):
        from services.worker.models import model_config

        self.settings = settings
        self.device = device
        config, _ = model_config(settings.model, cache)
        window = int(getattr(config.get_text_config(), "max_position_embeddings", 0) or 2048)
        self.max_context = min(window, settings.max_context) if settings.max_context else window
        itemsize = torch.empty((), dtype=dtype).element_size()
        # Off CUDA, SDPA's math kernel runs (and nothing caps the memory there).
        dims = ModelDims.from_config(config, itemsize)
        quant = QuantSpec.of(settings)
        dims = step_dims(dims, quant, device, dtype)
        self.plan = StepMemoryPlan(dims, math_attention=device.type != "cuda")
        self.graphs = devices.decode_graphs(settings.cuda_graphs, device)
        self.max_prefill_tokens = settings.max_prefill_tokens

    def workspace(self) -> int:
        return self.plan.workspace_bytes(
            max_batch=self.settings.max_batch, max_prefill_tokens=self.max_prefill_tokens,
            max_context=self.max_context, graphs=self.graphs)

    def graph_pool_estimate(self) -> int:
        if not self.graphs:
            return 0
        from services.worker import paged_kernels
        from services.worker.decode_graphs import buckets

        return self.plan.graph_pool_bytes(buckets(self.settings.max_batch), paged_kernels.PARTS)

    def initial(self, overhead: int) -> BaseLease:
        """Before the load (the weights' term is set by the caller): on CUDA
        the context with what the first steps' kernels add to it, the
        workspace, the graphs' pool estimated, a park's staging buffers and
        the allocator's slack; nothing beside the weights on the CPU."""
        if self.device.type != "cuda":
            return BaseLease(0, 0, 0)
        return BaseLease(0, overhead + CONTEXT_WARMUP_BYTES, self.workspace(),
                         self.graph_pool_estimate(), STAGING_BYTES, ALLOCATOR_SLACK_BYTES)

    async def measure(self, engine: Engine, open_session, close_session, memory: Memory, *,
                      weight_bytes: Callable[[], int], overhead: int, staging: int,
                      estimated: BaseLease,
                      shed_weights: Callable[[int], Awaitable[bool]] | None = None) -> BaseLease:
        """The profile run (CUDA), then the base lease resized to the
        measured terms, which are returned (`fit`). The engine's runner keeps
        every step within their workspace from then on. `shed_weights(bytes)`
        streams more layers to free at least that many bytes of weights, if
        the worker may (False when it may not)."""
        tokens = min(self.settings.max_prefill_tokens, self.max_context - 2)
        # On a device this full, the KV of a full-size prefill may not be
        # granted: halve the prefill (the engine's tokens per step) until it
        # is, rather than fail or wait for memory that is not coming.
        wait_s, engine.kv_wait_s = engine.kv_wait_s, min(engine.kv_wait_s, 10.0)
        graphs = engine.runner.graphs
        if graphs is not None:
            graphs.held = True     # the warm-up's decode step runs eagerly
        try:
            while True:
                try:
                    measured, kv_at_peak = await self._prefill_peak(
                        engine, open_session, close_session, tokens)
                    break
                except CapacityExhausted as exc:
                    if tokens <= MIN_PREFILL_TOKENS:
                        raise
                    tokens = max(MIN_PREFILL_TOKENS, tokens // 2)
                    log.warning("worker_prefill_reduced", max_prefill_tokens=tokens,
                                reason=exc.message)
        finally:
            engine.kv_wait_s = wait_s
            if graphs is not None:
                graphs.held = False
        engine.max_prefill_tokens = self.max_prefill_tokens = min(engine.max_prefill_tokens, tokens)
        planned = self.plan.step_bytes(StepShape(1, tokens, tokens, tokens))
        if measured > planned:
            self.plan.scale *= measured / planned * 1.1
            log.warning("step_plan_below_measured", tokens=tokens, planned_bytes=planned,
                        measured_bytes=measured, scale=round(self.plan.scale, 3),
                        effect="the plan is scaled up for every step; the formula misses a term")
        pool = await self._graph_pool(engine)
        # The context grew as the warm-up's kernels loaded and cuBLAS made
        # its handles: measured once at start, it would now be too small, and
        # the excess would count against the lease of whoever asks next
        # (admission sees it as foreign). Measure it again, with room for the
        # kernels a later step may still load.
        context = await asyncio.to_thread(devices.cuda_context_bytes, self.device)
        if context is not None and context + CONTEXT_GROWTH_BYTES > overhead:
            log.info("worker_context_grew", before_bytes=overhead, measured_bytes=context,
                     growth_room_bytes=CONTEXT_GROWTH_BYTES)
            overhead = context + CONTEXT_GROWTH_BYTES
        terms = BaseLease(weight_bytes(), overhead, self.workspace(), pool, staging,
                          ALLOCATOR_SLACK_BYTES)
        log.info("worker_workspace_measured", prefill_tokens=tokens, planned_step_bytes=planned,
                 measured_step_bytes=measured, kv_bytes=kv_at_peak,
                 graph_pool_estimate_bytes=estimated.graph_pool, **terms.fields())
        terms = await self.fit(engine, memory, terms, weight_bytes, shed_weights)
        engine.runner.workspace_bytes = terms.workspace
        return terms

    async def fit(self, engine: Engine, memory: Memory, terms: BaseLease,
                  weight_bytes: Callable[[], int],
                  shed_weights: Callable[[int], Awaitable[bool]] | None) -> BaseLease:
        """The base lease resized to `terms`; where admission cannot grow it
        (other holders keep their memory past SIZING_WAIT_S), the terms cut
        until they fit what is held, one step at a time, in the order that
        costs the least speed: the prefill per step halved down to
        PREFILL_FLOOR_TOKENS (a long prompt takes a few more steps), decode
        graphs for the largest buckets (half the rows, down to 8, then none:
        large batches decode eagerly), more layers streamed (every step
        slower), the prefill down to MIN_PREFILL_TOKENS. Each cut is logged
        (worker_lease_fitted); the terms that fit are returned. When nothing
        is left to cut, the start fails with admission's refusal."""
        graphs = engine.runner.graphs
        # A short wait: admission asks other holders to give back in it, and
        # should none, a smaller lease is better than a start that waits a
        # minute. After a cut, a glance: what others could give back, they
        # would have.
        wait_s = SIZING_WAIT_S
        while True:
            try:
                await memory.resize_base(terms.total, wait_s=wait_s)
                return terms
            except CapacityExhausted as exc:
                wait_s = RETRY_WAIT_S
                held = memory.granted().get("weights", 0)
                missing = terms.total - held
                if self.max_prefill_tokens > PREFILL_FLOOR_TOKENS:
                    terms, cut = self._halve_prefill(engine, terms, PREFILL_FLOOR_TOKENS)
                elif graphs is not None and terms.graph_pool and graphs.broken is None:
                    # Decode graphs only for the buckets that fit: half the
                    # rows, captured again and measured; none below 8 rows.
                    top = graphs.sizes[-1] // 2
                    if top < 8:
                        await engine.between_steps(graphs.disable, "their memory pool does not "
                                                   f"fit the lease ({exc.message})")
                        torch.cuda.empty_cache()
                        terms = dataclasses.replace(terms, graph_pool=0)
                        cut = "decode graphs off"
                    else:
                        await engine.between_steps(graphs.limit, top)
                        terms = dataclasses.replace(terms,
                                                    graph_pool=await self._graph_pool(engine))
                        cut = f"decode graphs up to {top} rows"
                elif shed_weights is not None and await shed_weights(missing):
                    terms = dataclasses.replace(terms, weights=weight_bytes())
                    cut = "more layers streamed"
                elif self.max_prefill_tokens > MIN_PREFILL_TOKENS:
                    terms, cut = self._halve_prefill(engine, terms, MIN_PREFILL_TOKENS)
                else:
                    raise
                log.warning("worker_lease_fitted", cut=cut, held_bytes=held,
                            missing_bytes=missing, reason=exc.message, **terms.fields())

    def _halve_prefill(self, engine: Engine, terms: BaseLease,
                       floor: int) -> tuple[BaseLease, str]:
        """The engine's prefill per step halved (not below `floor`), the
        terms' workspace with it, and the cut said for the log."""
        tokens = max(floor, self.max_prefill_tokens // 2)
        engine.max_prefill_tokens = self.max_prefill_tokens = tokens
        return (dataclasses.replace(terms, workspace=self.workspace()),
                f"prefill of {tokens} tokens per step")

    async def _graph_pool(self, engine: Engine) -> int:
        """Every decode graph captured now, the largest first, and the bytes
        their pool reserves (0 without graphs)."""
        graphs = engine.runner.graphs
        if graphs is None or graphs.broken is not None:
            return 0
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(self.device)
        await engine.between_steps(graphs.capture_all)
        torch.cuda.empty_cache()
        return max(0, torch.cuda.memory_reserved(self.device) - before)

    @staticmethod
    async def _prefill_peak(engine: Engine, open_session, close_session,
                            tokens: int) -> tuple[int, int]:
        """The largest step's peak beyond what it found allocated (the
        runner measures each step) over one prefill of `tokens` tokens and
        one decode step, and the KV it held then; its KV is given back
        before returning."""
        runner = engine.runner
        runner.max_step_bytes = 0
        session = open_session()
        try:
            vocab = engine.loaded.vocab_limit
            prompt_ids = [i % vocab for i in range(1000, 1000 + tokens)]
            # Two tokens: a prefill step and a decode step, so that both
            # steps' kernels are loaded before the context is measured.
            request = engine.submit_tokens(session, SamplingParams(max_tokens=2), prompt_ids)
            while True:
                event = await request.out.get()
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Finished):
                    break
            kv_at_peak = engine.storage.num_bytes
        finally:
            await close_session(session)
            await engine.wait_settled()  # the warm-up's KV chunks are given back
        return runner.max_step_bytes, kv_at_peak
