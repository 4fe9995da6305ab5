"""Sampling settings and choosing the next token from logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.common.errors import InvalidArgument
from services.worker import limits


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """temperature 0 is greedy (argmax); top_k 0 and top_p 1 are off."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise InvalidArgument("sampling.max_tokens", f"must be positive, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0 or self.temperature != self.temperature:
            raise InvalidArgument("sampling.temperature", f"must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument("sampling.top_k", f"must not be negative, got {self.top_k}")
        limits.check_stop(self.stop)
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:      # NaN fails too
                raise InvalidArgument(f"sampling.{name}", f"must be in [-2, 2], got {value}")

    @property
    def penalised(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def penalise(logits: torch.Tensor, param: SamplingParams, generated: list[int]) -> None:
    """OpenAI's penalties on one row [vocab], in place: minus
    frequency_penalty x each token's count in the answer so far, minus
    presence_penalty for each token in it."""
    if not generated:
        return
    ids = torch.tensor(generated, device=logits.device)
    counts = torch.bincount(ids[ids < logits.shape[-1]], minlength=logits.shape[-1])
    counts = counts[:logits.shape[-1]].to(logits.dtype)
    logits -= param.frequency_penalty * counts + param.presence_penalty * (counts > 0)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None], vocab_limit: int,
           constraints: list | None = None,
           generated: list[list[int] | None] | None = None) -> list[int]:
    """logits [rows, vocab] -> one token id per row (one host sync). A row
    with penalties is penalised by what its answer generated so far
    (`generated`); a row with a constraint (constraints.py) chooses among
    the tokens its grammar allows next."""
    logits = logits[:, :vocab_limit]
    penalised = generated is not None and any(p.penalised for p in params)
    if penalised or (constraints and any(c is not None for c in constraints)):
        logits = logits.clone()
    if penalised:
        for row, (param, history) in enumerate(zip(params, generated)):
            if param.penalised and history:
                penalise(logits[row], param, history)
    if constraints:
        for row, constraint in enumerate(constraints):
            if constraint is not None:
                constraint.mask(logits[row])
    chosen = torch.argmax(logits, dim=-1)
    for row, (param, generator) in enumerate(zip(params, generators)):
        if param.greedy:
            continue
        scores = logits[row].float() / param.temperature
        if param.top_k:
            kth = torch.topk(scores, min(param.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if param.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
            drop = cumulative - torch.softmax(ordered, dim=-1) >= param.top_p
            scores = scores.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
        probs = torch.softmax(scores, dim=-1)
        chosen[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return chosen.tolist()
