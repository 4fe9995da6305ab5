"""Entry point of the admission server."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from services.admission.settings import load_settings
from services.common import logging as lmx_logging
from services.common.errors import ConfigError
from services.common.server import serve


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        lmx_logging.configure(settings.log_format, settings.log_level)
        from services.admission.app import AdmissionApp  # after logging is set up

        asyncio.run(serve(AdmissionApp(settings), settings.listen, settings.grace_s))
    except ConfigError as exc:
        print(f"lmx admission: error: {exc}", file=sys.stderr)
        return 2
    return 0
