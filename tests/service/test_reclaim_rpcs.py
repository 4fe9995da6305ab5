"""Memory pressure through a real admission server: a queued request makes
admission ask the holder of the memory (ReclaimRequested in Watch, the ask in
Status); a holder that does not answer is reported overdue (event and
Status); an answer (AnswerReclaim) is an event; a worker's report
(ReportActivity) is an event; bad input is refused clearly."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from lmx.v1 import admission_pb2 as pb

from .support import (
    GiB,
    RPC_TIMEOUT_S,
    WatchStream,
    acquire_request,
    call_error,
    status,
    stub,
)

pytestmark = pytest.mark.timeout(60, func_only=True)


def next_of(watch: WatchStream, kind: str, timeout_s: float = 10.0) -> pb.Event:
    while True:
        event = watch.next(timeout_s)
        if event.WhichOneof("kind") == kind:
            return event


@pytest.mark.parametrize("admission", [["--reclaim-deadline-s", "0.5"]], indirect=True)
def test_ask_overdue_answer_and_activity(admission):
    with grpc.insecure_channel(admission.address) as channel:
        adm = stub(channel)
        watch = WatchStream(adm)
        try:
            held = adm.Acquire(acquire_request(6 * GiB, name="worker/big"),
                               timeout=RPC_TIMEOUT_S).lease
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(adm.Acquire, acquire_request(
                    4 * GiB, name="worker/small", purpose=pb.PURPOSE_WEIGHTS, wait_ms=20_000),
                    timeout=30)
                asked = next_of(watch, "reclaim_requested").reclaim_requested.reclaim
                assert (asked.lease.lease_id, asked.for_holder) == (held.lease_id, "worker/small")
                assert asked.bytes == 4 * GiB - (int(8 * GiB * 0.9) - 6 * GiB)
                assert asked.state == "asked" and asked.deadline_unix > 0
                listed = {r.reclaim_id: r for r in status(adm).reclaims}
                assert listed[asked.reclaim_id].state == "asked"

                late = next_of(watch, "reclaim_overdue").reclaim_overdue
                assert late.reclaim.reclaim_id == asked.reclaim_id and late.overdue_s >= 0
                assert {r.reclaim_id: r.state for r in status(adm).reclaims}[
                    asked.reclaim_id] == "overdue", "Status should show the holder as overdue"

                # The holder gives back what was asked, then answers.
                adm.Resize(pb.ResizeRequest(lease_id=held.lease_id, epoch=held.epoch,
                                            bytes=held.bytes - asked.bytes),
                           timeout=RPC_TIMEOUT_S)
                waiting.result(timeout=10)
                adm.AnswerReclaim(pb.AnswerReclaimRequest(
                    reclaim_id=asked.reclaim_id, freed_bytes=asked.bytes,
                    detail="parked 3 sessions"), timeout=RPC_TIMEOUT_S)
                answered = next_of(watch, "reclaim_answered").reclaim_answered.reclaim
                assert (answered.reclaim_id, answered.state, answered.freed_bytes,
                        answered.detail) == (asked.reclaim_id, "answered", asked.bytes,
                                             "parked 3 sessions")

            adm.ReportActivity(pb.ReportActivityRequest(activity=pb.WorkerActivity(
                kind=pb.WorkerActivity.KIND_MODEL_ASLEEP, worker_id="w@1", model="m",
                bytes=1234, seconds=0.5, reason=f"reclaim {asked.reclaim_id}")),
                timeout=RPC_TIMEOUT_S)
            activity = next_of(watch, "activity").activity
            assert (activity.kind, activity.worker_id, activity.bytes) == (
                pb.WorkerActivity.KIND_MODEL_ASLEEP, "w@1", 1234)
        finally:
            watch.close()


def test_bad_answers_and_reports_are_refused(admission):
    with grpc.insecure_channel(admission.address) as channel:
        adm = stub(channel)
        cases = [
            (adm.AnswerReclaim, pb.AnswerReclaimRequest(), grpc.StatusCode.INVALID_ARGUMENT),
            (adm.AnswerReclaim, pb.AnswerReclaimRequest(reclaim_id="reclaim-999"),
             grpc.StatusCode.NOT_FOUND),
            (adm.ReportActivity, pb.ReportActivityRequest(), grpc.StatusCode.INVALID_ARGUMENT),
            (adm.ReportActivity, pb.ReportActivityRequest(activity=pb.WorkerActivity(
                kind=pb.WorkerActivity.KIND_SESSION_PARKED)), grpc.StatusCode.INVALID_ARGUMENT),
            (adm.ReportActivity, pb.ReportActivityRequest(activity=pb.WorkerActivity(
                kind=pb.WorkerActivity.KIND_SESSION_PARKED, worker_id="w", bytes=-1)),
             grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for method, request, code in cases:
            error, _ = call_error(method, request)
            assert error.code() == code, f"{request} gave {error.code().name}: {error.details()}"



@pytest.mark.parametrize("admission", [["--reclaim-deadline-s", "5"]], indirect=True)
def test_only_the_holder_answers_and_only_the_worker_reports(admission):
    """A reclaim for a lease acquired with a secret is answered only with
    it; a worker registered with a secret is the only one that can report
    its activity, register it again or unregister it. Ids are public."""
    denied = grpc.StatusCode.PERMISSION_DENIED
    with grpc.insecure_channel(admission.address) as channel:
        adm = stub(channel)
        watch = WatchStream(adm)
        try:
            held = adm.Acquire(acquire_request(6 * GiB, name="worker/big", secret="lease-s"),
                               timeout=RPC_TIMEOUT_S).lease
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(adm.Acquire, acquire_request(
                    4 * GiB, name="worker/small", wait_ms=20_000), timeout=30)
                asked = next_of(watch, "reclaim_requested").reclaim_requested.reclaim
                for wrong in ("", "guess"):
                    error, _ = call_error(adm.AnswerReclaim, pb.AnswerReclaimRequest(
                        reclaim_id=asked.reclaim_id, freed_bytes=asked.bytes, secret=wrong))
                    assert error.code() == denied, error
                adm.Resize(pb.ResizeRequest(lease_id=held.lease_id, epoch=held.epoch,
                                            bytes=held.bytes - asked.bytes, secret="lease-s"),
                           timeout=RPC_TIMEOUT_S)
                waiting.result(timeout=10)
                adm.AnswerReclaim(pb.AnswerReclaimRequest(
                    reclaim_id=asked.reclaim_id, freed_bytes=asked.bytes, detail="parked",
                    secret="lease-s"), timeout=RPC_TIMEOUT_S)
                assert next_of(watch, "reclaim_answered").reclaim_answered.reclaim.detail == (
                    "parked")

            worker = pb.WorkerInfo(worker_id="m@127.0.0.1:7001", model="m",
                                   address="127.0.0.1:7001", state=pb.WORKER_STATE_READY)
            adm.RegisterWorker(pb.RegisterWorkerRequest(worker=worker, ttl_ms=60_000,
                                                        secret="worker-s"), timeout=RPC_TIMEOUT_S)
            listed = adm.ListWorkers(pb.ListWorkersRequest(), timeout=RPC_TIMEOUT_S)
            assert "worker-s" not in str(listed)
            report = pb.WorkerActivity(kind=pb.WorkerActivity.KIND_MODEL_AWAKE,
                                       worker_id=worker.worker_id, model="m", bytes=1)
            fake = pb.WorkerInfo(worker_id=worker.worker_id, model="m",
                                 address="127.0.0.1:6666", state=pb.WORKER_STATE_READY)
            for wrong in ("", "guess"):
                for method, request in (
                        (adm.ReportActivity, pb.ReportActivityRequest(activity=report,
                                                                      secret=wrong)),
                        (adm.RegisterWorker, pb.RegisterWorkerRequest(worker=fake, ttl_ms=60_000,
                                                                      secret=wrong)),
                        (adm.UnregisterWorker, pb.UnregisterWorkerRequest(
                            worker_id=worker.worker_id, secret=wrong))):
                    error, _ = call_error(method, request)
                    assert error.code() == denied, (request, error)
            [still] = adm.ListWorkers(pb.ListWorkersRequest(), timeout=RPC_TIMEOUT_S).workers
            assert still.address == "127.0.0.1:7001", "a refused registration moved the worker"
            adm.ReportActivity(pb.ReportActivityRequest(activity=report, secret="worker-s"),
                               timeout=RPC_TIMEOUT_S)
            assert next_of(watch, "activity").activity.worker_id == worker.worker_id
            adm.UnregisterWorker(pb.UnregisterWorkerRequest(worker_id=worker.worker_id,
                                                            secret="worker-s"),
                                 timeout=RPC_TIMEOUT_S)
            assert not adm.ListWorkers(pb.ListWorkersRequest(), timeout=RPC_TIMEOUT_S).workers
        finally:
            watch.close()
