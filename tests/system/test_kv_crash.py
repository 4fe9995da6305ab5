"""Crashes around parked sessions, with real processes on loopback: admission,
a kvstore (a unique --store-id, a fresh shm dir under /dev/shm) and
smollm2-135m workers.

- A worker killed with SIGKILL after parking two sessions: a second worker of
  the model restores both and continues token for token like a control
  session that was never parked (greedy); admission reclaims the dead worker's
  leases once their TTL runs out.
- The kvstore killed with SIGKILL and started again (same store id, shm dir,
  state dir and port): it re-adopts the parked entry, and the worker, still
  running, reconnects and restores it exactly. A clean SIGTERM stop (keep on
  stop, the default) leaves no segment, and after a restart the entry is
  restored from the spill dir, exactly too.
- No `lmx-<store id>-*` file is left afterwards, however a test ends.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
import time
from pathlib import Path

import grpc
import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from lmx.v1 import admission_pb2 as apb  # noqa: E402
from lmx.v1 import admission_pb2_grpc  # noqa: E402
from lmx.v1 import worker_pb2 as wpb  # noqa: E402
from service.kvstore.support import KVStoreProcess, kvstore_servers  # noqa: E402
from service.support import admission_servers, wait_until  # noqa: E402
from service.worker.worker_support import (  # noqa: E402
    RPC_TIMEOUT_S,
    SHARED_MAX_CONTEXT,
    SMOLLM2,
    Opened,
    WorkerClient,
    WorkerProcess,
    rpc_error,
)
from services.common.launch import free_port  # noqa: E402

pytestmark = pytest.mark.timeout(300, func_only=True)

MAX_TOKENS = 12
#: Two conversations: (first turn, second turn).
CHATS = [
    (("user", "Name three colors of the rainbow."),
     ("user", "Now name two animals that live in the sea.")),
    (("user", "What is the capital of France?"),
     ("user", "And what river runs through it?")),
]
LEASE_TTL_S = 1.5
#: How long the kvstore stays down (the worker's calls failing meanwhile), and how
#: soon after its restart the worker must reach it again.
DOWN_S = 6.0
RECONNECT_S = 5.0


@pytest.fixture(scope="module")
def admission(tmp_path_factory):
    with admission_servers(tmp_path_factory.mktemp("kv-crash-admission")) as start:
        yield start()


@pytest.fixture
def processes(tmp_path):
    """start_kvstore(port) and start_worker(name, admission, kvstore address,
    *flags); everything is killed at the end, the shm dir removed, and no
    `lmx-<store id>-*` file may be left in it or in /dev/shm."""
    store_id = f"crash{secrets.token_hex(4)}"
    workers: list[WorkerProcess] = []
    with kvstore_servers(tmp_path) as start:
        stores: list[KVStoreProcess] = []

        def start_kvstore(port: int = 0) -> KVStoreProcess:
            store = start("--listen", f"127.0.0.1:{port}", store_id=store_id)
            stores.append(store)
            return store

        def start_worker(name: str, admission: str, kvstore: str, *flags: str) -> WorkerProcess:
            worker = WorkerProcess(SMOLLM2, admission,
                                   ("--max-context", str(SHARED_MAX_CONTEXT),
                                    "--kvstore", kvstore, *flags),
                                   tmp_path / f"{name}.log")
            workers.append(worker)
            return worker.launch().wait_ready()

        try:
            yield start_kvstore, start_worker
            problems = [f"worker exited with {code}; log:\n{worker.log_tail(3000)}"
                        for worker in workers if worker.alive()
                        and (code := worker.stop()) != 0]
            assert not problems, "\n".join(problems)
        finally:
            for worker in workers:
                worker.kill()
        shm_dir = stores[0].shm_dir if stores else None
    # after kvstore_servers: every store stopped (exit 0, no segment) and the dir removed
    left = [p.name for d in {shm_dir, Path("/dev/shm")} if d is not None and d.is_dir()
            for p in d.iterdir() if p.name.startswith(f"lmx-{store_id}-")]
    assert not left, f"files of store {store_id} left behind: {left}"


def turn(client: WorkerClient, session: Opened, message) -> list[int]:
    ids = client.generate(session, message=message, max_tokens=MAX_TOKENS).token_ids
    assert ids, "a turn generated no token"
    return ids


def park(client: WorkerClient, session: Opened) -> wpb.ParkSessionResponse:
    parked = client.stub.ParkSession(wpb.ParkSessionRequest(session_id=session.session_id,
                                                            token=session.token),
                                     timeout=RPC_TIMEOUT_S)
    assert parked.entry_id and parked.parked_tokens > 0, parked
    return parked


def restore(client: WorkerClient, entry_id: str, token: str) -> Opened:
    reply = client.stub.RestoreSession(wpb.RestoreSessionRequest(entry_id=entry_id, token=token),
                                       timeout=RPC_TIMEOUT_S)
    return Opened(reply.session_id, token, reply)


def leases_of(address: str, pid: int) -> list[apb.Lease]:
    with grpc.insecure_channel(address) as channel:
        answer = admission_pb2_grpc.AdmissionServiceStub(channel).Status(
            apb.StatusRequest(), timeout=RPC_TIMEOUT_S)
    return [lease for lease in answer.leases if lease.holder.pid == pid]


def adopted(kvstore: KVStoreProcess, entry_id: str) -> str | None:
    """The state in which the last start of `kvstore` adopted `entry_id` (None: it did not)."""
    state = None
    for line in kvstore.log().splitlines()[kvstore._skip:]:
        if '"entry_adopted"' in line:
            with contextlib.suppress(ValueError):
                fields = json.loads(line)
                if fields.get("entry_id") == entry_id:
                    state = fields.get("state")
    return state


def reachable(client: WorkerClient) -> bool:
    """The worker reaches its kvstore: a restore of an unknown entry says NOT_FOUND,
    not KVSTORE_UNAVAILABLE."""
    error, details = rpc_error(client.stub.RestoreSession, wpb.RestoreSessionRequest(
        entry_id="kv-0000000000000000", token="probe"))
    if details.reason == "KVSTORE_UNAVAILABLE":
        return False
    assert error.code() == grpc.StatusCode.NOT_FOUND, (error.code(), details)
    return True


def restore_and_compare(client: WorkerClient, parked: wpb.ParkSessionResponse, token: str,
                        chat, first_ids: list[int]) -> None:
    """Restore on `client`, continue one turn, compare with a control there."""
    restored = restore(client, parked.entry_id, token)
    assert restored.reply.restored_tokens == parked.parked_tokens, restored.reply
    control = client.open()
    assert turn(client, control, chat[0]) == first_ids, (
        "a control session answered the first turn differently")
    assert turn(client, restored, chat[1]) == turn(client, control, chat[1]), (
        "the restored session continued differently from the control")
    client.close_session(restored)
    client.close_session(control)


def test_sessions_parked_by_a_killed_worker_continue_on_another(processes, admission):
    start_kvstore, start_worker = processes
    kvstore = start_kvstore()
    w1 = start_worker("w1", admission.address, kvstore.address,
                      "--lease-ttl-s", str(LEASE_TTL_S))
    pid1 = w1.proc.pid
    parked = []
    with WorkerClient(w1.address) as c1:
        for chat in CHATS:
            session = c1.open()
            first = turn(c1, session, chat[0])
            parked.append((park(c1, session), session.token, chat, first))
    assert leases_of(admission.address, pid1), "admission lists no lease of worker 1"
    w1.proc.kill()
    w1.proc.wait(10)
    killed_at = time.monotonic()

    w2 = start_worker("w2", admission.address, kvstore.address)
    with WorkerClient(w2.address) as c2:
        for entry, token, chat, first in parked:
            restore_and_compare(c2, entry, token, chat, first)

    wait_until(lambda: not leases_of(admission.address, pid1),
               max(0.0, killed_at + 4 * LEASE_TTL_S + 2.0 - time.monotonic()) + 0.1,
               "admission to reclaim the killed worker's leases", interval_s=0.1)


def test_kvstore_restarts_keep_parked_sessions(processes, admission):
    start_kvstore, start_worker = processes
    kvstore = start_kvstore(free_port())
    worker = start_worker("w", admission.address, kvstore.address)
    with WorkerClient(worker.address) as client:
        # (a) kill -9 and restart: the entry is re-adopted from shared memory
        chat = CHATS[0]
        session = client.open()
        first = turn(client, session, chat[0])
        entry = park(client, session)
        segments = kvstore.segments()
        assert segments, "the kvstore made no segment"
        kvstore.proc.kill()
        kvstore.proc.wait(5)
        assert kvstore.segments() == segments, "segments disappeared with the killed kvstore"
        # while it is down, a restore is refused with a clear reason (and loses nothing)
        down_since = time.monotonic()
        while time.monotonic() - down_since < DOWN_S:
            error, details = rpc_error(client.stub.RestoreSession, wpb.RestoreSessionRequest(
                entry_id=entry.entry_id, token=session.token))
            assert (error.code(), details.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                      "KVSTORE_UNAVAILABLE"), details
            time.sleep(0.5)
        kvstore.restart()
        assert adopted(kvstore, entry.entry_id) == "ready", (
            f"the restarted kvstore did not re-adopt {entry.entry_id} from shared memory; "
            f"log:\n{kvstore.log()[-3000:]}")
        # the worker's channel reconnects: a restore works at once (within a reconnect or two)
        wait_until(lambda: reachable(client), RECONNECT_S,
                   "the worker to reach the restarted kvstore", interval_s=0.1)
        restore_and_compare(client, entry, session.token, chat, first)

        # (b) a clean stop (keep on stop) and restart: the entry comes back from the spill dir
        chat = CHATS[1]
        session = client.open()
        first = turn(client, session, chat[0])
        entry = park(client, session)
        assert kvstore.stop() == 0, f"kvstore did not stop cleanly:\n{kvstore.log()[-3000:]}"
        assert not kvstore.segments(), f"a clean stop left segments: {kvstore.segments()}"
        kvstore.restart()
        assert adopted(kvstore, entry.entry_id) == "spilled", (
            f"the restarted kvstore did not keep {entry.entry_id} in its spill dir; "
            f"log:\n{kvstore.log()[-3000:]}")
        restore_and_compare(client, entry, session.token, chat, first)


def test_a_worker_restarted_on_its_address_brings_back_the_sessions_it_parked(processes,
                                                                               admission):
    """Killed (SIGKILL) and started again on the same address (as `lmx up`
    does), a worker has the same id, the kvstore's owner of what it parked: a
    session it had parked answers its next turn under its old id, token for
    token like a control; a wrong token is refused."""
    start_kvstore, start_worker = processes
    kvstore = start_kvstore()
    listen = ("--listen", f"127.0.0.1:{free_port()}")
    w1 = start_worker("w1", admission.address, kvstore.address, *listen)
    chat = CHATS[0]
    with WorkerClient(w1.address) as c1:
        session = c1.open()
        first = turn(c1, session, chat[0])
        park(c1, session)
    w1.proc.kill()
    w1.proc.wait(10)

    w2 = start_worker("w2", admission.address, kvstore.address, *listen)
    assert w2.address == w1.address
    with WorkerClient(w2.address) as c2:
        error, _ = rpc_error(c2.stub.Generate, wpb.GenerateRequest(
            session_id=session.session_id, token="not-the-token",
            message=wpb.ChatMessage(role=chat[1][0], content=chat[1][1]),
            sampling=wpb.SamplingParams(max_tokens=MAX_TOKENS)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
        continued = turn(c2, session, chat[1])
        control = c2.open()
        assert turn(c2, control, chat[0]) == first, "a control answered differently"
        assert continued == turn(c2, control, chat[1]), (
            "the session brought back continued differently from the control")
        c2.close_session(session)
        c2.close_session(control)
    assert '"session_adopted"' in w2.log()
    # While the dead one's entry (another secret) lives, its registration is
    # held (said once, not at every heartbeat); then it takes the entry over.
    # (Whether it started before that entry expired depends on timing.)
    if '"worker_registration_held"' in w2.log():
        deadline = time.monotonic() + 30
        while ('"worker_registration_taken_over"' not in w2.log()
               and time.monotonic() < deadline):
            time.sleep(0.2)
        assert '"worker_registration_taken_over"' in w2.log(), w2.log()[-3000:]
    assert w2.log().count('"worker_registration_held"') <= 1, w2.log()[-3000:]
    assert '"worker_register_failed"' not in w2.log(), w2.log()[-3000:]


def test_with_the_kvstore_down_parks_fail_cleanly_and_parked_sessions_recompute(processes,
                                                                               admission):
    """The kvstore killed: a park fails at once with FAILED_PRECONDITION /
    KVSTORE_UNAVAILABLE and the session keeps its context; a Generate on a
    session that was parked before computes its context again from its tokens;
    both answer like a control session."""
    start_kvstore, start_worker = processes
    kvstore = start_kvstore(free_port())
    worker = start_worker("w", admission.address, kvstore.address)
    chat = CHATS[1]
    with WorkerClient(worker.address) as client:
        kept, parked, control = client.open(), client.open(), client.open()
        first = turn(client, control, chat[0])
        assert turn(client, kept, chat[0]) == first and turn(client, parked, chat[0]) == first
        park(client, parked)
        kvstore.proc.kill()
        kvstore.proc.wait(5)
        error, details = rpc_error(client.stub.ParkSession, wpb.ParkSessionRequest(
            session_id=kept.session_id, token=kept.token))
        assert (error.code(), details.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                  "KVSTORE_UNAVAILABLE"), details
        expected = turn(client, control, chat[1])
        assert turn(client, kept, chat[1]) == expected, "a failed park changed the session"
        assert turn(client, parked, chat[1]) == expected, (
            "a parked session recomputed with the kvstore down answered differently")
        for session in (kept, parked, control):
            client.close_session(session)
        kvstore.restart()      # so that the fixture's clean stop and checks run as usual
