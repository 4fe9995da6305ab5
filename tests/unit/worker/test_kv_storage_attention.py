"""KVStorage (chunked KV tensors) and paged attention against a plain
reference: softmax(Q K^T * scale + causal mask) V, computed per sequence with
torch, GQA by repeating the KV heads."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from services.worker.attention import BatchPlan, Segment, paged_attention
from services.worker.kv_storage import KVShape, KVStorage, SlotGroups

CPU = torch.device("cpu")
LAYERS, KV_HEADS, HEADS, DIM = 2, 2, 4, 8
SLOTS_PER_CHUNK = 8


def make_storage(num_chunks: int, kv_heads: int = KV_HEADS) -> KVStorage:
    storage = KVStorage(KVShape(LAYERS, kv_heads, DIM, torch.float32), SLOTS_PER_CHUNK, CPU)
    for _ in range(num_chunks):
        storage.add_chunk()
    return storage


def test_shape_bytes_and_chunk_bytes():
    shape = KVShape(LAYERS, KV_HEADS, DIM, torch.float16)
    assert shape.bytes_per_token == 2 * LAYERS * KV_HEADS * DIM * 2, (
        f"K and V, all layers, fp16: {shape.bytes_per_token}")
    storage = make_storage(3)
    per_token = KVShape(LAYERS, KV_HEADS, DIM, torch.float32).bytes_per_token
    assert storage.chunk_bytes == SLOTS_PER_CHUNK * per_token, "chunk_bytes = slots x token bytes"
    assert (storage.num_chunks, storage.num_bytes) == (3, 3 * SLOTS_PER_CHUNK * per_token), (
        f"3 chunks: {storage.num_chunks} chunks, {storage.num_bytes} bytes")
    storage.remove_chunks(2)
    assert storage.num_chunks == 1, f"removing 2 of 3 chunks left {storage.num_chunks}"


def test_slot_groups_split_by_chunk_and_keep_positions():
    slots = torch.tensor([17, 2, 9, 3, 16, 10])
    groups = SlotGroups.build(slots, SLOTS_PER_CHUNK)
    seen = {chunk: (local.tolist(), positions.tolist())
            for chunk, local, positions in groups.groups}
    assert seen == {0: ([2, 3], [1, 3]), 1: ([1, 2], [2, 5]), 2: ([1, 0], [0, 4])}, (
        f"slots grouped by chunk as (local slots, positions): {seen}")
    one = SlotGroups.build(torch.tensor([12, 9, 15]), SLOTS_PER_CHUNK)
    assert [(c, l.tolist(), p) for c, l, p in one.groups] == [(1, [4, 1, 7], None)], (
        f"slots of one chunk should form one group, in order (positions None): {one.groups}")


def test_write_then_gather_round_trips_across_chunks():
    storage = make_storage(4)
    generator = torch.Generator().manual_seed(0)
    slots = torch.randperm(4 * SLOTS_PER_CHUNK, generator=generator)[:19]  # spread over chunks
    groups = SlotGroups.build(slots, SLOTS_PER_CHUNK)
    assert len(groups.groups) > 1, "the test needs slots in several chunks"
    written = {}
    for layer in range(LAYERS):
        key = torch.randn(19, KV_HEADS, DIM, generator=generator)
        value = torch.randn(19, KV_HEADS, DIM, generator=generator)
        storage.write(layer, groups, key, value)
        written[layer] = (key, value)
    for layer in range(LAYERS):
        key, value = storage.gather(layer, groups, 19)
        assert torch.equal(key, written[layer][0]), f"layer {layer}: gathered K differs"
        assert torch.equal(value, written[layer][1]), f"layer {layer}: gathered V differs"
    # Gather in another order (a subset, one chunk or several) finds the same values.
    order = torch.tensor([5, 0, 18, 7])
    key, value = storage.gather(1, SlotGroups.build(slots[order], SLOTS_PER_CHUNK), 4)
    assert torch.equal(key, written[1][0][order]), "gathering a reordered subset gave other K"
    assert torch.equal(value, written[1][1][order]), "gathering a reordered subset gave other V"
    keys, values = storage.read_tokens(slots)
    assert keys.shape == (LAYERS, 19, KV_HEADS, DIM), f"read_tokens shape {tuple(keys.shape)}"
    for layer in range(LAYERS):
        assert torch.equal(keys[layer], written[layer][0]), f"read_tokens K, layer {layer}"
        assert torch.equal(values[layer], written[layer][1]), f"read_tokens V, layer {layer}"


def test_untouched_slots_stay_zero():
    storage = make_storage(2)
    storage.write(0, SlotGroups.build(torch.tensor([3, 12]), SLOTS_PER_CHUNK),
                  torch.ones(2, KV_HEADS, DIM), torch.ones(2, KV_HEADS, DIM))
    keys, _ = storage.read_tokens(torch.tensor([2, 4, 11, 13]))
    assert not keys.any(), "a write touched slots it was not given"


# ---- paged attention -------------------------------------------------------
def reference_attention(q, k, v, start, scale, sliding_window=None, softcap=None):
    """q [n, heads, dim] at positions start..start+n-1; k, v [L, kv_heads, dim]."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).transpose(0, 1)       # [heads, L, dim]
    v = v.repeat_interleave(groups, dim=1).transpose(0, 1)
    scores = torch.matmul(q.transpose(0, 1), k.transpose(1, 2)) * scale   # [heads, n, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(start, start + q.shape[0]).unsqueeze(-1)
    k_pos = torch.arange(k.shape[1])
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).transpose(0, 1)   # [n, heads, dim]


def run_case(lengths_and_new, *, sliding_window=None, softcap=None, scaling=None,
             kv_heads=KV_HEADS, seed=0):
    """Sequences (context length, new tokens): the earlier tokens' KV already
    in the pool at scattered slots, the new ones fed packed. Checks every
    layer's output against the reference and that the new KV was stored."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(length for length, _ in lengths_and_new)
    num_chunks = -(-total // SLOTS_PER_CHUNK) + 1
    storage = make_storage(num_chunks, kv_heads)
    free = torch.randperm(num_chunks * SLOTS_PER_CHUNK, generator=generator).tolist()
    seqs = []
    for length, num_new in lengths_and_new:
        slots = [free.pop() for _ in range(length)]
        seqs.append(dict(length=length, new=num_new, slots=slots,
                         k=torch.randn(LAYERS, length, kv_heads, DIM, generator=generator),
                         v=torch.randn(LAYERS, length, kv_heads, DIM, generator=generator),
                         q=torch.randn(LAYERS, num_new, HEADS, DIM, generator=generator)))
    # The context before this step is already in the pool.
    for seq in seqs:
        old = seq["length"] - seq["new"]
        if old:
            groups = SlotGroups.build(torch.tensor(seq["slots"][:old]), SLOTS_PER_CHUNK)
            for layer in range(LAYERS):
                storage.write(layer, groups, seq["k"][layer, :old], seq["v"][layer, :old])
    plan = BatchPlan.build(storage, [Segment(s["slots"][s["length"] - s["new"]:], s["slots"])
                                     for s in seqs], CPU)
    scale = scaling if scaling is not None else DIM ** -0.5
    for layer in range(LAYERS):
        query = torch.cat([s["q"][layer] for s in seqs]).transpose(0, 1).unsqueeze(0)
        key = torch.cat([s["k"][layer, s["length"] - s["new"]:] for s in seqs])
        value = torch.cat([s["v"][layer, s["length"] - s["new"]:] for s in seqs])
        out, weights = paged_attention(
            SimpleNamespace(layer_idx=layer), query, key.transpose(0, 1).unsqueeze(0),
            value.transpose(0, 1).unsqueeze(0), None, scaling=scaling,
            sliding_window=sliding_window, softcap=softcap, lmx_plan=plan)
        assert weights is None, "paged attention returns no attention weights"
        num_tokens = sum(s["new"] for s in seqs)
        assert out.shape == (1, num_tokens, HEADS, DIM), f"output shape {tuple(out.shape)}"
        packed = 0
        for index, seq in enumerate(seqs):
            expected = reference_attention(seq["q"][layer], seq["k"][layer], seq["v"][layer],
                                           seq["length"] - seq["new"], scale,
                                           sliding_window, softcap)
            got = out[0, packed:packed + seq["new"]]
            error = (got - expected).abs().max().item()
            assert torch.allclose(got, expected, atol=1e-5, rtol=0), (
                f"layer {layer}, sequence {index} (length {seq['length']}, {seq['new']} new): "
                f"output differs from the reference by {error:.2e}")
            packed += seq["new"]
    for index, seq in enumerate(seqs):
        keys, values = storage.read_tokens(torch.tensor(seq["slots"]))
        assert torch.equal(keys, seq["k"]) and torch.equal(values, seq["v"]), (
            f"sequence {index}: the pool does not hold its whole context's K/V after the step")


CASES = {
    "prefill": [(5, 5), (17, 17), (1, 1), (9, 9)],
    "decode": [(12, 1), (30, 1), (3, 1), (1, 1)],
    "continuation": [(20, 6), (7, 3), (11, 1)],
    "single": [(13, 13)],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sliding_window", [None, 4])
def test_paged_attention_matches_reference(case, sliding_window):
    run_case(CASES[case], sliding_window=sliding_window)


@pytest.mark.parametrize("case", ["prefill", "decode", "continuation"])
@pytest.mark.parametrize("sliding_window", [None, 3])
def test_paged_attention_softcap_matches_reference(case, sliding_window):
    run_case(CASES[case], sliding_window=sliding_window, softcap=2.0, scaling=0.7)


def test_paged_attention_explicit_scaling_and_multi_query():
    run_case(CASES["continuation"], scaling=0.3, kv_heads=1, seed=3)
    run_case(CASES["prefill"], kv_heads=4, seed=4)  # no GQA: as many KV heads as heads


def test_mask_is_causal_within_context_and_window():
    storage = make_storage(2)
    plan = BatchPlan.build(storage, [Segment([3, 4], [0, 1, 2, 3, 4]), Segment([9], [8, 9])], CPU)
    mask = plan.mask(None)[:, 0]
    expected_first = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0], expected_first), f"sequence 0 (positions 3, 4): {mask[0]}"
    assert torch.equal(mask[1, 0], torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)), (
        f"sequence 1 (position 1 of 2) sees keys 0 and 1 only: {mask[1, 0]}")
    windowed = plan.mask(2)[:, 0]
    assert torch.equal(windowed[0], torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]],
                                                 dtype=torch.bool)), (
        f"window 2 keeps the query's key and the one before: {windowed[0]}")
    assert plan.mask(2) is plan.mask(2), "masks should be built once per window"


def test_paged_attention_needs_a_plan():
    with pytest.raises(RuntimeError, match="lmx_plan"):
        paged_attention(SimpleNamespace(layer_idx=0), torch.zeros(1, HEADS, 1, DIM),
                        torch.zeros(1, KV_HEADS, 1, DIM), torch.zeros(1, KV_HEADS, 1, DIM), None)


def test_reference_is_plain_attention():
    """The reference itself, on a case small enough to check by hand: one
    query at position 1 sees two keys with equal scores -> mean of V."""
    q = torch.zeros(1, 1, 2)
    k = torch.zeros(2, 1, 2)
    v = torch.tensor([[[1.0, 0.0]], [[3.0, 2.0]]])
    out = reference_attention(q, k, v, 1, 1 / math.sqrt(2))
    assert torch.allclose(out, torch.tensor([[[2.0, 1.0]]])), f"mean of the two values: {out}"
