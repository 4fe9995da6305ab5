"""AdmissionService end to end through gRPC, against a real server process:
the lease life cycle, the queue, rich errors, expiry, Watch and shutdown."""

from __future__ import annotations

import stat
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from lmx.v1 import admission_pb2 as pb

from .support import (
    GiB,
    MiB,
    RPC_TIMEOUT_S,
    WatchStream,
    acquire_request,
    call_error,
    cap_of,
    device_status,
    result_of,
    status,
    stub,
    wait_until,
)

CAP = cap_of(8 * GiB)  # the default server's one device, cpu:0 = 8 GiB
INT64_MAX = (1 << 63) - 1
SHORT_TTL = ["--min-ttl-s", "0.05", "--sweep-interval-s", "0.02"]


def release(admission, lease: pb.Lease) -> int:
    return admission.Release(pb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch),
                             timeout=RPC_TIMEOUT_S).released_bytes


def assert_book_empty(admission, device: str = "cpu:0") -> None:
    snap = status(admission)
    assert not snap.leases, f"leases left over: {[lease.lease_id for lease in snap.leases]}"
    assert not snap.waiters, f"waiters left over: {list(snap.waiters)}"
    dev = next(d for d in snap.devices if d.device == device)
    assert (dev.leased_bytes, dev.free_bytes) == (0, dev.budget_bytes), dev


# ---- the life cycle ------------------------------------------------------------

def test_acquire_renew_resize_release_status(admission_stub):
    admission = admission_stub
    before = device_status(admission)
    assert (before.total_bytes, before.cap_bytes, before.budget_bytes) == (8 * GiB, CAP, CAP)
    assert (before.name, before.source, before.foreign_bytes) == ("simulated", "simulated", 0)

    lease = admission.Acquire(acquire_request(2 * GiB, name="agent/code", ttl_ms=5000),
                              timeout=RPC_TIMEOUT_S).lease
    assert lease.lease_id.startswith("lease-")
    assert (lease.device, lease.bytes, lease.ttl_ms) == ("cpu:0", 2 * GiB, 5000)
    assert (lease.holder.name, lease.holder.pid, lease.purpose) == ("agent/code", 4242,
                                                                    pb.PURPOSE_KV)
    assert lease.epoch > 0
    assert 0 < lease.expires_in_ms <= 5000

    snap = status(admission)
    assert [held.lease_id for held in snap.leases] == [lease.lease_id]
    dev = snap.devices[0]
    assert (dev.leased_bytes, dev.free_bytes, dev.num_leases) == (2 * GiB, CAP - 2 * GiB, 1)

    time.sleep(0.1)
    renewed = admission.Renew(pb.RenewRequest(lease_id=lease.lease_id, epoch=lease.epoch),
                              timeout=RPC_TIMEOUT_S).lease
    assert renewed.epoch == lease.epoch, "Renew must keep the fencing epoch"
    assert renewed.since_renewal_s < 0.05 <= renewed.age_s, \
        f"Renew did not restart the TTL: {renewed}"

    grown = admission.Resize(pb.ResizeRequest(lease_id=lease.lease_id, epoch=lease.epoch,
                                              bytes=3 * GiB), timeout=RPC_TIMEOUT_S).lease
    assert (grown.bytes, grown.epoch) == (3 * GiB, lease.epoch)
    assert device_status(admission).leased_bytes == 3 * GiB

    shrunk = admission.Resize(pb.ResizeRequest(lease_id=lease.lease_id, epoch=lease.epoch,
                                               bytes=1 * GiB), timeout=RPC_TIMEOUT_S).lease
    assert shrunk.bytes == 1 * GiB
    assert device_status(admission).leased_bytes == 1 * GiB

    assert release(admission, lease) == 1 * GiB
    assert_book_empty(admission)


def test_every_grant_takes_a_larger_epoch(admission_stub):
    epochs = []
    for _ in range(5):
        lease = admission_stub.Acquire(acquire_request(MiB), timeout=RPC_TIMEOUT_S).lease
        epochs.append(lease.epoch)
        release(admission_stub, lease)
    assert epochs == sorted(set(epochs)), f"epochs not strictly increasing: {epochs}"


def test_any_device_goes_where_most_room_is(start_admission):
    server = start_admission("--device", "cpu:0=1GiB", "--device", "cpu:1=2GiB")
    with grpc.insecure_channel(server.address) as channel:
        admission = stub(channel)
        snap = status(admission)
        assert [(d.device, d.budget_bytes) for d in snap.devices] == [
            ("cpu:0", cap_of(GiB)), ("cpu:1", cap_of(2 * GiB))]
        first = admission.Acquire(acquire_request(800 * MiB), timeout=RPC_TIMEOUT_S).lease
        assert first.device == "cpu:1", "an any-device request must go where most room is"
        pinned = admission.Acquire(acquire_request(800 * MiB, device="cpu:0"),
                                   timeout=RPC_TIMEOUT_S).lease
        assert pinned.device == "cpu:0"
        for lease in (first, pinned):
            release(admission, lease)


# ---- the queue -----------------------------------------------------------------

def test_queued_acquire_is_granted_when_a_lease_is_released(admission_stub):
    admission = admission_stub
    big = admission.Acquire(acquire_request(6 * GiB, name="agent/big"),
                            timeout=RPC_TIMEOUT_S).lease
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(admission.Acquire,
                              acquire_request(4 * GiB, name="agent/waits", wait_ms=10_000),
                              timeout=15)
        snap = wait_until(lambda: (s := status(admission)).waiters and s, 5,
                          "the second Acquire to show up in Status' queue")
        assert [(w.holder.name, w.bytes) for w in snap.waiters] == [("agent/waits", 4 * GiB)]
        assert snap.devices[0].num_waiting == 1
        assert not waiting.done(), "the Acquire that does not fit must wait"

        released_at = time.monotonic()
        release(admission, big)
        lease = result_of(waiting, "the queued Acquire, after the release").lease
        assert time.monotonic() - released_at < 2, "the waiter was not served on the release"
    assert (lease.holder.name, lease.bytes, lease.device) == ("agent/waits", 4 * GiB, "cpu:0")
    snap = status(admission)
    assert not snap.waiters
    assert [held.lease_id for held in snap.leases] == [lease.lease_id]
    release(admission, lease)
    assert_book_empty(admission)


def test_queued_resize_grows_when_memory_comes_back(admission_stub):
    admission = admission_stub
    other = admission.Acquire(acquire_request(4 * GiB, name="agent/other"),
                              timeout=RPC_TIMEOUT_S).lease
    mine = admission.Acquire(acquire_request(2 * GiB, name="agent/grows"),
                             timeout=RPC_TIMEOUT_S).lease
    with ThreadPoolExecutor(1) as pool:
        growing = pool.submit(admission.Resize,
                              pb.ResizeRequest(lease_id=mine.lease_id, epoch=mine.epoch,
                                               bytes=5 * GiB, wait_ms=10_000), timeout=15)
        snap = wait_until(lambda: (s := status(admission)).waiters and s, 5,
                          "the growth to show up in Status' queue")
        assert [(w.lease_id, w.bytes) for w in snap.waiters] == [(mine.lease_id, 3 * GiB)]
        release(admission, other)
        grown = result_of(growing, "the queued growth, after the release").lease
    assert (grown.lease_id, grown.bytes, grown.epoch) == (mine.lease_id, 5 * GiB, mine.epoch)
    assert release(admission, grown) == 5 * GiB
    assert_book_empty(admission)


# ---- RESOURCE_EXHAUSTED --------------------------------------------------------

def test_resource_exhausted_says_what_is_missing_and_when_to_retry(admission_stub):
    admission = admission_stub
    big = admission.Acquire(acquire_request(6 * GiB, ttl_ms=3000), timeout=RPC_TIMEOUT_S).lease
    free = CAP - 6 * GiB

    error, details = call_error(admission.Acquire, acquire_request(4 * GiB, device="cpu:0"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert details.reason == "INSUFFICIENT_DEVICE_MEMORY", details
    assert details.metadata == {"device": "cpu:0", "requested_bytes": str(4 * GiB),
                                "free_bytes": str(free),
                                "missing_bytes": str(4 * GiB - free)}, details
    # The soonest expiry is big's (3 s TTL): retry then, within [0.1, 5] s.
    assert details.retry_after_s is not None and 2.0 < details.retry_after_s <= 3.0, details

    started = time.monotonic()
    error, details = call_error(admission.Acquire,
                                acquire_request(4 * GiB, wait_ms=300), timeout=10)
    waited = time.monotonic() - started
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert 0.25 < waited < 3, f"wait_ms=300 failed after {waited:.2f}s"
    assert details.metadata["missing_bytes"] == str(4 * GiB - free)
    assert not status(admission).waiters, "a waiter that timed out must leave the queue"

    # A growth that does not fit is refused the same way.
    small = admission.Acquire(acquire_request(512 * MiB), timeout=RPC_TIMEOUT_S).lease
    free -= 512 * MiB
    error, details = call_error(admission.Resize, pb.ResizeRequest(
        lease_id=small.lease_id, epoch=small.epoch, bytes=512 * MiB + free + 1))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert details.metadata["requested_bytes"] == str(free + 1), details
    assert details.metadata["missing_bytes"] == "1", details
    assert "grow lease" in details.message
    assert device_status(admission).leased_bytes == 6 * GiB + 512 * MiB, \
        "a refused growth changed the book"
    release(admission, small)
    release(admission, big)
    assert_book_empty(admission)


# ---- expiry --------------------------------------------------------------------

@pytest.mark.parametrize("admission", [SHORT_TTL], indirect=True)
def test_a_lease_not_renewed_expires(admission_stub):
    admission = admission_stub
    lease = admission.Acquire(acquire_request(GiB, ttl_ms=200), timeout=RPC_TIMEOUT_S).lease
    assert lease.ttl_ms == 200
    assert [held.lease_id for held in status(admission).leases] == [lease.lease_id]
    wait_until(lambda: not status(admission).leases, 3, "the unrenewed lease to expire")
    assert device_status(admission).free_bytes == CAP, "an expired lease's bytes did not come back"

    for rpc, request in [
        (admission.Renew, pb.RenewRequest(lease_id=lease.lease_id, epoch=lease.epoch)),
        (admission.Resize, pb.ResizeRequest(lease_id=lease.lease_id, epoch=lease.epoch,
                                            bytes=MiB)),
        (admission.Release, pb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch)),
    ]:
        error, details = call_error(rpc, request)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, (rpc, error)
        assert details.reason == "LEASE_EXPIRED", details
        assert "expired" in details.message


@pytest.mark.parametrize("admission", [SHORT_TTL], indirect=True)
def test_a_renewed_lease_outlives_its_ttl(admission_stub):
    admission = admission_stub
    lease = admission.Acquire(acquire_request(GiB, ttl_ms=500), timeout=RPC_TIMEOUT_S).lease
    until = time.monotonic() + 1.5
    while time.monotonic() < until:
        time.sleep(0.1)
        admission.Renew(pb.RenewRequest(lease_id=lease.lease_id, epoch=lease.epoch),
                        timeout=RPC_TIMEOUT_S)
    assert [held.lease_id for held in status(admission).leases] == [lease.lease_id], \
        "a lease renewed every 100 ms with a 500 ms TTL expired"
    release(admission, lease)


# ---- Watch ---------------------------------------------------------------------

@pytest.mark.parametrize("admission", [SHORT_TTL], indirect=True)
def test_watch_streams_every_change_in_order(admission_stub):
    admission = admission_stub
    # The default device: cpu:0 of 8 GiB, cap 0.9. With agent/big's 6 GiB held,
    # a 4 GiB waiter misses this much, which is asked of agent/big.
    RECLAIM_ASKED = 4 * GiB - (int(8 * GiB * 0.9) - 6 * GiB)
    watch = WatchStream(admission)
    try:
        last_seq = watch.sync(admission)
        big = admission.Acquire(acquire_request(6 * GiB, name="agent/big"),
                                timeout=RPC_TIMEOUT_S).lease
        error, _ = call_error(admission.Acquire, acquire_request(
            4 * GiB, name="agent/gives-up", device="cpu:0", wait_ms=150))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(admission.Acquire, acquire_request(
                4 * GiB, name="agent/waits", device="cpu:0", wait_ms=10_000), timeout=15)
            wait_until(lambda: status(admission).waiters, 5, "agent/waits to queue")
            admission.Resize(pb.ResizeRequest(lease_id=big.lease_id, epoch=big.epoch,
                                              bytes=3 * GiB), timeout=RPC_TIMEOUT_S)
            waiter_lease = result_of(
                waiting, "agent/waits' Acquire, after agent/big shrank to make room").lease
        release(admission, waiter_lease)
        short = admission.Acquire(acquire_request(GiB, name="agent/forgets", ttl_ms=200),
                                  timeout=RPC_TIMEOUT_S).lease
        wait_until(lambda: not any(held.lease_id == short.lease_id
                                   for held in status(admission).leases), 3,
                   "agent/forgets' lease to expire")
        release(admission, big)

        expected = [
            ("granted", "agent/big", 6 * GiB),
            ("queued", "agent/gives-up", 4 * GiB),
            # memory pressure: the holder of the device is asked for the shortfall
            ("reclaim_requested", "agent/big", RECLAIM_ASKED),
            ("left", "agent/gives-up", 4 * GiB),
            ("queued", "agent/waits", 4 * GiB),
            ("resized", "agent/big", 3 * GiB),
            ("granted", "agent/waits", 4 * GiB),
            ("released", "agent/waits", 4 * GiB),
            ("granted", "agent/forgets", GiB),
            ("expired", "agent/forgets", GiB),
            ("released", "agent/big", 3 * GiB),
        ]
        events = [watch.next() for _ in expected]
    finally:
        watch.close()

    def summary(event: pb.Event) -> tuple[str, str, int]:
        kind = event.WhichOneof("kind")
        body = getattr(event, kind)
        if kind.startswith("reclaim_"):
            return kind, body.reclaim.lease.holder.name, body.reclaim.bytes
        item = body.waiter if kind in ("queued", "left") else body.lease
        return kind, item.holder.name, item.bytes

    assert [summary(event) for event in events] == expected
    seqs = [event.seq for event in events]
    assert seqs == list(range(last_seq + 1, last_seq + 1 + len(expected))), \
        f"seq must grow by one per event after {last_seq}: {seqs}"
    assert all(event.device == "cpu:0" for event in events), [e.device for e in events]
    assert events[2].reclaim_requested.reclaim.for_holder == "agent/gives-up"
    assert events[3].left.reason == pb.WaiterLeft.REASON_TIMED_OUT
    assert events[5].resized.old_bytes == 6 * GiB
    assert events[5].resized.lease.lease_id == big.lease_id
    assert events[6].granted.waited_s > 0
    assert events[6].granted.lease.lease_id == waiter_lease.lease_id
    assert events[9].expired.lease.lease_id == short.lease_id
    times = [event.time_unix for event in events]
    assert times == sorted(times) and abs(times[-1] - time.time()) < 60, times


def test_sigterm_ends_open_watch_streams_and_exits_quickly(start_admission):
    server = start_admission("--grace-s", "5")
    with grpc.insecure_channel(server.address) as channel:
        admission = stub(channel)
        watches = [WatchStream(admission) for _ in range(3)]
        for watch in watches:
            watch.sync(admission)
        server.terminate()
        code, took = server.wait_exit(timeout_s=4)
        assert code == 0, f"admission exited with {code}; log:\n{server.log_tail()}"
        assert took < 2, f"shutdown took {took:.1f}s with Watch streams open (grace is 5 s)"
        for watch in watches:
            assert watch.ended.wait(2), "a Watch stream stayed open after the server stopped"
            assert watch.error is None, f"Watch ended {watch.describe_end()}, not with OK"
    assert '"server_stopped"' in server.log()


def test_sigterm_with_a_waiting_acquire_ends_it_within_the_grace(start_admission):
    server = start_admission("--grace-s", "1")
    with grpc.insecure_channel(server.address) as channel:
        admission = stub(channel)
        admission.Acquire(acquire_request(6 * GiB), timeout=RPC_TIMEOUT_S)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(admission.Acquire,
                                  acquire_request(4 * GiB, wait_ms=60_000), timeout=30)
            wait_until(lambda: status(admission).waiters, 5, "the Acquire to queue")
            server.terminate()
            code, took = server.wait_exit(timeout_s=4)
            with pytest.raises(grpc.RpcError) as ended:
                waiting.result(timeout=5)
    assert code == 0, f"admission exited with {code}; log:\n{server.log_tail()}"
    assert took < 3, f"shutdown took {took:.1f}s with a waiting Acquire (grace is 1 s)"
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value


# ---- bad input -----------------------------------------------------------------

def _holder(name: str = "test/holder") -> pb.Holder:
    return pb.Holder(name=name, pid=1)


BAD_ACQUIRES = {
    "zero bytes": (pb.AcquireRequest(holder=_holder(), bytes=0, purpose=pb.PURPOSE_KV), "bytes"),
    "negative bytes": (pb.AcquireRequest(holder=_holder(), bytes=-1, purpose=pb.PURPOSE_KV),
                       "bytes"),
    "int64 min bytes": (pb.AcquireRequest(holder=_holder(), bytes=-(1 << 63),
                                          purpose=pb.PURPOSE_KV), "bytes"),
    "bytes over the cap": (pb.AcquireRequest(holder=_holder(), bytes=CAP + 1,
                                             purpose=pb.PURPOSE_KV), "bytes"),
    "absurd bytes": (pb.AcquireRequest(holder=_holder(), bytes=INT64_MAX,
                                       purpose=pb.PURPOSE_KV), "bytes"),
    "unknown device": (pb.AcquireRequest(holder=_holder(), bytes=1, device="gpu:9",
                                         purpose=pb.PURPOSE_KV), "device"),
    "huge device name": (pb.AcquireRequest(holder=_holder(), bytes=1, device="d" * 100_000,
                                           purpose=pb.PURPOSE_KV), "device"),
    "missing holder": (pb.AcquireRequest(bytes=1, purpose=pb.PURPOSE_KV), "holder"),
    "empty holder name": (pb.AcquireRequest(holder=pb.Holder(name=""), bytes=1,
                                            purpose=pb.PURPOSE_KV), "holder.name"),
    "blank holder name": (pb.AcquireRequest(holder=pb.Holder(name="  "), bytes=1,
                                            purpose=pb.PURPOSE_KV), "holder.name"),
    "unprintable holder name": (pb.AcquireRequest(holder=pb.Holder(name="a\x00b"), bytes=1,
                                                  purpose=pb.PURPOSE_KV), "holder.name"),
    "long holder name": (pb.AcquireRequest(holder=pb.Holder(name="x" * 300), bytes=1,
                                           purpose=pb.PURPOSE_KV), "holder.name"),
    "missing purpose": (pb.AcquireRequest(holder=_holder(), bytes=1), "purpose"),
    "unknown purpose": (pb.AcquireRequest(holder=_holder(), bytes=1, purpose=99), "purpose"),
    "negative wait_ms": (pb.AcquireRequest(holder=_holder(), bytes=1, purpose=pb.PURPOSE_KV,
                                           wait_ms=-1), "wait_ms"),
    "priority out of range": (pb.AcquireRequest(holder=_holder(), bytes=1,
                                                purpose=pb.PURPOSE_KV, priority=5000),
                              "priority"),
    "negative ttl_ms": (pb.AcquireRequest(holder=_holder(), bytes=1, purpose=pb.PURPOSE_KV,
                                          ttl_ms=-1), "ttl_ms"),
}


def _assert_still_serving(admission, *, leases: int = 0) -> None:
    snap = status(admission)  # raises if the server stopped answering
    assert len(snap.leases) == leases, f"a refused request changed the book: {snap.leases}"
    assert not snap.waiters


@pytest.mark.parametrize("request_, field", BAD_ACQUIRES.values(), ids=BAD_ACQUIRES.keys())
def test_bad_acquire_is_invalid_argument_naming_the_field(shared_stub, request_, field):
    error, details = call_error(shared_stub.Acquire, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert details.field == field, f"BadRequest names {details.field!r}, not {field!r}"
    assert details.message.startswith(f"{field}: ")
    assert len(details.message) < 2000, "the error message must not echo huge input"
    _assert_still_serving(shared_stub)


def _bad_on_lease(lease: pb.Lease) -> dict:
    lid, epoch = lease.lease_id, lease.epoch
    return {
        "resize to zero": (pb.ResizeRequest(lease_id=lid, epoch=epoch, bytes=0), "bytes"),
        "resize negative": (pb.ResizeRequest(lease_id=lid, epoch=epoch, bytes=-5), "bytes"),
        "resize over the cap": (pb.ResizeRequest(lease_id=lid, epoch=epoch, bytes=CAP + 1),
                                "bytes"),
        "resize absurd": (pb.ResizeRequest(lease_id=lid, epoch=epoch, bytes=INT64_MAX), "bytes"),
        "resize negative wait_ms": (pb.ResizeRequest(lease_id=lid, epoch=epoch, bytes=2,
                                                     wait_ms=-1), "wait_ms"),
        "resize without lease_id": (pb.ResizeRequest(epoch=epoch, bytes=2), "lease_id"),
        "renew without lease_id": (pb.RenewRequest(epoch=epoch), "lease_id"),
        "release without lease_id": (pb.ReleaseRequest(epoch=epoch), "lease_id"),
    }


def test_bad_requests_on_a_lease_are_invalid_argument(shared_stub):
    admission = shared_stub
    lease = admission.Acquire(acquire_request(MiB), timeout=RPC_TIMEOUT_S).lease
    rpcs = {pb.ResizeRequest: admission.Resize, pb.RenewRequest: admission.Renew,
            pb.ReleaseRequest: admission.Release}
    failures = []
    for name, (request_, field) in _bad_on_lease(lease).items():
        error, details = call_error(rpcs[type(request_)], request_)
        if error.code() != grpc.StatusCode.INVALID_ARGUMENT or details.field != field:
            failures.append(f"{name}: {error.code().name} field={details.field!r} "
                            f"(want INVALID_ARGUMENT field={field!r}): {details.message}")
        _assert_still_serving(admission, leases=1)
    snap = status(admission)
    assert [(held.lease_id, held.bytes) for held in snap.leases] == [(lease.lease_id, MiB)], \
        "a refused request changed the lease"
    release(admission, lease)
    assert not failures, "\n".join(failures)


def test_undecodable_request_is_invalid_argument(shared_admission, shared_stub):
    with grpc.insecure_channel(shared_admission.address) as channel:
        raw = channel.unary_unary("/lmx.v1.AdmissionService/Acquire")
        error, details = call_error(raw, b"\xff\xff\xff")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert details.field == "request", details
    _assert_still_serving(shared_stub)


# ---- NOT_FOUND and FAILED_PRECONDITION -----------------------------------------

def _lease_rpcs(admission, lease_id: str, epoch: int):
    return [
        ("Renew", admission.Renew, pb.RenewRequest(lease_id=lease_id, epoch=epoch)),
        ("Resize", admission.Resize, pb.ResizeRequest(lease_id=lease_id, epoch=epoch, bytes=MiB)),
        ("Release", admission.Release, pb.ReleaseRequest(lease_id=lease_id, epoch=epoch)),
    ]


@pytest.mark.parametrize("lease_id", ["lease-0000000000000000", "nonsense", "x" * 50_000])
def test_unknown_lease_is_not_found(shared_stub, lease_id):
    for name, rpc, request_ in _lease_rpcs(shared_stub, lease_id, 1):
        error, details = call_error(rpc, request_)
        assert error.code() == grpc.StatusCode.NOT_FOUND, f"{name}: {error}"
        assert "unknown lease" in details.message, f"{name}: {details.message[:200]}"
    _assert_still_serving(shared_stub)


def test_released_lease_is_not_found(shared_stub):
    lease = shared_stub.Acquire(acquire_request(MiB), timeout=RPC_TIMEOUT_S).lease
    release(shared_stub, lease)
    for name, rpc, request_ in _lease_rpcs(shared_stub, lease.lease_id, lease.epoch):
        error, _ = call_error(rpc, request_)
        assert error.code() == grpc.StatusCode.NOT_FOUND, f"{name} of a released lease: {error}"
    _assert_still_serving(shared_stub)


def test_wrong_epoch_is_failed_precondition(shared_stub):
    lease = shared_stub.Acquire(acquire_request(2 * MiB), timeout=RPC_TIMEOUT_S).lease
    for epoch in (lease.epoch + 1, lease.epoch - 1, 0, (1 << 64) - 1):
        for name, rpc, request_ in _lease_rpcs(shared_stub, lease.lease_id, epoch):
            error, details = call_error(rpc, request_)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, \
                f"{name} with epoch {epoch}: {error}"
            assert details.reason == "STALE_EPOCH", details
    snap = status(shared_stub)
    assert [(held.lease_id, held.bytes) for held in snap.leases] == [(lease.lease_id, 2 * MiB)], \
        "a stale-epoch request changed the lease"
    assert release(shared_stub, lease) == 2 * MiB, "the right epoch no longer works"


@pytest.mark.parametrize("admission", [SHORT_TTL], indirect=True)
def test_a_growth_waiting_when_its_lease_expires_fails_and_leaves_the_queue(admission_stub):
    admission = admission_stub
    big = admission.Acquire(acquire_request(6 * GiB), timeout=RPC_TIMEOUT_S).lease
    short = admission.Acquire(acquire_request(GiB, ttl_ms=300), timeout=RPC_TIMEOUT_S).lease
    started = time.monotonic()
    error, details = call_error(admission.Resize, pb.ResizeRequest(
        lease_id=short.lease_id, epoch=short.epoch, bytes=2 * GiB, wait_ms=3000), timeout=10)
    assert time.monotonic() - started < 2, "the growth waited on after its lease expired"
    # The ledger says NOT_FOUND ("released or expired while the resize
    # waited"); the README's table would say FAILED_PRECONDITION
    # (LEASE_EXPIRED) for an expired lease. Either tells the holder it is gone.
    assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), error
    assert "expired" in details.message, details
    snap = status(admission)
    assert [held.lease_id for held in snap.leases] == [big.lease_id]
    assert not snap.waiters, "the failed growth is still queued"
    assert snap.devices[0].leased_bytes == 6 * GiB
    release(admission, big)


def test_a_message_over_max_message_bytes_is_refused_and_the_server_serves_on(start_admission):
    """--max-message-bytes: a request over it is RESOURCE_EXHAUSTED from gRPC
    itself, before any handler; the server answers the next call."""
    server = start_admission("--device", "cpu:0=1GiB", "--max-message-bytes", "64KiB")
    with grpc.insecure_channel(server.address) as channel:
        big = pb.ReleaseRequest(lease_id="x" * (100 << 10))
        with pytest.raises(grpc.RpcError) as caught:
            stub(channel).Release(big, timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
        assert stub(channel).Status(pb.StatusRequest(), timeout=5).devices


def test_a_lease_acquired_with_a_secret_needs_it_to_be_touched(admission):
    """Lease ids and epochs are public (Status); a lease acquired with a
    secret cannot be resized, renewed or released without it."""
    with grpc.insecure_channel(admission.address) as channel:
        lease = stub(channel).Acquire(acquire_request(1 << 20, secret="s3cret-1"),
                                      timeout=5).lease
        listed = stub(channel).Status(pb.StatusRequest(), timeout=5)
        assert "s3cret" not in str(listed), "Status shows a lease's secret"
        public = next(item for item in listed.leases if item.lease_id == lease.lease_id)
        for wrong in ("", "guess"):
            for call, request in (
                    (stub(channel).Release, pb.ReleaseRequest(lease_id=public.lease_id,
                                                              epoch=public.epoch, secret=wrong)),
                    (stub(channel).Renew, pb.RenewRequest(lease_id=public.lease_id,
                                                          epoch=public.epoch, secret=wrong)),
                    (stub(channel).Resize, pb.ResizeRequest(lease_id=public.lease_id,
                                                            epoch=public.epoch, bytes=1,
                                                            secret=wrong))):
                with pytest.raises(grpc.RpcError) as caught:
                    call(request, timeout=5)
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value
        assert stub(channel).Renew(pb.RenewRequest(lease_id=lease.lease_id, epoch=lease.epoch,
                                                   secret="s3cret-1"), timeout=5).lease.bytes
        released = stub(channel).Release(pb.ReleaseRequest(
            lease_id=lease.lease_id, epoch=lease.epoch, secret="s3cret-1"), timeout=5)
        assert released.released_bytes == 1 << 20
        # A lease acquired without one stays open, as before.
        open_lease = stub(channel).Acquire(acquire_request(1 << 20), timeout=5).lease
        stub(channel).Release(pb.ReleaseRequest(lease_id=open_lease.lease_id,
                                                epoch=open_lease.epoch), timeout=5)


def test_a_restart_with_leases_out_grants_nothing_until_their_holders_let_go(start_admission,
                                                                             tmp_path):
    """Killed with leases out and started again, admission does not know them,
    but their holders may still use the memory until their next renewal tells
    them: it grants nothing for the longest TTL it had out. A clean stop with
    nothing out leaves no file and no pause."""
    book = tmp_path / "book.json"
    flags = ("--device", "cpu:0=1GiB", "--state-file", str(book))
    first = start_admission(*flags)
    with grpc.insecure_channel(first.address) as channel:
        stub(channel).Acquire(acquire_request(1 << 20, ttl_ms=2000), timeout=5)
    wait_until(lambda: book.exists() and '"leases": 1' in book.read_text(), 5,
               "the book file to note the lease")
    assert stat.S_IMODE(book.stat().st_mode) == 0o600
    first.signalled = True
    first.kill()
    port = first.address.rpartition(":")[2]
    second = start_admission(*flags, "--listen", f"127.0.0.1:{port}")
    started = time.monotonic()
    with grpc.insecure_channel(second.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            stub(channel).Acquire(acquire_request(1 << 20), timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "restarted" in caught.value.details()
        lease = stub(channel).Acquire(acquire_request(1 << 20, wait_ms=10_000), timeout=15).lease
        waited = time.monotonic() - started
        assert 1.0 <= waited <= 6.0, f"granted after {waited:.1f}s of a 2 s grace"
        stub(channel).Release(pb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch),
                              timeout=5)
    second.stop()
    assert not book.exists(), "a clean stop with nothing out should leave no book file"
    third = start_admission(*flags, "--listen", f"127.0.0.1:{port}")
    with grpc.insecure_channel(third.address) as channel:
        assert stub(channel).Acquire(acquire_request(1 << 20), timeout=5).lease.bytes
