"""Leases never starve: a worker's leases are renewed from a thread of their
own (services/admission/renewer.py), so an event loop that is busy longer
than the TTL (a long step's bookkeeping, a capture, thousands of streamed
tokens) does not let them expire; and a lease admission says is gone is
reported on the holder's event loop, once.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from lmx.v1 import admission_pb2 as pb
from services.admission.client import AdmissionClient
from services.worker.memory import AdmissionMemory

from .support import stub

TTL_S = 0.6


@pytest.mark.parametrize("admission", [["--min-ttl-s", "0.05", "--sweep-interval-s", "0.02"]],
                         indirect=True)
def test_leases_outlive_an_event_loop_blocked_for_several_ttls(admission):
    async def scenario():
        client = AdmissionClient(admission.address, timeout_s=5)
        lost: list[str] = []
        memory = AdmissionMemory(client, "worker/test", "cpu:0", ttl_s=TTL_S,
                                 on_lost=lost.append)
        try:
            await memory.acquire_base(64 << 20)
            await memory.set_kv_bytes(32 << 20, 1.0)
            time.sleep(5 * TTL_S)            # the loop does nothing else meanwhile
            held = memory.granted()
            with grpc.insecure_channel(admission.address) as channel:
                leases = stub(channel).Status(pb.StatusRequest(), timeout=5).leases
            return lost, held, sorted(lease.bytes for lease in leases), memory.fresh()
        finally:
            await memory.close()
            await client.close()

    lost, held, leased, fresh = asyncio.run(scenario())
    assert not lost, f"leases expired while the event loop was blocked: {lost}"
    assert held == {"weights": 64 << 20, "kv": 32 << 20}
    assert leased == [32 << 20, 64 << 20], leased
    assert fresh


@pytest.mark.parametrize("admission", [["--min-ttl-s", "0.05", "--sweep-interval-s", "0.02"]],
                         indirect=True)
def test_a_lease_admission_forgot_is_reported_lost_on_the_holders_loop(admission):
    async def scenario():
        client = AdmissionClient(admission.address, timeout_s=5)
        loop = asyncio.get_running_loop()
        lost: list[tuple[str, bool]] = []
        memory = AdmissionMemory(
            client, "worker/test", "cpu:0", ttl_s=TTL_S,
            on_lost=lambda purpose: lost.append((purpose, asyncio.get_running_loop() is loop)))
        try:
            await memory.acquire_base(64 << 20)
            lease = memory._leases["weights"]
            # Someone else's view: the lease released behind the holder's back.
            await client.release(lease)
            deadline = time.monotonic() + 5
            while not lost and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return lost, memory.granted(), memory.fresh()
        finally:
            await memory.close()
            await client.close()

    lost, held, fresh = asyncio.run(scenario())
    assert lost == [("weights", True)], lost
    assert held == {}
    assert not fresh
