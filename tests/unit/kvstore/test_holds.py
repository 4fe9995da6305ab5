"""Holds: shared memory kept ahead of an owner's next entry, placed as a
ready entry in one step (Place: a Reserve and a Commit in one)."""

from __future__ import annotations

import os

import pytest

from services.common.errors import (
    CapacityExhausted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.kvstore.arena import align_up
from services.kvstore.checksum import checksum
from services.kvstore.hold import MAX_PER_OWNER

from .conftest import layout

SECRET = "entry-secret"
HOLD_SECRET = "hold-secret"


def place(store, held, data: bytes | None = None, hold_again: bool = False, **kw):
    """Write an entry's bytes at the start of the hold and place it."""
    lay = layout(**kw)
    data = data if data is not None else os.urandom(lay.num_bytes)
    store.view(held.region)[:len(data)] = data
    entry, following = store.place(held.hold_id, HOLD_SECRET, held.owner, "sess", SECRET, lay,
                                   range(lay.num_tokens + 1), b"{}", checksum(data), hold_again)
    return entry, following, data


def test_a_placed_entry_is_ready_where_it_was_written_and_the_rest_is_freed(make_store):
    store = make_store(reservation_ttl_s=0)
    held = store.hold("w1", HOLD_SECRET, 64 << 10)
    assert store.status().used_bytes == 64 << 10, "a hold counts as used"
    entry, following, data = place(store, held)
    assert following is None
    assert entry.state == "ready" and entry.num_bytes == 8 << 10
    assert (entry.region.segment, entry.region.offset) == (held.region.segment,
                                                           held.region.offset)
    _, region = store.open(entry.entry_id, SECRET)
    assert bytes(store.view(region)) == data
    assert entry.checksum == checksum(data)
    assert store.status().used_bytes == 8 << 10, "the rest of the hold should be freed"
    with pytest.raises(NotFound):
        place(store, held)   # a hold is used once
    # The freed rest is allocated again: nothing was lost in the arena.
    other = store.hold("w1", HOLD_SECRET, (64 << 10) - align_up(8 << 10))
    assert other.region.segment == held.region.segment


def test_hold_again_gives_the_next_hold_of_the_same_size(make_store):
    store = make_store(reservation_ttl_s=0)
    held = store.hold("w1", HOLD_SECRET, 32 << 10)
    entries = []
    for _ in range(3):
        entry, held, data = place(store, held, hold_again=True)
        entries.append((entry, data))
        assert held is not None and held.num_bytes == 32 << 10 and held.owner == "w1"
    for entry, data in entries:
        _, region = store.open(entry.entry_id, SECRET)
        assert bytes(store.view(region)) == data, "a later hold overwrote an entry"
    assert store.status().used_bytes == 3 * (8 << 10) + (32 << 10)


def test_without_room_for_the_next_hold_the_entry_is_placed_all_the_same(make_store):
    store = make_store(reservation_ttl_s=0, when_full="refuse")      # 1 MiB
    held = store.hold("w1", HOLD_SECRET, 64 << 10)
    store.reserve("w2", "other", SECRET, layout(num_tokens=480), range(480))  # 960 KiB
    entry, following, _ = place(store, held, hold_again=True)        # 8 KiB; 56 KiB free
    assert following is None and entry.state == "ready"


def test_holds_take_at_most_their_share_of_the_capacity(make_store):
    """One hold at most 1/8 of the capacity, all at most 1/4: the rest is
    for entries (a hold cannot be taken back to make room)."""
    store = make_store(reservation_ttl_s=0)                          # 1 MiB
    first = store.hold("w1", HOLD_SECRET, 1 << 20)
    assert first.num_bytes == 128 << 10, "a larger ask gets the share"
    store.hold("w2", HOLD_SECRET, 128 << 10)
    with pytest.raises(CapacityExhausted):
        store.hold("w3", HOLD_SECRET, 4096)
    store.release_hold(first.hold_id, HOLD_SECRET)
    store.hold("w3", HOLD_SECRET, 4096)


def test_an_entry_larger_than_its_hold_is_refused_and_the_hold_kept(make_store):
    store = make_store(reservation_ttl_s=0)
    held = store.hold("w1", HOLD_SECRET, 4 << 10)
    with pytest.raises(FailedPrecondition) as info:
        place(store, held, data=b"")
    assert info.value.reason == "HOLD_TOO_SMALL"
    entry, _, _ = place(store, held, num_tokens=2)   # 4 KiB: fits, and the hold was kept
    assert entry.state == "ready"


def test_holds_check_their_secret_owner_and_bounds(make_store):
    store = make_store(reservation_ttl_s=0)
    held = store.hold("w1", HOLD_SECRET, 16 << 10)
    with pytest.raises(PermissionDenied):
        store.hold("w1", "wrong", 0, hold_id=held.hold_id)
    with pytest.raises(PermissionDenied):
        store.release_hold(held.hold_id, "wrong")
    lay = layout()
    with pytest.raises(InvalidArgument) as info:
        store.place(held.hold_id, HOLD_SECRET, "w2", "sess", SECRET, lay, range(5), b"", 0)
    assert info.value.field == "entry.owner"
    with pytest.raises(InvalidArgument) as info:
        store.place(held.hold_id, HOLD_SECRET, "w1", "", SECRET, lay, range(5), b"", 0)
    assert info.value.field == "session_id"
    for num_bytes in (0, store.max_entry_bytes + 1):
        with pytest.raises(InvalidArgument) as info:
            store.hold("w1", HOLD_SECRET, num_bytes)
        assert info.value.field == "num_bytes"
    with pytest.raises(InvalidArgument):
        store.hold("", HOLD_SECRET, 4096)
    with pytest.raises(NotFound):
        store.hold("w1", HOLD_SECRET, 0, hold_id="hold-0000000000000000")
    assert store.release_hold(held.hold_id, HOLD_SECRET) == 16 << 10
    assert store.status().used_bytes == 0


def test_an_owner_keeps_a_bounded_number_of_holds(make_store):
    store = make_store(reservation_ttl_s=0)
    for _ in range(MAX_PER_OWNER):
        store.hold("w1", HOLD_SECRET, 4096)
    with pytest.raises(CapacityExhausted):
        store.hold("w1", HOLD_SECRET, 4096)
    store.hold("w2", HOLD_SECRET, 4096)   # another owner's are its own


def test_a_hold_neither_renewed_nor_used_expires_and_a_renewed_one_stays(make_store):
    store = make_store(reservation_ttl_s=100)
    kept = store.hold("w1", HOLD_SECRET, 4096)
    dropped = store.hold("w1", HOLD_SECRET, 4096)
    store.clock.now += 60
    store.hold("w1", HOLD_SECRET, 0, hold_id=kept.hold_id)
    store.clock.now += 60
    assert store.expire_reservations() == 0       # counts reservations only
    with pytest.raises(NotFound):
        store.release_hold(dropped.hold_id, HOLD_SECRET)
    assert store.release_hold(kept.hold_id, HOLD_SECRET) == 4096
    assert store.status().used_bytes == 0


def test_holds_are_not_kept_across_a_restart_but_their_entries_are(make_store, dirs):
    store = make_store(reservation_ttl_s=0)
    held = store.hold("w1", HOLD_SECRET, 64 << 10)
    entry, following, data = place(store, held, hold_again=True)
    store.close()
    again = make_store(reservation_ttl_s=0)
    _, region = again.open(entry.entry_id, SECRET)
    assert bytes(again.view(region)) == data
    with pytest.raises(NotFound):
        again.release_hold(following.hold_id, HOLD_SECRET)
    assert again.status().used_bytes == 8 << 10


@pytest.mark.parametrize("journal", [False, True])
def test_a_crash_restart_keeps_the_holds_regions(make_store, journal):
    """A worker may write into its hold any time: a kvstore restarted after
    a crash keeps the region held (from the manifest, or its journal), so
    that no new entry is put where the worker writes."""
    first = make_store(reservation_ttl_s=0)
    if journal:
        first.save_later = lambda: None        # commits and holds go on the journal
    held = first.hold("w1", HOLD_SECRET, 32 << 10)
    entry, following, data = place(first, held, hold_again=True)
    spare = first.hold("w1", HOLD_SECRET, 16 << 10)
    first.release_hold(spare.hold_id, HOLD_SECRET)
    # the first store "crashes": its lock goes, its segments stay
    first._lock.release()
    second = make_store(reservation_ttl_s=0)
    _, region = second.open(entry.entry_id, SECRET)
    assert bytes(second.view(region)) == data
    with pytest.raises(NotFound):
        second.release_hold(held.hold_id, HOLD_SECRET)      # placed: gone
    with pytest.raises(NotFound):
        second.release_hold(spare.hold_id, HOLD_SECRET)     # released: gone
    # The next hold is kept: what is reserved now goes elsewhere, and it places.
    lay = layout(num_tokens=16)                             # 32 KiB
    _, other = second.reserve("w2", "sess", SECRET, lay, range(16))
    start, end = following.region.offset, following.region.offset + following.num_bytes
    assert (other.segment != following.region.segment
            or other.offset >= end or other.offset + other.length <= start), (
        "a restarted store put a new entry inside a region still held")
    again, _, data2 = place(second, following)
    _, region = second.open(again.entry_id, SECRET)
    assert bytes(second.view(region)) == data2
    first._closed = True                                    # its segments are second's now
    first.arena._segments.clear()
