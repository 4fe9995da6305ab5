"""A small HTTP/1.1 server on asyncio streams, enough for the OpenAI API:
one request per connection (the response says `Connection: close`), a body
of at most `max_body_bytes` (Content-Length; no chunked uploads), a whole
response or a stream of server-sent events ended by closing. No framework:
the stack's dependencies stay grpcio, protobuf, torch and structlog.

A client that goes away, at any point after its request, cancels what
serves it: the connection is watched while the answer is made (a whole
answer, or a stream before its first event) and the handler cancelled when
it closes; mid-stream, the stream's iterator is closed, which cancels what
feeds it (the worker's generation)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import structlog

log = structlog.get_logger(__name__)

MAX_HEADER_BYTES = 64 << 10
READ_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]          # lower-case names
    body: bytes

    def json(self) -> object:
        return json.loads(self.body or b"null")


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_json(cls, status: int, value: object, headers: dict[str, str] | None = None
                ) -> Response:
        return cls(status, json.dumps(value).encode(), headers=headers or {})


@dataclass
class StreamResponse:
    """Server-sent events: each item of `events` is one event's bytes.
    `on_close` runs once the stream ended, however it ended (the client may
    leave before the first event)."""
    events: AsyncGenerator[bytes, None]
    status: int = 200
    content_type: str = "text/event-stream"
    headers: dict[str, str] = field(default_factory=dict)
    on_close: Callable[[], None] | None = None


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


async def read_request(reader: asyncio.StreamReader, max_body_bytes: int) -> Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(431, "request headers too large") from None
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("the client closed before a whole request") from None
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise HttpError(400, "malformed request line") from None
    if not version.startswith("HTTP/1."):
        raise HttpError(505, "HTTP/1.x only")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpError(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise HttpError(411, "chunked request bodies are not supported: send Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HttpError(400, "Content-Length is not a number") from None
    if length < 0:
        raise HttpError(400, "Content-Length is negative")
    if length > max_body_bytes:
        raise HttpError(413, f"the body is larger than {max_body_bytes} bytes")
    if headers.get("expect", "").lower() == "100-continue":
        raise HttpError(417, "Expect: 100-continue is not supported")
    try:
        body = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("the client closed before the whole body") from None
    url = urlsplit(target)
    return Request(method.upper(), url.path, parse_qs(url.query), headers, body)


def _head(status: int, content_type: str, headers: dict[str, str],
          length: int | None) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
             f"Content-Type: {content_type}", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    else:
        lines.append("Cache-Control: no-cache")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class HttpServer:
    def __init__(self, handler: Handler, host: str, port: int, max_body_bytes: int,
                 on_error: Callable[[int, str], Response]):
        self.handler = handler
        self.host, self.port = host, port
        self.max_body_bytes = max_body_bytes
        self.on_error = on_error
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  limit=MAX_HEADER_BYTES)

    async def stop(self, grace_s: float) -> None:
        if self._server is None:
            return
        self._server.close()
        if self._connections:
            await asyncio.wait(self._connections, timeout=grace_s)
        for task in list(self._connections):
            task.cancel()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            try:
                request = await asyncio.wait_for(read_request(reader, self.max_body_bytes),
                                                 READ_TIMEOUT_S)
            except HttpError as exc:
                await self._send(writer, self.on_error(exc.status, exc.message))
                return
            except (ConnectionError, TimeoutError):
                return
            await self._answer(request, reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass

    async def _answer(self, request: Request, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """Handle and send, watching the connection meanwhile: a client that
        closes it (one request per connection: nothing else may come) is
        gone, and the handler is cancelled whatever it waits for (a queue,
        memory, the first token, a whole answer), which cancels the worker's
        generation."""
        answering = asyncio.create_task(self._handle_and_send(request, writer))
        watching = asyncio.create_task(reader.read(1))
        try:
            done, _ = await asyncio.wait({answering, watching},
                                         return_when=asyncio.FIRST_COMPLETED)
            if answering not in done and not watching.cancelled() and (
                    watching.exception() is not None or watching.result() == b""):
                log.info("client_left", method=request.method, path=request.path)
                answering.cancel()
            await answering
        finally:
            for task in (answering, watching):
                task.cancel()
            await asyncio.gather(answering, watching, return_exceptions=True)

    async def _handle_and_send(self, request: Request, writer: asyncio.StreamWriter) -> None:
        await self._send(writer, await self.handler(request))

    async def _send(self, writer: asyncio.StreamWriter,
                    response: Response | StreamResponse) -> None:
        if isinstance(response, Response):
            writer.write(_head(response.status, response.content_type, response.headers,
                               len(response.body)) + response.body)
            await writer.drain()
            return
        events = response.events
        try:
            writer.write(_head(response.status, response.content_type, response.headers, None))
            await writer.drain()
            async for event in events:
                writer.write(event)
                await writer.drain()
        finally:
            await events.aclose()        # the client left early: the generation stops too
            if response.on_close is not None:
                response.on_close()
