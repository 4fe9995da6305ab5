"""A small HTTP/1.1 server on asyncio streams, enough for the OpenAI API.
No framework: the stack's dependencies stay grpcio, protobuf, torch and
structlog.

- Persistent connections (keep-alive): requests one after another on a
  connection; it is closed after a request that says `Connection: close` (or
  an HTTP/1.0 one without `Connection: keep-alive`), after a malformed one,
  when the server stops, or when no request starts within `keep_alive_s`
  (0: one request per connection).
- A body of at most `max_body_bytes` (Content-Length; no chunked uploads).
- A whole response (Content-Length), or a stream of server-sent events:
  chunked on a kept connection, ended by closing for HTTP/1.0.

A client that goes away, at any point after its request, cancels what
serves it: the connection is read while the answer is made (a whole answer,
or a stream before its first event), and its end cancels the handler; bytes
that come meanwhile (a pipelined next request) are kept for the next
request. Mid-stream, the stream's iterator is closed when a write fails,
which cancels what feeds it (the worker's generation)."""

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
#: The longest a request may take to arrive, once its first byte came (and
#: the longest a new connection may wait for its first request).
READ_TIMEOUT_S = 30.0
READ_CHUNK = 64 << 10


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]          # lower-case names
    body: bytes
    version: str = "HTTP/1.1"

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


class Input:
    """A connection's incoming bytes. Everything is read through it, so that
    bytes read ahead (a next, pipelined request arriving while an answer is
    made: see `watch`) are kept for the next request instead of lost."""

    def __init__(self, reader: asyncio.StreamReader, max_ahead: int = MAX_HEADER_BYTES):
        self._reader = reader
        self._buffer = bytearray()
        self._max_ahead = max_ahead

    async def _more(self, at_least: int = READ_CHUNK) -> bool:
        """Read what came (False at the end of the stream)."""
        data = await self._reader.read(max(at_least, READ_CHUNK))
        self._buffer += data
        return bool(data)

    async def ready(self) -> bool:
        """Wait for a first byte: True when one is there, False when the
        client closed instead."""
        return bool(self._buffer) or await self._more()

    async def readuntil(self, separator: bytes, limit: int) -> bytes:
        """Up to and with `separator`; HttpError 431 past `limit` bytes."""
        start = 0
        while True:
            index = self._buffer.find(separator, start)
            if index >= 0:
                return self._take(index + len(separator))
            if len(self._buffer) > limit:
                raise HttpError(431, "request headers too large")
            start = max(0, len(self._buffer) - len(separator) + 1)
            if not await self._more():
                raise ConnectionResetError("the client closed before a whole request")

    async def readexactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if not await self._more(size - len(self._buffer)):
                raise ConnectionResetError("the client closed before the whole body")
        return self._take(size)

    def _take(self, size: int) -> bytes:
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def watch(self) -> bool:
        """Read while an answer is made, to see the client leave: True at the
        end of the stream (or a reset). Bytes that come meanwhile are the
        next request's, kept for it; past `max_ahead` of them this stops
        reading (returns False) and the client's departure is seen only when
        a write fails."""
        try:
            while len(self._buffer) < self._max_ahead:
                if not await self._more():
                    return True
        except ConnectionError:
            return True
        return False


def wants_close(request: Request) -> bool:
    """HTTP/1.1 keeps a connection unless `Connection: close`; HTTP/1.0
    closes it unless `Connection: keep-alive`."""
    tokens = {t.strip().lower() for t in request.headers.get("connection", "").split(",")}
    if request.version == "HTTP/1.0":
        return "keep-alive" not in tokens
    return "close" in tokens


async def read_request(source: Input, max_body_bytes: int) -> Request:
    head = await source.readuntil(b"\r\n\r\n", MAX_HEADER_BYTES)
    lines = head.decode("latin-1").split("\r\n")
    while lines and not lines[0]:          # empty lines before a request line are allowed
        lines.pop(0)
    try:
        method, target, version = lines[0].split(" ")
    except (ValueError, IndexError):
        raise HttpError(400, "malformed request line") from None
    if version not in ("HTTP/1.0", "HTTP/1.1"):
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
    body = await source.readexactly(length) if length else b""
    url = urlsplit(target)
    return Request(method.upper(), url.path, parse_qs(url.query), headers, body, version)


def _head(status: int, content_type: str, headers: dict[str, str], length: int | None,
          keep_alive_s: float | None) -> bytes:
    """A response's head: Content-Length, else chunked (a stream on a kept
    connection) or neither (a stream ended by closing); `keep_alive_s` None
    closes the connection after it."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    if status == HTTPStatus.NO_CONTENT:
        length = None                      # 204: neither a body nor its length
    else:
        lines.append(f"Content-Type: {content_type}")
    if keep_alive_s is None:
        lines.append("Connection: close")
    else:
        lines += ["Connection: keep-alive", f"Keep-Alive: timeout={max(1, int(keep_alive_s))}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    elif status != HTTPStatus.NO_CONTENT:
        lines.append("Cache-Control: no-cache")
        if keep_alive_s is not None:
            lines.append("Transfer-Encoding: chunked")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class HttpServer:
    def __init__(self, handler: Handler, host: str, port: int, max_body_bytes: int,
                 on_error: Callable[[int, str], Response], keep_alive_s: float = 5.0):
        self.handler = handler
        self.host, self.port = host, port
        self.max_body_bytes = max_body_bytes
        self.on_error = on_error
        self.keep_alive_s = keep_alive_s
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._idle: set[asyncio.Task] = set()     # waiting for a request: closed at once on stop
        self._stopping = False

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  limit=MAX_HEADER_BYTES)

    async def stop(self, grace_s: float) -> None:
        """Stop listening, close idle connections, let answers in flight end
        within `grace_s` (their connections then close), cancel the rest."""
        if self._server is None:
            return
        self._stopping = True
        self._server.close()
        for task in list(self._idle):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=grace_s)
        for task in list(self._connections):
            task.cancel()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        source = Input(reader)
        try:
            wait_s = READ_TIMEOUT_S
            while not self._stopping:
                if not await self._next(source, wait_s):
                    return
                try:
                    request = await asyncio.wait_for(read_request(source, self.max_body_bytes),
                                                     READ_TIMEOUT_S)
                except HttpError as exc:
                    await self._send(writer, self.on_error(exc.status, exc.message), None, False)
                    return
                except (ConnectionError, TimeoutError):
                    return
                if not await self._answer(request, source, writer):
                    return
                wait_s = self.keep_alive_s
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            self._idle.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass

    async def _next(self, source: Input, wait_s: float) -> bool:
        """Wait up to `wait_s` for a request's first byte: False when the
        client closed, the wait ran out or the server stops."""
        if wait_s <= 0:
            return False
        task = asyncio.current_task()
        assert task is not None
        self._idle.add(task)
        try:
            return await asyncio.wait_for(source.ready(), wait_s)
        except (TimeoutError, ConnectionError):
            return False
        finally:
            self._idle.discard(task)

    def _keep_alive(self, request: Request) -> float | None:
        """How long the connection may then wait for the next request; None:
        it is closed after this answer."""
        if self.keep_alive_s <= 0 or self._stopping or wants_close(request):
            return None
        return self.keep_alive_s

    async def _answer(self, request: Request, source: Input,
                      writer: asyncio.StreamWriter) -> bool:
        """Handle and send, watching the connection meanwhile: a client that
        closes it is gone, and the handler is cancelled whatever it waits
        for (a queue, memory, the first token, a whole answer), which cancels
        the worker's generation. True when the connection may serve another
        request."""
        answering = asyncio.create_task(self._handle_and_send(request, writer))
        watching = asyncio.create_task(source.watch())
        try:
            done, _ = await asyncio.wait({answering, watching},
                                         return_when=asyncio.FIRST_COMPLETED)
            if answering not in done and (watching.exception() is not None
                                          or watching.result()):
                log.info("client_left", method=request.method, path=request.path)
                answering.cancel()
            return await answering
        finally:
            for task in (answering, watching):
                task.cancel()
            await asyncio.gather(answering, watching, return_exceptions=True)

    async def _handle_and_send(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        try:
            response = await self.handler(request)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - one request fails, the server goes on
            log.error("http_handler_failed", path=request.path, exc_info=exc)
            response = self.on_error(500, "internal error; see the server's log")
        keep_alive_s = self._keep_alive(request)
        chunked = request.version == "HTTP/1.1"
        if isinstance(response, StreamResponse) and not chunked:
            keep_alive_s = None
        try:
            await self._send(writer, response, keep_alive_s, chunked)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - a broken stream ends its connection only
            log.error("http_send_failed", path=request.path, exc_info=exc)
            return False
        return keep_alive_s is not None and not self._stopping

    async def _send(self, writer: asyncio.StreamWriter, response: Response | StreamResponse,
                    keep_alive_s: float | None, chunked: bool) -> None:
        if isinstance(response, Response):
            writer.write(_head(response.status, response.content_type, response.headers,
                               len(response.body), keep_alive_s) + response.body)
            await writer.drain()
            return
        events = response.events
        chunked = chunked and keep_alive_s is not None
        try:
            writer.write(_head(response.status, response.content_type, response.headers, None,
                               keep_alive_s))
            await writer.drain()
            async for event in events:
                if not event:
                    continue
                writer.write(b"%x\r\n%b\r\n" % (len(event), event) if chunked else event)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        finally:
            await events.aclose()        # the client left early: the generation stops too
            if response.on_close is not None:
                response.on_close()
