"""A service started with child_env stops when its starter dies."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from services.common.parent import PARENT_PID_ENV, child_env, follow_parent, process_alive

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

CHILD = ("from services.common.parent import follow_parent\n"
         "import time\n"
         "follow_parent()\n"
         "time.sleep(60)\n")

# The starter: launches the child with child_env, prints its pid, exits.
STARTER = ("import subprocess, sys\n"
           "from services.common.parent import child_env\n"
           f"p = subprocess.Popen([sys.executable, '-c', {CHILD!r}], env=child_env())\n"
           "print(p.pid, flush=True)\n"
           "import time; time.sleep(1.0)\n")


alive = process_alive   # an ended child not yet reaped counts as gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_child_stops_when_its_starter_ends():
    out = subprocess.run([sys.executable, "-c", STARTER], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=30, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "the child outlived its starter"


def test_child_env_names_this_process():
    env = child_env({"A": "1"})
    assert env == {"A": "1", PARENT_PID_ENV: str(os.getpid())}


def test_without_the_variable_nothing_happens(monkeypatch):
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    follow_parent()      # must not signal this test process
    monkeypatch.setenv(PARENT_PID_ENV, "not-a-pid")
    follow_parent()


def test_process_alive_knows_the_living_the_dead_and_the_unreaped():
    from services.common.parent import process_alive

    assert process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while process_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not process_alive(child.pid), "an ended child not yet reaped counts as gone"
    child.wait()
    assert not process_alive(child.pid)
