"""One kernel launch to copy a run of layers of a session's K (or V) between
the pool's chunks and one contiguous buffer [layers, tokens, kv_heads,
head_dim]: a park's gather, a restore's scatter (kv_transfer.py).

The pool (kv_storage.py) keeps K and V in chunks [num_layers,
slots_per_chunk, kv_heads, head_dim], and a session's tokens lie in blocks
of `block_size` consecutive slots spread over them. Done with torch's
index_select and index_copy_, a piece of a park takes two launches (and an
index tensor) per chunk it touches: 2,048 launches for a 1 GiB Llama-1B
entry (32 one-layer pieces over 32 chunks), whose park ran at 15 GB/s on
an H200 against 55 for the bare copy (the launches' host cost is the
suspect; bench/kv_copy_probe.py times both ways). Here one program copies
a tile of one block of one layer, reading the chunk's address from a table
(as paged_kernels.py does), so a piece is one launch whatever the number
of chunks.

The session's slots must be whole blocks in order, each but the last full
(what the engine hands out: `blocks_of` checks, and says None otherwise;
the caller then takes the torch path). On CPU tensors the kernels run
under Triton's interpreter (the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from services.worker.paged_kernels import AVAILABLE, next_power_of_2

if AVAILABLE:
    import triton.language as tl

    from services.worker.paged_kernels import _both


#: Elements of a row one program copies (a row is kv_heads * head_dim): a
#: block's 16 rows of 256 are 4,096 elements, 32 a thread at 4 warps.
ROW_TILE = 256


def blocks_of(slots: Sequence[int], block_size: int,
              device: torch.device) -> torch.Tensor | None:
    """The blocks holding `slots` in token order (int64, on `device`) if the
    slots are whole blocks in order, each but the last full; else None."""
    flat = np.asarray(slots, dtype=np.int64)
    if flat.size == 0:
        return None
    blocks = flat[::block_size] // block_size
    expected = (np.repeat(blocks, block_size)[:flat.size] * block_size
                + np.arange(flat.size, dtype=np.int64) % block_size)
    if not np.array_equal(flat, expected):
        return None
    return torch.from_numpy(blocks).to(device)


if AVAILABLE:
    def _copy_kernel(ptrs, blocks, buffer, first, slots_per_chunk, num_tokens,
                     ROW: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr,
                     GATHER: tl.constexpr):
        """Layer `first + program_id(0)`, the session's block program_id(1),
        elements [TILE * program_id(2), +TILE) of each of its BLOCK rows:
        between the chunk (through the address table) and the buffer
        [layers, num_tokens, ROW]."""
        layer = tl.program_id(0)
        j = tl.program_id(1)
        slot0 = tl.load(blocks + j).to(tl.int64) * BLOCK
        chunk = slot0 // slots_per_chunk
        local = slot0 % slots_per_chunk
        t = tl.arange(0, BLOCK)
        e = tl.program_id(2) * TILE + tl.arange(0, TILE)
        token = j * BLOCK + t
        mask = (token < num_tokens)[:, None] & (e < ROW)[None, :]
        base = tl.load(ptrs + chunk).to(tl.pointer_type(buffer.dtype.element_ty))
        pool = ((first + layer) * slots_per_chunk + local + t)[:, None] * ROW + e[None, :]
        flat = (layer * num_tokens + token.to(tl.int64))[:, None] * ROW + e[None, :]
        if GATHER:
            tl.store(buffer + flat, tl.load(base + pool, mask=mask), mask=mask)
        else:
            tl.store(base + pool, tl.load(buffer + flat, mask=mask), mask=mask)

    _COPY = _both(_copy_kernel)


def copy_blocks(ptrs: torch.Tensor, blocks: torch.Tensor, buffer: torch.Tensor, *, first: int,
                slots_per_chunk: int, block_size: int, gather: bool) -> None:
    """Layers [first, first + buffer.shape[0]) of the session whose slots are
    `blocks` (blocks_of) between the chunks at `ptrs` (int64 addresses, one
    per chunk, of K's or of V's) and `buffer` [layers, tokens, kv_heads,
    head_dim] (contiguous): into the buffer if `gather`, else out of it."""
    layers, num_tokens = buffer.shape[0], buffer.shape[1]
    row = buffer.shape[2] * buffer.shape[3]
    tile = min(next_power_of_2(row), ROW_TILE)
    _COPY[buffer.device.type][(layers, blocks.numel(), -(-row // tile))](
        ptrs, blocks, buffer, first, slots_per_chunk, num_tokens, ROW=row, TILE=tile,
        BLOCK=block_size, GATHER=gather)
