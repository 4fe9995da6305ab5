"""Paged attention for Hugging Face models.

The worker runs the model's own modules (embeddings, norms, rotary, MLP,
projections) and replaces only the attention kernel, through transformers'
AttentionInterface: for each layer the new tokens' K and V are written into
the paged pool, and each sequence's queries attend to its whole context
gathered from the pool (a graphed decode step instead attends in place:
decode_graphs.py). Sequences of a step are packed into one batch row of
the model (position ids restart per sequence); the plan below maps between
that packed order and a padded [sequences, tokens] layout for SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from services.worker.decode_graphs import GraphPlan
from services.worker.kv_storage import KVStorage, SlotGroups

ATTN_IMPLEMENTATION = "lmx_paged"


@dataclass(frozen=True, slots=True)
class Segment:
    """One sequence's part of a step: its new tokens' slots, and all of its
    slots (context so far + new), in token order."""

    new_slots: list[int]
    all_slots: list[int]


@dataclass
class BatchPlan:
    storage: KVStorage
    num_seqs: int
    max_new: int
    max_len: int
    write_groups: SlotGroups
    gather_groups: SlotGroups
    q_index: torch.Tensor        # [num_seqs * max_new] -> packed token
    out_index: torch.Tensor      # [num_tokens] -> padded row
    positions: torch.Tensor      # [num_seqs, max_new] absolute position of each query
    key_valid: torch.Tensor      # [num_seqs, max_len]
    query_valid: torch.Tensor    # [num_seqs, max_new]
    unpadded: bool               # every sequence feeds max_new tokens: no re-ordering needed
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, storage: KVStorage, segments: list[Segment], device: torch.device) -> BatchPlan:
        num_seqs = len(segments)
        max_new = max(len(s.new_slots) for s in segments)
        max_len = max(len(s.all_slots) for s in segments)
        new_slots, q_index, out_index, gather = [], [], [], []
        positions, key_valid, query_valid = [], [], []
        packed = 0
        for row, seg in enumerate(segments):
            n, length = len(seg.new_slots), len(seg.all_slots)
            new_slots.extend(seg.new_slots)
            q_index.extend(range(packed, packed + n))
            q_index.extend([packed] * (max_new - n))
            out_index.extend(range(row * max_new, row * max_new + n))
            packed += n
            # Padding keys point at the sequence's first slot: finite values, masked out.
            gather.extend(seg.all_slots)
            gather.extend([seg.all_slots[0]] * (max_len - length))
            start = length - n
            positions.append(list(range(start, start + max_new)))
            key_valid.append([True] * length + [False] * (max_len - length))
            query_valid.append([True] * n + [False] * (max_new - n))

        def tensor(values, dtype=torch.long):
            return torch.tensor(values, dtype=dtype, device=device)

        spc = storage.slots_per_chunk
        return cls(storage, num_seqs, max_new, max_len,
                   SlotGroups.build(new_slots, spc, device), SlotGroups.build(gather, spc, device),
                   tensor(q_index), tensor(out_index), tensor(positions),
                   tensor(key_valid, torch.bool), tensor(query_valid, torch.bool),
                   all(len(s.new_slots) == max_new for s in segments))

    def sdpa_mask(self, sliding_window: int | None) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for SDPA. A lone sequence needs no mask when it
        decodes over all of its context, or computes its whole context at
        once (causal): then SDPA can use its fused kernels."""
        windowed = sliding_window is not None and self.max_len > sliding_window
        if self.num_seqs == 1 and not windowed:
            if self.max_new == 1:
                return None, False
            if self.max_new == self.max_len:
                return None, True
        return self.mask(sliding_window), False

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """[num_seqs, 1, max_new, max_len]: causal, within the context, and
        within the sliding window if any. Padding query rows see key 0 (their
        output is dropped; a row with no key would give NaN)."""
        cached = self._masks.get(sliding_window)
        if cached is not None:
            return cached
        keys = torch.arange(self.max_len, device=self.positions.device)
        query_pos = self.positions.unsqueeze(-1)                       # [S, Q, 1]
        allowed = (keys <= query_pos) & self.key_valid.unsqueeze(1)    # [S, Q, K]
        if sliding_window is not None:
            allowed &= keys > query_pos - sliding_window
        allowed[..., 0] |= ~self.query_valid
        mask = allowed.unsqueeze(1)
        self._masks[sliding_window] = mask
        return mask


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None,
                    scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, softcap: float | None = None,
                    lmx_plan: BatchPlan | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, heads, tokens, dim], key/value [1, kv_heads, tokens, dim]
    (packed new tokens, rotary applied) -> [1, tokens, heads, dim]."""
    if lmx_plan is None:
        raise RuntimeError("paged attention needs lmx_plan (run the model through ModelRunner)")
    if isinstance(lmx_plan, GraphPlan):       # a graphed decode step: Triton kernels in place
        return lmx_plan.attend(module.layer_idx, query, key, value, scaling, sliding_window), None
    plan = lmx_plan
    layer = module.layer_idx
    heads, dim = query.shape[1], query.shape[3]
    kv_heads = key.shape[1]
    plan.storage.write(layer, plan.write_groups, key[0].transpose(0, 1), value[0].transpose(0, 1))
    rows = plan.num_seqs * plan.max_len
    k_all, v_all = plan.storage.gather(layer, plan.gather_groups, rows)
    k_all = k_all.view(plan.num_seqs, plan.max_len, kv_heads, dim).transpose(1, 2)
    v_all = v_all.view(plan.num_seqs, plan.max_len, kv_heads, dim).transpose(1, 2)
    q = query[0].transpose(0, 1)
    if not plan.unpadded:
        q = q.index_select(0, plan.q_index)
    q = q.reshape(plan.num_seqs, plan.max_new, heads, dim).transpose(1, 2)
    if softcap is None:
        mask, causal = plan.sdpa_mask(sliding_window)
        gqa = heads != kv_heads
        if gqa and mask is not None and q.is_cuda:
            # SDPA's memory-efficient kernel takes a mask but not grouped
            # heads: asked for both, SDPA falls back to its math kernel,
            # which holds the scores and float32 copies of Q, K and V (at 28
            # sessions of a Llama-1B, more than the step's lease). With the
            # heads expanded here the efficient kernel runs, in the memory
            # services/worker/step_memory.py plans for.
            k_all = k_all.repeat_interleave(heads // kv_heads, dim=1)
            v_all = v_all.repeat_interleave(heads // kv_heads, dim=1)
            gqa = False
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, is_causal=causal,
                                             scale=scaling, enable_gqa=gqa)
    else:  # logit soft-capping (Gemma 2): no fused kernel takes it
        groups = heads // kv_heads
        k_rep = k_all.repeat_interleave(groups, dim=1)
        v_rep = v_all.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k_rep.transpose(-1, -2)) * (scaling or dim ** -0.5)
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~plan.mask(sliding_window), float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v_rep)
    out = out.transpose(1, 2).reshape(plan.num_seqs * plan.max_new, heads, dim)
    if not plan.unpadded:
        out = out.index_select(0, plan.out_index)
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs) -> None:
    """The model need not build a mask: paged_attention makes its own."""
    return None


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
    # cuDNN's attention builds an execution plan for every new shape, and a
    # decode step has a new one at every context length: measured on an H200
    # (bench/diag_turns.py, smollm2-1.7b shape), a session's first turns ran
    # at 97-129 ms a step with it and 25-28 ms without; flash and
    # memory-efficient attention need no plan.
    torch.backends.cuda.enable_cudnn_sdp(False)
