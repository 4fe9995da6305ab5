"""What a run of admission leaves outstanding, on disk: how many leases and
the longest TTL among them. Admission's book itself lives in memory; after a
restart the holders of the previous run's leases learn from their next
renewal (NOT_FOUND) that the new admission does not know them, and give their
memory up. Until they have, that memory is still in use: a restart that finds
leases outstanding here grants nothing for their longest TTL (at most
--restart-grace-max-s), so the same memory is never granted twice.

Written atomically (temporary file, rename), owner-only; at most every
WRITE_EVERY_S while leases change, at once when the last one goes or the first
comes. Pure file handling: no gRPC."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from services.common.files import write_private_json

log = structlog.get_logger(__name__)

WRITE_EVERY_S = 0.5


@dataclass(frozen=True, slots=True)
class Outstanding:
    leases: int
    longest_ttl_s: float


class BookFile:
    def __init__(self, path: Path):
        self.path = path
        self._last: Outstanding | None = None
        self._written_at = 0.0

    def read(self) -> Outstanding:
        """What the previous run left (nothing if there is no readable file)."""
        try:
            data = json.loads(self.path.read_text())
            return Outstanding(int(data["leases"]), float(data["longest_ttl_s"]))
        except FileNotFoundError:
            return Outstanding(0, 0.0)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("book_file_unreadable", path=str(self.path), error=str(exc))
            return Outstanding(0, 0.0)

    def note(self, now: Outstanding, force: bool = False) -> None:
        """Record `now` if it changed (throttled, see the module)."""
        if now == self._last:
            return
        edge = self._last is None or (self._last.leases == 0) != (now.leases == 0)
        clock = time.monotonic()
        if not (force or edge or clock - self._written_at >= WRITE_EVERY_S):
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_json(self.path, {"leases": now.leases, "longest_ttl_s": now.longest_ttl_s,
                                       "pid": os.getpid()})
        self._last, self._written_at = now, clock
