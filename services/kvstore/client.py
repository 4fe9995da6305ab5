"""For clients on the kvstore's host: map a ShmRegion (as Reserve and Open
answer it) and read or write its bytes directly, without gRPC.

    with map_region(reserve.region, writable=True) as view:
        view[:] = kv_bytes                      # then Commit with checksum(kv_bytes)
    crc = write_region(reserve.region, kv_bytes)          # the same; its checksum
    data = read_checked(open_.region, open_.entry.checksum)  # ChecksumMismatch if not
    data = await read_region_async(region)      # unchecked, off the event loop

`region` is anything with `segment` (the segment file's path), `offset` and
`length`: the proto's ShmRegion or services.kvstore.arena.Region with a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

from services.kvstore.checksum import checksum

__all__ = ["ChecksumMismatch", "RegionError", "checksum", "map_region", "read_checked",
           "read_region", "read_region_async", "write_region", "write_region_async"]


class RegionError(Exception):
    """The region cannot be mapped (not an lmx- segment, or out of bounds)."""


class ChecksumMismatch(Exception):
    """The region's bytes do not have the entry's checksum: never use them."""


@contextlib.contextmanager
def map_region(region, writable: bool = False) -> Iterator[memoryview]:
    """A memoryview of exactly the region's bytes, unmapped on exit (release
    every slice of it before leaving the block)."""
    path = Path(region.segment)
    if not path.name.startswith("lmx-"):
        raise RegionError(f"{region.segment!r} is not an lmx- segment")
    offset, length = int(region.offset), int(region.length)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        if offset + length > os.fstat(fd).st_size or length <= 0:
            raise RegionError(f"region [{offset}, +{length}) is outside {path}")
        mapping = mmap.mmap(fd, offset + length - start, offset=start,
                            access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
    finally:
        os.close(fd)
    whole = memoryview(mapping)
    view = whole[offset - start:]
    try:
        yield view
    finally:
        view.release()
        whole.release()
        mapping.close()


def read_region(region) -> bytearray:
    """A copy of the region's bytes (mutable, so that torch can wrap it
    without another copy)."""
    with map_region(region) as view:
        return bytearray(view)


def read_checked(region, expected: int) -> bytearray:
    """read_region, then the bytes checked against the entry's checksum."""
    data = read_region(region)
    if checksum(data) != expected:
        raise ChecksumMismatch(f"{region.segment}[{region.offset}, +{region.length}) does "
                               f"not have the entry's checksum {expected:#018x}")
    return data


def write_region(region, data) -> int:
    """Write `data` (exactly region.length bytes) and return its checksum."""
    with map_region(region, writable=True) as view:
        if len(data) != len(view):
            raise RegionError(f"{len(data)} bytes given for a region of {len(view)}")
        view[:] = data
    return checksum(data)


async def read_region_async(region) -> bytearray:
    return await asyncio.to_thread(read_region, region)


async def write_region_async(region, data) -> int:
    return await asyncio.to_thread(write_region, region, data)
