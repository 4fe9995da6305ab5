"""Copies between the KV pool and the kvstore's shared memory, both ways, with
the sum64 checksum computed on the pool's device.

The entry's bytes are K then V, each [layers][tokens][kv_heads][head_dim] of
the worker's dtype (the kvstore's KVLayout): one slab per (K or V, layer).
Parking gathers a slab from the pool, adds its checksum and copies it into
the region; restoring copies a slab out of the region onto the device, adds
its checksum and scatters it into the pool. The checksum is over the very
bytes written (park) and the very bytes used (restore), so a region changed
under a copy is caught, never used.

On a CUDA device the kvstore's segments are mapped once per process and
registered as pinned memory once (cudaHostRegister), so that the copies run
at pinned speed and asynchronously, on a side stream: the engine's steps go
on meanwhile on theirs. The checksum runs on the GPU (a sum, so per slab and
in any order). On the CPU the same code copies between the pool and the
mapped segment directly.

Called from worker threads (asyncio.to_thread); no grpc here.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from services.kvstore.checksum import MASK
from services.kvstore.checksum import checksum as host_checksum
from services.worker import kv_copy_kernels
from services.worker.kv_storage import KVStorage, SlotGroups

log = structlog.get_logger(__name__)

#: Words per row of the checksum's 2-D view (its column weights are kept on
#: the device once).
_ROW_WORDS = 1 << 16


class RegionError(Exception):
    """The region cannot be mapped (not an lmx- segment, or out of bounds)."""


class ChecksumMismatch(Exception):
    """The bytes copied out of the region do not have the entry's checksum."""


# ---- sum64 on a torch device ------------------------------------------------------

_column_weights: dict[torch.device, torch.Tensor] = {}


def sum64(data: torch.Tensor, word_offset: int = 0) -> torch.Tensor:
    """services/kvstore/checksum.py's sum64 of a contiguous uint8 tensor whose
    length is a multiple of 8, its first word being word `word_offset` of the
    whole; a 0-d int64 tensor on data's device (wrapped modulo 2**64: read it
    with `int(x) & MASK`). No host sync on a GPU; numpy's on the CPU (one
    pass, where torch's needs a temporary)."""
    if data.device.type == "cpu":
        value = host_checksum(memoryview(data.numpy()), word_offset)
        return torch.tensor(value - (1 << 64) if value >> 63 else value, dtype=torch.int64)
    return sum64_torch(data, word_offset)


def sum64_torch(data: torch.Tensor, word_offset: int = 0) -> torch.Tensor:
    """sum64 with torch operations, on any device."""
    words = data.view(torch.int64)
    n = words.numel()
    total = torch.zeros((), dtype=torch.int64, device=data.device)
    if n == 0:
        return total
    weights = _column_weights.get(data.device)
    if weights is None:
        weights = 2 * torch.arange(_ROW_WORDS, dtype=torch.int64, device=data.device) + 1
        _column_weights[data.device] = weights
    rows, rest = divmod(n, _ROW_WORDS)
    if rows:
        # word (r, c) has weight 2*(offset + r*R + c) + 1 = (2c + 1) + 2*(offset + r*R)
        grid = words[:rows * _ROW_WORDS].view(rows, _ROW_WORDS)
        total += (grid * weights).sum()
        row_first = torch.arange(rows, dtype=torch.int64, device=data.device) * _ROW_WORDS
        total += 2 * ((row_first + word_offset) * grid.sum(dim=1)).sum()
    if rest:
        tail = words[rows * _ROW_WORDS:]
        total += (tail * weights[:rest]).sum() + 2 * (word_offset + rows * _ROW_WORDS) * tail.sum()
    return total


# ---- the kvstore's segments, mapped once -------------------------------------------------

@dataclass
class _Mapped:
    inode: int
    size: int
    mapping: mmap.mmap
    tensor: torch.Tensor
    pinned: bool
    users: int = 0


class HostSegments:
    """The kvstore's segment files mapped into this process, each once, and
    with `pin` registered with CUDA as pinned memory once. A mapping whose
    file is gone (or replaced) is dropped at the next use of any segment,
    unless a copy is using it."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._lock = threading.Lock()
        self._maps: dict[str, _Mapped] = {}
        self.pin_failed = False

    @contextlib.contextmanager
    def region(self, region, inode: int | None = None) -> Iterator[torch.Tensor]:
        """The region's bytes as a uint8 CPU tensor aliasing the segment;
        with `inode`, only in that very file (RegionError if the path names
        another now: a kvstore restarted since the region was handed out)."""
        path = Path(region.segment)
        if not path.name.startswith("lmx-"):
            raise RegionError(f"{region.segment!r} is not an lmx- segment")
        offset, length = int(region.offset), int(region.length)
        with self._lock:
            self._sweep()
            mapped = self._map(path)
            if inode is not None and mapped.inode != inode:
                raise RegionError(f"{path} is another file than when the region was held")
            if length <= 0 or offset < 0 or offset + length > mapped.size:
                raise RegionError(f"region [{offset}, +{length}) is outside {path}")
            mapped.users += 1
        try:
            yield mapped.tensor[offset:offset + length]
        finally:
            with self._lock:
                mapped.users -= 1

    def inode_of(self, region) -> int:
        """The inode of the region's segment as mapped."""
        with self._lock:
            return self._maps[str(Path(region.segment))].inode

    @property
    def num_mapped(self) -> int:
        return len(self._maps)

    def close(self) -> None:
        with self._lock:
            for key in list(self._maps):
                self._drop(key)

    def _map(self, path: Path) -> _Mapped:
        key = str(path)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise RegionError(f"cannot open {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            mapped = self._maps.get(key)
            if mapped is not None and (mapped.inode, mapped.size) == (st.st_ino, st.st_size):
                return mapped
            if mapped is not None:
                self._drop(key)
            if st.st_size <= 0:
                raise RegionError(f"{path} is empty")
            mapping = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        tensor = torch.frombuffer(mapping, dtype=torch.uint8)
        pinned = self.pin and self._register(tensor, path)
        mapped = _Mapped(st.st_ino, st.st_size, mapping, tensor, pinned)
        self._maps[key] = mapped
        return mapped

    def _register(self, tensor: torch.Tensor, path: Path) -> bool:
        started = time.perf_counter()
        # cudaHostRegisterPortable: pinned for every CUDA context of the process.
        error = int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(), 1))
        if error:
            if not self.pin_failed:
                log.warning("segment_pin_failed", segment=path.name, cuda_error=error,
                            effect="copies to and from the kvstore run at pageable speed")
            self.pin_failed = True
            return False
        log.info("segment_pinned", segment=path.name, bytes=tensor.numel(),
                 ms=round((time.perf_counter() - started) * 1e3, 1))
        return True

    def _sweep(self) -> None:
        for key, mapped in list(self._maps.items()):
            if mapped.users:
                continue
            try:
                st = os.stat(key)
                gone = (st.st_ino, st.st_size) != (mapped.inode, mapped.size)
            except OSError:
                gone = True
            if gone:
                self._drop(key)

    def _drop(self, key: str) -> None:
        mapped = self._maps.pop(key)
        if mapped.pinned:
            torch.cuda.cudart().cudaHostUnregister(mapped.tensor.data_ptr())
        del mapped.tensor
        try:
            mapped.mapping.close()
        except BufferError:  # a slice is still alive somewhere; unmapped when collected
            pass


# ---- park and restore copies ---------------------------------------------------------

#: The largest piece a park or restore copies at once (KVTransfer).
PIECE_BYTES = 32 << 20


def staging_bytes_for(piece_bytes: int) -> int:
    """Device memory a park or restore takes beside the pool: two staging
    buffers and the checksum's temporary, a piece each (more only when a
    single layer's K or V of a very long context exceeds piece_bytes)."""
    return 3 * piece_bytes


#: The same with the default pieces (the lease's estimate before the load).
STAGING_BYTES = staging_bytes_for(PIECE_BYTES)


class KVTransfer:
    """Copies a session's KV between `storage` and kvstore regions, in pieces
    of at most `piece_bytes` (a run of layers of K or of V, contiguous both in
    the pool's gather and in the region).

    On a GPU two staging buffers of piece_bytes alternate between two side
    streams: while the copy stream moves one piece over PCIe, the compute
    stream gathers (or scatters) and sums the other, so the copies run back
    to back and the GPU memory used is bounded by the two buffers. There a
    piece is gathered or scattered in one kernel launch through the chunks'
    addresses (kv_copy_kernels.py) when the slots are whole blocks of
    `block_size` in order (a session's always are); else, and on the CPU,
    with torch's index operations, two a pool chunk."""

    def __init__(self, storage: KVStorage, piece_bytes: int = PIECE_BYTES, block_size: int = 16,
                 kernels: bool | None = None):
        self.storage = storage
        self.device = storage.device
        self.cuda = self.device.type == "cuda"
        self.segments = HostSegments(pin=self.cuda)
        self.piece_bytes = piece_bytes
        self.block_size = block_size
        self.kernels = (self.cuda and kv_copy_kernels.AVAILABLE) if kernels is None else kernels
        if self.cuda:
            self._compute = torch.cuda.Stream(self.device)
            self._copy = torch.cuda.Stream(self.device)
        shape = storage.shape
        self._itemsize = torch.empty((), dtype=shape.dtype).element_size()
        self._row_bytes = shape.num_kv_heads * shape.head_dim * self._itemsize

    def num_bytes(self, num_tokens: int) -> int:
        return 2 * self.storage.shape.num_layers * num_tokens * self._row_bytes

    @property
    def staging_bytes(self) -> int:
        return staging_bytes_for(self.piece_bytes)

    def close(self) -> None:
        self.segments.close()

    def prepare(self, region) -> int:
        """Map (and on a GPU pin) the region's segment now, off a park's
        path (a region held ahead: parking.py); the segment file's inode."""
        with self.segments.region(region):
            return self.segments.inode_of(region)

    def park(self, slots: Sequence[int], region, inode: int | None = None) -> int:
        """The KV at `slots` (token order) into the region; its sum64. With
        `inode`, only into that segment file (HostSegments.region)."""
        n = len(slots)
        self._check_length(region, n)
        pieces = self._pieces(n)
        aligned = all(p.offset % 8 == 0 and p.length % 8 == 0 for p in pieces)
        with self.segments.region(region, inode) as dest:
            self._begin()
            with self._on(self._compute_stream):
                move = self._mover(slots)
                total = torch.zeros((), dtype=torch.int64, device=self.device)
                buffers = self._buffers(pieces)
            copied: list = [None, None]   # per buffer: its last copy out, done
            for i, piece in enumerate(pieces):
                buffer = buffers[i % 2][:piece.length]
                with self._on(self._compute_stream):
                    self._wait_for(copied[i % 2])
                    move(piece, self._as_kv(buffer, piece, n), gather=True)
                    if aligned:
                        total += sum64(buffer, piece.offset // 8)
                    gathered = self._mark()
                with self._on(self._copy_stream):
                    self._wait_for(gathered)
                    dest[piece.offset:piece.offset + piece.length].copy_(buffer, non_blocking=True)
                    copied[i % 2] = self._mark()
            self._finish()
            if not aligned:  # rows not a multiple of 8 bytes: summed on the host
                return host_checksum(memoryview(dest.numpy()))
            return int(total.item()) & MASK

    def restore(self, slots: Sequence[int], region, expected: int) -> None:
        """The region's KV into the pool at `slots`, checked against
        `expected` (ChecksumMismatch: the slots then hold garbage; free them).
        The bytes summed are the bytes used: copied out of the region first,
        on the CPU too."""
        n = len(slots)
        self._check_length(region, n)
        pieces = self._pieces(n)
        aligned = all(p.offset % 8 == 0 and p.length % 8 == 0 for p in pieces)
        with self.segments.region(region) as src:
            if not aligned and host_checksum(memoryview(src.numpy())) != expected:
                raise ChecksumMismatch("the region does not have the entry's checksum")
            self._begin()
            with self._on(self._compute_stream):
                move = self._mover(slots)
                total = torch.zeros((), dtype=torch.int64, device=self.device)
                buffers = self._buffers(pieces)
            used: list = [None, None]   # per buffer: its last scatter, done
            for i, piece in enumerate(pieces):
                buffer = buffers[i % 2][:piece.length]
                with self._on(self._copy_stream):
                    self._wait_for(used[i % 2])
                    buffer.copy_(src[piece.offset:piece.offset + piece.length], non_blocking=True)
                    filled = self._mark()
                with self._on(self._compute_stream):
                    self._wait_for(filled)
                    if aligned:
                        total += sum64(buffer, piece.offset // 8)
                    move(piece, self._as_kv(buffer, piece, n), gather=False)
                    used[i % 2] = self._mark()
            self._finish()
            if aligned and int(total.item()) & MASK != expected:
                raise ChecksumMismatch("the bytes read do not have the entry's checksum")

    # ---- helpers ----
    def _mover(self, slots: Sequence[int]):
        """`move(piece, data, gather)`: the piece's layers of the slots into
        `data` [layers, tokens, kv_heads, head_dim] (gather) or out of it:
        one kernel launch (kv_copy_kernels.py) where it serves, else the
        pool's index operations."""
        storage = self.storage
        blocks = (kv_copy_kernels.blocks_of(slots, self.block_size, self.device)
                  if self.kernels else None)
        if blocks is None:
            groups = SlotGroups.build(list(slots), storage.slots_per_chunk, self.device)

            def by_index(piece: _Piece, data: torch.Tensor, gather: bool) -> None:
                if gather:
                    storage.gather_layers(piece.kv, piece.first, piece.last, groups,
                                          data.shape[1], out=data)
                else:
                    storage.write_layers(piece.kv, piece.first, piece.last, groups, data)
            return by_index
        # The chunks holding these slots are in use: none is removed meanwhile,
        # so the table of their addresses stays good for this copy.
        ptrs = [torch.tensor(storage.chunk_addresses(kv), dtype=torch.int64, device=self.device)
                for kv in (0, 1)]

        def by_kernel(piece: _Piece, data: torch.Tensor, gather: bool) -> None:
            kv_copy_kernels.copy_blocks(ptrs[piece.kv], blocks, data, first=piece.first,
                                        slots_per_chunk=storage.slots_per_chunk,
                                        block_size=self.block_size, gather=gather)
        return by_kernel

    def _pieces(self, num_tokens: int) -> list[_Piece]:
        layers = self.storage.shape.num_layers
        layer_bytes = num_tokens * self._row_bytes
        per = max(1, self.piece_bytes // layer_bytes)
        return [_Piece(kv, first, min(layers, first + per),
                       (kv * layers + first) * layer_bytes,
                       (min(layers, first + per) - first) * layer_bytes)
                for kv in (0, 1) for first in range(0, layers, per)]

    def _buffers(self, pieces: list[_Piece]) -> list[torch.Tensor]:
        size = max(p.length for p in pieces)
        count = 2 if len(pieces) > 1 else 1
        buffers = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(count)]
        return buffers * (2 // count)

    def _as_kv(self, buffer: torch.Tensor, piece: _Piece, num_tokens: int) -> torch.Tensor:
        shape = self.storage.shape
        return buffer.view(shape.dtype).view(piece.last - piece.first, num_tokens,
                                             shape.num_kv_heads, shape.head_dim)

    def _check_length(self, region, num_tokens: int) -> None:
        if num_tokens <= 0 or int(region.length) != self.num_bytes(num_tokens):
            raise RegionError(f"region of {region.length} bytes for {num_tokens} tokens of "
                              f"{self.num_bytes(1)} bytes")

    # Streams: on the CPU every one of these is a no-op and the loop runs in order.
    @property
    def _compute_stream(self):
        return self._compute if self.cuda else None

    @property
    def _copy_stream(self):
        return self._copy if self.cuda else None

    def _on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _begin(self) -> None:
        if self.cuda:  # after whatever the engine has queued (the session's last step)
            self._compute.wait_stream(torch.cuda.default_stream(self.device))
            self._copy.wait_stream(torch.cuda.default_stream(self.device))

    def _mark(self):
        return torch.cuda.current_stream(self.device).record_event() if self.cuda else None

    def _wait_for(self, event) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def _finish(self) -> None:
        if self.cuda:
            self._copy.synchronize()
            self._compute.synchronize()


@dataclass(frozen=True, slots=True)
class _Piece:
    """Layers [first, last) of K (kv=0) or V (kv=1): bytes [offset, +length)
    of the region."""
    kv: int
    first: int
    last: int
    offset: int
    length: int
