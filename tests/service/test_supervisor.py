"""The stack's supervisor with real children (admission and a kvstore): one that
stops answering its health check (frozen with SIGSTOP) for hung_after_s is
killed and started again, like one that exited."""

from __future__ import annotations

import os
import signal
import time

import pytest

from services.common.launch import free_port
from services.stack.config import load_stack
from services.stack.supervisor import Supervisor

pytestmark = pytest.mark.timeout(120, func_only=True)


def test_a_hung_child_is_killed_and_restarted(tmp_path):
    path = tmp_path / "lmx.toml"
    shm = tmp_path / "shm"
    shm.mkdir()
    path.write_text(f'[admission]\nlisten = "127.0.0.1:{free_port()}"\ndevice = ["cpu:0=1GiB"]\n\n'
                    f'[kvstore]\nlisten = "127.0.0.1:{free_port()}"\nshm-dir = "{shm}"\n'
                    f'state-dir = "{tmp_path / "state"}"\nkeep-on-stop = false\n')
    events: list[str] = []
    supervisor = Supervisor(load_stack(path), tmp_path / "logs", start_timeout_s=60,
                            hung_after_s=2.0, health_every_s=0.5,
                            on_event=lambda name, what: events.append(f"{name}: {what}"))
    supervisor.start()
    try:
        child = supervisor.children["admission"]
        first = child.process.pid
        os.kill(first, signal.SIGSTOP)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            supervisor.watch_once()
            if child.restarts and child.state == "serving" and child.process.pid != first:
                break
            time.sleep(0.2)
        assert child.restarts == 1 and child.state == "serving", (child.state, events)
        assert child.process.pid != first
        assert any("not answering its health check" in e for e in events), events
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)            # the frozen one is gone, not left stopped
    finally:
        supervisor.stop()
