"""Each decoder layer's q, k and v projections as one matrix, and its MLP's
gate and up projections as another.

A decode step multiplies each layer's input by q, k and v, then (after
attention) its normalised sum by gate and up: five matrix products of two
inputs, two of them small (k and v of a grouped-query model are a quarter
of q or less). At a few rows each product is a kernel paced by its weights
plus a fixed cost, and the small ones are nearly all fixed cost: replayed
in a CUDA graph on an H100 (bench/merged_projections.py), the five took
44.9 us a Llama-1B layer at batch 1 and the merged two 32.4 us, against a
floor of 26.6 us for reading the weights once.

`merge(model)` replaces, in each decoder layer whose classes are known here
(Llama, Qwen2, Gemma 3: their attention and MLP forwards are replicated
below, everything else unchanged), q_proj/k_proj/v_proj by `qkv_proj` and
gate_proj/up_proj by `gate_up_proj`, their rows concatenated in that order.
On the meta device (models.build_synthetic, before the weights exist) it
moves nothing; on real weights it makes each merged matrix and frees the
parts, one layer at a time. Quantization (quantize.py) then packs the
merged matrices like any other. `split(model)` is the inverse, for the
benchmark's Hugging Face baselines (stock modules, the same weights).

Pure torch, no gRPC.
"""

from __future__ import annotations

import sys
import types

import torch

#: Attention and MLP classes whose forward is replicated here.
ATTENTIONS = ("LlamaAttention", "Qwen2Attention", "Gemma3Attention")
MLPS = ("LlamaMLP", "Qwen2MLP", "Gemma3MLP")


def _concat(parts: list[torch.nn.Linear]) -> torch.nn.Linear:
    first = parts[0]
    weight = first.weight
    merged = torch.nn.Linear(first.in_features, sum(p.out_features for p in parts),
                             bias=first.bias is not None, device="meta", dtype=weight.dtype)
    with torch.no_grad():
        merged.weight = torch.nn.Parameter(torch.cat([p.weight for p in parts]),
                                           requires_grad=False)
        if first.bias is not None:
            merged.bias = torch.nn.Parameter(torch.cat([p.bias for p in parts]),
                                             requires_grad=False)
    return merged


def _mergeable(parts) -> bool:
    return (all(type(p) is torch.nn.Linear for p in parts)
            and len({(p.in_features, p.weight.dtype, p.weight.device, p.bias is None)
                     for p in parts}) == 1)


def _attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                       attention_mask=None, cache=None, **kwargs):
    """Llama's, Qwen2's and Gemma 3's attention forward (transformers 5),
    with the three projections as one product."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if cache is None:     # its name before transformers 5 (the stock forward renames it)
        cache = kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1)
    query = query.reshape(hidden_shape).transpose(1, 2)
    key = key.reshape(hidden_shape).transpose(1, 2)
    value = value.reshape(hidden_shape).transpose(1, 2)
    if getattr(self, "q_norm", None) is not None:       # Gemma 3
        query = self.q_norm(query)
        key = self.k_norm(key)
    cos, sin = position_embeddings
    query, key = self.lmx_rotary(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                   self.lmx_eager_attention)
    out, weights = attend(self, query, key, value, attention_mask, dropout=0.0,
                          scaling=self.scaling,
                          sliding_window=getattr(self, "sliding_window", None), **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def merge(model: torch.nn.Module) -> int:
    """Merge the projections of every decoder layer it can; returns how
    many modules were merged (attention and MLP counted apart)."""
    from services.worker.streaming import decoder_layers

    merged = 0
    for layer in decoder_layers(model):
        attention = getattr(layer, "self_attn", None)
        if type(attention).__name__ in ATTENTIONS and not hasattr(attention, "qkv_proj"):
            parts = [attention.q_proj, attention.k_proj, attention.v_proj]
            if _mergeable(parts):
                attention.qkv_proj = _concat(parts)
                attention.qkv_sizes = [p.out_features for p in parts]
                source = sys.modules[type(attention).__module__]
                attention.lmx_rotary = source.apply_rotary_pos_emb
                attention.lmx_eager_attention = source.eager_attention_forward
                del attention.q_proj, attention.k_proj, attention.v_proj
                attention.forward = types.MethodType(_attention_forward, attention)
                merged += 1
        mlp = getattr(layer, "mlp", None)
        if type(mlp).__name__ in MLPS and not hasattr(mlp, "gate_up_proj"):
            parts = [mlp.gate_proj, mlp.up_proj]
            if _mergeable(parts):
                mlp.gate_up_proj = _concat(parts)
                del mlp.gate_proj, mlp.up_proj
                mlp.forward = types.MethodType(_mlp_forward, mlp)
                merged += 1
    return merged


def _parts(merged: torch.nn.Linear, sizes: list[int]) -> list[torch.nn.Linear]:
    out = []
    start = 0
    for size in sizes:
        part = torch.nn.Linear(merged.in_features, size, bias=merged.bias is not None,
                               device="meta", dtype=merged.weight.dtype)
        part.weight = torch.nn.Parameter(merged.weight[start:start + size], requires_grad=False)
        if merged.bias is not None:
            part.bias = torch.nn.Parameter(merged.bias[start:start + size], requires_grad=False)
        out.append(part)
        start += size
    return out


def split(model: torch.nn.Module) -> None:
    """Undo `merge`: stock modules and forwards, each part's weight a view
    of the merged matrix (no copy)."""
    from services.worker.streaming import decoder_layers

    for layer in decoder_layers(model):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "qkv_proj"):
            attention.q_proj, attention.k_proj, attention.v_proj = _parts(
                attention.qkv_proj, attention.qkv_sizes)
            for name in ("qkv_proj", "qkv_sizes", "lmx_rotary", "lmx_eager_attention",
                         "forward"):
                delattr(attention, name)
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "gate_up_proj"):
            half = mlp.gate_up_proj.out_features // 2
            mlp.gate_proj, mlp.up_proj = _parts(mlp.gate_up_proj, [half, half])
            del mlp.gate_up_proj, mlp.forward
