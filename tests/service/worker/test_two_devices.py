"""Two simulated devices (cpu:0 of 1 GiB, cpu:1 of 3 GiB), real processes:
workers that may choose are placed by best fit (smollm2-135m on the small
card, gemma3-270m where it fits), one told --admission-device is placed there,
each card keeps its own book, and a chat session parked by the worker on one
card is restored by a worker of the same model on the other, continuing token
for token like a control."""

from __future__ import annotations

import grpc
import pytest

from lmx.v1 import admission_pb2 as apb
from lmx.v1 import admission_pb2_grpc
from lmx.v1 import worker_pb2 as wpb

from ..kvstore.support import kvstore_servers
from ..support import admission_servers
from .worker_support import (
    GEMMA3,
    RPC_TIMEOUT_S,
    SHARED_MAX_CONTEXT,
    SMOLLM2,
    Opened,
    WorkerClient,
    WorkerFleet,
)

pytestmark = pytest.mark.timeout(300, func_only=True)

TURN_1 = ("user", "Name three colors of the rainbow.")
TURN_2 = ("user", "Now name two animals that live in the sea.")


def leases_by_holder(address: str) -> dict[int, set[str]]:
    with grpc.insecure_channel(address) as channel:
        status = admission_pb2_grpc.AdmissionServiceStub(channel).Status(
            apb.StatusRequest(), timeout=RPC_TIMEOUT_S)
    out: dict[int, set[str]] = {}
    for lease in status.leases:
        out.setdefault(lease.holder.pid, set()).add(lease.device)
    return out


def turn(client: WorkerClient, session: Opened, message) -> list[int]:
    return client.generate(session, message=message, max_tokens=10).token_ids


def test_placement_per_card_and_a_session_moving_between_cards(tmp_path):
    with admission_servers(tmp_path) as start_admission, kvstore_servers(tmp_path) as start_kv:
        admission = start_admission("--device", "cpu:0=1GiB", "--device", "cpu:1=3GiB")
        kvstore = start_kv()
        fleet = WorkerFleet(tmp_path)
        common = ("--kvstore", kvstore.address, "--max-context", str(SHARED_MAX_CONTEXT))
        try:
            small = fleet.ready("small", SMOLLM2, admission.address, *common)
            large = fleet.ready("large", GEMMA3, admission.address, *common)
            told = fleet.ready("told", SMOLLM2, admission.address, *common,
                               "--admission-device", "cpu:1")
            devices = leases_by_holder(admission.address)
            assert devices[small.proc.pid] == {"cpu:0"}, "smollm2 fits the small card best"
            assert devices[large.proc.pid] == {"cpu:1"}, "gemma3 fits only the large card"
            assert devices[told.proc.pid] == {"cpu:1"}, "a worker told its card goes there"
            assert '"worker_placed"' in small.log() and '"worker_placed"' not in told.log()

            with WorkerClient(small.address) as one, WorkerClient(told.address) as other:
                session, control = one.open(), other.open()
                first = turn(one, session, TURN_1)
                assert turn(other, control, TURN_1) == first
                parked = one.stub.ParkSession(wpb.ParkSessionRequest(
                    session_id=session.session_id, token=session.token), timeout=RPC_TIMEOUT_S)
                restored = other.stub.RestoreSession(wpb.RestoreSessionRequest(
                    entry_id=parked.entry_id, token=session.token), timeout=RPC_TIMEOUT_S)
                moved = Opened(restored.session_id, session.token, restored)
                assert restored.restored_tokens == parked.parked_tokens
                assert turn(other, moved, TURN_2) == turn(other, control, TURN_2), (
                    "the session moved to the other card continued differently")
                other.close_session(moved)
                other.close_session(control)
        finally:
            problems = fleet.stop_all()
        assert not problems, "\n".join(problems)


def test_memory_pressure_is_per_card_and_lmx_ps_shows_each(tmp_path):
    """A waiter on one card asks only that card's holders: the model on the
    other card is never asked and keeps serving; `lmx ps` lists both cards
    and which worker is on which (asleep on one, ready on the other)."""
    from services.stack.ps import render_ps

    with admission_servers(tmp_path) as start_admission, kvstore_servers(tmp_path) as start_kv:
        admission = start_admission("--device", "cpu:0=1GiB", "--device", "cpu:1=1GiB",
                                    "--reclaim-deadline-s", "2")
        kvstore = start_kv()
        fleet = WorkerFleet(tmp_path)
        common = ("--kvstore", kvstore.address, "--max-context", str(SHARED_MAX_CONTEXT))
        try:
            first = fleet.ready("first", SMOLLM2, admission.address, *common,
                                "--admission-device", "cpu:0")
            second = fleet.ready("second", SMOLLM2, admission.address, *common,
                                 "--admission-device", "cpu:1")
            with grpc.insecure_channel(admission.address) as channel:
                stub = admission_pb2_grpc.AdmissionServiceStub(channel)
                status = stub.Status(apb.StatusRequest(), timeout=RPC_TIMEOUT_S)
                free = {d.device: d.free_bytes for d in status.devices}
                lease = stub.Acquire(apb.AcquireRequest(
                    holder=apb.Holder(name="test/waiter", pid=1), device="cpu:0",
                    bytes=free["cpu:0"] + (64 << 20), purpose=apb.PURPOSE_OTHER,
                    wait_ms=30_000, ttl_ms=60_000), timeout=40).lease
                assert lease.device == "cpu:0"
                status = stub.Status(apb.StatusRequest(), timeout=RPC_TIMEOUT_S)
                asked = {r.lease.holder.pid for r in status.reclaims}
                assert first.proc.pid in asked and second.proc.pid not in asked, (
                    f"only cpu:0's holders may be asked: {asked}")
                table = render_ps(status)
            with WorkerClient(first.address) as one, WorkerClient(second.address) as other:
                assert one.status().state == "asleep"
                assert other.status().state == "ready"
                session = other.open()
                assert turn(other, session, TURN_1), "the other card's model keeps serving"
            assert "cpu:0" in table and "cpu:1" in table, table
            assert any("asleep" in line and "cpu:0" in line for line in table.splitlines()), table
            assert any("ready" in line and "cpu:1" in line for line in table.splitlines()), table
        finally:
            problems = fleet.stop_all()
        assert not problems, "\n".join(problems)
