"""Fixtures that run a real admission server (a subprocess on a free loopback
port) for the service tests.

    def test_x(admission):            # default: one simulated 8 GiB device
        with grpc.insecure_channel(admission.address) as channel: ...

    @pytest.mark.parametrize("admission", [["--min-ttl-s", "0.05"]], indirect=True)
    def test_y(admission): ...        # extra flags for this test's server

    def test_z(start_admission):      # several servers, or control over stopping
        server = start_admission("--device", "cpu:0=1GiB", "--device", "cpu:1=1GiB")

    def test_w(shared_admission): ... # one default server for the whole module

Each server is stopped with SIGTERM when its scope ends, which must make it
exit 0 within a few seconds (a server the test stopped itself is left alone).
"""

from __future__ import annotations

import grpc
import pytest

from .support import AdmissionProcess, admission_servers, stub


@pytest.fixture
def start_admission(tmp_path):
    """start_admission(*flags) -> a running AdmissionProcess (stopped after the test)."""
    with admission_servers(tmp_path) as start:
        yield start


@pytest.fixture
def admission(request, start_admission) -> AdmissionProcess:
    """A running admission server; `request.param` (indirect) adds flags."""
    return start_admission(*getattr(request, "param", ()))


@pytest.fixture
def admission_stub(admission):
    with grpc.insecure_channel(admission.address) as channel:
        yield stub(channel)


@pytest.fixture(scope="module")
def shared_admission(tmp_path_factory) -> AdmissionProcess:
    """One default server for a whole module (tests must give back what they take)."""
    with admission_servers(tmp_path_factory.mktemp("admission")) as start:
        yield start()


@pytest.fixture(scope="module")
def shared_stub(shared_admission):
    with grpc.insecure_channel(shared_admission.address) as channel:
        yield stub(channel)
