"""What quantization costs a model, measured: over a fixed text, teacher
forced (every position sees the true text before it), the share of
positions whose most likely next token is the reference model's, the
share within a near tie of it, and both models' perplexity. And whether
the worker's own greedy tokens are a float32 reference's choices (`choices`:
the decode path, its kernels and graphs, checked against the same weights).

Pure torch: bench/quality.py and the tests call it on loaded models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

#: A position's choice counts as a near tie when the reference gives the
#: quantized model's token a log-probability within this of its own best.
NEAR_TIE_NATS = 0.1


@dataclass(frozen=True)
class Quality:
    positions: int
    agreement: float          # same most likely token as the reference
    agreement_near_ties: float  # ... or one the reference rates within NEAR_TIE_NATS
    perplexity: float
    reference_perplexity: float

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.reference_perplexity

    def as_dict(self) -> dict:
        return {**asdict(self), "perplexity_ratio": self.perplexity_ratio}


@torch.no_grad()
def log_probs(model: torch.nn.Module, ids: list[int], device: torch.device,
              window: int = 1024) -> torch.Tensor:
    """[len(ids) - 1, vocab] float32 log-probabilities of each next token,
    in windows of `window` tokens (each window starts fresh), with PyTorch's
    own attention (sdpa), not the worker's paged kernel."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        out = []
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start:start + window + 1]], device=device)
            logits = model(input_ids=chunk[:, :-1], use_cache=False).logits[0]
            out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        return torch.cat(out)
    finally:
        model.set_attn_implementation(previous)


def compare(reference: torch.Tensor, candidate: torch.Tensor, ids: list[int],
            vocab_limit: int) -> Quality:
    """Quality of `candidate` against `reference` (both from `log_probs`)."""
    reference, candidate = reference[:, :vocab_limit], candidate[:, :vocab_limit]
    targets = torch.tensor(ids[1:reference.shape[0] + 1])
    best_ref = reference.argmax(dim=-1)
    best = candidate.argmax(dim=-1)
    same = best == best_ref
    ref_top = reference.gather(1, best_ref[:, None])[:, 0]
    ref_of_choice = reference.gather(1, best[:, None])[:, 0]
    near = same | (ref_top - ref_of_choice <= NEAR_TIE_NATS)
    nll = -candidate.gather(1, targets[:, None])[:, 0].mean().item()
    ref_nll = -reference.gather(1, targets[:, None])[:, 0].mean().item()
    return Quality(int(targets.numel()), same.float().mean().item(),
                   near.float().mean().item(), math.exp(nll), math.exp(ref_nll))


@dataclass(frozen=True)
class Choices:
    """Tokens a model chose (greedily), against a reference's log-probabilities
    at the same positions: how many are the reference's own choice, and how
    many of the others it rates within a near tie of its choice."""
    positions: int
    same: int
    near_ties: int

    @property
    def agreement(self) -> float:
        return self.same / self.positions if self.positions else 0.0

    @property
    def agreement_near_ties(self) -> float:
        return (self.same + self.near_ties) / self.positions if self.positions else 0.0

    def __add__(self, other: Choices) -> Choices:
        return Choices(self.positions + other.positions, self.same + other.same,
                       self.near_ties + other.near_ties)

    def as_dict(self) -> dict:
        return {**asdict(self), "agreement": round(self.agreement, 4),
                "agreement_near_ties": round(self.agreement_near_ties, 4),
                "near_tie": f"the reference rates the token within {NEAR_TIE_NATS} nats of "
                            "its own choice"}


def choices(reference: torch.nn.Module, prompt: list[int], chosen: list[int],
            device: torch.device, vocab_limit: int) -> Choices:
    """Teacher forced on `prompt` and the tokens a model chose after it: at
    each chosen token, whether `reference` (a float32 copy of the same
    weights, say) picks it too among the ids below `vocab_limit` (those the
    worker samples from)."""
    if not chosen:
        return Choices(0, 0, 0)
    rows = log_probs(reference, prompt + chosen, device)[len(prompt) - 1:, :vocab_limit]
    picked = torch.tensor(chosen)
    best = rows.argmax(dim=-1)
    same = best == picked
    gap = rows.gather(1, best[:, None])[:, 0] - rows.gather(1, picked[:, None])[:, 0]
    near = ~same & (gap <= NEAR_TIE_NATS)
    return Choices(len(chosen), int(same.sum()), int(near.sum()))
