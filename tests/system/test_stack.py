"""`lmx up`, `lmx ps`, `lmx down` and the Python client, with real processes.

A stack file with admission (a simulated 2 GiB device), a kvstore and one
worker (the synthetic llama-tiny model, CPU) on free loopback ports:

- `lmx up` starts them in order and says when it is ready; `lmx ps` shows
  the device and the worker with its lease; the Python client opens a
  session through admission, streams tokens, parks the session and goes on.
- A worker killed with SIGKILL is restarted by the supervisor.
- `lmx down` stops everything: no process, no shared-memory segment and no
  state file left.
- A taken port, an unknown model and a broken stack file are one clear line
  each and exit non-zero, starting nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from lmx.client import Client, ClientError
from services.common.launch import free_port
from services.common.parent import process_alive

pytestmark = pytest.mark.timeout(300, func_only=True)

REPO = Path(__file__).resolve().parents[2]


def cache_dir() -> str:
    return os.environ.get("LMX_CACHE") or str(REPO / ".cache" / "lmx")


def stack_file(tmp_path: Path, model: str = "synthetic:llama-tiny",
               device: str = "cpu:0=2GiB",
               worker: str = 'kv-chunk-bytes = "64KiB"') -> tuple[Path, dict]:
    """A stack file of admission (a simulated `device`), a kvstore, one CPU
    worker of `model` (with the `worker` table's other lines) and the front,
    on free ports."""
    ports = {name: free_port("127.0.0.1") for name in ("admission", "kvstore", "worker", "front")}
    store = "st" + secrets.token_hex(4)
    path = tmp_path / "lmx.toml"
    path.write_text(f"""
[admission]
listen = "127.0.0.1:{ports['admission']}"
device = ["{device}"]

[kvstore]
listen = "127.0.0.1:{ports['kvstore']}"
keep-on-stop = false
store-id = "{store}"
state-dir = "{tmp_path / 'kvstate'}"

[[worker]]
model = "{model}"
listen = "127.0.0.1:{ports['worker']}"
device = "cpu"
{worker}

[front]
listen = "127.0.0.1:{ports['front']}"
""")
    return path, {"ports": ports, "store": store}


def lmx(args: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture
def env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}
    env["LMX_STACK_DIR"] = str(tmp_path / "run")
    env["LMX_CACHE"] = cache_dir()
    return env


alive = process_alive   # an ended child not yet reaped counts as gone


def wait_for(predicate, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_up_ps_client_restart_and_down(tmp_path, env):
    path, info = stack_file(tmp_path)
    state = tmp_path / "run" / "stack.json"
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--stack", str(path)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    children: dict[str, int] = {}
    try:
        wait_for(lambda: state.exists() or up.poll() is not None, "lmx up to be ready", 120)
        assert up.poll() is None, f"lmx up exited: {up.stdout.read()}"
        stack = json.loads(state.read_text())
        assert stack["pid"] == up.pid
        admission = f"127.0.0.1:{info['ports']['admission']}"

        ps = lmx(["ps"], env)
        assert ps.returncode == 0, ps.stderr
        assert "synthetic:llama-tiny" in ps.stdout and "ready" in ps.stdout, ps.stdout
        assert "2.00 GiB" in ps.stdout, ps.stdout

        with Client(admission) as client:
            with client.session("synthetic:llama-tiny") as session:
                pieces = list(session.send("one two three", max_tokens=6))
                assert sum(len(p.token_ids) for p in pieces) == 6
                assert session.finish is not None and session.finish.completion_tokens == 6
                first = [t for p in pieces for t in p.token_ids]
                entry = session.park()
                assert entry, "park should answer the kvstore entry"
                ps = lmx(["ps", "--json"], env)
                workers = json.loads(ps.stdout)["workers"]
                assert workers[0].get("numParked") == 1, workers
                more = list(session.send(" four", max_tokens=4))
                assert sum(len(p.token_ids) for p in more) == 4, "the parked session went on"
            with pytest.raises(ClientError) as refused:
                client.session("no-such-model")
            assert refused.value.code == grpc.StatusCode.NOT_FOUND
        assert first, "tokens were streamed"

        # The OpenAI front came up with the stack and reaches the worker.
        front = f"http://127.0.0.1:{info['ports']['front']}"
        with urllib.request.urlopen(front + "/v1/models", timeout=10) as reply:
            assert [m["id"] for m in json.load(reply)["data"]] == ["synthetic:llama-tiny"]
        body = json.dumps({"model": "synthetic:llama-tiny", "prompt": "one two",
                           "max_tokens": 3, "temperature": 0}).encode()
        request = urllib.request.Request(front + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert json.load(reply)["usage"]["completion_tokens"] == 3

        # A worker killed hard is started again.
        with Client(admission) as client:
            (worker,) = client.workers()
        old_pid = worker.pid
        children["worker"] = old_pid
        os.kill(old_pid, signal.SIGKILL)

        def restarted():
            with Client(admission, timeout_s=2) as client:
                try:
                    found = [w for w in client.workers() if w.pid != old_pid and w.state == 3]
                except ClientError:
                    return None
            return found[0] if found else None
        new = wait_for(restarted, "the supervisor to restart the killed worker", 90)
        children["worker"] = new.pid
        # The restart registered under the worker's own secret (the same for
        # each of its processes): it took its entry over at once, no refusal.
        worker_logs = "".join(p.read_text() for p in (tmp_path / "run" / "logs").glob("worker*"))
        assert "worker_register_failed" not in worker_logs, worker_logs[-2000:]
        with Client(admission) as client, client.session("synthetic:llama-tiny") as session:
            assert session.generate("again", max_tokens=3) is not None

        with Client(admission) as client:
            status = client.status()
        down = lmx(["down"], env)
        assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
        up.wait(30)
        out = up.stdout.read()
        assert "restarting" in out and "stopped" in out, out
        assert not alive(new.pid), "the worker outlived lmx down"
        assert not any(alive(lease.holder.pid) for lease in status.leases)
        assert not list(Path("/dev/shm").glob(f"lmx-{info['store']}-*")), "shared memory left"
        assert not state.exists(), "the state file was left"
        again = lmx(["down"], env)
        assert again.returncode == 0 and "no stack is up" in again.stdout
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(30)
        for pid in children.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_taken_port_is_one_clear_line(tmp_path, env):
    path, info = stack_file(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", info["ports"]["kvstore"]))
        sock.listen()
        result = lmx(["up", "--stack", str(path)], env)
    assert result.returncode == 1
    assert "is taken" in result.stderr and "kvstore" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run" / "logs" / "admission.log").exists(), "nothing should start"


def test_an_unknown_model_and_a_broken_file_are_one_clear_line(tmp_path, env):
    path, _ = stack_file(tmp_path, model="no-such-model")
    result = lmx(["up", "--stack", str(path)], env)
    assert result.returncode == 1 and "unknown model 'no-such-model'" in result.stderr
    assert "Traceback" not in result.stderr
    path.write_text("[admission\n")
    result = lmx(["up", "--stack", str(path)], env)
    assert result.returncode == 2 and "not valid TOML" in result.stderr
    assert "Traceback" not in result.stderr
    result = lmx(["up", "--stack", str(tmp_path / "missing.toml")], env)
    assert result.returncode == 2 and "no stack file" in result.stderr


def test_ps_without_a_stack_says_what_to_do(env):
    result = lmx(["ps", "--admission", f"127.0.0.1:{free_port('127.0.0.1')}"], env)
    assert result.returncode == 1 and "lmx up" in result.stderr
    assert "Traceback" not in result.stderr
