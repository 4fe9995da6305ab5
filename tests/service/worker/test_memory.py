"""The lease story on a small simulated device: a dozen agents share one
worker, one copy of the weights, and a KV lease that grows a chunk at a time
with their contexts and shrinks when they leave, never beyond admission's
budget; when the memory is taken, a request is refused in about --kv-wait-s
and the worker keeps serving."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc
import pytest

from lmx.v1 import admission_pb2 as apb

from ..support import GiB, MiB, WatchStream, acquire_request, admission_servers, cap_of
from ..support import stub as admission_stub
from .worker_support import (
    RPC_TIMEOUT_S,
    SMOLLM2,
    WorkerClient,
    generate_request,
    rpc_error,
    run_concurrently,
)

pytestmark = pytest.mark.timeout(150, func_only=True)

DEVICE_BYTES = 1 * GiB
BUDGET_BYTES = cap_of(DEVICE_BYTES)            # 0.9 GiB, nothing foreign on a simulated device
WEIGHT_BYTES = 538_060_288                     # SmolLM2-135M in float32
KV_BYTES_PER_TOKEN = 46_080                    # 2 x 30 layers x 3 KV heads x 64 x 4 bytes
BLOCK_SIZE = 16                                # the worker's default --block-size
KV_CHUNK_FLAG = 8 * MiB
#: The KV lease grows and shrinks by whole chunks of whole blocks.
CHUNK_BYTES = (KV_CHUNK_FLAG // (BLOCK_SIZE * KV_BYTES_PER_TOKEN)) * BLOCK_SIZE * KV_BYTES_PER_TOKEN
KV_WAIT_S = 1.5
HOLDER = f"worker/{SMOLLM2}"

NUM_AGENTS = 12
#: What a naive server would reserve per agent: its own weights and a full KV cache.
NAIVE_CONTEXT_TOKENS = 4096
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank. "


@pytest.fixture(scope="module")
def small_admission(tmp_path_factory):
    with admission_servers(tmp_path_factory.mktemp("small-admission")) as start:
        yield start("--device", f"cpu:0={DEVICE_BYTES}", "--cap-fraction", "0.9")


@pytest.fixture(scope="module")
def lean_worker(worker_fleet, small_admission):
    worker = worker_fleet.ready("smollm2-lean", SMOLLM2, small_admission.address,
                                "--kv-chunk-bytes", str(KV_CHUNK_FLAG),
                                "--kv-wait-s", str(KV_WAIT_S))
    yield worker
    problem = worker_fleet.stop("smollm2-lean")
    if problem:
        pytest.fail(problem)


@pytest.fixture(scope="module")
def admission(small_admission):
    with grpc.insecure_channel(small_admission.address) as channel:
        yield admission_stub(channel)


def worker_leases(status: apb.StatusResponse, purpose: int) -> list[apb.Lease]:
    return [lease for lease in status.leases
            if lease.holder.name == HOLDER and lease.purpose == purpose]


@dataclass
class Sample:
    leased: int
    budget: int
    num_weight_leases: int
    num_kv_leases: int
    worker_leased: int
    worker_held: int
    worker_kv: int


class MemoryPoller:
    """Reads admission's Status and the worker's GetStatus every few ms in a
    thread, checking the invariants at every poll."""

    def __init__(self, admission_address: str, worker_address: str):
        self.samples: list[Sample] = []
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._admission_address = admission_address
        self._worker_address = worker_address
        self._thread = threading.Thread(target=self._run, name="memory-poller", daemon=True)

    def __enter__(self) -> MemoryPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with grpc.insecure_channel(self._admission_address) as channel, \
                WorkerClient(self._worker_address) as worker:
            admission = admission_stub(channel)
            while not self._stop.is_set():
                try:
                    status = admission.Status(apb.StatusRequest(), timeout=RPC_TIMEOUT_S)
                    mine = worker.status()
                except grpc.RpcError as exc:
                    self.problems.append(f"a poll failed: {exc.code().name}: {exc.details()}")
                    return
                device = status.devices[0]
                sample = Sample(device.leased_bytes, device.budget_bytes,
                                len(worker_leases(status, apb.PURPOSE_WEIGHTS)),
                                len(worker_leases(status, apb.PURPOSE_KV)),
                                mine.leased_bytes, mine.held_bytes, mine.kv_bytes)
                self.samples.append(sample)
                if sample.leased > sample.budget:
                    self.problems.append(f"admission leased {sample.leased} bytes over its "
                                         f"budget of {sample.budget}")
                if sample.worker_held > sample.worker_leased:
                    self.problems.append(f"the worker held {sample.worker_held} bytes beyond its "
                                         f"leases of {sample.worker_leased}")
                if sample.num_weight_leases != 1 or sample.num_kv_leases > 1:
                    self.problems.append(f"the worker had {sample.num_weight_leases} weights "
                                         f"leases and {sample.num_kv_leases} KV leases")
                time.sleep(0.01)


def drain(watch: WatchStream) -> list[apb.Event]:
    events = []
    while not watch.events.empty():
        item = watch.events.get_nowait()
        if isinstance(item, apb.Event):
            events.append(item)
    return events


def kv_events(events: list[apb.Event]) -> list[tuple[str, int, int]]:
    """(kind, old bytes, new bytes) of the worker's KV lease, in order."""
    out = []
    for event in events:
        kind = event.WhichOneof("kind")
        if kind not in ("granted", "resized", "released"):
            continue
        lease = getattr(event, kind).lease
        if lease.holder.name != HOLDER or lease.purpose != apb.PURPOSE_KV:
            continue
        old = {"granted": 0, "resized": event.resized.old_bytes, "released": lease.bytes}[kind]
        new = 0 if kind == "released" else lease.bytes
        out.append((kind, old, new))
    return out


def prompt_of(index: int) -> str:
    """Prompts of different lengths: about 15 to 400 tokens."""
    return f"Agent {index} reads: " + SENTENCE * (1 + index * index * 2 // 5 + index)


def test_a_dozen_agents_share_one_weights_copy_and_a_growing_kv_lease(
        lean_worker, small_admission, admission):
    naive = NUM_AGENTS * (WEIGHT_BYTES + NAIVE_CONTEXT_TOKENS * KV_BYTES_PER_TOKEN)
    assert naive > 8 * BUDGET_BYTES > DEVICE_BYTES, (
        f"the scenario is meant to need far more than the device when each agent reserves "
        f"its own weights and a {NAIVE_CONTEXT_TOKENS}-token cache: {naive} bytes vs a budget "
        f"of {BUDGET_BYTES}")
    watch = WatchStream(admission, timeout_s=120)
    try:
        watch.sync(admission)
        with WorkerClient(lean_worker.address) as client:
            sessions = [client.open() for _ in range(NUM_AGENTS)]
            with MemoryPoller(small_admission.address, lean_worker.address) as poller:
                results = run_concurrently(
                    {i: (lambda i=i: client.generate(sessions[i], prompt=prompt_of(i),
                                                     max_tokens=8, timeout=120))
                     for i in range(NUM_AGENTS)}, timeout_s=120)
                at_peak = client.status()
                for session in sessions:
                    client.close_session(session)
                deadline = time.monotonic() + 5
                while client.status().kv_bytes > CHUNK_BYTES and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.2)  # a last poll or two of the shrunk state
            after = client.status()
        status = admission.Status(apb.StatusRequest(), timeout=RPC_TIMEOUT_S)
    finally:
        events = drain(watch)
        watch.close()

    # Everyone was served, each from its own context.
    contexts = []
    for i, result in sorted(results.items()):
        assert result.finish.completion_tokens == 8 or result.reason == "FINISH_REASON_STOP", (
            f"agent {i} got {result!r}")
        contexts.append(result.finish.context_tokens)
    assert max(contexts) > 5 * min(contexts), f"the prompts should differ in length: {contexts}"

    # The book was never over-committed, and the worker stayed inside its leases.
    assert not poller.problems, "\n".join(poller.problems[:10])
    assert len(poller.samples) >= 10, f"only {len(poller.samples)} polls during the run"
    peak = max(sample.leased for sample in poller.samples)
    assert peak <= BUDGET_BYTES, f"admission leased {peak} > budget {BUDGET_BYTES}"

    # One copy of the weights, for all twelve.
    weights = worker_leases(status, apb.PURPOSE_WEIGHTS)
    assert len(weights) == 1 and weights[0].bytes == WEIGHT_BYTES, (
        f"expected one weights lease of {WEIGHT_BYTES} bytes, admission lists {list(weights)}")
    assert at_peak.weight_bytes == WEIGHT_BYTES, at_peak

    # The KV lease covered every context, and only about what they needed.
    needed = sum(context - 1 for context in contexts) * KV_BYTES_PER_TOKEN
    assert at_peak.kv_bytes >= needed, (
        f"{NUM_AGENTS} contexts of {sum(contexts)} tokens need {needed} bytes of KV; the worker "
        f"held {at_peak.kv_bytes}")
    slack = (NUM_AGENTS + 1) * BLOCK_SIZE * KV_BYTES_PER_TOKEN + 2 * CHUNK_BYTES
    assert at_peak.kv_bytes <= needed + slack, (
        f"the worker held {at_peak.kv_bytes} bytes of KV for {needed} bytes of contexts "
        f"(more than partly used blocks and a spare chunk explain)")
    assert at_peak.leased_bytes == WEIGHT_BYTES + at_peak.kv_bytes, (
        f"the worker's leases ({at_peak.leased_bytes}) are not its weights + KV "
        f"({WEIGHT_BYTES} + {at_peak.kv_bytes})")

    # The KV lease grew in whole chunks, in several steps, and shrank back.
    changes = kv_events(events)
    assert changes, f"Watch showed no KV lease of {HOLDER}: {events}"
    assert changes[0][0] == "granted", f"the first KV event is {changes[0]}"
    for kind, old, new in changes:
        assert new % CHUNK_BYTES == 0 and old % CHUNK_BYTES == 0, (
            f"a KV {kind} event from {old} to {new} bytes is not in whole chunks of "
            f"{CHUNK_BYTES} bytes")
    growths = [c for c in changes if c[0] == "granted" or (c[0] == "resized" and c[2] > c[1])]
    assert len(growths) >= 2 and any(c[0] == "resized" for c in growths), (
        f"the KV lease should grow in several resizes as contexts arrive: {changes}")
    top = max(new for _, _, new in changes)
    assert top >= needed, f"the KV lease peaked at {top} bytes < the {needed} contexts needed"
    assert changes[-1][2] <= CHUNK_BYTES, (
        f"after every session closed the KV lease is still {changes[-1][2]} bytes: {changes}")
    assert after.kv_bytes <= CHUNK_BYTES and after.held_bytes <= after.leased_bytes, (
        f"after every session closed the worker still holds {after.kv_bytes} bytes of KV "
        f"(held {after.held_bytes}, leased {after.leased_bytes})")
    kv_left = sum(lease.bytes for lease in worker_leases(status, apb.PURPOSE_KV))
    assert kv_left <= CHUNK_BYTES, f"admission still lists {kv_left} bytes of KV lease"
    assert after.num_sessions == 0 and after.kv_blocks_used == 0, after


def test_when_memory_is_taken_a_request_is_refused_in_about_kv_wait_s(
        lean_worker, small_admission, admission):
    with WorkerClient(lean_worker.address) as client:
        survivor = client.open()
        client.generate(survivor, prompt="Hello there.", max_tokens=4)
        time.sleep(0.3)  # let any shrink settle
        free = admission.Status(apb.StatusRequest(), timeout=RPC_TIMEOUT_S).devices[0].free_bytes
        hog = admission.Acquire(acquire_request(free - CHUNK_BYTES // 2, name="test/hog",
                                                purpose=apb.PURPOSE_OTHER),
                                timeout=RPC_TIMEOUT_S).lease
        try:
            long_one = client.open()
            long_prompt = SENTENCE * 60  # about 800 tokens: several chunks of KV
            started = time.monotonic()
            _, details = rpc_error(client.stub.Generate,
                                   generate_request(long_one, prompt=long_prompt, max_tokens=4),
                                   timeout=KV_WAIT_S + 30)
            took = time.monotonic() - started
            assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"a prompt whose KV does not fit gave {details.code.name}: {details.message}")
            assert details.reason == "INSUFFICIENT_DEVICE_MEMORY" and details.retry_after_s, (
                f"the refusal lacks ErrorInfo/RetryInfo: {details!r}")
            assert 0.7 * KV_WAIT_S <= took <= KV_WAIT_S + 3, (
                f"the refusal came after {took:.2f}s; --kv-wait-s is {KV_WAIT_S}")
            assert lean_worker.health() == "SERVING", (
                f"the worker's health is {lean_worker.health()} after the refusal")
            status = admission.Status(apb.StatusRequest(), timeout=RPC_TIMEOUT_S)
            assert status.devices[0].leased_bytes <= status.devices[0].budget_bytes, status
            assert not [w for w in status.waiters if w.holder.name == HOLDER], (
                f"the worker left a waiter in admission's queue: {list(status.waiters)}")
        finally:
            admission.Release(apb.ReleaseRequest(lease_id=hog.lease_id, epoch=hog.epoch),
                              timeout=RPC_TIMEOUT_S)
        short = client.generate(survivor, prompt=" How are you?", max_tokens=4)
        assert short.finish.completion_tokens > 0, f"the surviving session got {short!r}"
        retried = client.generate(long_one, prompt=long_prompt, max_tokens=4)
        assert retried.finish.context_tokens == retried.finish.prompt_tokens + \
            retried.finish.completion_tokens, (
            f"the refused turn was not undone: the retry started from a context of "
            f"{retried.finish.context_tokens - retried.finish.prompt_tokens}"
            f" - {retried.finish.completion_tokens} tokens")
        for session in (survivor, long_one):
            client.close_session(session)
