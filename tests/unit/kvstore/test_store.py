"""The entry table and its policy over temporary directories."""

from __future__ import annotations

import json
import os
import stat

import pytest

from services.common.errors import (
    CapacityExhausted,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.kvstore.checksum import checksum
from services.kvstore.entry import Layout

from .conftest import layout, shm_files

SECRET = "s3cret"
ENTRY = layout().num_bytes   # 8 KiB


def park(store, data: bytes | None = None, owner: str = "w1", secret: str = SECRET, **kw):
    """Reserve, write, commit; returns (entry, data)."""
    lay = layout(**kw)
    entry, region = store.reserve(owner, "sess", secret, lay, range(lay.num_tokens + 1))
    data = data if data is not None else os.urandom(lay.num_bytes)
    store.view(region)[:] = data
    store.commit(entry.entry_id, secret, checksum(data))
    return entry, data


def read(store, entry_id: str, secret: str = SECRET) -> bytes:
    _, region = store.open(entry_id, secret)
    return bytes(store.view(region))


def test_reserve_commit_open_delete(make_store, dirs):
    store = make_store()
    entry, data = park(store)
    assert entry.state == "ready" and entry.num_bytes == ENTRY
    assert read(store, entry.entry_id) == data
    assert [e.entry_id for e in store.list()] == [entry.entry_id]
    assert store.list("someone-else") == []
    assert store.status().used_bytes == ENTRY and store.status().num_entries == 1
    assert store.delete(entry.entry_id, SECRET) == ENTRY
    with pytest.raises(NotFound):
        store.open(entry.entry_id, SECRET)
    assert store.status().used_bytes == 0


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"dtype": "int8"}, "layout.dtype"),
    ({"num_layers": 0}, "layout.num_layers"),
    ({"num_kv_heads": -1}, "layout.num_kv_heads"),
    ({"head_dim": 0}, "layout.head_dim"),
    ({"num_tokens": 0}, "layout.num_tokens"),
])
def test_bad_layouts_name_the_field(make_store, kwargs, field):
    store = make_store()
    with pytest.raises(InvalidArgument) as err:
        store.reserve("w", "s", SECRET, layout(**kwargs), range(8))
    assert err.value.field == field


def test_reserve_checks_tokens_names_and_size(make_store):
    store = make_store(max_entry_bytes=ENTRY)
    with pytest.raises(InvalidArgument) as err:
        store.reserve("w", "s", SECRET, layout(num_tokens=4), range(3))
    assert err.value.field == "layout.num_tokens"
    for missing in ("owner", "session_id", "secret"):
        args = {"owner": "w", "session_id": "s", "secret": SECRET, missing: ""}
        with pytest.raises(InvalidArgument) as err:
            store.reserve(args["owner"], args["session_id"], args["secret"], layout(), range(4))
        assert err.value.field == missing
    with pytest.raises(InvalidArgument) as err:
        store.reserve("w", "s", SECRET, layout(num_tokens=8), range(8))
    assert err.value.field == "layout"
    empty_model = Layout("", "1", "float32", 1, 1, 1, 1)
    with pytest.raises(InvalidArgument):
        store.reserve("w", "s", SECRET, empty_model, [1])


def test_bfloat16_size(make_store):
    assert layout(dtype="bfloat16").num_bytes == ENTRY // 2


def test_secret_is_required_and_only_its_hash_kept(make_store, dirs):
    store = make_store()
    entry, _ = park(store)
    for wrong in ("", "nope", SECRET + "x"):
        for call in (store.open, store.delete):
            with pytest.raises(PermissionDenied):
                call(entry.entry_id, wrong)
    with pytest.raises(PermissionDenied):
        store.commit(entry.entry_id, "nope", 0)
    manifest = (dirs["state_dir"] / "manifest.json").read_text()
    assert SECRET not in manifest and entry.secret_hash in manifest


def test_checksum_mismatch_at_a_verified_commit_deletes_the_entry(make_store):
    store = make_store()
    entry, region = store.reserve("w", "s", SECRET, layout(), range(4))
    store.view(region)[:] = b"\1" * ENTRY
    with pytest.raises(FailedPrecondition) as err:
        store.commit(entry.entry_id, SECRET, checksum(b"\2" * ENTRY), verify=True)
    assert err.value.reason == "CHECKSUM_MISMATCH"
    assert store.get(entry.entry_id) is None and store.status().used_bytes == 0


def test_commit_records_the_writers_checksum_without_reading_the_bytes(make_store):
    store = make_store()
    entry, region = store.reserve("w", "s", SECRET, layout(), range(4))
    store.view(region)[:] = b"\1" * ENTRY
    store.commit(entry.entry_id, SECRET, 12345)
    opened, region = store.open(entry.entry_id, SECRET)
    assert opened.checksum == 12345, "the writer's checksum was not kept as given"
    assert checksum(store.view(region)) != opened.checksum, "a reader must see the mismatch"


def test_commit_twice_and_open_before_commit(make_store):
    store = make_store()
    entry, region = store.reserve("w", "s", SECRET, layout(), range(4))
    with pytest.raises(FailedPrecondition) as err:
        store.open(entry.entry_id, SECRET)
    assert err.value.reason == "NOT_COMMITTED"
    store.commit(entry.entry_id, SECRET, checksum(bytes(store.view(region))))
    with pytest.raises(FailedPrecondition) as err:
        store.commit(entry.entry_id, SECRET, 0)
    assert err.value.reason == "ALREADY_COMMITTED"


def test_corruption_in_shared_memory_is_visible_to_the_reader(make_store, dirs):
    store = make_store()
    entry, _ = park(store)
    region = entry.region
    # flip one byte through the segment file, as a stray writer would
    with open(dirs["shm_dir"] / region.segment, "r+b") as fh:
        fh.seek(region.offset + 100)
        byte = fh.read(1)
        fh.seek(region.offset + 100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    opened, region = store.open(entry.entry_id, SECRET)
    assert checksum(store.view(region)) != opened.checksum, (
        "the flipped byte does not show against the entry's checksum")


def test_full_spills_least_recently_used_and_open_brings_back(make_store, dirs):
    store = make_store(capacity_bytes=3 * ENTRY)
    a, data_a = park(store)
    b, data_b = park(store)
    c, data_c = park(store)
    read(store, a.entry_id)                 # a is now more recent than b
    d, data_d = park(store)                 # b (least recently used) is spilled
    assert store.get(b.entry_id).state == "spilled"
    assert (dirs["spill_dir"] / f"lmx-{b.entry_id}.kv").stat().st_size == ENTRY
    sidecar = json.loads((dirs["spill_dir"] / f"lmx-{b.entry_id}.json").read_text())
    assert sidecar["entry_id"] == b.entry_id
    # The session's tokens and chat are on disk: owner-only, like the manifest.
    for path in (dirs["spill_dir"] / f"lmx-{b.entry_id}.kv",
                 dirs["spill_dir"] / f"lmx-{b.entry_id}.json",
                 dirs["state_dir"] / "manifest.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path.name} is readable by others"
    status = store.status()
    assert (status.used_bytes, status.spilled_bytes, status.num_entries) == (3 * ENTRY, ENTRY, 4)
    assert read(store, b.entry_id) == data_b          # back, c spilled in its place
    assert store.get(c.entry_id).state == "spilled"
    assert not (dirs["spill_dir"] / f"lmx-{b.entry_id}.kv").exists()
    for entry, data in ((a, data_a), (c, data_c), (d, data_d), (b, data_b)):
        assert read(store, entry.entry_id) == data
    assert store.status().used_bytes <= 3 * ENTRY


def test_reserved_entries_are_never_spilled(make_store):
    store = make_store(capacity_bytes=2 * ENTRY)
    store.reserve("w", "s", SECRET, layout(), range(4))
    store.reserve("w", "s", SECRET, layout(), range(4))
    with pytest.raises(CapacityExhausted):
        store.reserve("w", "s", SECRET, layout(), range(4))


def test_refuse_when_full_says_how_much_is_missing(make_store):
    store = make_store(capacity_bytes=2 * ENTRY + 100, when_full="refuse")
    park(store)
    park(store)
    with pytest.raises(CapacityExhausted) as err:
        park(store)
    assert err.value.shortfall.requested_bytes == ENTRY
    assert err.value.shortfall.missing_bytes == ENTRY - 100
    assert all(e.state == "ready" for e in store.list())    # nothing dropped


def test_corrupted_spill_file_is_detected(make_store, dirs):
    store = make_store(capacity_bytes=ENTRY)
    a, _ = park(store)
    park(store)                                   # spills a
    path = dirs["spill_dir"] / f"lmx-{a.entry_id}.kv"
    raw = bytearray(path.read_bytes())
    raw[0] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(FailedPrecondition) as err:
        store.open(a.entry_id, SECRET)
    assert err.value.reason == "CORRUPTED"
    assert not path.exists()


def test_pinned_entries_are_not_spilled_or_deleted(make_store):
    store = make_store(capacity_bytes=ENTRY)
    a, _ = park(store)
    store.pin(a.entry_id)
    with pytest.raises(CapacityExhausted):
        park(store)
    with pytest.raises(FailedPrecondition) as err:
        store.delete(a.entry_id, SECRET)
    assert err.value.reason == "ENTRY_BUSY"
    store.unpin(a.entry_id)
    store.delete(a.entry_id, SECRET)


def test_large_entries_get_dedicated_segments_reused_by_the_next(make_store, dirs):
    store = make_store()
    big, data = park(store, num_tokens=40)       # 80 KiB > 64 KiB segments
    segment = big.region.segment
    assert store.arena.segment(segment).dedicated
    assert read(store, big.entry_id) == data
    store.delete(big.entry_id, SECRET)
    # Kept (within the capacity) for the next large entry: a worker that
    # mapped and pinned it uses it again as it is.
    assert shm_files(dirs) == [segment]
    again, data_again = park(store, num_tokens=40)
    assert again.region.segment == segment
    assert read(store, again.entry_id) == data_again
    store.close()
    assert shm_files(dirs) == []


def test_readoption_after_a_crash(make_store, dirs):
    first = make_store()
    a, data_a = park(first)
    b, data_b = park(first)
    first.reserve("w", "s", SECRET, layout(), range(4))     # never committed: not kept
    # the first store "crashes": its lock goes (the kernel would drop it), its segments stay
    first._lock.release()
    second = make_store()
    assert {e.entry_id for e in second.list()} == {a.entry_id, b.entry_id}
    assert read(second, a.entry_id) == data_a and read(second, b.entry_id) == data_b
    c, data_c = park(second)                      # the reserved space was reclaimed
    assert read(second, c.entry_id) == data_c
    first._closed = True                           # never closed: its segments are second's now
    first.arena._segments.clear()


def test_readoption_drops_corrupted_entries(make_store, dirs):
    first = make_store()
    a, _ = park(first)
    b, data_b = park(first)
    first.arena.view(a.region)[0] ^= 0xFF
    first._lock.release()
    first._closed = True
    first.arena._segments.clear()
    second = make_store()
    assert [e.entry_id for e in second.list()] == [b.entry_id]
    assert read(second, b.entry_id) == data_b


def test_second_live_store_with_the_same_id_is_refused(make_store):
    make_store()
    with pytest.raises(ConfigError) as err:
        make_store()
    assert err.value.setting == "store_id"


def test_stale_cleanup(make_store, dirs):
    shm = dirs["shm_dir"]
    shm.mkdir(parents=True)
    for name in ("lmx-s1-7", "lmx-dead-0", "lmx-kept-0", "lmx-live-0", "other-file"):
        (shm / name).write_bytes(b"x")
    (shm / "lmx-test-dir").mkdir()
    (dirs["state_dir"].parent / "kept").mkdir(parents=True)
    (dirs["state_dir"].parent / "kept" / "manifest.json").write_text("{}")
    live = make_store("live")
    (shm / "lmx-live-0").write_bytes(b"x")  # its own file (not in its manifest, but it runs)
    make_store("s1")
    left = sorted(p.name for p in shm.iterdir())
    # own unlisted segment and the dead store's segment are gone; a store with a
    # manifest, a running store, other files and directories are left alone
    assert "lmx-s1-7" not in left and "lmx-dead-0" not in left
    assert {"lmx-kept-0", "lmx-live-0", "other-file", "lmx-test-dir"} <= set(left)
    live.close()


def test_stale_cleanup_can_be_turned_off(make_store, dirs):
    dirs["shm_dir"].mkdir(parents=True)
    (dirs["shm_dir"] / "lmx-dead-0").write_bytes(b"x")
    make_store(clean_stale=False)
    assert (dirs["shm_dir"] / "lmx-dead-0").exists()


def test_clean_stop_leaves_no_segment_and_keeps_ready_entries(make_store, dirs):
    store = make_store(capacity_bytes=ENTRY)
    a, data_a = park(store)
    b, data_b = park(store)                        # a spilled
    store.reserve("w", "s", SECRET, layout(num_tokens=1), [1])   # reserved: not kept
    store.close()
    assert shm_files(dirs) == [] and shm_files(dirs, "lmx-s1.lock") == []
    again = make_store(capacity_bytes=ENTRY)
    assert [e.state for e in again.list()] == ["spilled", "spilled"]
    assert read(again, a.entry_id) == data_a
    assert read(again, b.entry_id) == data_b
    again.close()
    assert shm_files(dirs) == []


def test_clean_stop_without_keep_forgets_everything(make_store, dirs):
    store = make_store(keep_on_stop=False, capacity_bytes=ENTRY)
    park(store)
    park(store)
    store.close()
    assert shm_files(dirs) == []
    assert not (dirs["state_dir"] / "manifest.json").exists()
    assert list(dirs["spill_dir"].iterdir()) == []
    assert make_store(keep_on_stop=False).list() == []


def test_metadata_is_kept_through_spill_restart_and_readoption(make_store, dirs):
    store = make_store(capacity_bytes=ENTRY)
    lay = layout()
    meta = b'{"messages": [{"role": "user", "content": "hi"}]}'
    entry, region = store.reserve("w1", "sess", SECRET, lay, range(lay.num_tokens), meta)
    data = os.urandom(lay.num_bytes)
    store.view(region)[:] = data
    store.commit(entry.entry_id, SECRET, checksum(data))
    park(store)                                   # the first is spilled
    assert store.open(entry.entry_id, SECRET)[0].metadata == meta, "lost through a spill"
    store.close()
    again = make_store(capacity_bytes=ENTRY)
    assert again.open(entry.entry_id, SECRET)[0].metadata == meta, "lost through a restart"
    again.close()
    with pytest.raises(InvalidArgument, match="metadata"):
        make_store().reserve("w1", "s", SECRET, lay, range(lay.num_tokens), b"x" * (2 << 20))


def test_with_save_later_commits_and_deletes_go_on_the_journal_until_flush(make_store, dirs):
    """The app writes the manifest behind the commits and deletes (once per
    --manifest-delay-s): each goes on the journal at once, one line; flush
    writes the whole manifest and starts the journal afresh; a restart
    replays the journal on the manifest."""
    store = make_store()
    asked = []
    store.save_later = lambda: asked.append(1)
    path = dirs["state_dir"] / "manifest.json"
    journal = dirs["state_dir"] / "journal.jsonl"

    def listed() -> list[str]:
        return [e["entry_id"] for e in json.loads(path.read_text())["entries"]]

    before = listed()
    entry, _ = park(store)
    gone, _ = park(store)
    store.delete(gone.entry_id, SECRET)
    assert listed() == before and asked, "a commit rewrote the manifest (or asked nothing)"
    ops = [json.loads(line)["op"] for line in journal.read_text().splitlines()]
    assert ops == ["commit", "commit", "delete"], ops
    assert oct(journal.stat().st_mode & 0o777) == "0o600", "the journal holds tokens: owner-only"
    # A crash now (no flush): the next store replays the journal.
    replayed = {e["entry_id"] for e in json.loads(path.read_text())["entries"]}
    for record in map(json.loads, journal.read_text().splitlines()):
        if record["op"] == "commit":
            replayed.add(record["entry"]["entry_id"])
        else:
            replayed.discard(record["entry_id"])
    assert replayed == {*before, entry.entry_id}
    store.flush()
    assert listed() == before + [entry.entry_id] and not journal.exists()
    written = path.stat().st_mtime_ns
    store.flush()   # nothing changed since: not written again
    assert path.stat().st_mtime_ns == written
