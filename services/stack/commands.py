"""`lmx up`, `lmx down` and `lmx ps`.

`lmx up` starts the stack of a stack file (default deploy/lmx.toml) and
supervises it in the foreground until Ctrl-C or SIGTERM (`lmx down`), or, with
--detach, in the background. It writes its pid and the services' addresses
to a state file (LMX_STACK_DIR, default $XDG_RUNTIME_DIR/lmx or
/tmp/lmx-<uid>), beside the services' logs, so that `lmx down` finds it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from services.common.errors import ConfigError
from services.common.parent import process_alive
from services.common.paths import runtime_dir
from services.stack.config import DEFAULT_STACK, StackConfig, load_stack
from services.stack.supervisor import StackError, Supervisor

DOWN_TIMEOUT_S = 60.0


def stack_dir() -> Path:
    return runtime_dir()


def state_path() -> Path:
    return stack_dir() / "stack.json"


def read_state() -> dict | None:
    """The running stack's state, or None (no file, or its supervisor is gone)."""
    try:
        state = json.loads(state_path().read_text())
        pid = int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if process_alive(pid) else None


def say(text: str) -> None:
    print(text, flush=True)


# ---- up ----
def up(args: argparse.Namespace) -> int:
    try:
        stack = load_stack(args.stack)
    except ConfigError as exc:
        print(f"lmx up: {exc}", file=sys.stderr)
        return 2
    running = read_state()
    if running:
        print(f"lmx up: a stack is already up (pid {running['pid']}, {running['stack']}); "
              "`lmx down` stops it", file=sys.stderr)
        return 1
    if args.detach:
        return _up_detached(args)
    return _up_foreground(stack, args.start_timeout_s)


def _up_foreground(stack: StackConfig, start_timeout_s: float) -> int:
    directory = stack_dir()
    supervisor = Supervisor(stack, directory / "logs", start_timeout_s,
                            on_event=lambda name, what: say(f"  {name}: {what}"))
    stop = lambda *_: supervisor.request_stop()   # noqa: E731 - a signal handler
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    say(f"lmx up: {stack.path} ({len(stack.workers)} worker(s)); logs in {directory / 'logs'}")
    try:
        supervisor.start()
    except StackError as exc:
        print(f"lmx up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        supervisor.stop()
        return 130
    state = {"pid": os.getpid(), "stack": str(stack.path), "started": time.time(),
             "admission": stack.admission.listen,
             "services": {s.name: s.listen for s in stack.services}}
    directory.mkdir(parents=True, exist_ok=True)
    tmp = state_path().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(state_path())
    say(f"lmx up: ready; admission at {stack.admission.listen} (`lmx ps` shows the GPU); "
        "Ctrl-C or `lmx down` stops it")
    try:
        supervisor.run()
    finally:
        say("lmx up: stopping")
        supervisor.stop()
        state_path().unlink(missing_ok=True)
        say("lmx up: stopped")
    return 0


def _up_detached(args: argparse.Namespace) -> int:
    directory = stack_dir()
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "up.log"
    argv = [sys.executable, "-m", "services.cli", "up", "--stack", str(args.stack or DEFAULT_STACK),
            "--start-timeout-s", str(args.start_timeout_s)]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + args.start_timeout_s + 30
    while time.monotonic() < deadline:
        state = read_state()
        if state and state["pid"] == process.pid:
            say(f"lmx up: ready in the background (pid {process.pid}); admission at "
                f"{state['admission']}; `lmx down` stops it; log {log_path}")
            return 0
        if process.poll() is not None:
            print(f"lmx up: the stack did not start; {log_path} ends:\n"
                  + "\n".join(log_path.read_text(errors="replace").splitlines()[-15:]),
                  file=sys.stderr)
            return 1
        time.sleep(0.2)
    process.terminate()
    print(f"lmx up: not ready after {args.start_timeout_s:g} s; see {log_path}", file=sys.stderr)
    return 1


# ---- down ----
def down(_args: argparse.Namespace) -> int:
    state = read_state()
    if state is None:
        state_path().unlink(missing_ok=True)
        say("lmx down: no stack is up")
        return 0
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + DOWN_TIMEOUT_S
    while time.monotonic() < deadline:
        if not process_alive(pid):
            say(f"lmx down: stopped (pid {pid})")
            return 0
        time.sleep(0.1)
    print(f"lmx down: pid {pid} still running after {DOWN_TIMEOUT_S:g} s", file=sys.stderr)
    return 1


# ---- ps ----
def ps(args: argparse.Namespace) -> int:
    from lmx.client import Client, ClientError
    from services.stack.ps import render_ps

    address = args.admission or os.environ.get("LMX_ADMISSION") or (
        (read_state() or {}).get("admission")) or "127.0.0.1:50051"
    try:
        with Client(address, timeout_s=5) as client:
            status = client.status()
    except ClientError as exc:
        print(f"lmx ps: admission at {address}: {exc} (is the stack up? `lmx up`)",
              file=sys.stderr)
        return 1
    if args.json:
        from google.protobuf import json_format
        print(json_format.MessageToJson(status))
    else:
        print(render_ps(status))
    return 0


def add_commands(commands) -> None:
    p = commands.add_parser("up", help="start the whole stack (deploy/lmx.toml)")
    p.add_argument("--stack", help=f"stack file [{DEFAULT_STACK}]")
    p.add_argument("-d", "--detach", action="store_true", help="run it in the background")
    p.add_argument("--start-timeout-s", type=float, default=600.0,
                   help="how long each service may take to be ready [600]")
    commands.add_parser("down", help="stop the stack `lmx up` started")
    p = commands.add_parser("ps", help="the GPU's memory: devices, workers, leases, sessions")
    p.add_argument("--admission", metavar="HOST:PORT")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int | None:
    handler = {"up": up, "down": down, "ps": ps}.get(args.command)
    return handler(args) if handler else None


def main(argv: Sequence[str]) -> int:   # for tests: `lmx up|down|ps ...`
    parser = argparse.ArgumentParser(prog="lmx")
    add_commands(parser.add_subparsers(dest="command"))
    result = run(parser.parse_args(argv))
    return 2 if result is None else result
