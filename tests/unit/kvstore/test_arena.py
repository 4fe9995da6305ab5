"""The shared-memory arena over a temporary directory."""

from __future__ import annotations

import stat

import pytest

from services.kvstore.arena import ALIGN, Arena, Region, parse_segment_name

SEGMENT = 16 * ALIGN


@pytest.fixture
def arena(tmp_path):
    arena = Arena(tmp_path, "t", SEGMENT)
    yield arena
    arena.close()


def names(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_segments_are_named_sized_and_private(arena, tmp_path):
    region = arena.allocate(100)
    assert region == Region("lmx-t-0", 0, 100)
    path = tmp_path / "lmx-t-0"
    assert path.stat().st_size == SEGMENT
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert parse_segment_name("lmx-t-0") == ("t", 0)
    assert parse_segment_name("lmx-test-dir") is None


def test_first_fit_page_aligned(arena):
    a = arena.allocate(1)
    b = arena.allocate(ALIGN + 1)
    c = arena.allocate(ALIGN)
    assert (a.offset, b.offset, c.offset) == (0, ALIGN, 3 * ALIGN)
    arena.free(b)
    d = arena.allocate(ALIGN)           # first fit: b's hole
    assert d.offset == ALIGN and d.segment == a.segment


def test_free_coalesces_and_drops_empty_segments_beyond_one_spare(arena, tmp_path):
    first = [arena.allocate(4 * ALIGN) for _ in range(4)]   # fills segment 0
    second = arena.allocate(ALIGN)                           # opens segment 1
    assert second.segment == "lmx-t-1"
    for region in (first[1], first[3], first[2], first[0]):  # out of order
        arena.free(region)
    seg0 = arena.segment("lmx-t-0")
    assert seg0.free == [(0, SEGMENT)]                       # fully coalesced, kept as spare
    arena.free(second)                                       # second empty segment: dropped
    assert names(tmp_path) == ["lmx-t-0"]
    assert arena.allocate(SEGMENT).segment == "lmx-t-0"      # a whole segment fits


def test_large_entry_gets_a_dedicated_segment(arena, tmp_path):
    big = arena.allocate(SEGMENT + 1)
    seg = arena.segment(big.segment)
    assert seg.dedicated and seg.size == SEGMENT + ALIGN
    arena.free(big)
    assert arena.segment(big.segment) is None and names(tmp_path) == []


def test_empty_dedicated_segments_are_reused_for_the_next_large_region(tmp_path):
    """Kept while everything mapped stays within spare_limit: the next large
    region reuses the file (a worker's mapping and pinning of it stay
    good), the smallest that fits."""
    arena = Arena(tmp_path, "t", SEGMENT, spare_bytes=8 * SEGMENT, mapped_limit=8 * SEGMENT)
    big = arena.allocate(2 * SEGMENT)
    arena.free(big)
    assert names(tmp_path) == [big.segment] and arena.spare_bytes == 2 * SEGMENT
    again = arena.allocate(SEGMENT + 1)                 # smaller: fits the spare
    assert again == Region(big.segment, 0, SEGMENT + 1)
    assert arena.spare_bytes == 0
    larger = arena.allocate(3 * SEGMENT)                # does not fit: a new one
    assert larger.segment != big.segment
    arena.free(again)
    arena.free(larger)
    assert arena.allocate(2 * SEGMENT).segment == big.segment   # the smallest that fits
    arena.close()
    assert names(tmp_path) == []


def test_spare_dedicated_segments_stay_within_the_limit(tmp_path):
    arena = Arena(tmp_path, "t", SEGMENT, spare_bytes=8 * SEGMENT, mapped_limit=5 * SEGMENT)
    a, b = arena.allocate(2 * SEGMENT), arena.allocate(2 * SEGMENT)
    arena.free(a)                          # 4 segments' worth mapped: kept
    assert arena.segment(a.segment) is not None
    c = arena.allocate(3 * SEGMENT)        # 2 + 2 + 3 > 5: the spare goes first
    assert arena.segment(a.segment) is None and names(tmp_path) == sorted([b.segment, c.segment])
    arena.free(b)                          # 2 + 3 mapped: within 5, kept
    assert arena.segment(b.segment) is not None
    arena.free(c)                          # 2 + 3 mapped: kept too
    assert arena.spare_bytes == 5 * SEGMENT
    arena.allocate(ALIGN)                  # a regular segment needs room: the largest spare goes
    assert arena.segment(c.segment) is None and arena.segment(b.segment) is not None
    arena.close()


def test_spare_dedicated_segments_are_kept_up_to_their_own_limit(tmp_path):
    """An idle store does not keep its capacity in spares: at most
    spare_bytes of emptied dedicated segments, the one freed last kept."""
    arena = Arena(tmp_path, "t", SEGMENT, spare_bytes=3 * SEGMENT, mapped_limit=64 * SEGMENT)
    a, b = arena.allocate(2 * SEGMENT), arena.allocate(2 * SEGMENT)
    arena.free(a)                          # 2 of 3 spare bytes: kept
    arena.free(b)                          # 4 > 3: the one freed longer ago goes
    assert arena.segment(a.segment) is None and arena.segment(b.segment) is not None
    assert arena.spare_bytes == 2 * SEGMENT
    arena.close()


def test_entries_a_little_larger_each_round_reuse_one_segment(tmp_path):
    """The cliff an H100 showed at 0afff2d: a spare of exactly 1 GiB (the
    first hold) was kept, and entries of 1 GiB + 16 KiB, too large for it,
    each got a new segment (pinned again by the worker: 530 ms), their
    own freed one dropped as over the spare limit. Now the segment just
    freed is kept (the older spare goes) and sizes are rounded up, so the
    next entry of about the same size reuses it."""
    arena = Arena(tmp_path, "t", SEGMENT, spare_bytes=32 * SEGMENT, mapped_limit=64 * SEGMENT)
    first = arena.allocate(16 * SEGMENT)   # exactly 16 segments' worth
    arena.free(first)
    created = set()
    for extra in (4 * ALIGN, 4 * ALIGN, 5 * ALIGN, 3 * ALIGN, 6 * ALIGN):
        region = arena.allocate(16 * SEGMENT + extra)
        created.add(region.segment)
        assert arena.segment(region.segment).size <= (16 * SEGMENT + extra) * 17 // 16
        arena.free(region)
    assert len(created) == 1, f"a new segment for each round: {sorted(created)}"
    assert arena.segment(first.segment) is None, "the spare none of them fit went"
    arena.close()


def test_a_dedicated_segment_is_at_most_a_sixteenth_larger_than_its_region():
    from services.kvstore.arena import dedicated_size

    for length in (SEGMENT + ALIGN, 2 * SEGMENT, (1 << 30) + (16 << 10), 1 << 30, 3 << 28):
        size = dedicated_size(length)
        assert length <= size <= length + length // 16 and size % ALIGN == 0
    assert dedicated_size(1 << 30) == 1 << 30
    assert dedicated_size((1 << 30) + (16 << 10)) == (1 << 30) + (64 << 20)


def test_without_a_limit_a_dedicated_segment_goes_when_freed(arena, tmp_path):
    big = arena.allocate(SEGMENT + 1)
    arena.free(big)
    assert names(tmp_path) == []


def test_views_share_the_file(arena, tmp_path):
    region = arena.allocate(10)
    arena.view(region)[:] = b"0123456789"
    with open(tmp_path / region.segment, "rb") as fh:
        assert fh.read(10) == b"0123456789"


def test_double_free_is_refused(arena):
    region = arena.allocate(ALIGN)
    arena.allocate(ALIGN)
    arena.free(region)
    with pytest.raises(ValueError, match="double free"):
        arena.free(region)


def test_adopt_and_claim(tmp_path):
    arena = Arena(tmp_path, "t", SEGMENT)
    region = arena.allocate(ALIGN)
    arena.view(region)[:4] = b"keep"
    # a second arena (a restarted process) over the same file
    again = Arena(tmp_path, "t", SEGMENT)
    assert again.adopt("lmx-t-0", SEGMENT, False) is not None
    assert again.adopt("lmx-t-9", SEGMENT, False) is None          # no such file
    assert again.adopt("lmx-other-0", SEGMENT, False) is None      # not ours
    assert again.claim(region) and not again.claim(region)
    assert bytes(again.view(region)[:4]) == b"keep"
    assert again.allocate(ALIGN).offset == ALIGN
    again.close()
    arena._segments.clear()   # its file is gone with `again`
    assert names(tmp_path) == []


def test_close_removes_every_segment(tmp_path):
    arena = Arena(tmp_path, "t", SEGMENT)
    arena.allocate(ALIGN)
    arena.allocate(SEGMENT * 2)
    view = arena.view(arena.allocate(ALIGN))   # a live view must not block the unlink
    arena.close()
    del view
    assert names(tmp_path) == []
