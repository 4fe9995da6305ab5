"""The Triton kernels of the CUDA decode step (paged_kernels.py), run by
Triton's interpreter on the CPU, against the worker's own paged attention
(KVStorage.gather + SDPA) on the same pool: several chunks, grouped-query
heads, uneven context lengths, padding rows, a sliding window."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.worker import paged_kernels
from services.worker.kv_pool import BlockPool
from services.worker.kv_storage import KVShape, KVStorage, SlotGroups


def _triton_interpreting() -> bool:
    knobs = getattr(paged_kernels.triton, "knobs", None) if paged_kernels.AVAILABLE else None
    return bool(knobs is not None and knobs.runtime.interpret)


#: For the tests of the CUDA decode step's Triton kernels on CPU tensors.
needs_triton_interpreter = pytest.mark.skipif(
    not _triton_interpreting(),
    reason="needs Triton's interpreter: Triton installed, no CUDA GPU (tests/conftest.py); "
           "tests/gpu/test_decode_graphs_gpu.py runs the kernels on a GPU")

pytestmark = needs_triton_interpreter

BLOCK = 4
LAYERS, KV_HEADS, DIM = 2, 2, 16


def pool_with(lengths: list[int], heads: int, *, blocks_per_chunk: int = 3, seed: int = 0):
    """A pool of several chunks holding random K/V for sessions of these
    context lengths, their blocks interleaved across chunks."""
    generator = torch.Generator().manual_seed(seed)
    shape = KVShape(LAYERS, KV_HEADS, DIM, torch.float32)
    pool = BlockPool(BLOCK, blocks_per_chunk)
    storage = KVStorage(shape, blocks_per_chunk * BLOCK, torch.device("cpu"))
    total_blocks = sum(-(-n // BLOCK) for n in lengths)
    for _ in range(-(-total_blocks // blocks_per_chunk)):
        pool.add_chunk()
        storage.add_chunk()
    slots: list[list[int]] = [[] for _ in lengths]
    # Interleave: one token per session in turn, so that blocks alternate.
    for t in range(max(lengths)):
        for i, n in enumerate(lengths):
            if t < n:
                slots[i].extend(pool.append(f"s{i}", 1))
    for layer in range(LAYERS):
        for s in slots:
            groups = SlotGroups.build(s, storage.slots_per_chunk)
            storage.write(layer, groups, torch.randn(len(s), KV_HEADS, DIM, generator=generator),
                          torch.randn(len(s), KV_HEADS, DIM, generator=generator))
    q = torch.randn(len(lengths), heads, DIM, generator=generator)
    return pool, storage, slots, q


def reference(storage: KVStorage, slots: list[list[int]], q: torch.Tensor, layer: int,
              window: int) -> torch.Tensor:
    outs = []
    for row, s in enumerate(slots):
        if window:
            s = s[max(0, len(s) - window):]
        k, v = storage.gather(layer, SlotGroups.build(s, storage.slots_per_chunk), len(s))
        o = F.scaled_dot_product_attention(q[row][:, None], k.transpose(0, 1), v.transpose(0, 1),
                                           scale=0.25, enable_gqa=True)
        outs.append(o[:, 0])
    return torch.stack(outs)


def tables(pool: BlockPool, lengths: list[int], max_blocks: int):
    table = torch.zeros(len(lengths), max_blocks, dtype=torch.int32)
    for i in range(len(lengths)):
        blocks = pool.table(f"s{i}")
        table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return table, torch.tensor(lengths, dtype=torch.int32)


def pointers(storage: KVStorage) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([t.data_ptr() for t in storage._k], dtype=torch.int64),
            torch.tensor([t.data_ptr() for t in storage._v], dtype=torch.int64))


@pytest.mark.parametrize("heads", [2, 6, 8], ids=["mha", "gqa3", "gqa4"])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("parts", [1, 2, 8])
def test_decode_attention_equals_gather_and_sdpa(heads, window, parts):
    lengths = [1, 7, 13, 4]
    pool, storage, slots, q = pool_with(lengths, heads)
    assert storage.num_chunks > 2
    table, ctx = tables(pool, lengths, max_blocks=8)
    k_ptrs, v_ptrs = pointers(storage)
    for layer in range(LAYERS):
        got = paged_kernels.decode_attention(
            q, k_ptrs, v_ptrs, table, ctx, layer=layer, slots_per_chunk=storage.slots_per_chunk,
            block_size=BLOCK, kv_heads=KV_HEADS, scale=0.25, window=window, parts=parts)
        want = reference(storage, slots, q, layer, window)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_padding_rows_give_zeros():
    lengths = [5, 3]
    pool, storage, _, q = pool_with(lengths, 4)
    table, ctx = tables(pool, lengths, max_blocks=4)
    ctx[1] = 0
    k_ptrs, v_ptrs = pointers(storage)
    out = paged_kernels.decode_attention(q, k_ptrs, v_ptrs, table, ctx, layer=0,
                                         slots_per_chunk=storage.slots_per_chunk,
                                         block_size=BLOCK, kv_heads=KV_HEADS, scale=0.25)
    assert torch.isfinite(out).all() and not out[1].any()


def test_write_kv_writes_each_row_to_its_slot_and_skips_minus_one():
    lengths = [6, 9]
    pool, storage, slots, _ = pool_with(lengths, 2)
    before_k = [t.clone() for t in storage._k]
    new_slots = torch.tensor([slots[0][-1], -1, slots[1][-1]], dtype=torch.int64)
    k_new = torch.randn(3, KV_HEADS, DIM)
    v_new = torch.randn(3, KV_HEADS, DIM)
    k_ptrs, v_ptrs = pointers(storage)
    paged_kernels.write_kv(k_new, v_new, new_slots, k_ptrs, v_ptrs, layer=1,
                           slots_per_chunk=storage.slots_per_chunk)
    k, v = storage.read_tokens(torch.tensor([slots[0][-1], slots[1][-1]]))
    torch.testing.assert_close(k[1], k_new[[0, 2]])
    torch.testing.assert_close(v[1], v_new[[0, 2]])
    # Nothing else changed: layer 0 everywhere, and every other slot of layer 1.
    written = {slots[0][-1], slots[1][-1]}
    spc = storage.slots_per_chunk
    for chunk, (old, new) in enumerate(zip(before_k, storage._k)):
        assert torch.equal(old[0], new[0])
        for local in range(spc):
            if chunk * spc + local not in written:
                assert torch.equal(old[1, local], new[1, local])
