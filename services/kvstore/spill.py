"""The spill directory: entries written out of shared memory when it is full
(or at a clean stop), as `lmx-<entry_id>.kv` (the bytes) next to
`lmx-<entry_id>.json` (the entry, for people and tools; the manifest is what
the store reads back)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from services.common.files import write_private_json

CHUNK = 8 << 20


class SpillDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def data_path(self, entry_id: str) -> Path:
        return self.path / f"lmx-{entry_id}.kv"

    def sidecar_path(self, entry_id: str) -> Path:
        return self.path / f"lmx-{entry_id}.json"

    def write(self, entry_id: str, data: memoryview, sidecar: dict[str, Any]) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self.data_path(entry_id)
        tmp = target.with_name(target.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for start in range(0, len(data), CHUNK):
                chunk = data[start:start + CHUNK]
                written = 0
                while written < len(chunk):
                    written += os.write(fd, chunk[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        sidecar_path = self.sidecar_path(entry_id)       # owner-only: tokens and chat
        write_private_json(sidecar_path, sidecar, tmp=sidecar_path.with_suffix(".json.tmp"))

    def size(self, entry_id: str) -> int | None:
        try:
            return self.data_path(entry_id).stat().st_size
        except OSError:
            return None

    def read_into(self, entry_id: str, target: memoryview) -> None:
        """Fill `target` from the entry's file; OSError if short or missing."""
        with open(self.data_path(entry_id), "rb", buffering=0) as fh:
            done = 0
            while done < len(target):
                num = fh.readinto(target[done:done + CHUNK])
                if not num:
                    raise OSError(f"{self.data_path(entry_id)} is shorter than {len(target)} bytes")
                done += num

    def remove(self, entry_id: str) -> None:
        self.data_path(entry_id).unlink(missing_ok=True)
        self.sidecar_path(entry_id).unlink(missing_ok=True)

    def entry_ids(self) -> set[str]:
        """Ids of every entry with a file here (temporary files included)."""
        ids = set()
        if not self.path.is_dir():
            return ids
        for child in self.path.iterdir():
            name = child.name
            if name.startswith("lmx-"):
                for suffix in (".kv.tmp", ".json.tmp", ".kv", ".json"):
                    if name.endswith(suffix):
                        ids.add(name[4:-len(suffix)])
                        break
        return ids
