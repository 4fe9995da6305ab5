"""Where lmx keeps per-user runtime files (the stack's state, admission's
book file): LMX_STACK_DIR if set, else $XDG_RUNTIME_DIR/lmx, else
/tmp/lmx-<uid>."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def runtime_dir() -> Path:
    explicit = os.environ.get("LMX_STACK_DIR")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "lmx"
    return Path(tempfile.gettempdir()) / f"lmx-{os.getuid()}"
