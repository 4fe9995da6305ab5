"""A service started by another process (a supervisor, a test, a benchmark)
stops when that process ends, so that nothing is left behind: the starter
sets LMX_PARENT_PID to its pid, and the service asks Linux for SIGTERM when
its parent dies (prctl PR_SET_PDEATHSIG), then checks the parent is still the
one named (it may have died before the ask).

This replaces a `preexec_fn` in subprocess.Popen: that forces a plain fork()
of a process with gRPC threads, and gRPC's fork handlers can then abort the
child before its exec (grpc/grpc#43055: "epoll_wait error: Bad file
descriptor"). Without `preexec_fn`, CPython starts children with vfork or
posix_spawn, which runs no fork handlers.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping

PARENT_PID_ENV = "LMX_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment) for a child that should
    stop when this process ends."""
    return {**(os.environ if env is None else env), PARENT_PID_ENV: str(os.getpid())}


def follow_parent() -> None:
    """In the service: SIGTERM to itself when the parent named in
    LMX_PARENT_PID ends. Linux only; elsewhere, or without the variable,
    nothing."""
    value = os.environ.get(PARENT_PID_ENV, "")
    if not value.isdigit() or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(value):        # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs: one that ended but is not yet reaped (a
    zombie) does not; one of another user does."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
