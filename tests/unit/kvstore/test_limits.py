"""The KV store's bounds on what clients send (services/kvstore/limits.py)
and the expiry of uncommitted reservations (issue 19: five Reserves of 5
million ids each grew the store by 218 MiB, and reservations stayed
forever)."""

from __future__ import annotations

import pytest

from services.common.errors import CapacityExhausted, FailedPrecondition, InvalidArgument, NotFound
from services.kvstore import limits

from .conftest import layout

SECRET = "s3cret"


def reserve(store, num_tokens=4, ids=None, metadata=b"", **names):
    args = dict(owner="w1", session_id="sess", secret=SECRET) | names
    lay = layout(num_tokens=num_tokens)
    return store.reserve(args["owner"], args["session_id"], args["secret"], lay,
                         range(num_tokens + 1) if ids is None else ids, metadata)


def test_token_ids_past_the_layout_and_the_uncached_allowance_are_refused(make_store):
    store = make_store()
    with pytest.raises(InvalidArgument) as err:
        reserve(store, ids=range(5_000_000))
    assert err.value.field == "token_ids" and "5000000" in err.value.message
    entry, _ = reserve(store, ids=range(4 + limits.MAX_UNCACHED_TOKENS))
    assert len(entry.token_ids) == 4 + limits.MAX_UNCACHED_TOKENS
    assert entry.token_ids.itemsize == limits.TOKEN_ID_BYTES  # int32s, not Python ints
    assert store.status().num_entries == 1


@pytest.mark.parametrize("field", ["owner", "session_id", "secret"])
def test_names_are_required_and_bounded(make_store, field):
    store = make_store()
    for value in ("", "x" * (limits.MAX_NAME_CHARS + 1)):
        with pytest.raises(InvalidArgument) as err:
            reserve(store, **{field: value})
        assert err.value.field == field
    assert store.status().num_entries == 0


def test_metadata_is_bounded(make_store):
    store = make_store()
    with pytest.raises(InvalidArgument) as err:
        reserve(store, metadata=b"x" * (limits.MAX_METADATA_BYTES + 1))
    assert err.value.field == "metadata"


@pytest.mark.parametrize("call", ["open", "delete", "commit"])
def test_an_empty_entry_id_is_invalid_not_unknown(make_store, call):
    store = make_store()
    with pytest.raises(InvalidArgument) as err:
        if call == "commit":
            store.commit("", SECRET, 0)
        else:
            getattr(store, call)("", SECRET)
    assert err.value.field == "entry_id"


def test_the_chunk_size_is_bounded():
    limits.check_chunk_bytes(0)
    limits.check_chunk_bytes(limits.MAX_CHUNK_BYTES)
    for bad in (-1, limits.MAX_CHUNK_BYTES + 1):
        with pytest.raises(InvalidArgument):
            limits.check_chunk_bytes(bad)


def test_all_entries_bookkeeping_is_bounded_with_a_retry_hint(make_store):
    # 1 MiB of capacity: the floor (64 MiB) bounds the bookkeeping; 1 MiB of
    # metadata an entry reaches it within 64 tiny entries.
    store = make_store(capacity_bytes=1 << 20, reservation_ttl_s=0)
    made = 0
    with pytest.raises(CapacityExhausted) as err:
        for _ in range(200):
            reserve(store, num_tokens=1, metadata=b"m" * limits.MAX_METADATA_BYTES)
            made += 1
    assert 0 < made < 64
    assert err.value.retry_after_s > 0
    assert store.bookkeeping_bytes <= limits.bookkeeping_bound(1 << 20)


def test_uncommitted_reservations_expire_and_free_their_memory(make_store):
    store = make_store(reservation_ttl_s=30.0)
    stale, _ = reserve(store)
    kept, _ = reserve(store)
    store.commit(kept.entry_id, SECRET, 0)
    used = store.status().used_bytes
    store.clock.now += 31
    assert store.expire_reservations() == 1
    assert store.status().num_entries == 1
    assert store.status().used_bytes == used - stale.num_bytes
    with pytest.raises(FailedPrecondition) as err:
        store.commit(stale.entry_id, SECRET, 0)
    assert err.value.reason == "RESERVATION_EXPIRED"
    with pytest.raises(NotFound):
        store.open("kv-0123456789abcdef", SECRET)
    store.open(kept.entry_id, SECRET)   # committed entries never expire


def test_a_pinned_reservation_being_imported_does_not_expire(make_store):
    store = make_store(reservation_ttl_s=30.0)
    entry, _ = reserve(store)
    store.pin(entry.entry_id)
    store.clock.now += 100
    assert store.expire_reservations() == 0
    store.unpin(entry.entry_id)
    assert store.expire_reservations() == 1


def test_a_ttl_of_zero_keeps_reservations(make_store):
    store = make_store(reservation_ttl_s=0)
    reserve(store)
    store.clock.now += 10_000
    assert store.expire_reservations() == 0
