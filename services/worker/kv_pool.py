"""The paged KV block pool's bookkeeping: pure Python, no torch.

KV memory is cut into blocks of `block_size` tokens. Blocks come in chunks
(one admission Resize each): the pool grows a chunk at a time when sessions
need blocks and gives back whole chunks from the top when they are free. The
lowest free block is always handed out first, so that freed memory gathers in
the top chunks.

A session's block table lists its blocks in token order: token t lives in
block table[t // block_size], slot t % block_size.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PoolUsage:
    num_chunks: int
    num_blocks: int
    num_used_blocks: int
    num_sessions: int


class BlockPool:
    def __init__(self, block_size: int, blocks_per_chunk: int):
        if block_size <= 0 or blocks_per_chunk <= 0:
            raise ValueError("block_size and blocks_per_chunk must be positive")
        self.block_size = block_size
        self.blocks_per_chunk = blocks_per_chunk
        self.num_chunks = 0
        self._free: list[int] = []           # a heap: lowest block first
        self._tables: dict[str, list[int]] = {}
        self._lengths: dict[str, int] = {}

    # ---- queries -------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.num_chunks * self.blocks_per_chunk

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> PoolUsage:
        return PoolUsage(self.num_chunks, self.num_blocks, self.num_blocks - len(self._free),
                         len(self._tables))

    def table(self, session_id: str) -> list[int]:
        return self._tables.get(session_id, [])

    def length(self, session_id: str) -> int:
        """Tokens whose KV the session holds."""
        return self._lengths.get(session_id, 0)

    def blocks_needed(self, session_id: str, num_new_tokens: int) -> int:
        """Blocks to add so that the session can hold num_new_tokens more."""
        total = self.length(session_id) + num_new_tokens
        needed = -(-total // self.block_size)
        return max(0, needed - len(self.table(session_id)))

    def can_append(self, session_id: str, num_new_tokens: int) -> bool:
        return self.blocks_needed(session_id, num_new_tokens) <= len(self._free)

    # ---- changes -------------------------------------------------------
    def add_chunk(self) -> int:
        """A new chunk (its memory was granted); returns its index."""
        first = self.num_blocks
        self.num_chunks += 1
        for block in range(first, self.num_blocks):
            heapq.heappush(self._free, block)
        return self.num_chunks - 1

    def append(self, session_id: str, num_new_tokens: int) -> list[int]:
        """Make room for num_new_tokens more tokens; returns the slots (global
        token slots: block * block_size + offset) where their KV goes."""
        if num_new_tokens < 0:
            raise ValueError("num_new_tokens must not be negative")
        start = self._lengths.get(session_id, 0)
        table = self._tables.get(session_id)
        size = self.block_size
        if num_new_tokens == 1 and table and start < len(table) * size:
            # A decode step's token in the session's last block: the common
            # case, once per row per step.
            self._lengths[session_id] = start + 1
            return [table[start // size] * size + start % size]
        needed = self.blocks_needed(session_id, num_new_tokens)
        if needed > len(self._free):
            raise MemoryError(f"need {needed} blocks, {len(self._free)} free")
        table = self._tables.setdefault(session_id, [])
        table.extend(heapq.heappop(self._free) for _ in range(needed))
        self._lengths[session_id] = start + num_new_tokens
        return [table[t // size] * size + t % size for t in range(start, start + num_new_tokens)]

    def truncate(self, session_id: str, num_tokens: int) -> None:
        """Keep only the first num_tokens tokens of the session."""
        length = self.length(session_id)
        if not 0 <= num_tokens <= length:
            raise ValueError(f"cannot truncate {length} tokens to {num_tokens}")
        table = self._tables.get(session_id, [])
        keep = -(-num_tokens // self.block_size)
        for block in table[keep:]:
            heapq.heappush(self._free, block)
        del table[keep:]
        self._lengths[session_id] = num_tokens

    def free(self, session_id: str) -> None:
        for block in self._tables.pop(session_id, []):
            heapq.heappush(self._free, block)
        self._lengths.pop(session_id, None)

    def num_removable_chunks(self) -> int:
        """How many chunks at the top hold no used block."""
        used = {block for table in self._tables.values() for block in table}
        top = max(used, default=-1)
        highest_used_chunk = top // self.blocks_per_chunk if top >= 0 else -1
        return self.num_chunks - 1 - highest_used_chunk

    def remove_chunks(self, count: int) -> None:
        """Drop `count` free chunks from the top (their memory goes back)."""
        if count > self.num_removable_chunks():
            raise ValueError("those chunks still hold KV")
        self.num_chunks -= count
        limit = self.num_blocks
        self._free = [block for block in self._free if block < limit]
        heapq.heapify(self._free)
