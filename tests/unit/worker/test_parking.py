"""Parking: the byte layout (KVStorage -> bytes, K then V, each
[layers][tokens][kv_heads][head_dim], contiguous -> another KVStorage at
other slots, exactly; float32 and bfloat16), and park / restore / a
transparent restore over a real engine (llama-tiny) with an in-memory
kvstore: exact continuation and the refusals."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets

import pytest
import torch

from services.common.errors import FailedPrecondition, NotFound, PermissionDenied
from services.kvstore.entry import ITEMSIZE
from services.worker.core import WorkerCore
from services.worker.engine import Engine, Finished
from services.worker.kv_link import FetchedEntry
from services.worker.kv_storage import KVShape, KVStorage, SlotGroups
from services.worker.memory import FixedMemory
from services.worker.parking import DTYPE_NAMES, Parking, bytes_to_kv, kv_to_bytes
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_round_trip_across_chunks_and_slots(dtype):
    source = make_storage(dtype, 3)
    slots = [17, 3, 4, 9, 10, 11, 12, 0, 23, 5, 6]   # scattered over three chunks
    keys, values = fill(source, slots, seed=1)
    data = kv_to_bytes(source, slots)
    itemsize = ITEMSIZE[DTYPE_NAMES[dtype]]
    assert len(data) == 2 * LAYERS * len(slots) * KV_HEADS * DIM * itemsize, (
        f"{len(data)} bytes: not 2 x layers x tokens x kv_heads x head_dim x itemsize")
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)
    half = flat.numel() // 2
    assert torch.equal(flat[:half].reshape(keys.shape), keys), "the first half is not K in order"
    assert torch.equal(flat[half:].reshape(values.shape), values), "the second half is not V"

    target = make_storage(dtype, 2)
    other_slots = [8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2]
    bytes_to_kv(target, other_slots, data)
    got_keys, got_values = target.read_tokens(torch.tensor(other_slots))
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values), (
        "K/V restored at other slots differ from the parked ones")
    assert kv_to_bytes(target, other_slots) == data, "parking the restored KV gives other bytes"


def test_bytes_of_the_wrong_size_are_refused():
    storage = make_storage(torch.float32, 1)
    with pytest.raises(ValueError, match="bytes given"):
        bytes_to_kv(storage, [0, 1], b"\0" * 10)


# ---- Parking over a real engine (llama-tiny) and an in-memory kvstore ---------------

class FakeLink:
    """The kvstore's contract in memory: entries by id, guarded by the secret."""

    def __init__(self):
        self.entries: dict[str, tuple[str, FetchedEntry]] = {}

    async def park(self, layout, session_id, secret, token_ids, metadata, data) -> str:
        assert len(data) == layout.num_bytes, "park bytes do not match the layout"
        entry_id = f"kv-{secrets.token_hex(8)}"
        self.entries[entry_id] = (secret, FetchedEntry(entry_id, layout, list(token_ids),
                                                       metadata, bytes(data)))
        return entry_id

    async def fetch(self, entry_id, secret) -> FetchedEntry:
        if entry_id not in self.entries:
            raise NotFound("entry", entry_id)
        if self.entries[entry_id][0] != secret:
            raise PermissionDenied("token", "wrong")
        return self.entries[entry_id][1]

    async def delete(self, entry_id, secret) -> None:
        self.entries.pop(entry_id, None)


def run_core(loaded, scenario, link=None):
    async def main():
        engine = Engine(loaded, FixedMemory(1 << 30), chunk_bytes=1 << 16)
        engine.start()
        sessions = SessionTable()
        core = WorkerCore(loaded, engine, sessions, Parking(loaded, engine, sessions, link))
        try:
            return await asyncio.wait_for(scenario(core, link), 60)
        finally:
            await engine.close()

    return asyncio.run(main())


async def ids_of(core, session, prompt, max_tokens=8) -> list[int]:
    ids = []
    async for event in core.generate(session.session_id, session.token,
                                     SamplingParams(max_tokens=max_tokens), prompt=prompt):
        if not isinstance(event, Finished):
            ids.extend(event.token_ids)
    return ids


def test_park_restore_and_unpark_continue_exactly(tiny):
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

    run_core(tiny, scenario, FakeLink())


def test_parking_refusals(tiny):
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

    run_core(tiny, scenario, FakeLink())


def test_parking_disabled(tiny):
    async def scenario(core, link):
        session = core.open_session().session
        await ids_of(core, session, "x y")
        with pytest.raises(FailedPrecondition) as caught:
            await core.park_session(session.session_id, session.token)
        assert caught.value.reason == "PARKING_DISABLED"

    run_core(tiny, scenario, None)
