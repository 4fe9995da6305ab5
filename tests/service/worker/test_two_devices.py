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
