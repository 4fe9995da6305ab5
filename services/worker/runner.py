"""Runs one forward pass of the model over a batch of sequences (prefills
and decodes packed together) with paged KV, and samples their next tokens.
A decode step replays a CUDA graph where one applies (decode_graphs.py); the
first one is checked against the eager step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.attention import BatchPlan, Segment
from services.worker.decode_graphs import DecodeGraphs
from services.worker.kv_storage import KVStorage
from services.worker.models import LoadedModel
from services.worker.sampling import SamplingParams, sample


@dataclass(frozen=True, slots=True)
class StepItem:
    """One sequence in a step: the tokens to feed (a whole prompt, or the
    last sampled token) and their slots; all_slots covers the context."""

    tokens: list[int]
    new_slots: list[int]
    all_slots: list[int]
    params: SamplingParams
    generator: torch.Generator | None


class ModelRunner:
    def __init__(self, loaded: LoadedModel, storage: KVStorage,
                 graphs: DecodeGraphs | None = None):
        self.loaded = loaded
        self.storage = storage
        self.device = loaded.device
        self.graphs = graphs
        self.graphed_steps = 0

    @torch.inference_mode()
    def step(self, items: list[StepItem]) -> list[int]:
        graphs = self.graphs
        logits = None
        if graphs is not None and graphs.applies(items):
            try:
                logits = graphs.run(items)
            except Exception as exc:  # noqa: BLE001 - decode eagerly rather than not at all
                graphs.fail(exc)
            else:
                if not graphs.checked:
                    # The eager step writes this step's K/V again: its own stays.
                    eager = self._eager(items)
                    if not graphs.check(logits, eager):
                        logits = eager
                if graphs.broken is None:
                    self.graphed_steps += 1
        if logits is None:
            logits = self._eager(items)
        return sample(logits, [i.params for i in items], [i.generator for i in items],
                      self.loaded.vocab_limit)

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
