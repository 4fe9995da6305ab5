"""The worker's registrations with admission land in the order of its state
changes: an earlier state ("loading") sent slowly can never arrive after a
later one ("ready") and leave the worker listed as loading while it serves."""

from __future__ import annotations

import asyncio

from lmx.v1 import admission_pb2 as apb
from services.worker.app import WorkerApp
from services.worker.settings import WorkerSettings


class SlowAdmission:
    """Answers RegisterWorker after a delay that shrinks with each call, so
    that unserialised calls would land in the reverse order."""

    def __init__(self):
        self.landed: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.delays = [0.2, 0.1, 0.0]

    async def register_worker(self, info: apb.WorkerInfo, ttl_s: float) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delays.pop(0) if self.delays else 0.0)
            self.landed.append(info.state)
        finally:
            self.in_flight -= 1


def test_state_changes_land_in_order_and_the_last_one_wins():
    async def scenario() -> tuple[SlowAdmission, list[int]]:
        app = WorkerApp(WorkerSettings(model="smollm2-135m", device="cpu"))
        admission = SlowAdmission()
        app.admission = admission
        app._heartbeat = asyncio.create_task(asyncio.sleep(3600))   # registrations are on
        for state in ("waiting", "loading", "ready"):
            app._set_state(state)
        await asyncio.gather(*app._registering)
        app._heartbeat.cancel()
        return admission, admission.landed

    admission, landed = asyncio.run(scenario())
    assert admission.most_in_flight == 1, (
        f"{admission.most_in_flight} registrations were in flight at once: they can land out "
        "of order")
    assert landed and landed[-1] == apb.WORKER_STATE_READY, (
        "the last registration admission received says "
        f"{[apb.WorkerState.Name(s) for s in landed]}: the worker serves but is listed otherwise")
