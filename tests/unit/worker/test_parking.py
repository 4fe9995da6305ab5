"""Parking: the copies (KVStorage -> a shared-memory region, K then V, each
[layers][tokens][kv_heads][head_dim], contiguous -> another KVStorage at
other slots, exactly; float32 and bfloat16; the sum64 checksum over what was
copied, a changed region refused), the segments mapped once, and park /
restore / a transparent restore over a real engine (llama-tiny) with the
kvstore's control plane in memory: exact continuation and the refusals."""

from __future__ import annotations

import asyncio
import os
import dataclasses
import secrets
from types import SimpleNamespace

import pytest
import torch
from structlog.testing import capture_logs

from services.common.errors import FailedPrecondition, NotFound, PermissionDenied
from services.kvstore.entry import ITEMSIZE
from services.worker.core import WorkerCore
from services.worker.engine import Engine, Finished
from services.kvstore.arena import Arena, Region
from services.kvstore.checksum import MASK, checksum
from services.worker.kv_link import Held, OpenedEntry, Reservation, ShmRegion
from services.worker.kv_storage import KVShape, KVStorage, SlotGroups
from services.worker.kv_transfer import ChecksumMismatch, KVTransfer, RegionError, sum64, sum64_torch
from services.worker.memory import FixedMemory
from services.worker.parking import DTYPE_NAMES, Parking
from services.worker.sampling import SamplingParams
from services.worker.sessions import SessionTable

CPU = torch.device("cpu")
LAYERS, KV_HEADS, DIM = 3, 2, 8
SLOTS_PER_CHUNK = 8


def make_storage(dtype: torch.dtype, num_chunks: int) -> KVStorage:
    storage = KVStorage(KVShape(LAYERS, KV_HEADS, DIM, dtype), SLOTS_PER_CHUNK, CPU)
    for _ in range(num_chunks):
        storage.add_chunk()
    return storage


def fill(storage: KVStorage, slots: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random K, V [layers, n, kvh, hd] written at `slots`."""
    generator = torch.Generator().manual_seed(seed)
    dims = (LAYERS, len(slots), KV_HEADS, DIM)
    keys = torch.randn(dims, generator=generator).to(storage.shape.dtype)
    values = torch.randn(dims, generator=generator).to(storage.shape.dtype)
    groups = SlotGroups.build(slots, SLOTS_PER_CHUNK)
    for layer in range(LAYERS):
        storage.write(layer, groups, keys[layer], values[layer])
    return keys, values


@pytest.fixture
def arena(tmp_path):
    """Real shared-memory segments (the kvstore's arena) in a test directory."""
    arena = Arena(tmp_path, f"t{secrets.token_hex(4)}", 64 << 10)
    yield arena
    arena.close()


def region_of(arena: Arena, num_bytes: int) -> SimpleNamespace:
    region = arena.allocate(num_bytes)
    return SimpleNamespace(segment=str(arena.path_of(region.segment)), offset=region.offset,
                           length=region.length, name=region.segment)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transfer_round_trip_across_chunks_and_slots(dtype, arena):
    source = make_storage(dtype, 3)
    slots = [17, 3, 4, 9, 10, 11, 12, 0, 23, 5, 6]   # scattered over three chunks
    keys, values = fill(source, slots, seed=1)
    transfer = KVTransfer(source)
    itemsize = ITEMSIZE[DTYPE_NAMES[dtype]]
    num_bytes = 2 * LAYERS * len(slots) * KV_HEADS * DIM * itemsize
    assert transfer.num_bytes(len(slots)) == num_bytes
    region = region_of(arena, num_bytes)
    crc = transfer.park(slots, region)
    data = bytes(arena.view(Region(region.name, region.offset, region.length)))
    assert crc == checksum(data), "park's checksum is not the sum64 of the bytes it wrote"
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)
    half = flat.numel() // 2
    assert torch.equal(flat[:half].reshape(keys.shape), keys), "the first half is not K in order"
    assert torch.equal(flat[half:].reshape(values.shape), values), "the second half is not V"

    target = make_storage(dtype, 2)
    other_slots = [8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2]
    KVTransfer(target).restore(other_slots, region, crc)
    got_keys, got_values = target.read_tokens(torch.tensor(other_slots))
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values), (
        "K/V restored at other slots differ from the parked ones")
    again = region_of(arena, num_bytes)
    assert KVTransfer(target).park(other_slots, again) == crc, "re-parking gives other bytes"
    transfer.close()


def test_restore_refuses_a_changed_region_and_bad_regions(arena):
    source = make_storage(torch.float32, 1)
    slots = [0, 1, 2]
    fill(source, slots, seed=2)
    transfer = KVTransfer(source)
    region = region_of(arena, transfer.num_bytes(3))
    crc = transfer.park(slots, region)
    view = arena.view(Region(region.name, region.offset, region.length))
    view[100] ^= 0x01   # one bit flipped after commit
    view.release()
    with pytest.raises(ChecksumMismatch):
        transfer.restore([4, 5, 6], region, crc)
    with pytest.raises(RegionError, match="bytes for 2 tokens"):
        transfer.restore([4, 5], region, crc)
    outside = SimpleNamespace(segment=region.segment, offset=1 << 20, length=region.length)
    with pytest.raises(RegionError, match="outside"):
        transfer.park(slots, outside)
    foreign = SimpleNamespace(segment="/etc/passwd", offset=0, length=region.length)
    with pytest.raises(RegionError, match="not an lmx- segment"):
        transfer.park(slots, foreign)
    gone = SimpleNamespace(segment=region.segment + "9", offset=0, length=region.length)
    with pytest.raises(RegionError, match="cannot open"):
        transfer.park(slots, gone)


def test_segments_are_mapped_once_and_dropped_when_gone(arena):
    storage = make_storage(torch.float32, 1)
    fill(storage, [0, 1], seed=3)
    transfer = KVTransfer(storage)
    regions = [region_of(arena, transfer.num_bytes(2)) for _ in range(3)]
    assert len({r.segment for r in regions}) == 1, "the arena should share one segment"
    for region in regions:
        transfer.park([0, 1], region)
    assert transfer.segments.num_mapped == 1, "a segment was mapped once per region"
    big = region_of(arena, 128 << 10)   # over the segment size: a dedicated segment
    assert big.segment != regions[0].segment
    transfer.park([0, 1], SimpleNamespace(segment=big.segment, offset=0,
                                          length=transfer.num_bytes(2)))
    assert transfer.segments.num_mapped == 2
    for region in regions:
        arena.free(Region(region.name, region.offset, region.length))
    arena.free(Region(big.name, big.offset, big.length))   # the dedicated one is unlinked
    transfer.park([0, 1], region_of(arena, transfer.num_bytes(2)))
    assert transfer.segments.num_mapped == 1, "the unlinked segment's mapping was kept"
    transfer.close()
    assert transfer.segments.num_mapped == 0


def test_a_park_into_a_held_region_writes_only_into_the_file_it_was_held_in(arena, tmp_path):
    """A region held ahead keeps its segment file's inode (KVTransfer.prepare):
    a kvstore restarted since may have made a new file of the same name,
    whose bytes there may be another entry's; the park refuses it."""
    storage = make_storage(torch.float32, 1)
    fill(storage, [0, 1], seed=4)
    transfer = KVTransfer(storage)
    region = region_of(arena, transfer.num_bytes(2))
    inode = transfer.prepare(region)
    transfer.park([0, 1], region, inode)                  # the same file: written
    path = arena.path_of(region.name)
    replaced = tmp_path / "replacement"
    replaced.write_bytes(path.read_bytes())
    os.replace(replaced, path)                            # a new file under the old name
    before = path.read_bytes()
    with pytest.raises(RegionError, match="another file"):
        transfer.park([0, 1], region, inode)
    assert path.read_bytes() == before, "the park wrote into the new file"
    transfer.close()


@pytest.mark.parametrize("num_bytes", [8, 64, 8 * 65536, 8 * (65536 * 2 + 3)])
def test_sum64_on_torch_matches_the_host_checksum(num_bytes):
    data = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8)
    for offset in (0, 5, 1 << 30):
        expected = checksum(data.numpy(), offset)
        assert int(sum64_torch(data, offset)) & MASK == expected, (num_bytes, offset)
        assert int(sum64(data, offset)) & MASK == expected, (num_bytes, offset)


# ---- Parking over a real engine (llama-tiny) and a kvstore in memory ---------------

class FakeLink:
    """The kvstore's control plane in memory (entries by id, guarded by the
    secret) over a real shared-memory arena for the bytes."""

    def __init__(self, arena: Arena):
        self.arena = arena
        self.entries: dict[str, tuple[str, OpenedEntry]] = {}

    async def reserve(self, layout, session_id, secret, token_ids, metadata) -> Reservation:
        entry_id = f"kv-{secrets.token_hex(8)}"
        region = region_of(self.arena, layout.num_bytes)
        self.entries[entry_id] = (secret, OpenedEntry(entry_id, layout, list(token_ids),
                                                      metadata, region, -1))
        return Reservation(entry_id, region)

    async def commit(self, entry_id, secret, crc) -> None:
        entry = self.entries[entry_id][1]
        self.entries[entry_id] = (secret, dataclasses.replace(entry, checksum=crc))

    async def open(self, entry_id, secret, contents: bool = True) -> OpenedEntry:
        if entry_id not in self.entries:
            raise NotFound("entry", entry_id)
        if self.entries[entry_id][0] != secret:
            raise PermissionDenied("token", "wrong")
        entry = self.entries[entry_id][1]
        # As the kvstore answers Open(omit_contents): no token ids, no metadata.
        return entry if contents else dataclasses.replace(entry, token_ids=[], metadata=b"")

    def move(self, entry_id) -> None:
        """The entry's bytes to another region (as a spill and a reload
        may put them), the old region freed."""
        secret, entry = self.entries[entry_id]
        old = entry.region
        new = region_of(self.arena, old.length)
        view = lambda r: self.arena.view(Region(r.name, r.offset, r.length))  # noqa: E731
        view(new)[:] = view(old)
        view(old)[:] = bytes(old.length)
        self.arena.free(Region(old.name, old.offset, old.length))
        self.entries[entry_id] = (secret, dataclasses.replace(entry, region=new))

    async def delete(self, entry_id, secret) -> None:
        entry = self.entries.pop(entry_id, None)
        if entry is not None:
            region = entry[1].region
            self.arena.free(Region(region.name, region.offset, region.length))


class HoldingLink(FakeLink):
    """FakeLink with holds (Hold, Place, ReleaseHold) and a count of calls;
    `unreachable`: holds in a segment this process cannot open (a kvstore
    on another host)."""

    def __init__(self, arena: Arena, unreachable: bool = False):
        super().__init__(arena)
        self.unreachable = unreachable
        self.calls: list[str] = []
        self.holds: dict[str, Held] = {}
        self.names: dict[str, str] = {}       # segment path -> the arena's name

    def _new_hold(self, num_bytes, secret) -> Held:
        region = region_of(self.arena, num_bytes)
        self.names[region.segment] = region.name
        segment = "/nonexistent/lmx-elsewhere-0" if self.unreachable else region.segment
        held = Held(f"hold-{secrets.token_hex(8)}", secret,
                    ShmRegion(segment, region.offset, num_bytes), 60.0)
        self.holds[held.hold_id] = held
        return held

    async def hold(self, num_bytes, secret, renew=""):
        self.calls.append("hold")
        if renew:
            if renew not in self.holds:
                raise NotFound("hold", renew)
            return self.holds[renew]
        return self._new_hold(num_bytes, secret)

    async def place(self, held, layout, session_id, secret, token_ids, metadata, checksum,
                    hold_again=True):
        self.calls.append("place")
        if self.holds.pop(held.hold_id, None) is None:
            raise NotFound("hold", held.hold_id)
        entry_id = f"kv-{secrets.token_hex(8)}"
        region = SimpleNamespace(segment=held.region.segment, offset=held.region.offset,
                                 length=layout.num_bytes,
                                 name=self.names[held.region.segment])
        self.entries[entry_id] = (secret, OpenedEntry(entry_id, layout, list(token_ids),
                                                      metadata, region, checksum))
        return entry_id, self._new_hold(held.region.length, held.secret) if hold_again else None

    async def release_hold(self, held) -> None:
        self.calls.append("release_hold")
        self.holds.pop(held.hold_id, None)

    async def reserve(self, *args):
        self.calls.append("reserve")
        return await super().reserve(*args)


def run_core(loaded, scenario, link=None, park_ahead_bytes: int = 0):
    async def main():
        engine = Engine(loaded, FixedMemory(1 << 30), chunk_bytes=1 << 16)
        engine.start()
        sessions = SessionTable()
        parking = Parking(loaded, engine, sessions, link, park_ahead_bytes=park_ahead_bytes)
        core = WorkerCore(loaded, engine, sessions, parking)
        try:
            return await asyncio.wait_for(scenario(core, link), 60)
        finally:
            await parking.release()
            await engine.close()

    return asyncio.run(main())


async def ids_of(core, session, prompt, max_tokens=8) -> list[int]:
    ids = []
    async for event in core.generate(session.session_id, session.token,
                                     SamplingParams(max_tokens=max_tokens), prompt=prompt):
        if not isinstance(event, Finished):
            ids.extend(event.token_ids)
    return ids


def test_park_restore_and_unpark_continue_exactly(tiny, arena):
    async def scenario(core, link):
        control, a, b = (core.open_session().session for _ in range(3))
        first = [await ids_of(core, s, "one two three") for s in (control, a, b)]
        assert first[0] == first[1] == first[2], "three fresh sessions answered differently"
        used = core.engine.pool.usage().num_used_blocks
        parked_a = await core.park_session(a.session_id, a.token)
        assert core.engine.pool.usage().num_used_blocks == used - parked_a.freed_blocks
        assert core.engine.pool.length(a.session_id) == 0 and a.parked_entry
        assert parked_a.num_tokens <= len(a.tokens), "parked more KV than the session has tokens"
        restored = await core.restore_session(parked_a.entry_id, a.token)
        assert restored.session.token == a.token and restored.session.tokens == a.tokens
        with pytest.raises(NotFound):
            core.sessions.get(a.session_id, a.token)   # the parked session moved
        parked_b = await core.park_session(b.session_id, b.token)
        expected = await ids_of(core, control, " four five")
        assert await ids_of(core, restored.session, " four five") == expected, "restore differs"
        assert await ids_of(core, b, " four five") == expected, "transparent restore differs"
        assert link.entries == {}, f"entries not deleted after restore: {list(link.entries)}"
        return parked_b

    run_core(tiny, scenario, FakeLink(arena))


def test_unpark_copies_from_where_it_parked_or_again_from_where_the_entry_is(tiny, arena):
    """A worker's own parked session: its KV is copied from where the park
    wrote it while Open confirms the entry is still there; an entry since
    moved is copied again from its new place, and one whose bytes changed
    in place is corrupted (its context recomputed): the same tokens every
    way."""
    async def scenario(core, link):
        control, kept, moved, spoiled = (core.open_session().session for _ in range(4))
        for session in (control, kept, moved, spoiled):
            await ids_of(core, session, "one two three")
        expected = await ids_of(core, control, " four five")
        for session in (kept, moved, spoiled):
            await core.park_session(session.session_id, session.token)
            assert session.parked_at is not None
        link.move(moved.parked_entry)
        region = link.entries[spoiled.parked_entry][1].region
        view = arena.view(Region(region.name, region.offset, region.length))
        view[:8] = bytes(b ^ 0xFF for b in view[:8])
        with capture_logs() as logs:
            for session in (kept, moved, spoiled):
                assert await ids_of(core, session, " four five") == expected, session
                assert session.parked_at is None and not session.parked_entry
        events = [(e["event"], e.get("session_id")) for e in logs]
        assert ("restore_copied_again", kept.session_id) not in events
        assert ("restore_copied_again", moved.session_id) in events
        assert ("restore_recomputes", spoiled.session_id) in events
        assert link.entries == {}

    run_core(tiny, scenario, FakeLink(arena))


def test_an_unpark_whose_entry_is_gone_frees_what_it_copied(tiny, arena):
    async def scenario(core, link):
        session = core.open_session().session
        await ids_of(core, session, "one two three")
        await core.park_session(session.session_id, session.token)
        used = core.engine.pool.usage().num_used_blocks
        del link.entries[session.parked_entry]      # restored elsewhere meanwhile
        with pytest.raises(NotFound):
            await ids_of(core, session, " four")
        assert core.engine.pool.usage().num_used_blocks == used
        assert core.engine.pool.length(session.session_id) == 0

    run_core(tiny, scenario, FakeLink(arena))


def test_parking_refusals(tiny, arena):
    async def scenario(core, link):
        fresh = core.open_session().session
        with pytest.raises(FailedPrecondition) as caught:
            await core.park_session(fresh.session_id, fresh.token)
        assert caught.value.reason == "NOTHING_TO_PARK"
        busy = core.open_session().session
        stream = core.generate(busy.session_id, busy.token, SamplingParams(max_tokens=50),
                               prompt="a b c")
        await anext(stream)
        with pytest.raises(FailedPrecondition) as caught:
            await core.park_session(busy.session_id, busy.token)
        assert caught.value.reason == "SESSION_BUSY", caught.value.reason
        await stream.aclose()
        parked = await core.park_session(busy.session_id, busy.token)
        # an entry of another model version: refused, and no session is made
        secret, entry = link.entries[parked.entry_id]
        link.entries[parked.entry_id] = (secret, dataclasses.replace(
            entry, layout=dataclasses.replace(entry.layout, model_version="other")))
        num_sessions = len(core.sessions)
        with pytest.raises(FailedPrecondition) as caught:
            await core.restore_session(parked.entry_id, busy.token)
        assert caught.value.reason == "LAYOUT_MISMATCH" and len(core.sessions) == num_sessions
        with pytest.raises(PermissionDenied):
            await core.restore_session(parked.entry_id, "wrong")

    run_core(tiny, scenario, FakeLink(arena))


def test_parking_disabled(tiny):
    async def scenario(core, link):
        session = core.open_session().session
        await ids_of(core, session, "x y")
        with pytest.raises(FailedPrecondition) as caught:
            await core.park_session(session.session_id, session.token)
        assert caught.value.reason == "PARKING_DISABLED"

    run_core(tiny, scenario, None)


def test_a_park_goes_through_the_region_held_ahead_and_restores_exactly(tiny, arena):
    """With a region held ahead, parks are one Place each (no Reserve, no
    Commit), each reply holding the next region; a park larger than the hold
    reserves; the sessions come back exactly."""
    async def scenario(core, link):
        core.parking.hold_ahead()
        while core.parking._held is None:
            await asyncio.sleep(0.01)
        control, a, b, big = (core.open_session().session for _ in range(4))
        for session in (control, a, b):
            await ids_of(core, session, "one two three")
        await ids_of(core, big, "one two three " * 30)
        expected = await ids_of(core, control, " four five")
        link.calls.clear()
        for session in (a, b):
            await core.park_session(session.session_id, session.token)
        assert link.calls == ["place", "place"], link.calls
        await core.park_session(big.session_id, big.token)       # over the hold's bytes
        assert link.calls[2:] == ["reserve"], link.calls
        for session in (a, b):
            assert await ids_of(core, session, " four five") == expected
        assert len(link.holds) == 1, "one hold should be kept, the next park's"

    run_core(tiny, scenario, HoldingLink(arena), park_ahead_bytes=16 << 10)


def test_a_hold_this_process_cannot_reach_is_given_back_and_parks_reserve(tiny, arena):
    async def scenario(core, link):
        session = core.open_session().session
        await ids_of(core, session, "one two three")
        core.parking.hold_ahead()
        await asyncio.sleep(0.3)
        assert link.calls == ["hold", "release_hold"], (
            f"an unreachable hold should be given back, then tried again later: {link.calls}")
        assert core.parking._held is None and not link.holds
        await core.park_session(session.session_id, session.token)
        assert "reserve" in link.calls

    run_core(tiny, scenario, HoldingLink(arena, unreachable=True), park_ahead_bytes=16 << 10)
