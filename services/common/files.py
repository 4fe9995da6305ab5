"""Small files lmx keeps for itself: written whole or not at all, readable by
their owner only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_private_json(path: Path, data: Any, tmp: Path | None = None) -> None:
    """`data` as JSON at `path`: written to a temporary file beside it (`tmp`,
    default .<name>.<pid>.tmp), mode 0600, then renamed into place (atomic
    against a crash of the writer; not fsynced)."""
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)
