"""Starts the stack's services as child processes, in order (admission, the
kvstore, then the workers), waits for each to report SERVING through gRPC
health, restarts one that exits with a backoff (and kills, to restart it,
one that stops answering its health check for `hung_after_s`: frozen,
deadlocked), and stops them all (workers
first, admission last) on stop(): no orphan (each child also follows this
process through LMX_PARENT_PID) and no shared memory left behind.

No gRPC server here; the supervisor is driven by `lmx up` (services/stack/
commands.py) and the demo.
"""

from __future__ import annotations

import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from services.admission.client import WORKER_SECRET_ENV
from services.common.launch import wait_serving
from services.common.parent import child_env
from services.stack.config import ServiceSpec, StackConfig

log = structlog.get_logger(__name__)

#: Restart delays: 1 s, doubling to 30 s; back to 1 s after a minute up.
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
#: A serving child's health is probed this often; one that has not answered
#: for hung_after_s is killed and restarted.
HEALTH_EVERY_S = 5.0
HEALTH_TIMEOUT_S = 2.0
HUNG_AFTER_S = 60.0


class StackError(Exception):
    """The stack could not start: one clear line for the user."""


@dataclass
class Child:
    spec: ServiceSpec
    log_path: Path
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    state: str = "stopped"     # starting | serving | restarting | stopped | failed
    last_healthy: float = 0.0
    last_probe: float = 0.0
    #: A worker's registration secret, the same for each of its restarts:
    #: the restarted process takes its entry in admission over at once.
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))


@dataclass
class Supervisor:
    stack: StackConfig
    log_dir: Path
    start_timeout_s: float = 600.0
    hung_after_s: float = HUNG_AFTER_S
    health_every_s: float = HEALTH_EVERY_S
    on_event: Callable[[str, str], None] = lambda name, what: None
    children: dict[str, Child] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._stopping = threading.Event()
        for spec in self.stack.services:
            self.children[spec.name] = Child(spec, self.log_dir / f"{spec.name}.log")

    # ---- start ----
    def preflight(self) -> None:
        """What can be known wrong before anything starts: a taken port, an
        unknown model."""
        for spec in self.stack.services:
            if spec.listen.startswith("unix:"):
                continue                 # the server says so if the path is taken
            host, _, port = spec.listen.rpartition(":")
            if port != "0" and not port_free(host, int(port)):
                raise StackError(
                    f"{spec.name}: {spec.listen} is taken (another `lmx up`? `lmx down` stops "
                    f"it; else change its listen in {self.stack.path})")
            if spec.is_worker:
                problem = model_problem(spec.settings.model)
                if problem:
                    raise StackError(f"{spec.name}: {problem}")

    def start(self) -> None:
        """Start every service in order, each SERVING before the next;
        the workers together. StackError (after stopping what started) when
        one does not come up."""
        self.preflight()
        try:
            for spec in self.stack.services:
                if not spec.is_worker:
                    self._launch(self.children[spec.name])
                    self._wait_serving(self.children[spec.name])
            workers = [c for c in self.children.values() if c.spec.is_worker]
            for child in workers:
                self._launch(child)
            for child in workers:
                self._wait_serving(child)
        except BaseException:
            self.stop()
            raise

    def _launch(self, child: Child) -> None:
        spec = child.spec
        argv = [sys.executable, "-m", spec.module, *spec.argv, "--log-format", "json"]
        env = child_env()
        if spec.is_worker:
            env[WORKER_SECRET_ENV] = child.secret
        log_file = open(child.log_path, "ab")
        try:
            child.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env=env, start_new_session=True)   # Ctrl-C reaches the supervisor only
        finally:
            log_file.close()
        child.started_at = time.monotonic()
        child.state = "starting"
        self.on_event(spec.name, f"starting (pid {child.process.pid}, log {child.log_path})")

    def _wait_serving(self, child: Child) -> None:
        assert child.process is not None
        try:
            wait_serving(child.spec.listen, child.spec.health_service, self.start_timeout_s,
                         child.process)
        except (RuntimeError, TimeoutError) as exc:
            child.state = "failed"
            raise StackError(f"{child.spec.name} did not start: {exc}; its log ends:\n"
                             + tail(child.log_path)) from None
        child.state = "serving"
        child.last_healthy = child.last_probe = time.monotonic()
        self.on_event(child.spec.name, f"serving on {child.spec.listen}")

    # ---- run ----
    def watch_once(self) -> None:
        """Restart what exited (after its backoff)."""
        now = time.monotonic()
        for child in self.children.values():
            if self._stopping.is_set():
                return
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restart_at = None
                    child.restarts += 1
                    self._launch(child)
                continue
            if child.process is None or child.process.poll() is None:
                if child.state == "starting" and child.process is not None:
                    if probe_serving(child.spec.listen, child.spec.health_service):
                        child.state = "serving"
                        child.last_healthy = child.last_probe = now
                        self.on_event(child.spec.name, f"serving again on {child.spec.listen}")
                elif child.state == "serving" and child.process is not None:
                    self._check_health(child, now)
                if child.state == "serving" and now - child.started_at > STABLE_AFTER_S:
                    child.backoff_s = BACKOFF_START_S
                continue
            code = child.process.returncode
            child.state = "restarting"
            child.restart_at = now + child.backoff_s
            self.on_event(child.spec.name, f"exited with code {code}; restarting in "
                                           f"{child.backoff_s:g} s (log {child.log_path})")
            log.warning("service_exited", service=child.spec.name, code=code,
                        restart_in_s=child.backoff_s)
            child.backoff_s = min(BACKOFF_MAX_S, child.backoff_s * 2)

    def _check_health(self, child: Child, now: float) -> None:
        """A serving child that has not answered its health check for
        hung_after_s is killed; the next look restarts it like any exit."""
        if now - child.last_probe < self.health_every_s:
            return
        child.last_probe = now
        if probe_serving(child.spec.listen, child.spec.health_service, HEALTH_TIMEOUT_S):
            child.last_healthy = now
            return
        silent = now - child.last_healthy
        if silent < self.hung_after_s:
            return
        self.on_event(child.spec.name, f"not answering its health check for {silent:.0f} s; "
                                       "killing it to restart it")
        log.warning("service_hung", service=child.spec.name, silent_s=round(silent, 1),
                    pid=child.process.pid)
        child.process.kill()
        try:
            child.process.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def run(self, poll_s: float = 0.5) -> None:
        """Supervise until stop() is called (from a signal handler, say)."""
        while not self._stopping.wait(poll_s):
            self.watch_once()

    # ---- stop ----
    def request_stop(self) -> None:
        self._stopping.set()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Workers first (their sessions and leases go back), then the
        kvstore, then admission: SIGTERM, then SIGKILL past the timeout."""
        self._stopping.set()
        order = [c for c in self.children.values() if c.spec.is_worker]
        order += [c for c in self.children.values() if not c.spec.is_worker][::-1]
        workers = [c for c in order if c.spec.is_worker]
        self._terminate(workers, timeout_s)
        for child in order[len(workers):]:
            self._terminate([child], timeout_s)
        self._remove_shm_leftovers()

    def _terminate(self, children: list[Child], timeout_s: float) -> None:
        running = [c for c in children if c.process is not None and c.process.poll() is None]
        for child in running:
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in running:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
                self.on_event(child.spec.name, "killed (did not stop in time)")
        for child in children:
            if child.state != "stopped":
                child.state = "stopped"
                child.restart_at = None
                self.on_event(child.spec.name, "stopped")

    def _remove_shm_leftovers(self) -> None:
        """A kvstore that was killed leaves its segment files; a clean stop
        without keep-on-stop removes them itself."""
        kv = self.stack.kvstore
        if kv is None or kv.settings.keep_on_stop:
            return
        shm = Path(kv.settings.shm_dir)
        for path in shm.glob(f"lmx-{kv.settings.store_id}-*"):
            path.unlink(missing_ok=True)
            log.info("shm_leftover_removed", path=str(path))

    def pids(self) -> dict[str, int]:
        return {name: c.process.pid for name, c in self.children.items()
                if c.process is not None and c.process.poll() is None}


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError:
            return False
    return True


def model_problem(model: str) -> str:
    """Why a worker could not load `model` ("" if it can try)."""
    from services.worker.models import SYNTHETIC_SHAPES, known_models

    if model.startswith("synthetic:"):
        if model.removeprefix("synthetic:") in SYNTHETIC_SHAPES:
            return ""
        return f"unknown synthetic shape {model!r} (known: {', '.join(SYNTHETIC_SHAPES)})"
    if model in known_models():
        return ""
    path = Path(model)
    if path.is_dir() and (path / "config.json").exists():
        return ""
    return (f"unknown model {model!r}: use one of {', '.join(known_models())} or a model "
            "directory (config.json, weights, tokenizer)")


def probe_serving(address: str, service: str, timeout_s: float = 0.2) -> bool:
    try:
        wait_serving(address, service, timeout_s=timeout_s)
    except (RuntimeError, TimeoutError, OSError):
        return False
    return True


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])
