"""BlockPool: the paged KV bookkeeping (pure Python), by example and under
random sequences of operations (hypothesis state machine)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from services.worker.kv_pool import BlockPool, PoolUsage


def pool_with(chunks: int, block_size: int = 4, blocks_per_chunk: int = 2) -> BlockPool:
    pool = BlockPool(block_size, blocks_per_chunk)
    for _ in range(chunks):
        pool.add_chunk()
    return pool


def test_rejects_non_positive_sizes():
    for block_size, per_chunk in [(0, 1), (1, 0), (-4, 2)]:
        with pytest.raises(ValueError):
            BlockPool(block_size, per_chunk)


def test_append_maps_tokens_to_block_slots():
    pool = pool_with(2)  # blocks 0..3, 4 tokens each
    slots = pool.append("a", 6)
    assert pool.table("a") == [0, 1], f"6 tokens should take blocks 0 and 1, got {pool.table('a')}"
    assert slots == [0, 1, 2, 3, 4, 5], f"slots of tokens 0..5 in blocks [0, 1]: {slots}"
    assert pool.length("a") == 6, f"length after appending 6: {pool.length('a')}"
    slots = pool.append("b", 3)
    assert pool.table("b") == [2], (
        f"the next session should get the lowest free block 2: {pool.table('b')}")
    assert slots == [8, 9, 10], f"slots of b's tokens 0..2 in block 2: {slots}"
    # a's next tokens fill block 1 (slots 6, 7), then a new block (3: slots 12, 13).
    slots = pool.append("a", 4)
    assert pool.table("a") == [0, 1, 3], f"a should grow into block 3: {pool.table('a')}"
    assert slots == [6, 7, 12, 13], f"slots of a's tokens 6..9: {slots}"
    assert pool.append("a", 0) == [], "appending 0 tokens should give no slots"
    with pytest.raises(ValueError):
        pool.append("a", -1)


def test_one_token_at_a_time_takes_the_same_slots_as_many_at_once():
    """A decode step appends one token (a shortcut within the last block):
    the same slots and blocks as appending them together."""
    one, many = pool_with(3), pool_with(3)
    one.append("x", 1)
    many.append("x", 1)
    slots = [one.append("a", 1)[0] for _ in range(9)]
    assert slots == many.append("a", 9)
    assert one.table("a") == many.table("a") and one.length("a") == many.length("a") == 9


def test_blocks_needed_and_can_append():
    pool = pool_with(1)  # 2 blocks of 4 tokens
    assert pool.blocks_needed("a", 0) == 0, "no tokens should need no blocks"
    assert pool.blocks_needed("a", 1) == 1, "1 token of a new session should need a block"
    assert pool.blocks_needed("a", 5) == 2, "5 tokens should need 2 blocks of 4"
    assert pool.can_append("a", 8), "8 tokens should fit in 2 free blocks of 4"
    assert not pool.can_append("a", 9), "9 tokens should not fit in 2 blocks of 4"
    pool.append("a", 3)
    assert pool.blocks_needed("a", 1) == 0, "the 4th token should fit in a's partly filled block"
    assert pool.blocks_needed("a", 2) == 1, "the 5th token should need a new block"
    assert pool.can_append("a", 5), "a (3 tokens) should be able to grow to 8 in 2 blocks"
    assert not pool.can_append("a", 6), "a (3 tokens) should not fit 9 tokens in 2 blocks"


def test_truncate_frees_only_whole_blocks_past_the_kept_length():
    pool = pool_with(2)
    pool.append("a", 10)  # blocks 0, 1, 2 (2 tokens in block 2)
    pool.truncate("a", 5)  # tokens 0..4: blocks 0, 1 (1 token in block 1)
    assert pool.table("a") == [0, 1], f"5 kept tokens should keep 2 blocks: {pool.table('a')}"
    assert pool.length("a") == 5, f"length after truncating to 5: {pool.length('a')}"
    assert pool.num_free_blocks == 2, f"block 2 should be free again: {pool.num_free_blocks} free"
    pool.truncate("a", 4)
    assert pool.table("a") == [0], f"4 kept tokens fill exactly block 0: {pool.table('a')}"
    pool.truncate("a", 4)
    assert pool.table("a") == [0], "truncating to the current length should change nothing"
    pool.truncate("a", 0)
    assert pool.table("a") == [] and pool.length("a") == 0, "truncating to 0 should free all"
    assert pool.num_free_blocks == 4, f"all 4 blocks should be free: {pool.num_free_blocks}"
    for bad in (-1, 1):
        with pytest.raises(ValueError):
            pool.truncate("a", bad)


def test_truncate_then_append_reuses_the_partial_block():
    pool = pool_with(2)
    pool.append("a", 6)
    pool.truncate("a", 5)
    slots = pool.append("a", 1)
    assert slots == [5], f"token 5 should go back into block 1 slot 1 (global 5): {slots}"


def test_free_returns_all_blocks_and_forgets_the_session():
    pool = pool_with(2)
    pool.append("a", 9)
    pool.append("b", 1)
    pool.free("a")
    assert pool.table("a") == [] and pool.length("a") == 0, "a freed session should hold nothing"
    assert pool.usage() == PoolUsage(2, 4, 1, 1), f"only b's block should be used: {pool.usage()}"
    pool.free("a")  # twice: harmless
    pool.free("never-seen")
    assert pool.num_free_blocks == 3, f"freeing unknown sessions changed the pool: {pool.usage()}"


def test_lowest_free_block_is_handed_out_first():
    pool = pool_with(3)  # blocks 0..5, 1 block per 4 tokens
    for name in "abcdef":
        pool.append(name, 4)
    assert [pool.table(n)[0] for n in "abcdef"] == [0, 1, 2, 3, 4, 5], "blocks in order"
    pool.free("e")
    pool.free("b")
    pool.free("d")
    pool.append("g", 4)
    pool.append("h", 4)
    pool.append("i", 4)
    assert (pool.table("g"), pool.table("h"), pool.table("i")) == ([1], [3], [4]), (
        "freed blocks should be reused lowest first: "
        f"{pool.table('g')}, {pool.table('h')}, {pool.table('i')}")


def test_out_of_blocks_raises_memory_error_and_changes_nothing():
    pool = pool_with(1)
    pool.append("a", 5)
    with pytest.raises(MemoryError):
        pool.append("b", 5)
    assert pool.table("b") == [] and pool.length("b") == 0, "a refused append must not allocate"
    assert pool.num_free_blocks == 0, f"a's 2 blocks are all there is: {pool.usage()}"
    empty = BlockPool(4, 2)
    with pytest.raises(MemoryError):
        empty.append("a", 1)


def test_chunks_add_and_remove_from_the_top():
    pool = BlockPool(4, 2)
    assert pool.num_removable_chunks() == 0, "an empty pool has no chunks to remove"
    assert [pool.add_chunk() for _ in range(3)] == [0, 1, 2], "chunk indices should count up"
    assert pool.num_blocks == 6 and pool.num_free_blocks == 6, f"3 chunks of 2: {pool.usage()}"
    assert pool.num_removable_chunks() == 3, "3 free chunks should all be removable"
    pool.append("a", 12)  # blocks 0, 1, 2: chunks 0 and 1
    assert pool.num_removable_chunks() == 1, "only chunk 2 should be removable"
    with pytest.raises(ValueError):
        pool.remove_chunks(2)  # chunk 1 holds a's KV
    assert pool.num_chunks == 3, "a refused removal must not drop chunks"
    pool.remove_chunks(1)
    assert pool.num_chunks == 2 and pool.num_free_blocks == 1, (
        f"after removing chunk 2, block 3 only should be free: {pool.usage()}")
    assert pool.append("b", 4) == [12, 13, 14, 15], "b should get block 3, not a removed block"
    with pytest.raises(MemoryError):
        pool.append("c", 1)


def test_a_used_block_high_up_pins_every_chunk_below():
    pool = pool_with(3)
    for name in "abcdef":
        pool.append(name, 1)
    for name in "abcde":
        pool.free(name)  # only block 5 (chunk 2) is used
    assert pool.num_removable_chunks() == 0, "chunk 2 holds f's KV: nothing is removable"
    with pytest.raises(ValueError):
        pool.remove_chunks(1)
    pool.free("f")
    assert pool.num_removable_chunks() == 3, "an empty pool should be removable entirely"
    pool.remove_chunks(3)
    assert pool.usage() == PoolUsage(0, 0, 0, 0), f"nothing should be left: {pool.usage()}"


# ---- random operations ---------------------------------------------------
SESSIONS = ["s0", "s1", "s2", "s3"]


class PoolMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = BlockPool(block_size=3, blocks_per_chunk=2)
        self.lengths = {s: 0 for s in SESSIONS}   # the model: tokens per session

    @rule()
    def add_chunk(self):
        self.pool.add_chunk()

    @rule(session=st.sampled_from(SESSIONS), num=st.integers(0, 10))
    def append(self, session, num):
        before = (self.pool.table(session).copy(), self.pool.num_free_blocks)
        fits = self.pool.can_append(session, num)
        try:
            slots = self.pool.append(session, num)
        except MemoryError:
            assert not fits, "append refused although can_append said it fits"
            assert (self.pool.table(session), self.pool.num_free_blocks) == before, (
                "a refused append changed the pool")
            return
        assert fits, "append succeeded although can_append said it does not fit"
        start = self.lengths[session]
        table, size = self.pool.table(session), self.pool.block_size
        assert slots == [table[t // size] * size + t % size for t in range(start, start + num)], (
            f"slots {slots} do not match the table {table} for tokens {start}..{start + num - 1}")
        self.lengths[session] += num

    @rule(session=st.sampled_from(SESSIONS), data=st.data())
    def truncate(self, session, data):
        keep = data.draw(st.integers(0, self.lengths[session]))
        self.pool.truncate(session, keep)
        self.lengths[session] = keep

    @rule(session=st.sampled_from(SESSIONS))
    def free(self, session):
        self.pool.free(session)
        self.lengths[session] = 0

    @rule(count=st.integers(1, 3))
    def remove_chunks(self, count):
        removable = self.pool.num_removable_chunks()
        chunks = self.pool.num_chunks
        if count > removable:
            with pytest.raises(ValueError):
                self.pool.remove_chunks(count)
            assert self.pool.num_chunks == chunks, "a refused removal dropped chunks"
        else:
            self.pool.remove_chunks(count)
            assert self.pool.num_chunks == chunks - count, "removal dropped the wrong number"

    @invariant()
    def every_block_is_free_or_owned_once(self):
        pool = self.pool
        free = list(pool._free)
        owned = [b for s in SESSIONS for b in pool.table(s)]
        assert len(set(free)) == len(free), f"a block is free twice: {sorted(free)}"
        assert len(set(owned)) == len(owned), f"a block is in two tables: {sorted(owned)}"
        assert not set(free) & set(owned), f"blocks both free and owned: {set(free) & set(owned)}"
        assert sorted(free + owned) == list(range(pool.num_blocks)), (
            f"blocks lost or out of range: free {sorted(free)}, owned {sorted(owned)}, "
            f"{pool.num_blocks} blocks")

    @invariant()
    def lengths_match_tables(self):
        for s in SESSIONS:
            length = self.pool.length(s)
            assert length == self.lengths[s], f"{s}: pool says {length}, expected {self.lengths[s]}"
            expected_blocks = -(-length // self.pool.block_size)
            assert len(self.pool.table(s)) == expected_blocks, (
                f"{s}: {length} tokens in {len(self.pool.table(s))} blocks, "
                f"expected {expected_blocks}")

    @invariant()
    def removable_chunks_hold_no_kv(self):
        pool = self.pool
        first_removable = (pool.num_chunks - pool.num_removable_chunks()) * pool.blocks_per_chunk
        owned = [b for s in SESSIONS for b in pool.table(s)]
        assert all(b < first_removable for b in owned), (
            f"a removable chunk holds KV: owned {sorted(owned)}, removable from {first_removable}")


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestPoolMachine = PoolMachine.TestCase
