"""Entry point of the HTTP front (`lmx front`)."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

import structlog

from services.common import logging as lmx_logging
from services.common.errors import ConfigError
from services.common.parent import follow_parent
from services.common.units import parse_address
from services.front.settings import FrontSettings, load_settings

log = structlog.get_logger(__name__)


async def serve(settings: FrontSettings) -> None:
    from services.front.app import FrontApp, http_error_response
    from services.front.http_server import HttpServer

    app = FrontApp(settings)
    app.start()
    host, port = parse_address(settings.listen)
    server = HttpServer(app.handle, host, port, settings.max_body_bytes, http_error_response,
                        keep_alive_s=settings.keep_alive_s)
    await server.start()
    log.info("server_ready", address=server.address, admission=settings.admission,
             services=["openai-http"])
    print(f"lmx front: serving on http://{server.address}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("server_stopping", grace_s=settings.grace_s)
        await server.stop(settings.grace_s)
        await app.close()
        log.info("server_stopped")


def main(argv: Sequence[str] | None = None) -> int:
    follow_parent()
    try:
        settings = load_settings(argv)
        lmx_logging.configure(settings.log_format, settings.log_level)
        asyncio.run(serve(settings))
    except ConfigError as exc:
        print(f"lmx front: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lmx front: error: cannot serve on {exc}", file=sys.stderr)
        return 1
    return 0
