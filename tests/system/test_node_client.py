"""The Node.js example (examples/node/client.js) against a real stack: any
language with gRPC can use lmx from the .proto files alone.

Admission (a simulated 8 GiB device), a kvstore (a fresh --shm-dir under
/dev/shm, a temporary --state-dir) and a smollm2-135m worker run as
processes on loopback ports. The client's device table must be admission's
as the Python client reads it, and its greedy generation must be, token for
token, what a Python client gets from the same worker for the same prompt in
a fresh session. A worker that is not there is a non-zero exit naming
UNAVAILABLE.

Needs node >= 20 and npm; `npm ci` runs into examples/node once (skipped
while node_modules matches package-lock.json). Without node, npm or the
npm registry the tests are skipped, saying why.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import grpc
import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from lmx.v1 import admission_pb2 as apb  # noqa: E402
from lmx.v1 import admission_pb2_grpc  # noqa: E402
from lmx.v1 import worker_pb2 as wpb  # noqa: E402
from service.worker.worker_support import RPC_TIMEOUT_S, WorkerClient, cache_dir  # noqa: E402
from services.common.launch import ServiceProcess, free_port, start_service  # noqa: E402

REPO_ROOT = TESTS_DIR.parent
NODE_DIR = REPO_ROOT / "examples" / "node"
CLIENT = NODE_DIR / "client.js"
#: Written into node_modules after a successful `npm ci`: the lock file's sha256.
INSTALL_STAMP = NODE_DIR / "node_modules" / ".lmx-package-lock.sha256"
NPM_CI_TIMEOUT_S = 240
NODE_TIMEOUT_S = 60
#: A first start converts the model's GGUF into the cache: a minute or two.
WORKER_START_TIMEOUT_S = 300
MODEL = "smollm2-135m"
PROMPT = "The three primary colors are"
MAX_TOKENS = 16

pytestmark = pytest.mark.timeout(NPM_CI_TIMEOUT_S + WORKER_START_TIMEOUT_S + 120)


# ---- node and its packages -------------------------------------------------------

def lock_digest() -> str:
    return hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()


def installed() -> bool:
    """node_modules was installed by `npm ci` from this package-lock.json."""
    return INSTALL_STAMP.is_file() and INSTALL_STAMP.read_text().strip() == lock_digest()


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, once examples/node's packages are installed."""
    node_bin, npm_bin = shutil.which("node"), shutil.which("npm")
    if node_bin is None or npm_bin is None:
        pytest.skip(f"node and npm are needed for the Node.js client (node: {node_bin}, "
                    f"npm: {npm_bin}); install Node.js 20")
    version = subprocess.run([node_bin, "--version"], capture_output=True, text=True,
                             timeout=NODE_TIMEOUT_S).stdout.strip()
    if not version.startswith("v") or int(version[1:].split(".")[0]) < 20:
        pytest.skip(f"the Node.js client needs node >= 20, this is {version or 'unknown'}")
    if not installed():
        try:
            done = subprocess.run([npm_bin, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
                                  cwd=NODE_DIR, capture_output=True, text=True,
                                  timeout=NPM_CI_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pytest.skip(f"npm ci in {NODE_DIR} took over {NPM_CI_TIMEOUT_S}s (no registry?)")
        if done.returncode != 0:
            pytest.skip(f"npm ci in {NODE_DIR} failed ({done.returncode}; no registry?): "
                        f"{(done.stderr or done.stdout)[-1500:]}")
        INSTALL_STAMP.write_text(lock_digest() + "\n")
    return node_bin


def run_client(node: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([node, str(CLIENT), *args], capture_output=True, text=True,
                          timeout=NODE_TIMEOUT_S, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)


def summary(done: subprocess.CompletedProcess) -> dict:
    """The --json line: the only line of stdout."""
    assert done.returncode == 0, (f"client.js exited {done.returncode}; stderr:\n{done.stderr}\n"
                                  f"stdout:\n{done.stdout}")
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"--json should print one line, printed:\n{done.stdout}"
    return json.loads(lines[0])


# ---- the stack ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """{"admission", "kvstore", "worker"} -> ServiceProcess; all stopped at the
    end, each must exit 0 and leave no file in the shm dir."""
    logs = tmp_path_factory.mktemp("node-stack")
    shm = Path(tempfile.mkdtemp(prefix="lmx-test-node-", dir="/dev/shm"))
    store_id = "node" + uuid.uuid4().hex[:8]
    procs: dict[str, ServiceProcess] = {}
    try:
        procs["admission"] = start_service(
            "services.admission", "lmx.v1.AdmissionService",
            ["--device", "cpu:0=8GiB", "--log-format", "json"],
            log_path=logs / "admission.log")
        procs["kvstore"] = start_service(
            "services.kvstore", "lmx.v1.KVStoreService",
            ["--store-id", store_id, "--shm-dir", str(shm), "--state-dir", str(logs / "kvstate"),
             "--keep-on-stop", "false", "--log-format", "json"],
            log_path=logs / "kvstore.log")
        procs["worker"] = start_service(
            "services.worker", "lmx.v1.WorkerService",
            ["--model", MODEL, "--device", "cpu", "--max-context", "512",
             "--admission", procs["admission"].address, "--kvstore", procs["kvstore"].address,
             "--log-format", "json"],
            log_path=logs / "worker.log", timeout_s=WORKER_START_TIMEOUT_S,
            env={"LMX_CACHE": str(cache_dir())})
        yield procs
        codes = {name: procs.pop(name).stop() for name in ("worker", "kvstore", "admission")}
        bad = {name: code for name, code in codes.items() if code != 0}
        assert not bad, (f"services did not exit 0 on SIGTERM: {bad}; logs:\n" + "\n".join(
            f"--- {name}\n{(logs / f'{name}.log').read_text(errors='replace')[-3000:]}"
            for name in bad))
        left = [p.name for d in (shm, Path("/dev/shm")) if d.is_dir()
                for p in d.iterdir() if p.name.startswith(f"lmx-{store_id}-")]
        assert not left, f"kvstore files left in shared memory: {left}"
    finally:
        for proc in procs.values():
            proc.stop()
        shutil.rmtree(shm, ignore_errors=True)


def python_status(address: str) -> apb.StatusResponse:
    with grpc.insecure_channel(address) as channel:
        return admission_pb2_grpc.AdmissionServiceStub(channel).Status(
            apb.StatusRequest(), timeout=RPC_TIMEOUT_S)


# ---- the tests ---------------------------------------------------------------------

def test_node_client_sees_admission_and_generates_like_python(node, stack):
    admission, worker = stack["admission"].address, stack["worker"].address
    got = summary(run_client(node, "--admission", admission, "--worker", worker,
                             "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS), "--json"))

    # The device table is admission's, as the Python client reads it.
    expected = python_status(admission).devices
    assert [(d["device"], int(d["total_bytes"]), int(d["cap_bytes"])) for d in got["devices"]] \
        == [(d.device, d.total_bytes, d.cap_bytes) for d in expected], (
        f"node's devices {got['devices']} are not admission's {expected}")
    for d in got["devices"]:
        assert int(d["leased_bytes"]) > 0, f"the worker's weights lease is missing: {d}"
        assert int(d["leased_bytes"]) + int(d["free_bytes"]) == int(d["budget_bytes"]), d

    # As many tokens as asked, unless the model ended its answer first.
    finish = got["finish"]
    assert finish is not None, f"the stream had no finish: {got}"
    assert got["num_tokens"] == finish["completion_tokens"] == len(got["token_ids"]), got
    if finish["reason"] == "FINISH_REASON_LENGTH":
        assert got["num_tokens"] == MAX_TOKENS, got
    else:
        assert finish["reason"] == "FINISH_REASON_STOP" and got["num_tokens"] <= MAX_TOKENS, got
    assert got["session"]["model"] == MODEL, got["session"]

    # The same prompt in a fresh session from Python, greedy too: the same tokens and text.
    with WorkerClient(worker) as client:
        session = client.open()
        try:
            python = client.generate(session, prompt=PROMPT, max_tokens=MAX_TOKENS)
        finally:
            client.close_session(session)
        open_sessions = [s.session_id for s in client.status().sessions]
    assert got["token_ids"] == python.token_ids, (
        f"node generated {got['token_ids']}, Python {python.token_ids}")
    assert got["text"] == python.text, f"node: {got['text']!r}, Python: {python.text!r}"
    assert got["text"].strip(), "the generation is empty"
    assert finish["reason"] == wpb.FinishReason.Name(python.finish.reason)
    assert got["session"]["session_id"] not in open_sessions, (
        f"client.js left its session open: {open_sessions}")


def test_node_client_prints_the_table_and_streams_the_text(node, stack):
    done = run_client(node, "--admission", stack["admission"].address,
                      "--worker", stack["worker"].address,
                      "--prompt", PROMPT, "--max-tokens", "4")
    assert done.returncode == 0, f"client.js exited {done.returncode}; stderr:\n{done.stderr}"
    out = done.stdout
    assert "cpu:0" in out and "7.20 GiB" in out, f"no device table (cap 7.20 GiB) in:\n{out}"
    assert f"worker {stack['worker'].address}: {PROMPT}" in out, out
    assert "tokens from smollm2-135m" in out, out


@pytest.mark.parametrize("closed", ["worker", "admission"])
def test_node_client_fails_clearly_when_a_service_is_not_there(node, stack, closed):
    addresses = {"admission": stack["admission"].address, "worker": stack["worker"].address,
                 closed: f"127.0.0.1:{free_port()}"}   # nothing listens there
    done = run_client(node, "--admission", addresses["admission"],
                      "--worker", addresses["worker"], "--prompt", PROMPT, "--max-tokens", "4")
    assert done.returncode != 0, f"client.js exited 0 with no {closed}:\n{done.stdout}"
    assert "UNAVAILABLE" in done.stderr and addresses[closed] in done.stderr, (
        f"the error should name UNAVAILABLE and {addresses[closed]}:\n{done.stderr}")
    assert "Traceback" not in done.stderr and "    at " not in done.stderr, done.stderr
