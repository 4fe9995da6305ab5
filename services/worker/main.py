"""Entry point of a worker server (one per model)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from services.common import logging as lmx_logging
from services.common.errors import ConfigError, LmxError
from services.common.server import serve
from services.worker.settings import load_settings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        lmx_logging.configure(settings.log_format, settings.log_level)
        from services.worker.app import WorkerApp  # torch and transformers load here

        asyncio.run(serve(WorkerApp(settings), settings.listen, settings.grace_s))
    except ConfigError as exc:
        print(f"lmx worker: error: {exc}", file=sys.stderr)
        return 2
    except LmxError as exc:
        print(f"lmx worker: error: {exc.message}", file=sys.stderr)
        return 1
    return 0
