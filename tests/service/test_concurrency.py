"""Many clients at once against one real admission server: the book must never
go over any device's budget, whatever the interleaving.

32 asyncio clients over 4 channels acquire (now or with a wait, sized at
random, on a given device or any), grow and shrink, renew and release for a
few seconds; some abandon short leases so that they expire, some give up on a
waiting Acquire by deadline. Meanwhile a watcher rebuilds each device's leased
bytes from the Watch events and a poller reads Status, both checking the
budget every time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest

from lmx.v1 import admission_pb2 as pb
from lmx.v1 import admission_pb2_grpc

from .support import MiB, cap_of

DEVICES = {"cpu:0": 1024 * MiB, "cpu:1": 512 * MiB}
BUDGET = {device: cap_of(total) for device, total in DEVICES.items()}
FLAGS = ("--device", "cpu:0=1GiB", "--device", "cpu:1=512MiB", "--min-ttl-s", "0.1",
         "--sweep-interval-s", "0.02", "--max-wait-s", "2", "--grace-s", "2")
NUM_CLIENTS = 32
NUM_CHANNELS = 4
DURATION_S = 6.0
HELD_TTL_MS = 60_000       # leases the clients keep: never expire during the test
ABANDONED_TTL_MS = 150     # leases a client walks away from
RPC_TIMEOUT_S = 5.0
PROBE_PREFIX = "test/probe"

Code = grpc.StatusCode


@dataclass
class Findings:
    """What went wrong (anything here fails the test) and what happened."""

    unexpected: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def bad(self, text: str) -> None:
        if len(self.unexpected) < 50:
            self.unexpected.append(text)


class Client:
    def __init__(self, index: int, admission: admission_pb2_grpc.AdmissionServiceStub,
                 findings: Findings):
        self.name = f"load/{index}"
        self.rng = random.Random(1000 + index)
        self.admission = admission
        self.findings = findings
        self.held: dict[str, pb.Lease] = {}
        # (lease, monotonic time after which it has certainly expired)
        self.abandoned: list[tuple[pb.Lease, float]] = []

    def request(self, num_bytes: int, *, device: str = "", wait_ms: int = 0,
                ttl_ms: int = HELD_TTL_MS) -> pb.AcquireRequest:
        return pb.AcquireRequest(
            holder=pb.Holder(name=self.name, pid=4242), bytes=num_bytes, device=device,
            purpose=self.rng.choice([pb.PURPOSE_KV, pb.PURPOSE_WEIGHTS, pb.PURPOSE_WORKSPACE]),
            priority=self.rng.choice([0, 0, 0, 1, -1]), wait_ms=wait_ms, ttl_ms=ttl_ms)

    def size(self) -> int:
        return self.rng.choice([self.rng.randint(1, 4 * MiB), self.rng.randint(MiB, 64 * MiB),
                                self.rng.randint(32 * MiB, 300 * MiB)])

    def device(self) -> str:
        return self.rng.choice(["cpu:0", "cpu:1", ""])

    async def call(self, op: str, rpc, request, allowed: tuple[Code, ...], timeout: float):
        self.findings.counts[f"{op}"] += 1
        try:
            return await rpc(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            self.findings.counts[f"{op}:{exc.code().name}"] += 1
            if exc.code() not in allowed:
                self.findings.bad(f"{self.name} {op}: {exc.code().name}: {exc.details()}")
            return None

    async def run(self, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            await self.step()
            if self.rng.random() < 0.3:
                await asyncio.sleep(self.rng.random() * 0.003)
        for lease in list(self.held.values()):
            await self.release(lease)

    async def step(self) -> None:
        ops = ["acquire", "acquire_wait", "abandon", "give_up_waiting", "probe_expired"]
        if self.held:
            ops += ["resize", "resize_wait", "renew", "release", "release"]
        if len(self.held) >= 3:
            ops = [op for op in ops if not op.startswith("acquire")] + ["release"]
        await getattr(self, self.rng.choice(ops))()

    async def acquire(self, wait_ms: int = 0) -> None:
        answer = await self.call("acquire", self.admission.Acquire,
                                 self.request(self.size(), device=self.device(), wait_ms=wait_ms),
                                 (Code.RESOURCE_EXHAUSTED,), RPC_TIMEOUT_S + wait_ms / 1000)
        if answer is not None:
            self.held[answer.lease.lease_id] = answer.lease

    async def acquire_wait(self) -> None:
        await self.acquire(wait_ms=self.rng.randint(1, 300))

    async def abandon(self) -> None:
        answer = await self.call(
            "abandon", self.admission.Acquire,
            self.request(self.rng.randint(1, 32 * MiB), device=self.device(),
                         ttl_ms=ABANDONED_TTL_MS),
            (Code.RESOURCE_EXHAUSTED,), RPC_TIMEOUT_S)
        if answer is not None:
            self.abandoned.append((answer.lease, time.monotonic() + ABANDONED_TTL_MS / 1000 + 0.05))

    async def give_up_waiting(self) -> None:
        """Wait in the queue, but let the deadline cancel the call first. A
        grant that races the deadline is abandoned (its TTL is short)."""
        answer = await self.call(
            "give_up_waiting", self.admission.Acquire,
            self.request(self.size(), device=self.device(), wait_ms=2000,
                         ttl_ms=ABANDONED_TTL_MS),
            (Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED, Code.CANCELLED),
            self.rng.uniform(0.02, 0.2))
        if answer is not None:
            self.abandoned.append((answer.lease, time.monotonic() + ABANDONED_TTL_MS / 1000 + 0.05))

    async def probe_expired(self) -> None:
        """Touch an abandoned lease once it has certainly expired: the server
        must say so (FAILED_PRECONDITION), never grant or renew it."""
        now = time.monotonic()
        due = [item for item in self.abandoned if item[1] <= now]
        if not due:
            return
        lease, _ = item = self.rng.choice(due)
        self.abandoned.remove(item)
        rpc, request = self.rng.choice([
            (self.admission.Renew, pb.RenewRequest(lease_id=lease.lease_id, epoch=lease.epoch)),
            (self.admission.Release, pb.ReleaseRequest(lease_id=lease.lease_id,
                                                       epoch=lease.epoch)),
            (self.admission.Resize, pb.ResizeRequest(lease_id=lease.lease_id, epoch=lease.epoch,
                                                     bytes=lease.bytes + 1))])
        answer = await self.call("probe_expired", rpc, request, (Code.FAILED_PRECONDITION,),
                                 RPC_TIMEOUT_S)
        if answer is not None:
            self.findings.bad(f"{self.name}: a lease abandoned past its TTL still works: "
                              f"{lease.lease_id} -> {answer}")

    def pick(self) -> pb.Lease:
        return self.held[self.rng.choice(list(self.held))]

    async def resize(self, wait_ms: int = 0) -> None:
        lease = self.pick()
        target = max(1, min(BUDGET[lease.device], int(lease.bytes * self.rng.uniform(0.3, 2.2))))
        answer = await self.call(
            "resize", self.admission.Resize,
            pb.ResizeRequest(lease_id=lease.lease_id, epoch=lease.epoch, bytes=target,
                             wait_ms=wait_ms),
            (Code.RESOURCE_EXHAUSTED,), RPC_TIMEOUT_S + wait_ms / 1000)
        if answer is not None:
            if answer.lease.bytes != target or answer.lease.epoch != lease.epoch:
                self.findings.bad(f"{self.name}: Resize to {target} answered {answer.lease}")
            self.held[lease.lease_id] = answer.lease

    async def resize_wait(self) -> None:
        await self.resize(wait_ms=self.rng.randint(1, 200))

    async def renew(self) -> None:
        lease = self.pick()
        answer = await self.call("renew", self.admission.Renew,
                                 pb.RenewRequest(lease_id=lease.lease_id, epoch=lease.epoch),
                                 (), RPC_TIMEOUT_S)
        if answer is not None and answer.lease.bytes != lease.bytes:
            self.findings.bad(f"{self.name}: Renew changed the size: {lease} -> {answer.lease}")

    async def release(self, lease: pb.Lease | None = None) -> None:
        lease = lease or self.pick()
        del self.held[lease.lease_id]
        answer = await self.call("release", self.admission.Release,
                                 pb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch),
                                 (), RPC_TIMEOUT_S)
        if answer is not None and answer.released_bytes != lease.bytes:
            self.findings.bad(f"{self.name}: released {answer.released_bytes} bytes of "
                              f"{lease.lease_id}, which held {lease.bytes}")


class Watcher:
    """Rebuilds the book from Watch events and checks it at every event."""

    def __init__(self, admission: admission_pb2_grpc.AdmissionServiceStub, findings: Findings):
        self.admission = admission
        self.findings = findings
        self.call = admission.Watch(pb.WatchRequest())
        self.leased = dict.fromkeys(BUDGET, 0)
        self.peak = dict.fromkeys(BUDGET, 0)
        self.leases: dict[str, int] = {}
        self.last_seq: int | None = None
        self.seen_releases: set[str] = set()
        self.released = asyncio.Condition()

    async def run(self) -> None:
        try:
            async for event in self.call:
                self.apply(event)
                kind = event.WhichOneof("kind")
                if kind == "released":
                    async with self.released:
                        self.seen_releases.add(event.released.lease.lease_id)
                        self.released.notify_all()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != Code.CANCELLED:
                self.findings.bad(f"Watch ended with {exc.code().name}: {exc.details()}")

    def apply(self, event: pb.Event) -> None:
        self.findings.counts[f"event:{event.WhichOneof('kind')}"] += 1
        if self.last_seq is not None and event.seq != self.last_seq + 1:
            self.findings.bad(f"Watch seq jumped from {self.last_seq} to {event.seq}")
        self.last_seq = event.seq
        kind = event.WhichOneof("kind")
        if kind not in ("granted", "resized", "released", "expired"):
            return
        lease = getattr(event, kind).lease
        if lease.holder.name.startswith(PROBE_PREFIX):
            return  # sync probes: the first one's grant may precede the subscription
        if event.device != lease.device or lease.device not in BUDGET:
            self.findings.bad(f"event {event.seq} on device {event.device!r}, lease on "
                              f"{lease.device!r}")
            return
        known = self.leases.get(lease.lease_id)
        if kind == "granted":
            if known is not None:
                self.findings.bad(f"lease {lease.lease_id} granted twice")
            delta = lease.bytes
        elif kind == "resized":
            if known != event.resized.old_bytes:
                self.findings.bad(f"resize of {lease.lease_id} from {event.resized.old_bytes}, "
                                  f"but the watcher knows it at {known}")
            delta = lease.bytes - event.resized.old_bytes
        else:
            if known != lease.bytes:
                self.findings.bad(f"{kind} {lease.lease_id} of {lease.bytes} bytes, but the "
                                  f"watcher knows it at {known}")
            delta = -lease.bytes
        if kind in ("released", "expired"):
            self.leases.pop(lease.lease_id, None)
        else:
            self.leases[lease.lease_id] = lease.bytes
        self.leased[lease.device] += delta
        self.peak[lease.device] = max(self.peak[lease.device], self.leased[lease.device])
        if not 0 <= self.leased[lease.device] <= BUDGET[lease.device]:
            self.findings.bad(f"after event {event.seq} ({kind} {lease.lease_id}) the events "
                              f"add up to {self.leased[lease.device]} bytes on {lease.device}, "
                              f"budget {BUDGET[lease.device]}")

    async def sync(self, name: str) -> None:
        """Acquire and release a probe lease until the watcher sees it: after
        that, every earlier event has been applied."""
        deadline = time.monotonic() + 10
        while True:
            lease = (await self.admission.Acquire(pb.AcquireRequest(
                holder=pb.Holder(name=name), bytes=1, purpose=pb.PURPOSE_OTHER),
                timeout=RPC_TIMEOUT_S)).lease
            await self.admission.Release(pb.ReleaseRequest(lease_id=lease.lease_id,
                                                           epoch=lease.epoch),
                                         timeout=RPC_TIMEOUT_S)
            try:
                async with self.released:
                    await asyncio.wait_for(self.released.wait_for(
                        lambda: lease.lease_id in self.seen_releases), 0.5)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise AssertionError("the Watch stream delivered no probe event in 10 s")


async def poll_status(admission, findings: Findings, stop: asyncio.Event) -> None:
    while not stop.is_set():
        snap = await admission.Status(pb.StatusRequest(), timeout=RPC_TIMEOUT_S)
        findings.counts["status_polls"] += 1
        per_device = Counter()
        for lease in snap.leases:
            per_device[lease.device] += lease.bytes
        for dev in snap.devices:
            if dev.budget_bytes != BUDGET[dev.device]:
                findings.bad(f"{dev.device}: budget {dev.budget_bytes}, want {BUDGET[dev.device]}")
            if not 0 <= dev.leased_bytes <= dev.budget_bytes:
                findings.bad(f"Status: {dev.device} leased {dev.leased_bytes} of a budget of "
                             f"{dev.budget_bytes}")
            if dev.free_bytes != dev.budget_bytes - dev.leased_bytes:
                findings.bad(f"Status: {dev.device} free {dev.free_bytes} != budget - leased")
            if per_device[dev.device] != dev.leased_bytes:
                findings.bad(f"Status: {dev.device}'s leases add up to {per_device[dev.device]}, "
                             f"its leased_bytes say {dev.leased_bytes}")
        await asyncio.sleep(0.01)


async def hammer(address: str) -> tuple[Findings, Watcher, pb.StatusResponse]:
    findings = Findings()
    channels = [grpc.aio.insecure_channel(address) for _ in range(NUM_CHANNELS + 1)]
    try:
        stubs = [admission_pb2_grpc.AdmissionServiceStub(channel) for channel in channels]
        watcher = Watcher(stubs[-1], findings)
        watching = asyncio.create_task(watcher.run())
        await watcher.sync(f"{PROBE_PREFIX}-start")

        stop_polling = asyncio.Event()
        polling = asyncio.create_task(poll_status(stubs[-1], findings, stop_polling))
        clients = [Client(i, stubs[i % NUM_CHANNELS], findings) for i in range(NUM_CLIENTS)]
        stop_at = time.monotonic() + DURATION_S
        await asyncio.wait_for(asyncio.gather(*(client.run(stop_at) for client in clients)),
                               DURATION_S + 30)

        # Everything held was released; what was abandoned expires soon.
        deadline = time.monotonic() + 5
        while True:
            final = await stubs[-1].Status(pb.StatusRequest(), timeout=RPC_TIMEOUT_S)
            if not final.leases and not final.waiters or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        stop_polling.set()
        await asyncio.wait_for(polling, 10)
        await watcher.sync(f"{PROBE_PREFIX}-end")
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        return findings, watcher, final
    finally:
        for channel in channels:
            await channel.close()


@pytest.mark.timeout(90)
def test_many_clients_never_overcommit_a_device(start_admission):
    server = start_admission(*FLAGS)
    started = time.monotonic()
    findings, watcher, final = asyncio.run(hammer(server.address))
    took = time.monotonic() - started
    counts = findings.counts

    assert not findings.unexpected, (
        f"{len(findings.unexpected)} problems under load (first 50):\n"
        + "\n".join(findings.unexpected) + f"\ncounts: {dict(counts)}")
    assert not final.leases and not final.waiters, (
        f"left over after every client released and abandoned leases had time to expire: "
        f"{list(final.leases)} {list(final.waiters)}")
    for dev in final.devices:
        assert (dev.leased_bytes, dev.free_bytes) == (0, dev.budget_bytes), dev
    assert watcher.leased == dict.fromkeys(BUDGET, 0), \
        f"the Watch events do not add up to an empty book: {watcher.leased}"
    assert not watcher.leases, f"leases granted but never released or expired: {watcher.leases}"

    # The load must really have contended, or the checks above prove little.
    assert counts["event:granted"] > 200, dict(counts)
    assert counts["acquire:RESOURCE_EXHAUSTED"] > 0, dict(counts)
    assert counts["event:expired"] > 10, dict(counts)
    assert counts["event:resized"] > 20, dict(counts)
    assert counts["probe_expired:FAILED_PRECONDITION"] > 0, dict(counts)
    assert counts["status_polls"] > 20, dict(counts)
    assert all(peak > budget // 2 for peak, budget in zip(watcher.peak.values(),
                                                          BUDGET.values())), watcher.peak
    assert took < DURATION_S + 20, f"the run took {took:.1f}s"
    assert server.alive()
