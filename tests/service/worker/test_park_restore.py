"""ParkSession / RestoreSession through real processes: admission, a kvstore
(its own store id, segments under a fresh /dev/shm directory) and two
smollm2-135m workers pointed at it. A parked and restored session continues
token for token like a control session that was never parked, on the same
worker and after a move to the other one; a Generate on a parked session
restores it transparently; a wrong token is refused; a corrupted entry is
reported and never used; no segment of the store is left afterwards."""

from __future__ import annotations

import json
import re
import secrets
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from lmx.v1 import kvstore_pb2 as kpb
from lmx.v1 import worker_pb2 as wpb
from services.kvstore.client import map_region

from ..kvstore.support import KVStoreProcess, kvstore_servers
from ..support import wait_until
from ..kvstore.support import stub as kvstore_stub
from .test_grpcurl_worker import GRPCURL, readme_worker_commands
from .worker_support import (
    RPC_TIMEOUT_S,
    SHARED_MAX_CONTEXT,
    SMOLLM2,
    Opened,
    WorkerClient,
    WorkerFleet,
    WorkerProcess,
    rpc_error,
)

pytestmark = pytest.mark.timeout(180, func_only=True)

TURN_1 = ("user", "Name three colors of the rainbow.")
TURN_2 = ("user", "Now name two animals that live in the sea.")
MAX_TOKENS = 16


@dataclass
class Stack:
    kvstore: KVStoreProcess
    w1: WorkerProcess
    w2: WorkerProcess


@pytest.fixture(scope="module")
def stack(tmp_path_factory, worker_admission) -> Stack:
    tmp = tmp_path_factory.mktemp("park-restore")
    store_id = f"park{secrets.token_hex(4)}"
    with kvstore_servers(tmp) as start:
        kvstore = start(store_id=store_id)
        fleet = WorkerFleet(tmp)
        flags = ("--max-context", str(SHARED_MAX_CONTEXT), "--kvstore", kvstore.address)
        try:
            # w1 parks through a region held ahead (one round trip: Place),
            # w2 holds none (Reserve, then Commit).
            fleet.launch("w1", SMOLLM2, worker_admission.address, *flags)
            fleet.launch("w2", SMOLLM2, worker_admission.address, *flags,
                         "--park-ahead-bytes", "0")
            yield Stack(kvstore, fleet.workers["w1"].wait_ready(),
                        fleet.workers["w2"].wait_ready())
        except BaseException:
            for worker in fleet.workers.values():
                worker.kill()
            raise
        problems = fleet.stop_all()
        assert not problems, "workers did not shut down cleanly:\n" + "\n\n".join(problems)
        assert kvstore.stop() == 0, f"kvstore did not stop cleanly:\n{kvstore.log()[-3000:]}"
        # (f) no segment of this store is left, in its shm directory or in /dev/shm itself
        left = [p.name for d in {kvstore.shm_dir, Path("/dev/shm")} if d.is_dir()
                for p in d.iterdir() if p.name.startswith(f"lmx-{store_id}-")]
        assert not left, f"segments of store {store_id} left behind: {left}"


def park(client: WorkerClient, session: Opened) -> wpb.ParkSessionResponse:
    return client.stub.ParkSession(wpb.ParkSessionRequest(session_id=session.session_id,
                                                          token=session.token),
                                   timeout=RPC_TIMEOUT_S)


def restore(client: WorkerClient, entry_id: str, token: str) -> Opened:
    reply = client.stub.RestoreSession(wpb.RestoreSessionRequest(entry_id=entry_id, token=token),
                                       timeout=RPC_TIMEOUT_S)
    return Opened(reply.session_id, token, reply)


def turn(client: WorkerClient, session: Opened, message) -> list[int]:
    return client.generate(session, message=message, max_tokens=MAX_TOKENS).token_ids


def first_turns(client: WorkerClient) -> tuple[Opened, Opened]:
    """A session to park and a control, both after TURN_1 (identical so far)."""
    parked, control = client.open(), client.open()
    ids = turn(client, parked, TURN_1)
    assert len(ids) == MAX_TOKENS, f"the first turn made {len(ids)} tokens, not {MAX_TOKENS}"
    assert turn(client, control, TURN_1) == ids, "two fresh sessions answered TURN_1 differently"
    return parked, control


def test_park_then_restore_on_the_same_worker_is_exact(stack):
    with WorkerClient(stack.w1.address) as w1:
        session, control = first_turns(w1)
        used_before = w1.status().kv_blocks_used
        parked = park(w1, session)
        assert parked.entry_id.startswith("kv-") and parked.parked_tokens > 0, parked
        assert parked.freed_blocks > 0, f"parking freed no blocks: {parked}"
        assert w1.status().kv_blocks_used == used_before - parked.freed_blocks, (
            "the pool's used blocks did not drop by the freed blocks")
        restored = restore(w1, parked.entry_id, session.token)
        assert restored.session_id != session.session_id, "RestoreSession reused the session id"
        assert restored.reply.restored_tokens == parked.parked_tokens, restored.reply
        error, _ = rpc_error(w1.stub.Generate, _generate(session, TURN_2))
        assert error.code() == grpc.StatusCode.NOT_FOUND, (
            f"the parked session still answers after its restore: {error.code().name}")
        assert turn(w1, restored, TURN_2) == turn(w1, control, TURN_2), (
            "the restored session continued differently from the control")
        w1.close_session(restored)
        w1.close_session(control)


def test_a_park_uses_the_region_held_ahead_when_it_has_one(stack):
    """w1 holds a region ahead: its park is one Place; w2 holds none: its
    park reserves and commits. Both restore exactly."""
    with WorkerClient(stack.w1.address) as w1, WorkerClient(stack.w2.address) as w2:
        done = []
        for client in (w1, w2):
            session, control = first_turns(client)
            parked = park(client, session)
            restored = restore(client, parked.entry_id, session.token)
            assert turn(client, restored, TURN_2) == turn(client, control, TURN_2)
            done.append(parked.entry_id)
            client.close_session(restored)
            client.close_session(control)
    events = {}
    for line in stack.kvstore.log().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("entry_id") in done:
                events.setdefault(record["entry_id"], []).append(record["event"])
    held_park, reserved_park = done
    assert "entry_placed" in events[held_park], events[held_park]
    assert "entry_reserved" not in events[held_park], events[held_park]
    assert {"entry_reserved", "entry_committed"} <= set(events[reserved_park]), (
        events[reserved_park])
    assert '"region_held"' in stack.kvstore.log()


def test_move_to_another_worker_is_exact(stack):
    with WorkerClient(stack.w1.address) as w1, WorkerClient(stack.w2.address) as w2:
        session, control = first_turns(w1)
        parked = park(w1, session)
        moved = restore(w2, parked.entry_id, session.token)
        assert turn(w2, moved, TURN_2) == turn(w1, control, TURN_2), (
            "the session moved to worker 2 continued differently from the control on worker 1")
        error, _ = rpc_error(w1.stub.Generate, _generate(session, TURN_2))
        assert error.code() == grpc.StatusCode.NOT_FOUND, (
            f"the moved session still answers on worker 1: {error.code().name}")
        w2.close_session(moved)
        w1.close_session(control)


def test_generate_on_a_parked_session_restores_it(stack):
    with WorkerClient(stack.w1.address) as w1:
        session, control = first_turns(w1)
        parked = park(w1, session)
        error, details = rpc_error(w1.stub.ParkSession, wpb.ParkSessionRequest(
            session_id=session.session_id, token=session.token))
        assert (error.code(), details.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                  "ALREADY_PARKED"), details
        assert turn(w1, session, TURN_2) == turn(w1, control, TURN_2), (
            "the transparently restored session continued differently from the control")
        unparked = [line for line in stack.w1.log_lines()
                    if line.get("event") == "session_unparked"
                    and line.get("entry_id") == parked.entry_id]
        assert unparked, "Generate did not restore the parked KV (no session_unparked logged)"
        with kvstore_channel(stack) as kv:
            ids = [e.entry_id for e in kv.ListEntries(kpb.ListEntriesRequest()).entries]
        assert parked.entry_id not in ids, "the entry was not deleted after its restore"
        w1.close_session(session)
        w1.close_session(control)


def test_restore_with_a_wrong_token_is_denied(stack):
    with WorkerClient(stack.w1.address) as w1, WorkerClient(stack.w2.address) as w2:
        session = w1.open()
        turn(w1, session, TURN_1)
        parked = park(w1, session)
        sessions_before = w2.status().num_sessions
        error, _ = rpc_error(w2.stub.RestoreSession, wpb.RestoreSessionRequest(
            entry_id=parked.entry_id, token="not-the-token"))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (
            f"a wrong token gave {error.code().name}: {error.details()}")
        assert w2.status().num_sessions == sessions_before, "a refused restore left a session"
        w1.close_session(session)   # deletes its entry


def test_a_corrupted_entry_is_reported_and_not_used(stack):
    with WorkerClient(stack.w1.address) as w1, WorkerClient(stack.w2.address) as w2:
        session = w1.open()
        turn(w1, session, TURN_1)
        parked = park(w1, session)
        with kvstore_channel(stack) as kv:
            region = kv.Open(kpb.OpenRequest(entry_id=parked.entry_id, secret=session.token),
                             timeout=RPC_TIMEOUT_S).region
        with map_region(region, writable=True) as view:
            view[100] ^= 0xFF
        sessions_before = w2.status().num_sessions
        error, details = rpc_error(w2.stub.RestoreSession, wpb.RestoreSessionRequest(
            entry_id=parked.entry_id, token=session.token))
        assert (error.code(), details.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                  "CORRUPTED"), (
            f"restoring a corrupted entry gave {error.code().name} {details.reason}: "
            f"{error.details()}")
        assert w2.status().num_sessions == sessions_before, "a corrupted restore left a session"
        w1.close_session(session)


def test_a_corrupted_entry_under_a_generate_is_recomputed_and_reported(stack,
                                                                       worker_admission):
    """A Generate on a parked session whose entry was corrupted: the worker
    computes the context again from the session's tokens (the answer equals a
    control session's) and says so: a log line and a Watch event."""
    with WorkerClient(stack.w1.address) as w1:
        session, control = w1.open(), w1.open()
        assert turn(w1, session, TURN_1) == turn(w1, control, TURN_1)
        parked = park(w1, session)
        with kvstore_channel(stack) as kv:
            region = kv.Open(kpb.OpenRequest(entry_id=parked.entry_id, secret=session.token),
                             timeout=RPC_TIMEOUT_S).region
        with map_region(region, writable=True) as view:
            view[100] ^= 0xFF
        assert turn(w1, session, TURN_2) == turn(w1, control, TURN_2), (
            "a session whose entry was corrupted continued differently")
        log = stack.w1.log()
        assert '"restore_recomputes"' in log and parked.entry_id in log, (
            "the recompute after a corrupted entry was not reported")
        wait_until(lambda: f"recomputed: entry {parked.entry_id} corrupted"
                   in worker_admission.log(), 5, "admission to hear of the recompute")
        w1.close_session(session)
        w1.close_session(control)


def test_readme_park_and_restore_commands(stack):
    """The README's grpcurl lines: park on worker 1 (localhost:50061 there),
    restore on worker 2 (localhost:50062)."""

    lines = {re.search(r"WorkerService/(\w+)", line).group(1): line
             for line in readme_worker_commands()}
    with WorkerClient(stack.w1.address) as w1, WorkerClient(stack.w2.address) as w2:
        session = w1.open()
        turn(w1, session, TURN_1)
        fill = {'"sess-…"': json.dumps(session.session_id),
                '"token": "…"': f'"token": {json.dumps(session.token)}',
                "localhost:50061": stack.w1.address, "localhost:50062": stack.w2.address}
        parked = json.loads(grpcurl(lines["ParkSession"], fill))
        assert parked["entry_id"].startswith("kv-") and parked["parked_tokens"] > 0, parked
        fill['"kv-…"'] = json.dumps(parked["entry_id"])
        restored = json.loads(grpcurl(lines["RestoreSession"], fill))
        assert restored["restored_tokens"] == parked["parked_tokens"], restored
        w2.close_session(Opened(restored["session_id"], session.token, None))


def test_no_entry_is_left(stack):
    with kvstore_channel(stack) as kv:
        entries = kv.ListEntries(kpb.ListEntriesRequest(), timeout=RPC_TIMEOUT_S).entries
    assert not entries, f"entries left in the kvstore: {[e.entry_id for e in entries]}"


# ---- helpers ----------------------------------------------------------------

def grpcurl(line: str, fill: dict[str, str]) -> str:
    for placeholder, value in fill.items():
        line = line.replace(placeholder, value)
    assert "…" not in line, f"a placeholder left in: {line}"
    argv = shlex.split(line)
    done = subprocess.run([str(GRPCURL), *argv[1:]], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{line}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _generate(session: Opened, message) -> wpb.GenerateRequest:
    from .worker_support import generate_request
    return generate_request(session, message=message, max_tokens=MAX_TOKENS)


class kvstore_channel:
    def __init__(self, stack: Stack):
        self.channel = grpc.insecure_channel(stack.kvstore.address)

    def __enter__(self):
        return kvstore_stub(self.channel)

    def __exit__(self, *exc):
        self.channel.close()
