"""Fixtures for the worker's service tests: real admission and worker
processes on loopback ports, shared across tests (a worker takes seconds to
start, a minute or two the first time a model is converted).

    def test_x(smollm2_worker, worker_admission): ...   # one admission, one worker per model,
    def test_y(gemma3_worker): ...                      # for the whole session
    def test_z(worker_fleet, start_admission): ...      # own processes, by key

Every worker still running at the end of the session is stopped with
SIGTERM and must exit 0.
"""

from __future__ import annotations

import pytest

from ..support import AdmissionProcess, admission_servers
from .worker_support import (
    Reference,
    WorkerFleet,
    WorkerProcess,
    launch_gemma3,
    launch_smollm2,
)


@pytest.fixture(scope="session")
def worker_admission(tmp_path_factory) -> AdmissionProcess:
    """One admission server (a simulated 8 GiB device) for the shared workers."""
    with admission_servers(tmp_path_factory.mktemp("worker-admission")) as start:
        yield start()


@pytest.fixture(scope="session")
def worker_fleet(tmp_path_factory) -> WorkerFleet:
    fleet = WorkerFleet(tmp_path_factory.mktemp("workers"))
    try:
        yield fleet
    except BaseException:
        for worker in fleet.workers.values():
            worker.kill()
        raise
    problems = fleet.stop_all()
    if problems:
        pytest.fail("workers did not shut down cleanly:\n" + "\n\n".join(problems))


@pytest.fixture(scope="session")
def smollm2_worker(worker_fleet, worker_admission) -> WorkerProcess:
    """SmolLM2-135M-Instruct (chat), float32 on the CPU, registered with worker_admission."""
    return launch_smollm2(worker_fleet, worker_admission.address).wait_ready()


@pytest.fixture(scope="session")
def gemma3_worker(worker_fleet, worker_admission) -> WorkerProcess:
    """Gemma 3 270M (a base model: no chat template), float32 on the CPU."""
    return launch_gemma3(worker_fleet, worker_admission.address).wait_ready()


@pytest.fixture(scope="session")
def references():
    """name -> Reference, loaded on first use (after the worker converted the model)."""
    loaded: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in loaded:
            loaded[name] = Reference(name)
        return loaded[name]

    return get
