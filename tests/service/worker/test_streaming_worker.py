"""A streamed worker (--resident-fraction 0.3: 9 of SmolLM2's 30 decoder
layers on the "device", 21 in host memory streamed through a ring of two)
generates exactly what Hugging Face generate does (float32, CPU), alone and
with sessions batched together; its lease covers only the resident layers
and the ring; status and admission say it streams."""

from __future__ import annotations

import pytest

from lmx.v1 import admission_pb2 as apb
from services.stack.ps import worker_state

from .test_exactness import INPUTS, assert_matches_reference, generate_once
from .worker_support import SMOLLM2, run_concurrently

pytestmark = pytest.mark.timeout(240, func_only=True)


def _admission(tmp_path, device: str, *extra: str):
    """An admission of its own on a simulated device (`cpu:0=<size>`)."""
    from services.common.launch import start_service

    return start_service("services.admission", "lmx.v1.AdmissionService",
                         ["--device", device, "--log-format", "json", *extra,
                          "--state-file", "none"],
                         log_path=tmp_path / "admission.log")


def _waiter_beyond_free(stub, extra_bytes: int):
    """A plain holder asking for `extra_bytes` more than is free now, waiting
    for admission to ask the others: the lease it was granted, and what it
    asked."""
    free = next(d.free_bytes for d in stub.Status(apb.StatusRequest(), timeout=10).devices)
    asked = free + extra_bytes
    lease = stub.Acquire(apb.AcquireRequest(
        holder=apb.Holder(name="agent/waiter"), bytes=asked, wait_ms=30_000,
        purpose=apb.PURPOSE_OTHER, ttl_ms=600_000), timeout=40).lease
    return lease, asked


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights-shm")


@pytest.fixture(scope="module")
def streamed(worker_fleet, worker_admission, weights_dir):
    return worker_fleet.ready("smollm2-streamed", SMOLLM2, worker_admission.address,
                              "--resident-fraction", "0.3", "--stream-ring", "2",
                              "--kvstore", "none", "--weights-shm-dir", str(weights_dir))


def test_streamed_greedy_equals_hugging_face(streamed, references):
    for item in INPUTS[SMOLLM2][:2]:
        got = generate_once(streamed.address, item)
        assert_matches_reference(SMOLLM2, item, got, references(SMOLLM2), "streamed, alone")


def test_streamed_sessions_batched_together_stay_exact(streamed, references):
    items = INPUTS[SMOLLM2]
    results = run_concurrently({i: (lambda item=item: generate_once(streamed.address, item))
                                for i, item in enumerate(items)}, timeout_s=200)
    for index, item in enumerate(items):
        assert_matches_reference(SMOLLM2, item, results[index], references(SMOLLM2),
                                 "streamed, batched")


def test_status_lease_and_admission_show_the_streaming(streamed, smollm2_worker,
                                                       worker_admission):
    from .worker_support import WorkerClient
    with WorkerClient(streamed.address) as client:
        status = client.status()
    with WorkerClient(smollm2_worker.address) as client:
        resident = client.status()
    assert status.resident_fraction == pytest.approx(0.3)
    per_layer = status.streamed_bytes // 21
    assert status.streamed_bytes > 0 and per_layer * 21 == status.streamed_bytes
    # The weights lease: all of the weights less 21 layers, plus a ring of 2.
    assert resident.leased_bytes - status.leased_bytes == pytest.approx(19 * per_layer, rel=0.02)
    assert resident.resident_fraction == 1.0 and resident.streamed_bytes == 0
    from lmx.client import Client
    with Client(worker_admission.address) as admission:
        info = next(w for w in admission.workers() if w.address == streamed.address)
    assert info.resident_fraction == pytest.approx(0.3)
    assert worker_state(info) == "ready (streaming, 30% resident)"
    assert info.state == apb.WORKER_STATE_READY


def test_auto_streams_what_does_not_fit(tmp_path):
    """--resident-fraction auto on a device too small for the whole model
    (360 MiB of leases for SmolLM2's 513 MiB of float32 weights): the worker
    keeps as many layers resident as fit, streams the rest, and is exact."""
    from .test_exactness import Input
    from .worker_support import WorkerFleet

    admission = _admission(tmp_path, "cpu:0=400MiB")
    fleet = WorkerFleet(tmp_path)
    try:
        worker = fleet.ready("auto", SMOLLM2, admission.address, "--resident-fraction", "auto",
                             "--kv-chunk-bytes", "1MiB", "--kvstore", "none")
        from .worker_support import WorkerClient
        with WorkerClient(worker.address) as client:
            status = client.status()
        assert 0.2 < status.resident_fraction < 1.0, status.resident_fraction
        assert status.leased_bytes <= int((400 << 20) * 0.9)
        chosen = [line for line in worker.log_lines()
                  if line.get("event") == "worker_resident_fraction_chosen"]
        assert chosen and chosen[0]["resident_layers"] == round(status.resident_fraction * 30)
        item = Input("prompt", "The capital of France is")
        got = generate_once(worker.address, item)
        from .worker_support import Reference
        assert_matches_reference(SMOLLM2, item, got, Reference(SMOLLM2), "auto-streamed")
    finally:
        fleet.stop_all()
        admission.stop()


def test_a_second_worker_of_the_model_maps_the_first_ones_host_copy(
        streamed, worker_fleet, worker_admission, weights_dir):
    files = [f for f in weights_dir.iterdir() if not f.name.endswith(".lock")]
    assert len(files) == 1 and files[0].stat().st_size == 21 * 14_160_384, files
    second = worker_fleet.ready("smollm2-streamed-2", SMOLLM2, worker_admission.address,
                                "--resident-fraction", "0.3", "--kvstore", "none",
                                "--weights-shm-dir", str(weights_dir))
    try:
        events = [line.get("event") for line in second.log_lines()]
        assert "shared_weights_mapped" in events and "shared_weights_written" not in events
        item = INPUTS[SMOLLM2][0]
        assert generate_once(second.address, item).token_ids == \
            generate_once(streamed.address, item).token_ids
    finally:
        worker_fleet.stop("smollm2-streamed-2")
    assert [f for f in weights_dir.iterdir() if not f.name.endswith(".lock")] == files, (
        "the first worker still uses the file")


def test_a_streamed_worker_takes_its_layers_back_when_memory_frees(tmp_path):
    """Started while another holder keeps most of the device, an auto worker
    streams; once that memory is released it grows its lease and brings its
    layers back to the device, between steps, and stays exact."""
    import time

    import grpc

    from lmx.v1 import admission_pb2_grpc
    from .test_exactness import Input
    from .worker_support import Reference, WorkerClient, WorkerFleet

    admission = _admission(tmp_path, "cpu:0=800MiB")
    fleet = WorkerFleet(tmp_path)
    try:
        with grpc.insecure_channel(admission.address) as channel:
            stub = admission_pb2_grpc.AdmissionServiceStub(channel)
            blocker = stub.Acquire(apb.AcquireRequest(
                holder=apb.Holder(name="agent/blocker"), bytes=400 << 20,
                purpose=apb.PURPOSE_OTHER, ttl_ms=600_000), timeout=10).lease
            # --stream-max-share 1: stream what does not fit now, however much
            # (the default would wait for the blocker to give its memory back).
            worker = fleet.ready("grow", SMOLLM2, admission.address, "--resident-fraction",
                                 "auto", "--kv-chunk-bytes", "1MiB", "--kvstore", "none",
                                 "--stream-grow-interval-s", "0.5", "--stream-max-share", "1")
            with WorkerClient(worker.address) as client:
                before = client.status().resident_fraction
            assert before < 1.0, "with the blocker holding 400 MiB the worker should stream"
            item = Input("prompt", "The capital of France is")
            streamed_ids = generate_once(worker.address, item).token_ids
            stub.Release(apb.ReleaseRequest(lease_id=blocker.lease_id, epoch=blocker.epoch),
                         timeout=10)
        deadline = time.monotonic() + 30
        with WorkerClient(worker.address) as client:
            while client.status().resident_fraction < 1.0 and time.monotonic() < deadline:
                time.sleep(0.2)
            after = client.status()
        assert after.resident_fraction == 1.0 and after.streamed_bytes == 0, after
        got = generate_once(worker.address, item)
        assert got.token_ids == streamed_ids
        assert_matches_reference(SMOLLM2, item, got, Reference(SMOLLM2), "grown back")
    finally:
        fleet.stop_all()
        admission.stop()


def test_a_share_that_was_set_does_not_grow(streamed):
    """--resident-fraction 0.3 stays 0.3 though the device has room (growing
    back is for auto)."""
    import time

    from .worker_support import WorkerClient
    time.sleep(1.0)
    with WorkerClient(streamed.address) as client:
        assert client.status().resident_fraction == pytest.approx(0.3)
    events = [line.get("event") for line in streamed.log_lines()]
    assert "layers_made_resident" not in events


def test_a_streamed_worker_streams_more_to_make_room_and_goes_on(tmp_path):
    """Memory short and a waiter queued: an auto worker that already streams
    answers admission's ask for its weights by streaming more of its layers
    (what the waiter misses), not by sleeping; the waiter is granted and the
    worker still answers exactly."""
    import grpc

    from lmx.v1 import admission_pb2_grpc
    from .test_exactness import Input
    from .worker_support import Reference, WorkerClient, WorkerFleet

    admission = _admission(tmp_path, "cpu:0=800MiB", "--reclaim-deadline-s", "2")
    fleet = WorkerFleet(tmp_path)
    try:
        with grpc.insecure_channel(admission.address) as channel:
            stub = admission_pb2_grpc.AdmissionServiceStub(channel)
            # Held above the waiter's priority: admission never asks it back.
            stub.Acquire(apb.AcquireRequest(
                holder=apb.Holder(name="agent/blocker"), bytes=300 << 20, priority=10,
                purpose=apb.PURPOSE_OTHER, ttl_ms=600_000), timeout=10)
            worker = fleet.ready("shrink", SMOLLM2, admission.address, "--resident-fraction",
                                 "auto", "--kv-chunk-bytes", "1MiB", "--kvstore", "none",
                                 "--max-prefill-tokens", "256", "--stream-grow-interval-s", "0",
                                 "--stream-max-share", "1")
            with WorkerClient(worker.address) as client:
                before = client.status()
            assert 0 < before.resident_fraction < 1.0
            item = Input("prompt", "The capital of France is")
            want = generate_once(worker.address, item).token_ids
            # Three layers' worth more than is free:
            lease, asked = _waiter_beyond_free(stub, 40 << 20)
            assert lease.bytes == asked, "the waiter should be granted"
            with WorkerClient(worker.address) as client:
                after = client.status()
            assert after.state == "ready", "the worker streams more; it does not sleep"
            assert after.resident_fraction < before.resident_fraction
            assert before.leased_bytes - after.leased_bytes >= 40 << 20
            events = [line.get("event") for line in worker.log_lines()]
            assert "layers_streamed_more" in events and "model_asleep" not in events
            # The waiter took all the room there was; once it is gone, the
            # worker (streaming more now) has room for its KV again.
            stub.Release(apb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch),
                         timeout=10)
            got = generate_once(worker.address, item)
            assert got.token_ids == want
            assert_matches_reference(SMOLLM2, item, got, Reference(SMOLLM2), "streamed more")
    finally:
        fleet.stop_all()
        admission.stop()


def test_a_resident_auto_worker_starts_streaming_to_make_room(tmp_path):
    """--resident-fraction auto on a device with room for the whole model:
    it loads fully resident; when a waiter then misses memory, it answers
    the ask for its weights by streaming the fewest layers that free what
    the waiter misses (a ring of two paid for out of them), not by sleeping,
    and answers exactly; once memory frees up, its layers come back."""
    import time

    import grpc

    from lmx.v1 import admission_pb2_grpc
    from .test_exactness import Input
    from .worker_support import Reference, WorkerClient, WorkerFleet

    admission = _admission(tmp_path, "cpu:0=1200MiB", "--reclaim-deadline-s", "2")
    fleet = WorkerFleet(tmp_path)
    try:
        with grpc.insecure_channel(admission.address) as channel:
            stub = admission_pb2_grpc.AdmissionServiceStub(channel)
            # Up to 6 of 30 layers may stream to make room (the default, 5%,
            # allows one: test_past_its_share_an_auto_worker_sleeps_instead).
            worker = fleet.ready("start", SMOLLM2, admission.address, "--resident-fraction",
                                 "auto", "--kv-chunk-bytes", "1MiB", "--kvstore", "none",
                                 "--max-prefill-tokens", "256", "--stream-grow-interval-s", "1",
                                 "--stream-max-share", "0.2")
            with WorkerClient(worker.address) as client:
                before = client.status()
            assert before.resident_fraction == 1.0 and before.streamed_bytes == 0
            item = Input("prompt", "The capital of France is")
            want = generate_once(worker.address, item).token_ids
            # Two layers' worth (14.2 MB each) more than is free:
            lease, asked = _waiter_beyond_free(stub, 20 << 20)
            assert lease.bytes == asked, "the waiter should be granted"
            with WorkerClient(worker.address) as client:
                after = client.status()
            assert after.state == "ready", "the worker streams; it does not sleep"
            # About 2 layers for the waiter + 2 for the ring: 3-4 of 30 stream.
            assert 25 / 30 <= after.resident_fraction < 1.0, after.resident_fraction
            assert before.leased_bytes - after.leased_bytes >= 20 << 20
            events = [line.get("event") for line in worker.log_lines()]
            assert "layers_streamed_more" in events and "model_asleep" not in events
            got = generate_once(worker.address, item)
            assert got.token_ids == want
            assert_matches_reference(SMOLLM2, item, got, Reference(SMOLLM2), "started streaming")
            stub.Release(apb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch),
                         timeout=10)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with WorkerClient(worker.address) as client:
                    now = client.status()
                if now.resident_fraction == 1.0:
                    break
                time.sleep(0.5)
            assert now.resident_fraction == 1.0, "its layers should come back once memory frees"
            assert generate_once(worker.address, item).token_ids == want
    finally:
        fleet.stop_all()
        admission.stop()


def test_past_its_share_an_auto_worker_sleeps_instead(tmp_path):
    """--resident-fraction auto with the default --stream-max-share (5%: one
    of SmolLM2's 30 layers): a waiter that misses more than one layer's
    worth is not made room for by streaming (every step would copy those
    layers over the host link) but by the model's sleep, whole; the waiter
    is granted, and the next request wakes the model, exact."""
    import time

    import grpc

    from lmx.v1 import admission_pb2_grpc
    from .test_exactness import Input
    from .worker_support import Reference, WorkerClient, WorkerFleet

    admission = _admission(tmp_path, "cpu:0=1200MiB", "--reclaim-deadline-s", "2")
    fleet = WorkerFleet(tmp_path)
    try:
        with grpc.insecure_channel(admission.address) as channel:
            stub = admission_pb2_grpc.AdmissionServiceStub(channel)
            worker = fleet.ready("turns", SMOLLM2, admission.address, "--resident-fraction",
                                 "auto", "--kv-chunk-bytes", "1MiB", "--kvstore", "none",
                                 "--max-prefill-tokens", "256", "--stream-grow-interval-s", "0")
            chosen = [line for line in worker.log_lines()
                      if line.get("event") == "worker_resident_fraction_chosen"]
            assert chosen and chosen[0]["fits_alone"] and chosen[0]["max_streamed"] == 1, chosen
            item = Input("prompt", "The capital of France is")
            want = generate_once(worker.address, item).token_ids
            # About three layers' worth more than is free:
            lease, asked = _waiter_beyond_free(stub, 40 << 20)
            assert lease.bytes == asked, "the waiter should be granted"
            def asleep(lines):
                return any(line.get("event") == "model_state" and line.get("state") == "asleep"
                           for line in lines)
            deadline = time.monotonic() + 10     # the worker's log may lag its answer
            while not asleep(lines := worker.log_lines()) and time.monotonic() < deadline:
                time.sleep(0.1)
            events = [line.get("event") for line in lines]
            assert asleep(lines), "the model sleeps whole"
            assert "worker_stream_limit" in events and "layers_streamed_more" not in events
            with WorkerClient(worker.address) as client:
                assert client.status().resident_fraction == 1.0, "asleep whole, not streaming"
            stub.Release(apb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch),
                         timeout=10)
            got = generate_once(worker.address, item)
            assert got.token_ids == want
            assert_matches_reference(SMOLLM2, item, got, Reference(SMOLLM2), "woken whole")
            assert [line.get("state") for line in worker.log_lines()
                    if line.get("event") == "model_state"][-1] == "ready", "woken"
    finally:
        fleet.stop_all()
        admission.stop()
