"""Runs one forward pass of the model over a batch of sequences (prefills
and decodes packed together) with paged KV, and samples their next tokens.
A decode step replays a CUDA graph where one applies (decode_graphs.py); the
first one is checked against the eager step.

Memory: with a workspace set (the bytes the worker's base lease holds for
steps, services/worker/step_memory.py), an eager step whose plan exceeds it
is split into sub-steps that fit, by rows and, for one long row, by tokens
(its first part only writes KV). The items of a step are independent (each
reads and writes its own slots), so the split computes the same tokens. An
out-of-memory error in a step is caught, logged as `step_out_of_memory` with
the plan and the measured peak, counted, and the step is split in halves and
run again; one token of one row that still does not fit ends that request
with RESOURCE_EXHAUSTED (retryable), never the worker. It is a bug when it
happens, not a normal path."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
import torch

from services.common.errors import CapacityExhausted, Shortfall
from services.worker.attention import BatchPlan, Segment
from services.worker.decode_ahead import plain_greedy
from services.worker.decode_graphs import CHECK_ROWS, DecodeGraphs, HostTokens
from services.worker.kv_storage import KVStorage
from services.worker.models import LoadedModel
from services.worker.sampling import SamplingParams, sample
from services.worker.step_memory import StepMemoryPlan, StepShape

log = structlog.get_logger(__name__)

#: A step that ran out of memory though it fit its plan is retried after
#: this long by the caller it fails (RESOURCE_EXHAUSTED's retry hint).
OOM_RETRY_AFTER_S = 1.0


@dataclass(frozen=True, slots=True)
class StepItem:
    """One sequence in a step: the tokens to feed (a whole prompt, or the
    last sampled token) and their slots; all_slots covers the context."""

    tokens: list[int]
    new_slots: list[int]
    all_slots: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    #: The generation's grammar (constraints.py), or None.
    constraint: object = None
    #: The tokens its answer generated so far (for penalties), or None.
    generated: list[int] | None = None

    def split(self, count: int) -> tuple[StepItem, StepItem]:
        """The first `count` tokens (KV only: their logits are not used) and
        the rest, as two items of consecutive steps."""
        head_len = len(self.all_slots) - len(self.tokens) + count
        return (StepItem(self.tokens[:count], self.new_slots[:count],
                         self.all_slots[:head_len], self.params, self.generator),
                StepItem(self.tokens[count:], self.new_slots[count:], self.all_slots,
                         self.params, self.generator, self.constraint, self.generated))


def step_shape(items: list[StepItem], graphed: bool = False, checked: bool = True) -> StepShape:
    return StepShape.of([(len(i.tokens), len(i.all_slots)) for i in items], graphed, checked)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, storage: KVStorage,
                 graphs: DecodeGraphs | None = None, plan: StepMemoryPlan | None = None):
        self.loaded = loaded
        self.storage = storage
        self.device = loaded.device
        self.graphs = graphs
        self.plan = plan
        #: Bytes a step may use beyond weights and KV (None: no bound, as
        #: without a plan). Set by the worker once its base lease holds it.
        self.workspace_bytes: int | None = None
        self.graphed_steps = 0
        self.argmax_steps = 0          # graphed steps whose tokens were the graph's own argmax
        self.ahead_steps = 0           # of those, launched before the step before was read
        self.split_steps = 0           # steps run as several sub-steps to fit the workspace
        self.out_of_memory = 0         # steps that raised out of memory (each a bug)
        self.plan_misses = 0           # steps that used more than their plan (each a bug)
        #: The largest step's peak beyond what was allocated before it (CUDA).
        self.max_step_bytes = 0
        self._path = StepShape(0, 0, 0, 0)   # how the step in progress ran (graphed or not)

    # ---- what the scheduler asks ------------------------------------------
    def will_graph(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows is expected to replay a graph
        (the event loop asks; nothing changes)."""
        graphs = self.graphs
        return graphs is not None and graphs.likely(rows)

    def fits(self, shape: StepShape, held_bytes: int = 0) -> bool:
        """Whether a step of this shape stays within the workspace, beside
        `held_bytes` already held (earlier parts' logits)."""
        if self.plan is None or self.workspace_bytes is None:
            return True
        return self.plan.fits(shape, self.workspace_bytes - held_bytes)

    def can_launch(self, rows: int) -> bool:
        """Whether a decode step of `rows` plain greedy rows can be launched
        without reading its tokens (decode_ahead.py): it replays a graph
        already captured and checked, whose own argmax is its tokens."""
        graphs = self.graphs
        return (graphs is not None and graphs.checked and graphs.likely(rows)
                and graphs.captured(rows))

    # ---- decoding ahead ------------------------------------------------------
    @torch.inference_mode()
    def launch(self, items: list[StepItem], feed: list[int] | None = None) -> HostTokens | None:
        """Launch a graphed greedy decode step and return its tokens on their
        way to the host, without waiting for it; None (nothing launched) if
        its graph is not there to replay now (`can_launch` said so, or the
        weights moved since). `feed`: its rows' tokens are the previous
        launch's choices for those rows, taken on the device
        (DecodeGraphs.run)."""
        graphs = self.graphs
        if graphs is None or not graphs.applies(items) or not graphs.captured(len(items)):
            return None
        graphs.run(items, feed)
        self.graphed_steps += 1
        self.argmax_steps += 1
        if feed is not None:
            self.ahead_steps += 1
        return graphs.greedy_to_host()

    def launch_then_read(self, items: list[StepItem] | None, feed: list[int] | None,
                         previous: HostTokens) -> tuple[HostTokens | None, list[int]]:
        """Launch the next step (if `items`), then read the previous one's
        tokens: the device computes the next while the host works on those."""
        launched = self.launch(items, feed) if items else None
        return launched, previous.read()

    # ---- a step ------------------------------------------------------------
    @torch.inference_mode()
    def step(self, items: list[StepItem]) -> list[int | CapacityExhausted]:
        """The next token of each item, or for an item that could not be
        computed in the memory there is, the error its request ends with.

        On CUDA each step's peak beyond what was allocated before it is
        measured (`max_step_bytes`), and a step that used more than its plan
        is logged as step_plan_below_measured (a missing term of the
        formula, found in service rather than by an out-of-memory error)."""
        failed: str | None = None
        cuda = self.device.type == "cuda"
        graphs_before = self.graphs.num_graphs if self.graphs is not None else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            kv_before = self.storage.num_chunks
        self._path = StepShape(0, 0, 0, 0)
        try:
            tokens = list(self._step(items))
        except torch.OutOfMemoryError as exc:
            failed = str(exc).splitlines()[0] if str(exc) else "out of memory"
        if failed is None:
            if cuda:
                # KV chunks the event loop added while the step ran (the
                # KV lease's memory) are not the step's.
                kv_added = max(0, self.storage.num_chunks - kv_before) * self.storage.chunk_bytes
                measured = torch.cuda.max_memory_allocated(self.device) - before - kv_added
                self.max_step_bytes = max(self.max_step_bytes, measured)
                captured = self.graphs is not None and self.graphs.num_graphs != graphs_before
                planned = self._planned(items)
                if measured > planned and not captured and self.plan is not None:
                    self.plan_misses += 1
                    log.warning("step_plan_below_measured", rows=len(items),
                                tokens=sum(len(i.tokens) for i in items),
                                max_len=max(len(i.all_slots) for i in items),
                                planned_bytes=planned, measured_bytes=measured)
            return tokens
        # Out of the except block: the failed step's frames, and the tensors
        # they held, are gone before anything runs again.
        self.out_of_memory += 1
        planned = self._planned(items)
        peak = 0
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.device) - before
            torch.cuda.empty_cache()
        log.error("step_out_of_memory", rows=len(items), tokens=sum(len(i.tokens) for i in items),
                  max_len=max(len(i.all_slots) for i in items), planned_bytes=planned,
                  measured_peak_bytes=peak, workspace_bytes=self.workspace_bytes, error=failed)
        if len(items) > 1:
            half = len(items) // 2
            return self.step(items[:half]) + self.step(items[half:])
        item = items[0]
        if len(item.tokens) > 1:
            head, rest = item.split(len(item.tokens) // 2)
            done = self.step([head])
            return done if isinstance(done[0], CapacityExhausted) else self.step([rest])
        return [CapacityExhausted(
            f"the device ran out of memory computing one token ({failed}); retry",
            Shortfall(str(self.device), planned, self.workspace_bytes or 0), OOM_RETRY_AFTER_S)]

    def _planned(self, items: list[StepItem]) -> int:
        """The plan of the step as it ran (graphed or not: `_path`)."""
        if self.plan is None:
            return 0
        return self.plan.step_bytes(step_shape(items, self._path.graphed, self._path.checked))

    def _step(self, items: list[StepItem]) -> list[int]:
        graphs = self.graphs
        logits = None
        if graphs is not None and graphs.applies(items):
            try:
                logits = graphs.run(items)
            except Exception as exc:  # noqa: BLE001 - decode eagerly rather than not at all
                # A capture that failed, out of memory too (its pool is
                # freed): eager decode steps from now on.
                graphs.fail(exc)
            else:
                self._path = StepShape(0, 0, 0, 0, graphed=True, checked=graphs.checked)
                if not graphs.checked:
                    # Its first rows again, eagerly (their K/V written again:
                    # the same values), to check the kernels.
                    rows = items[:CHECK_ROWS]
                    if not graphs.check(logits[:len(rows)], self._eager_fitting(rows)):
                        logits = None
                if graphs.broken is None:
                    self.graphed_steps += 1
                    if logits is not None and all(plain_greedy(i) for i in items):
                        self.argmax_steps += 1
                        return graphs.greedy_tokens().tolist()
        if logits is None:
            logits = self._eager_fitting(items)
        return sample(logits, [i.params for i in items], [i.generator for i in items],
                      self.loaded.vocab_limit, [i.constraint for i in items],
                      [i.generated for i in items])

    def _eager_fitting(self, items: list[StepItem]) -> torch.Tensor:
        """Logits [rows, vocab] of `items`, computed eagerly in as few
        sub-steps as the workspace allows."""
        if self.fits(step_shape(items)):
            return self._eager(items)
        self.split_steps += 1
        if len(items) > 1:
            # Each part's logits are held while the next parts run.
            row_bytes = self.plan.dims.vocab * self.plan.dims.itemsize
            parts, group, held = [], [], 0
            for item in items:
                if group and not self.fits(step_shape([*group, item]), held):
                    parts.append(self._eager_fitting(group))
                    held += len(group) * row_bytes
                    group = []
                group.append(item)
            parts.append(self._eager_fitting(group))
            return torch.cat(parts)
        item = items[0]
        assert self.plan is not None and self.workspace_bytes is not None
        context_before = len(item.all_slots) - len(item.tokens)
        count = self.plan.largest_chunk(StepShape(0, 0, 0, 0), len(item.tokens), context_before,
                                        self.workspace_bytes)
        if count == 0 or count >= len(item.tokens):
            # Not even one token fits the plan (the workspace is smaller than
            # one row at this context): run it; an out-of-memory error is
            # caught in step().
            return self._eager(items)
        head, rest = item.split(count)
        self._eager([head])
        return self._eager_fitting([rest])

    def _eager(self, items: list[StepItem]) -> torch.Tensor:
        input_ids: list[int] = []
        positions: list[int] = []
        last: list[int] = []
        for item in items:
            start = len(item.all_slots) - len(item.tokens)
            input_ids.extend(item.tokens)
            positions.extend(range(start, start + len(item.tokens)))
            last.append(len(input_ids) - 1)
        plan = BatchPlan.build(self.storage, [Segment(i.new_slots, i.all_slots) for i in items],
                               self.device)
        out = self.loaded.model(
            input_ids=torch.tensor([input_ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            use_cache=False, lmx_plan=plan,
            logits_to_keep=torch.tensor(last, device=self.device))
        return out.logits[0]
