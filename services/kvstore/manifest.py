"""The store's manifest (which segments and entries it holds, so that a
restart after a crash can re-adopt them) and its liveness lock.

The manifest is JSON at <state_dir>/manifest.json, replaced atomically
(write a temporary file, then rename) on every change. The lock is
`lmx-<store_id>.lock` in the shm directory, held with flock while the store
runs: the kernel lets go of it when the process dies, however it dies, so
another store can tell a live store from a crashed one.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import structlog

from services.common.errors import ConfigError
from services.common.files import write_private_json

log = structlog.get_logger(__name__)

MANIFEST_NAME = "manifest.json"
VERSION = 2  # 2: token ids as base64 int32


class Manifest:
    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / MANIFEST_NAME

    def read(self) -> dict[str, Any] | None:
        """The last manifest written; None if there is none or it is unreadable."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("manifest_unreadable", path=str(self.path), error=str(exc))
            return None
        if not isinstance(data, dict) or data.get("version") != VERSION:
            log.warning("manifest_unreadable", path=str(self.path), error="unknown version")
            return None
        return data

    def write(self, segments: list[dict[str, Any]], entries: list[dict[str, Any]]) -> None:
        """Atomic against a crash of the process (write, then rename); not
        fsynced: what it describes, shared memory, does not outlive the host
        either, and an fsync per commit cost milliseconds on the hot path."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = {"version": VERSION, "pid": os.getpid(), "segments": segments,
                "entries": entries}
        # Owner-only: it lists the sessions' tokens, their chat metadata and
        # their secrets' hashes.
        write_private_json(self.path, data)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def has_manifest(state_dir: str | Path) -> bool:
    return (Path(state_dir) / MANIFEST_NAME).exists()


def lock_path(shm_dir: str | Path, store_id: str) -> Path:
    return Path(shm_dir) / f"lmx-{store_id}.lock"


def is_locked(shm_dir: str | Path, store_id: str) -> bool:
    """Whether a live process holds store `store_id`'s lock."""
    try:
        fd = os.open(lock_path(shm_dir, store_id), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class StoreLock:
    """Held while a store runs; a second store with the same id is refused."""

    def __init__(self, shm_dir: str | Path, store_id: str):
        self.path = lock_path(shm_dir, store_id)
        self.store_id = store_id
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError("store_id", f"store {self.store_id!r} is already running "
                                          f"(its lock {self.path} is held)",
                              fix="stop it, or pass another --store-id") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
