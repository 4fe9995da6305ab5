"""How lmx's processes reach each other and are reached: plain loopback by
default; TLS and a bearer token when configured.

Servers (every service's settings): `--tls-cert`/`--tls-key` (PEM files) serve
TLS instead of plaintext; `--auth-token-file` makes every lmx RPC need the
token in the `authorization: Bearer <token>` metadata (UNAUTHENTICATED
otherwise). Health checking and reflection stay open, so probes and
`grpcurl list` work without it.

Clients (anything that dials: workers towards admission and the kvstore, the
CLI, the Python client, the supervisor's health probes) read the environment:
`LMX_TLS_CA` (a PEM file: dial with TLS, trusting it) and
`LMX_AUTH_TOKEN_FILE` (send its token with every call).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence
from pathlib import Path

import grpc

from services.common.errors import ConfigError

ENV_TLS_CA = "LMX_TLS_CA"
ENV_TOKEN_FILE = "LMX_AUTH_TOKEN_FILE"
AUTH_KEY = "authorization"


def read_token(path: str, what: str = "auth_token_file") -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(what, f"cannot read {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError(what, f"{path} is empty")
    return token


def read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(what, f"cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(what, f"{path} is not a PEM file")
    return data


# ---- clients ---------------------------------------------------------------

def _client_token() -> str:
    path = os.environ.get(ENV_TOKEN_FILE, "")
    return read_token(path, ENV_TOKEN_FILE) if path else ""


def _client_credentials() -> grpc.ChannelCredentials | None:
    path = os.environ.get(ENV_TLS_CA, "")
    return grpc.ssl_channel_credentials(root_certificates=read_pem(path, ENV_TLS_CA)) \
        if path else None


def _with_token(metadata, token: str):
    pairs = list(metadata or ())
    pairs.append((AUTH_KEY, f"Bearer {token}"))
    return pairs


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    def _details(self, details):
        return _CallDetails(details.method, details.timeout,
                            _with_token(details.metadata, self.token), details.credentials,
                            getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


class _AioToken(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor,
                grpc.aio.StreamUnaryClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    def _details(self, details):
        return grpc.aio.ClientCallDetails(details.method, details.timeout,
                                          grpc.aio.Metadata(*_with_token(details.metadata,
                                                                         self.token)),
                                          details.credentials, details.wait_for_ready)

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def channel(address: str, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A blocking channel to an lmx server, with TLS and the token from the
    environment when set."""
    credentials = _client_credentials()
    chan = (grpc.secure_channel(address, credentials, options=list(options)) if credentials
            else grpc.insecure_channel(address, options=list(options)))
    token = _client_token()
    return grpc.intercept_channel(chan, _SyncToken(token)) if token else chan


def aio_channel(address: str, options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
    """The asyncio flavour of `channel`."""
    credentials = _client_credentials()
    token = _client_token()
    interceptors = [_AioToken(token)] if token else None
    if credentials:
        return grpc.aio.secure_channel(address, credentials, options=list(options),
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)


# ---- servers ---------------------------------------------------------------

class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Every lmx RPC (not health, not reflection) needs the token."""

    def __init__(self, token: str, package_prefix: str = "/lmx."):
        self._expected = f"Bearer {token}".encode()
        self._prefix = package_prefix

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == AUTH_KEY and isinstance(value, str):
                return hmac.compare_digest(value.encode(), self._expected)
        return False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if (handler is None or not handler_call_details.method.startswith(self._prefix)
                or self._allowed(handler_call_details)):
            return handler
        message = ("this server needs a token: send 'authorization: Bearer <token>' "
                   f"(clients: set {ENV_TOKEN_FILE})")

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - an async generator that never yields

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                deny_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            deny_stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def server_credentials(cert_path: str, key_path: str) -> grpc.ServerCredentials | None:
    if not cert_path and not key_path:
        return None
    if not (cert_path and key_path):
        raise ConfigError("tls_cert", "give both --tls-cert and --tls-key, or neither")
    return grpc.ssl_server_credentials(
        [(read_pem(key_path, "tls_key"), read_pem(cert_path, "tls_cert"))])
