"""The store's manifest (which segments and entries it holds, so that a
restart after a crash can re-adopt them) and its liveness lock.

The manifest is JSON at <state_dir>/manifest.json, replaced atomically
(write a temporary file, then rename). Between two such snapshots, commits
and deletes are appended to <state_dir>/journal.jsonl, one line each (a few
kB, not every entry again); a restart replays the lines of the snapshot's
generation on top of it, and the next snapshot starts the journal afresh.
The lock is
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
JOURNAL_NAME = "journal.jsonl"
VERSION = 2  # 2: token ids as base64 int32


class Manifest:
    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / MANIFEST_NAME
        self.journal_path = self.state_dir / JOURNAL_NAME
        #: The last snapshot's generation: journal lines carry it, and a
        #: restart replays only those of the snapshot it read (a crash
        #: between a snapshot and the journal's removal leaves older lines).
        self.generation = 0

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
        generation = data.get("generation", 0)
        self.generation = generation if isinstance(generation, int) else 0
        return data

    def read_journal(self) -> list[dict[str, Any]]:
        """The journal's records of the last snapshot read, in order; a line
        cut short by a crash, or of another generation, is skipped."""
        try:
            lines = self.journal_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("journal_unreadable", path=str(self.journal_path), error=str(exc))
            return []
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("journal_line_skipped", reason="not JSON (cut short by a crash?)")
                continue
            if isinstance(record, dict) and record.get("generation") == self.generation:
                records.append(record)
        return records

    def append(self, record: dict[str, Any]) -> None:
        """One change on the journal, after the last snapshot (not fsynced:
        it outlives the process, as the snapshot does, not the host)."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        line = json.dumps({**record, "generation": self.generation}) + "\n"
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def write(self, segments: list[dict[str, Any]], entries: list[dict[str, Any]],
              holds: list[dict[str, Any]] = ()) -> None:
        """Atomic against a crash of the process (write, then rename); not
        fsynced: what it describes, shared memory, does not outlive the host
        either, and an fsync per commit cost milliseconds on the hot path."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.generation += 1
        data = {"version": VERSION, "pid": os.getpid(), "generation": self.generation,
                "segments": segments, "entries": entries, "holds": list(holds)}
        # Owner-only: it lists the sessions' tokens, their chat metadata and
        # their secrets' hashes.
        write_private_json(self.path, data)
        # Everything the journal said is in the snapshot now.
        self.journal_path.unlink(missing_ok=True)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.journal_path.unlink(missing_ok=True)


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
