"""The shared-memory arena: segments under a directory (normally /dev/shm),
each a file `lmx-<store_id>-<n>` of mode 0600 mapped with mmap, and a
first-fit allocator over them.

Regular segments are `segment_bytes` long and hold many regions; a region
larger than that gets a dedicated segment of at least its size, rounded up
to a multiple of a sixteenth of the largest power of two not above it (at
most 6.25% more), so that entries of
nearly the same size (the same context plus a few tokens) fit one another's
segment. Freed ranges coalesce with their neighbours; an empty segment is
unlinked at once, except one empty regular segment kept as a spare, and
empty dedicated segments kept for the next large regions, up to
`spare_bytes` of them and while all segments together map at most
`mapped_limit` bytes (the store's capacity); past those limits the spares
freed longest ago go first (the one just freed is the likeliest size for
the next large region).
A new segment costs its pages' first touch and, in a GPU worker, registering
it as pinned memory (30-55 ms for 256 MiB on an H200, 530 ms for 1 GiB on
an H100): a dedicated segment made afresh for every large entry held parks
and restores of it to 2 GB/s (an H100 at 0afff2d, entries of 1 GiB + 16
KiB: the freed one was dropped while a 1 GiB spare they did not fit was
kept).
Files are created sparse (ftruncate), so a segment costs host memory only
for the pages written into it.

Pure Python + mmap: no grpc, no policy (capacity and eviction are the store's).
"""

from __future__ import annotations

import bisect
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

#: Offsets and lengths are multiples of a page.
ALIGN = 4096
SEGMENT_NAME = re.compile(r"^lmx-([A-Za-z0-9_]+)-(\d+)$")


def align_up(num: int) -> int:
    return (num + ALIGN - 1) // ALIGN * ALIGN


def dedicated_size(length: int) -> int:
    """A dedicated segment's size for a region of `length` (aligned) bytes:
    rounded up to a multiple of a sixteenth of the largest power of two not
    above it (at most 6.25% more)."""
    step = max(ALIGN, 1 << max(0, length.bit_length() - 5))
    return (length + step - 1) // step * step


def segment_name(store_id: str, number: int) -> str:
    return f"lmx-{store_id}-{number}"


def parse_segment_name(name: str) -> tuple[str, int] | None:
    """'lmx-main-3' -> ('main', 3); None for any other name."""
    match = SEGMENT_NAME.match(name)
    return (match.group(1), int(match.group(2))) if match else None


@dataclass(frozen=True)
class Region:
    """`length` bytes at `offset` in the segment file `segment` (a name)."""

    segment: str
    offset: int
    length: int


@dataclass
class Segment:
    name: str
    path: Path
    size: int
    dedicated: bool
    map: mmap.mmap = field(repr=False)
    #: Free ranges, sorted by offset, never adjacent (coalesced): (offset, length).
    free: list[tuple[int, int]] = field(default_factory=list)
    #: When it last became empty (the arena's counter): spares freed longest
    #: ago go first.
    emptied: int = 0

    @property
    def free_bytes(self) -> int:
        return sum(length for _, length in self.free)

    @property
    def empty(self) -> bool:
        return self.free == [(0, self.size)]

    def take(self, offset: int, length: int) -> bool:
        """Remove [offset, offset+length) from a free range; False if not free."""
        for index, (start, size) in enumerate(self.free):
            if start <= offset and offset + length <= start + size:
                pieces = [(start, offset - start), (offset + length, start + size - offset - length)]
                self.free[index:index + 1] = [(o, n) for o, n in pieces if n > 0]
                return True
        return False

    def first_fit(self, length: int) -> int | None:
        for start, size in self.free:
            if size >= length:
                self.take(start, length)
                return start
        return None

    def give_back(self, offset: int, length: int) -> None:
        starts = [start for start, _ in self.free]
        index = bisect.bisect_left(starts, offset)
        if index > 0:
            prev_start, prev_size = self.free[index - 1]
            if prev_start + prev_size > offset:
                raise ValueError(f"{self.name}: double free at {offset}")
        if index < len(self.free) and offset + length > self.free[index][0]:
            raise ValueError(f"{self.name}: double free at {offset}")
        self.free.insert(index, (offset, length))
        # Coalesce with the next, then with the previous range.
        if index + 1 < len(self.free) and offset + length == self.free[index + 1][0]:
            self.free[index] = (offset, length + self.free[index + 1][1])
            del self.free[index + 1]
        if index > 0 and self.free[index - 1][0] + self.free[index - 1][1] == offset:
            self.free[index - 1] = (self.free[index - 1][0], self.free[index - 1][1] + self.free[index][1])
            del self.free[index]


class Arena:
    """Allocates page-aligned regions in shared-memory segment files."""

    def __init__(self, shm_dir: str | Path, store_id: str, segment_bytes: int,
                 spare_bytes: int = 0, mapped_limit: int = 0):
        if segment_bytes <= 0 or segment_bytes % ALIGN:
            raise ValueError(f"segment_bytes must be a positive multiple of {ALIGN}")
        self.shm_dir = Path(shm_dir)
        self.store_id = store_id
        self.segment_bytes = segment_bytes
        #: Empty dedicated segments kept for reuse: at most this many bytes of
        #: them (0: none), and only while every segment together maps at most
        #: mapped_limit bytes.
        self.spare_bytes_limit = spare_bytes
        self.mapped_limit = mapped_limit
        self._segments: dict[str, Segment] = {}
        self._next_number = 0
        self._frees = 0

    # ---- segments ---------------------------------------------------------
    def segments(self) -> list[Segment]:
        return list(self._segments.values())

    def segment(self, name: str) -> Segment | None:
        return self._segments.get(name)

    @property
    def mapped_bytes(self) -> int:
        return sum(seg.size for seg in self._segments.values())

    def path_of(self, name: str) -> Path:
        return self.shm_dir / name

    def _create(self, size: int, dedicated: bool) -> Segment:
        name = segment_name(self.store_id, self._next_number)
        self._next_number += 1
        path = self.path_of(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        seg = Segment(name, path, size, dedicated, mapping, [(0, size)])
        self._segments[name] = seg
        log.info("segment_created", segment=name, bytes=size, dedicated=dedicated)
        return seg

    def adopt(self, name: str, size: int, dedicated: bool) -> Segment | None:
        """Map an existing segment file left by an earlier run (all free until
        claimed). None when the file is missing or not of `size` bytes."""
        parsed = parse_segment_name(name)
        if parsed is None or parsed[0] != self.store_id or name in self._segments:
            return None
        path = self.path_of(name)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size != size or size <= 0:
                return None
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        seg = Segment(name, path, size, dedicated, mapping, [(0, size)])
        self._segments[name] = seg
        self._next_number = max(self._next_number, parsed[1] + 1)
        return seg

    def claim(self, region: Region) -> bool:
        """Mark an adopted region as in use; False if it is not free/valid."""
        seg = self._segments.get(region.segment)
        if seg is None or region.length <= 0 or region.offset % ALIGN:
            return False
        return seg.take(region.offset, align_up(region.length))

    def _drop(self, seg: Segment) -> None:
        del self._segments[seg.name]
        seg.path.unlink(missing_ok=True)
        try:
            seg.map.close()
        except BufferError:  # a view of it is still alive; unmapped when collected
            pass
        log.info("segment_dropped", segment=seg.name, bytes=seg.size)

    # ---- regions ----------------------------------------------------------
    def allocate(self, num_bytes: int) -> Region:
        if num_bytes <= 0:
            raise ValueError("num_bytes must be positive")
        length = align_up(num_bytes)
        if length > self.segment_bytes:
            seg = self._spare_for(length)
            if seg is None:
                size = dedicated_size(length)
                self._make_room(size)
                seg = self._create(size, dedicated=True)
            seg.take(0, length)
            return Region(seg.name, 0, num_bytes)
        for seg in self._segments.values():
            if seg.dedicated:
                continue
            offset = seg.first_fit(length)
            if offset is not None:
                return Region(seg.name, offset, num_bytes)
        self._make_room(self.segment_bytes)
        seg = self._create(self.segment_bytes, dedicated=False)
        seg.take(0, length)
        return Region(seg.name, 0, num_bytes)

    def free(self, region: Region) -> None:
        seg = self._segments[region.segment]
        seg.give_back(region.offset, align_up(region.length))
        if seg.empty:
            self._maybe_drop(seg)

    def _maybe_drop(self, seg: Segment) -> None:
        if seg.dedicated:
            self._frees += 1
            seg.emptied = self._frees
            # Over the limits: the spares freed longest ago go first, this
            # one (the likeliest size for the next large region) last.
            for spare in sorted(self._spares(), key=lambda other: other.emptied):
                if (self.spare_bytes <= self.spare_bytes_limit
                        and self.mapped_bytes <= self.mapped_limit):
                    return
                self._drop(spare)
            return
        spares = [other for other in self._segments.values()
                  if other is not seg and not other.dedicated and other.empty]
        if spares:
            self._drop(seg)

    def _spares(self) -> list[Segment]:
        """The empty dedicated segments (kept for the next large region)."""
        return [seg for seg in self._segments.values() if seg.dedicated and seg.empty]

    @property
    def spare_bytes(self) -> int:
        """Bytes of the empty dedicated segments kept for reuse."""
        return sum(seg.size for seg in self._spares())

    def _spare_for(self, length: int) -> Segment | None:
        """The smallest empty dedicated segment that holds `length` bytes."""
        return min((seg for seg in self._spares() if seg.size >= length),
                   key=lambda seg: seg.size, default=None)

    def _make_room(self, size: int) -> None:
        """Empty dedicated segments go, the largest first, until a new
        segment of `size` bytes keeps the mapped bytes within mapped_limit
        (or none is left)."""
        for seg in sorted(self._spares(), key=lambda seg: seg.size, reverse=True):
            if self.mapped_bytes + size <= self.mapped_limit:
                return
            self._drop(seg)

    def trim(self) -> None:
        """Drop empty segments beyond the spares kept (after adoption)."""
        for seg in list(self._segments.values()):
            if seg.empty:
                self._maybe_drop(seg)

    def view(self, region: Region) -> memoryview:
        seg = self._segments[region.segment]
        return memoryview(seg.map)[region.offset:region.offset + region.length]

    def close(self) -> None:
        """Unmap and unlink every segment."""
        for seg in list(self._segments.values()):
            self._drop(seg)
