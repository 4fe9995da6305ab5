"""The one-launch gather and scatter of a session's KV (kv_copy_kernels.py),
run by Triton's interpreter on the CPU, against the pool's own index
operations (KVStorage.gather_layers / write_layers), and through KVTransfer:
blocks interleaved over several chunks, a last block part full, float32 and
bfloat16, an odd row (3 KV heads), a row wider than one program's tile."""

from __future__ import annotations

import secrets
from types import SimpleNamespace

import pytest
import torch

from services.kvstore.arena import Arena
from services.worker import kv_copy_kernels
from services.worker.kv_storage import KVShape, KVStorage, SlotGroups
from services.worker.kv_transfer import KVTransfer
from tests.unit.worker.test_paged_kernels import needs_triton_interpreter

CPU = torch.device("cpu")
BLOCK = 4
LAYERS = 3


def session_slots(blocks: list[int], num_tokens: int) -> list[int]:
    return [b * BLOCK + i for b in blocks for i in range(BLOCK)][:num_tokens]


def filled(dtype: torch.dtype, kv_heads: int, chunks: int = 3) -> KVStorage:
    storage = KVStorage(KVShape(LAYERS, kv_heads, 8, dtype), 2 * BLOCK, CPU)   # 2 blocks a chunk
    generator = torch.Generator().manual_seed(0)
    for _ in range(chunks):
        storage.add_chunk()
    for tensor in (*storage._k, *storage._v):
        tensor.copy_(torch.randn(tensor.shape, generator=generator).to(dtype))
    return storage


def test_blocks_of_whole_blocks_in_order_only():
    assert kv_copy_kernels.blocks_of(session_slots([5, 0, 3], 10), BLOCK, CPU).tolist() == [5, 0, 3]
    assert kv_copy_kernels.blocks_of(session_slots([2], 1), BLOCK, CPU).tolist() == [2]
    assert kv_copy_kernels.blocks_of([8, 9, 11], BLOCK, CPU) is None       # a hole in a block
    assert kv_copy_kernels.blocks_of([9, 10, 11, 12], BLOCK, CPU) is None  # not from a block start
    assert kv_copy_kernels.blocks_of([], BLOCK, CPU) is None


@needs_triton_interpreter
@pytest.mark.parametrize("dtype,kv_heads", [(torch.float32, 2), (torch.bfloat16, 3),
                                            (torch.float32, 40)])   # a row of 320: two tiles
def test_one_launch_gathers_and_scatters_what_the_index_operations_do(dtype, kv_heads):
    storage = filled(dtype, kv_heads)
    blocks = [4, 1, 5, 0]                               # over all three chunks, out of order
    slots = session_slots(blocks, 14)                   # the last block half full
    table = kv_copy_kernels.blocks_of(slots, BLOCK, CPU)
    groups = SlotGroups.build(slots, storage.slots_per_chunk)
    for kv in (0, 1):
        ptrs = torch.tensor(storage.chunk_addresses(kv), dtype=torch.int64)
        want = storage.gather_layers(kv, 1, 3, groups, len(slots))
        got = torch.zeros_like(want)
        kv_copy_kernels.copy_blocks(ptrs, table, got, first=1,
                                    slots_per_chunk=storage.slots_per_chunk, block_size=BLOCK,
                                    gather=True)
        assert torch.equal(got, want)
        # Scattered back elsewhere (other blocks), the pool holds the same.
        other = session_slots([2, 3, 1, 5], 14)
        before = [t.clone() for t in (storage._k if kv == 0 else storage._v)]
        kv_copy_kernels.copy_blocks(ptrs, kv_copy_kernels.blocks_of(other, BLOCK, CPU), got,
                                    first=1, slots_per_chunk=storage.slots_per_chunk,
                                    block_size=BLOCK, gather=False)
        again = storage.gather_layers(kv, 1, 3, SlotGroups.build(other, storage.slots_per_chunk),
                                      len(other))
        assert torch.equal(again, want)
        # Layer 0 and the slots past the session's 14th were not touched.
        after = storage._k if kv == 0 else storage._v
        assert all(torch.equal(a[0], b[0]) for a, b in zip(after, before))
        assert torch.equal(after[2][1:, 6:], before[2][1:, 6:])     # block 5's last two slots


@needs_triton_interpreter
@pytest.mark.parametrize("kernels", [True, False])
def test_a_transfer_with_either_path_writes_the_same_region(kernels, tmp_path):
    storage = filled(torch.float32, 2)
    slots = session_slots([4, 1, 5], 11)
    arena = Arena(tmp_path, f"k{secrets.token_hex(4)}", 64 << 10)
    try:
        transfer = KVTransfer(storage, block_size=BLOCK, kernels=kernels, piece_bytes=512)
        region = arena.allocate(transfer.num_bytes(len(slots)))
        shm = SimpleNamespace(segment=str(arena.path_of(region.segment)), offset=region.offset,
                              length=region.length)
        crc = transfer.park(slots, shm)
        reference = KVTransfer(storage, block_size=BLOCK, kernels=False)
        check = arena.allocate(transfer.num_bytes(len(slots)))
        assert reference.park(slots, SimpleNamespace(
            segment=str(arena.path_of(check.segment)), offset=check.offset,
            length=check.length)) == crc
        target = filled(torch.float32, 2)
        other = session_slots([0, 3, 2], 11)
        KVTransfer(target, block_size=BLOCK, kernels=kernels, piece_bytes=512).restore(
            other, shm, crc)
        assert torch.equal(target.read_tokens(torch.tensor(other))[0],
                           storage.read_tokens(torch.tensor(slots))[0])
        assert torch.equal(target.read_tokens(torch.tensor(other))[1],
                           storage.read_tokens(torch.tensor(slots))[1])
        transfer.close()
        reference.close()
    finally:
        arena.close()
