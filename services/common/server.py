"""The one server bootstrap shared by the lmx services.

    aio server (+ the error-mapping interceptor)
    -> health: every service NOT_SERVING
    -> reflection
    -> bind (a taken port is a clear error, never silently shared)
    -> app.start()          (the service gets ready: devices, models, ...)
    -> health SERVING, log "server_ready"
    -> wait for SIGTERM / SIGINT
    -> health NOT_SERVING, server.stop(grace), app.close()
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import logging as lmx_logging
from services.common import reflection
from services.common.errors import ConfigError, LmxError
from services.common.interceptors import ErrorMappingInterceptor
from services.common.transport import TokenInterceptor, read_token, server_credentials
from services.common.parent import follow_parent

log = structlog.get_logger(__name__)

# 64 MiB by default (--max-message-bytes): room for chunked KV transfers;
# limits for hostile input are per-RPC in the services.
MAX_MESSAGE_BYTES = 64 << 20


class App(Protocol):
    """What a service hands to the bootstrap."""

    #: Full names of the gRPC services it serves, e.g. "lmx.v1.AdmissionService".
    service_names: Sequence[str]

    def register(self, server: grpc.aio.Server) -> None: ...

    async def start(self, address: str) -> None:
        """Get ready to serve; `address` is where the server listens."""
        ...

    def drain(self) -> None:
        """Shutting down: end long-lived streams (Watch) so stop() need not
        wait out the grace period for them."""
        ...

    async def close(self) -> None: ...


class Server:
    """Runs one App on one address until asked to stop."""

    def __init__(self, app: App, listen: str, grace_s: float = 5.0,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 credentials: grpc.ServerCredentials | None = None, token: str = ""):
        self.app = app
        self.listen = listen
        self.grace_s = grace_s
        self.max_message_bytes = max_message_bytes
        #: TLS (None: plaintext) and the bearer token every lmx RPC needs ("": none).
        self.credentials = credentials
        self.token = token
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._stopping = asyncio.Event()

    async def start(self) -> int:
        """Bind, get ready, turn health SERVING. Returns the bound port."""
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorMappingInterceptor()]
        if self.token:
            interceptors.insert(0, TokenInterceptor(self.token))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                # A second server on a taken port must fail, not share it.
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
            ],
        )
        self._server = server
        self.app.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = list(self.app.service_names)
        for name in ["", *names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable(
            server, [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name])
        try:
            port = (server.add_secure_port(self.listen, self.credentials) if self.credentials
                    else server.add_insecure_port(self.listen))
        except RuntimeError as exc:
            raise ConfigError("listen", f"cannot listen on {self.listen}: {exc}",
                              fix="is another server using that port? pass --listen HOST:PORT") from None
        if not port:
            raise ConfigError("listen", f"cannot listen on {self.listen}",
                              fix="is another server using that port? pass --listen HOST:PORT")
        self.port = port
        await server.start()
        if self.listen.startswith("unix:"):
            address = self.listen
            # Owner-only, like the shared memory: other users cannot connect.
            os.chmod(self.listen[len("unix:"):], 0o600)
        else:
            address = f"{self.listen.rpartition(':')[0]}:{port}"
        await self.app.start(address)
        for name in ["", *names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("server_ready", services=names, address=address)
        return port

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """Health NOT_SERVING, stop accepting, let calls finish for grace_s, close."""
        log.info("server_stopping", grace_s=self.grace_s)
        await self._health.enter_graceful_shutdown()
        self.app.drain()
        try:
            if self._server is not None:
                await self._server.stop(self.grace_s)
        finally:
            await self.app.close()
        log.info("server_stopped")


async def serve(app: App, listen: str, grace_s: float,
                max_message_bytes: int = MAX_MESSAGE_BYTES,
                credentials: grpc.ServerCredentials | None = None, token: str = "") -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    server = Server(app, listen, grace_s, max_message_bytes, credentials, token)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.request_stop)
    try:
        await server.start()
        await server.wait()
    finally:
        await server.stop()


def run_service(service: str, load_settings: Callable[[Sequence[str] | None], Any],
                make_app: Callable[[Any], App], argv: Sequence[str] | None = None) -> int:
    """A service's main: settings, then logging, then the app (imported by
    make_app, after logging is set up), served until SIGTERM. A bad setting
    exits 2 and a failed start 1, each with one clear line, no traceback."""
    follow_parent()
    try:
        settings = load_settings(argv)
        lmx_logging.configure(settings.log_format, settings.log_level)
        credentials = server_credentials(getattr(settings, "tls_cert", ""),
                                         getattr(settings, "tls_key", ""))
        token_file = getattr(settings, "auth_token_file", "")
        token = read_token(token_file) if token_file else ""
        asyncio.run(serve(make_app(settings), settings.listen, settings.grace_s,
                          getattr(settings, "max_message_bytes", MAX_MESSAGE_BYTES),
                          credentials, token))
    except ConfigError as exc:
        print(f"lmx {service}: error: {exc}", file=sys.stderr)
        return 2
    except LmxError as exc:
        print(f"lmx {service}: error: {exc.message}", file=sys.stderr)
        return 1
    return 0
