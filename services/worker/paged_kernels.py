"""Triton kernels for a decode step over the paged KV pool, read in place.

The pool (kv_storage.py) is a list of chunks, one K and one V tensor each,
[num_layers, slots_per_chunk, kv_heads, head_dim]. These kernels take a
table of the chunks' addresses (int64) instead of the tensors, so that a
CUDA graph captured once stays valid when the pool grows or shrinks: only
the table's contents change, never the graph.

- `write_kv`: the step's new K and V (one token per sequence) into their
  slots; a slot of -1 (a padding row of the graph's batch) writes nothing.
- `decode_attention`: each sequence's one query against its whole context,
  read through its block table, no copy of it and no score matrix in
  memory. The context is split into PARTS parts walked in parallel, each
  with an online softmax (flash-decoding), then a second kernel combines
  the parts' statistics; grouped-query attention (each KV head serves its
  group of query heads in one program); a sliding window if the layer has
  one. A context length of 0 (padding) gives zeros.

Blocks never straddle chunks (a chunk holds a whole number of blocks), so a
block's slots are contiguous. Float32 accumulation whatever the pool's
dtype. On CPU tensors they run under Triton's interpreter (the tests); the
worker uses them only on CUDA.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:        # torch's CPU build brings no Triton
    triton = None
try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:
    InterpretedFunction = None

AVAILABLE = triton is not None
#: Parts a sequence's context is split into, walked by parallel programs
#: (flash-decoding): at batch 1 a model with 8 KV heads would otherwise run
#: 8 programs, each walking its whole context block after block.
PARTS = 16


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _both(fn):
    """The kernel compiled for CUDA tensors, and interpreted for CPU ones
    (the tests: Triton's interpreter mode must be on in the process, as
    tests/conftest.py sets it where there is no GPU)."""
    kernels = {"cuda": triton.jit(fn)}
    if InterpretedFunction is not None:
        kernels["cpu"] = InterpretedFunction(fn)
    return kernels


if AVAILABLE:
    def _write_kernel(k_new, v_new, slots, k_ptrs, v_ptrs, layer, slots_per_chunk,
                      HD: tl.constexpr, HD_P2: tl.constexpr):
        row = tl.program_id(0)
        slot = tl.load(slots + row).to(tl.int64)
        offs = tl.arange(0, HD_P2)
        keep = offs < tl.where(slot >= 0, HD, 0)
        chunk = tl.where(slot >= 0, slot // slots_per_chunk, 0)
        local = tl.where(slot >= 0, slot % slots_per_chunk, 0)
        dst = (layer * slots_per_chunk + local) * HD + offs
        k_base = tl.load(k_ptrs + chunk).to(tl.pointer_type(k_new.dtype.element_ty))
        v_base = tl.load(v_ptrs + chunk).to(tl.pointer_type(v_new.dtype.element_ty))
        tl.store(k_base + dst, tl.load(k_new + row * HD + offs, mask=keep), mask=keep)
        tl.store(v_base + dst, tl.load(v_new + row * HD + offs, mask=keep), mask=keep)

    def _decode_kernel(q, part_m, part_l, part_acc, k_ptrs, v_ptrs, block_table, ctx_lens,
                       layer, slots_per_chunk, max_blocks, scale, window,
                       KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
                       DIM: tl.constexpr, BLOCK: tl.constexpr, PARTS: tl.constexpr):
        """One part of one sequence's context for one KV head and its group
        of query heads: the running max, sum and weighted values of an
        online softmax over its blocks, for _reduce_kernel to combine."""
        seq = tl.program_id(0)
        head = tl.program_id(1)
        part = tl.program_id(2)
        ctx = tl.load(ctx_lens + seq)
        g = tl.arange(0, GROUP_P2)
        d = tl.arange(0, DIM)
        t = tl.arange(0, BLOCK)
        in_group = g < GROUP
        q_heads = head * GROUP + g
        q_offs = (seq * (KV_HEADS * GROUP) + q_heads[:, None]) * DIM + d[None, :]
        query = tl.load(q + q_offs, mask=in_group[:, None], other=0.0).to(tl.float32) * scale
        m_i = tl.full([GROUP_P2], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_P2], tl.float32)
        acc = tl.zeros([GROUP_P2, DIM], tl.float32)
        first_key = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
        first_block = first_key // BLOCK
        end_block = tl.cdiv(ctx, BLOCK)
        per_part = tl.cdiv(end_block - first_block, PARTS)
        lo = first_block + part * per_part
        hi = tl.minimum(lo + per_part, end_block)
        for j in range(lo, hi):
            block = tl.load(block_table + seq * max_blocks + j).to(tl.int64)
            slot0 = block * BLOCK
            chunk = slot0 // slots_per_chunk
            local = slot0 % slots_per_chunk + t
            kv_offs = ((layer * slots_per_chunk + local)[:, None] * KV_HEADS + head) * DIM \
                + d[None, :]
            key_pos = j * BLOCK + t
            valid = (key_pos < ctx) & (key_pos >= first_key)
            k_base = tl.load(k_ptrs + chunk).to(tl.pointer_type(q.dtype.element_ty))
            v_base = tl.load(v_ptrs + chunk).to(tl.pointer_type(q.dtype.element_ty))
            keys = tl.load(k_base + kv_offs, mask=valid[:, None], other=0.0).to(tl.float32)
            values = tl.load(v_base + kv_offs, mask=valid[:, None], other=0.0).to(tl.float32)
            scores = tl.sum(query[:, None, :] * keys[None, :, :], axis=2)       # [G, BLOCK]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * values[None, :, :], axis=1)
            m_i = m_new
        stat = (seq * (KV_HEADS * GROUP) + q_heads) * PARTS + part                # [G]
        tl.store(part_m + stat, m_i, mask=in_group)
        tl.store(part_l + stat, l_i, mask=in_group)
        tl.store(part_acc + stat[:, None] * DIM + d[None, :], acc, mask=in_group[:, None])

    def _reduce_kernel(part_m, part_l, part_acc, out, DIM: tl.constexpr, PARTS: tl.constexpr):
        """One query head of one sequence: its parts' softmax statistics
        combined (a part with no keys has max -inf and weighs nothing; a
        row with no keys at all, padding, gives zeros)."""
        row = tl.program_id(0)          # sequence * heads + head
        parts = tl.arange(0, PARTS)
        d = tl.arange(0, DIM)
        m = tl.load(part_m + row * PARTS + parts)
        l = tl.load(part_l + row * PARTS + parts)
        acc = tl.load(part_acc + (row * PARTS + parts)[:, None] * DIM + d[None, :])
        top = tl.max(m, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)
        weight = tl.exp(m - top)                      # exp(-inf) = 0 for empty parts
        total = tl.sum(l * weight, axis=0)
        total = tl.where(total > 0.0, total, 1.0)
        result = tl.sum(acc * weight[:, None], axis=0) / total
        tl.store(out + row * DIM + d, result.to(out.dtype.element_ty))

    _WRITE = _both(_write_kernel)
    _DECODE = _both(_decode_kernel)
    _REDUCE = _both(_reduce_kernel)


def write_kv(k_new: torch.Tensor, v_new: torch.Tensor, slots: torch.Tensor, k_ptrs: torch.Tensor,
             v_ptrs: torch.Tensor, layer: int, slots_per_chunk: int) -> None:
    """k_new, v_new [rows, kv_heads, head_dim] (contiguous) into `slots`
    [rows] (int64 global slots, -1: skip) of `layer`."""
    rows, heads, dim = k_new.shape
    _WRITE[k_new.device.type][(rows,)](k_new, v_new, slots, k_ptrs, v_ptrs, layer, slots_per_chunk,
                           HD=heads * dim, HD_P2=next_power_of_2(heads * dim))


def decode_attention(q: torch.Tensor, k_ptrs: torch.Tensor, v_ptrs: torch.Tensor,
                     block_table: torch.Tensor, ctx_lens: torch.Tensor, *, layer: int,
                     slots_per_chunk: int, block_size: int, kv_heads: int, scale: float,
                     window: int = 0, parts: int = PARTS,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """q [rows, heads, head_dim] (contiguous; rotary applied) -> [rows, heads, head_dim].
    block_table [rows, max_blocks] (int32 block ids in token order), ctx_lens
    [rows] (int32: keys per row, this step's included). window 0: none.
    Each row's context is split into `parts` (a power of two) walked in
    parallel, then combined."""
    rows, heads, dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    group = heads // kv_heads
    stats = torch.empty((2, rows * heads * parts), dtype=torch.float32, device=q.device)
    part_acc = torch.empty((rows * heads * parts, dim), dtype=torch.float32, device=q.device)
    kind = q.device.type
    _DECODE[kind][(rows, kv_heads, parts)](
        q, stats[0], stats[1], part_acc, k_ptrs, v_ptrs, block_table, ctx_lens, layer,
        slots_per_chunk, block_table.shape[1], scale, window, KV_HEADS=kv_heads, GROUP=group,
        GROUP_P2=max(2, next_power_of_2(group)), DIM=dim, BLOCK=block_size, PARTS=parts)
    _REDUCE[kind][(rows * heads,)](stats[0], stats[1], part_acc, out, DIM=dim, PARTS=parts)
    return out


@torch.library.custom_op("lmx::paged_decode", mutates_args=())
def paged_decode(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, new_slots: torch.Tensor,
                 k_ptrs: torch.Tensor, v_ptrs: torch.Tensor, block_table: torch.Tensor,
                 ctx_lens: torch.Tensor, layer: int, slots_per_chunk: int, block_size: int,
                 scale: float, window: int) -> torch.Tensor:
    """One layer of a decode step as one operator: the new K and V
    [rows, kv_heads, head_dim] written into their slots, then q [rows,
    heads, head_dim] attended over each row's context -> [rows, heads,
    head_dim]. An operator of its own so that torch.compile keeps it whole
    (its writes go through the address table, which no compiler sees): the
    compiled decode step (decode_graphs.py) fuses everything around it."""
    write_kv(k_new.contiguous(), v_new.contiguous(), new_slots, k_ptrs, v_ptrs, layer,
             slots_per_chunk)
    return decode_attention(q.contiguous(), k_ptrs, v_ptrs, block_table, ctx_lens, layer=layer,
                            slots_per_chunk=slots_per_chunk, block_size=block_size,
                            kv_heads=k_new.shape[1], scale=scale, window=window, parts=PARTS)


@paged_decode.register_fake
def _paged_decode_shape(q, k_new, v_new, new_slots, k_ptrs, v_ptrs, block_table, ctx_lens, layer,
                        slots_per_chunk, block_size, scale, window):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def supported(head_dim: int, block_size: int) -> str | None:
    """Why these kernels cannot serve a model (None: they can)."""
    if not AVAILABLE:
        return "Triton is not installed"
    if head_dim & (head_dim - 1) or block_size & (block_size - 1):
        return f"head_dim {head_dim} and block_size {block_size} must be powers of 2"
    return None
