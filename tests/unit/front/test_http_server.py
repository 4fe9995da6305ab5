"""The front's HTTP server (services/front/http_server.py) with a fake
handler, over real loopback sockets: persistent connections (several requests
one after another, `Connection: close` honoured, the idle timeout, streams
chunked on a kept connection), bytes of a pipelined request kept for it while
an answer is made, and a client that leaves cancelling its answer (issue 23).
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable, Coroutine

import pytest

from services.front.http_server import HttpServer, Request, Response, StreamResponse

pytestmark = pytest.mark.timeout(60)


def run(test: Callable[[], Coroutine]) -> Callable[[], None]:
    """An async test, run on its own event loop."""
    @functools.wraps(test)
    def sync() -> None:
        asyncio.run(asyncio.wait_for(test(), 30))
    return sync


class Fake:
    """Answers GET /echo?... with the request, /slow once `release` is set,
    /forever never (recording its cancellation), /stream with three events."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.stream_closed = asyncio.Event()
        self.started = asyncio.Event()

    async def handle(self, request: Request) -> Response | StreamResponse:
        self.seen.append(request)
        if request.path == "/slow":
            self.started.set()
            await self.release.wait()
        elif request.path == "/forever":
            self.started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        elif request.path == "/stream":
            return StreamResponse(self._events(), on_close=self.stream_closed.set)
        return Response.of_json(200, {"path": request.path, "body": request.body.decode()},
                                headers={"x-seen": str(len(self.seen))})

    async def _events(self) -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"data: {i}\n\n".encode()


def error(status: int, message: str) -> Response:
    return Response.of_json(status, {"error": message})


async def started(fake: Fake, keep_alive_s: float = 5.0) -> HttpServer:
    server = HttpServer(fake.handle, "127.0.0.1", 0, 1 << 20, error, keep_alive_s=keep_alive_s)
    await server.start()
    return server


async def connect(server: HttpServer):
    host, port = server.address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


def request(path: str, body: bytes = b"", headers: str = "", version: str = "HTTP/1.1"
            ) -> bytes:
    method = "POST" if body else "GET"
    return (f"{method} {path} {version}\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"{headers}\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response: its status, headers (lower-case names) and body, read by
    Content-Length, chunks, or to the end of the stream."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
            if size == 0:
                break
    elif status == 204:
        body = b""
    else:
        body = await asyncio.wait_for(reader.read(), 10)
    return status, headers, body


async def closed(reader: asyncio.StreamReader, within_s: float = 5.0) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), within_s) == b""
    except (ConnectionError, TimeoutError):
        return False


@run
async def test_several_requests_one_after_another_on_one_connection():
    fake = Fake()
    server = await started(fake)
    reader, writer = await connect(server)
    try:
        for i in range(3):
            writer.write(request("/echo", f"body {i}".encode()))
            status, headers, body = await read_response(reader)
            assert status == 200 and headers["connection"] == "keep-alive"
            assert json.loads(body) == {"path": "/echo", "body": f"body {i}"}
            assert headers["x-seen"] == str(i + 1)
        writer.write(request("/echo", headers="Connection: close\r\n"))
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await closed(reader), "Connection: close from the client is honoured"
    finally:
        writer.close()
        await server.stop(1)


@run
async def test_an_idle_connection_is_closed_after_keep_alive_s():
    fake = Fake()
    server = await started(fake, keep_alive_s=0.3)
    reader, writer = await connect(server)
    try:
        writer.write(request("/echo"))
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["keep-alive"] == "timeout=1"
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await closed(reader, 3)
        assert 0.2 < loop.time() - start < 2, "closed after about keep_alive_s"
    finally:
        writer.close()
        await server.stop(1)


@run
async def test_keep_alive_0_and_http_1_0_close_after_one_answer():
    fake = Fake()
    server = await started(fake, keep_alive_s=0)
    reader, writer = await connect(server)
    writer.write(request("/echo"))
    status, headers, _ = await read_response(reader)
    assert headers["connection"] == "close" and await closed(reader)
    writer.close()
    await server.stop(1)

    server = await started(fake)
    reader, writer = await connect(server)
    writer.write(request("/echo", version="HTTP/1.0"))
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "close" and await closed(reader)
    writer.close()
    reader, writer = await connect(server)
    writer.write(request("/echo", headers="Connection: keep-alive\r\n", version="HTTP/1.0"))
    status, headers, _ = await read_response(reader)
    assert headers["connection"] == "keep-alive", "HTTP/1.0 asking to keep it"
    writer.close()
    await server.stop(1)


@run
async def test_a_stream_is_chunked_and_the_connection_serves_on():
    fake = Fake()
    server = await started(fake)
    reader, writer = await connect(server)
    try:
        writer.write(request("/stream"))
        status, headers, body = await read_response(reader)
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert headers["content-type"] == "text/event-stream"
        assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert fake.stream_closed.is_set()
        writer.write(request("/echo", b"after"))
        status, _, body = await read_response(reader)
        assert status == 200 and json.loads(body)["body"] == "after"
    finally:
        writer.close()
        await server.stop(1)


@run
async def test_an_http_1_0_stream_ends_by_closing():
    fake = Fake()
    server = await started(fake)
    reader, writer = await connect(server)
    writer.write(request("/stream", version="HTTP/1.0"))
    status, headers, body = await read_response(reader)
    assert "transfer-encoding" not in headers and headers["connection"] == "close"
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    writer.close()
    await server.stop(1)


@run
async def test_pipelined_bytes_that_come_during_an_answer_are_kept_for_the_next_request():
    """The next request (and a part of the one after) arrive while /slow is
    answered: the server reads them to watch the connection, and serves them
    in order once /slow is answered, nothing lost."""
    fake = Fake()
    server = await started(fake)
    reader, writer = await connect(server)
    try:
        writer.write(request("/slow"))
        await asyncio.wait_for(fake.started.wait(), 5)
        second, third = request("/echo", b"second"), request("/echo", b"third" * 1000)
        writer.write(second + third[:40])
        await writer.drain()
        await asyncio.sleep(0.2)
        assert len(fake.seen) == 1
        fake.release.set()
        status, _, body = await read_response(reader)
        assert status == 200 and json.loads(body)["path"] == "/slow"
        status, _, body = await read_response(reader)
        assert json.loads(body) == {"path": "/echo", "body": "second"}
        writer.write(third[40:])
        status, _, body = await read_response(reader)
        assert json.loads(body)["body"] == "third" * 1000
    finally:
        writer.close()
        await server.stop(1)


@run
async def test_a_client_that_leaves_cancels_its_answer_even_after_sending_more():
    fake = Fake()
    server = await started(fake)
    for extra in (b"", request("/echo")):     # leaving, or pipelining then leaving
        fake.started.clear()
        fake.cancelled.clear()
        reader, writer = await connect(server)
        writer.write(request("/forever"))
        await asyncio.wait_for(fake.started.wait(), 5)
        if extra:
            writer.write(extra)
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.close()
        await asyncio.wait_for(fake.cancelled.wait(), 5)
    await server.stop(1)


@run
async def test_a_malformed_request_is_answered_and_closed():
    fake = Fake()
    server = await started(fake)
    reader, writer = await connect(server)
    writer.write(b"NONSENSE\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 400 and headers["connection"] == "close" and await closed(reader)
    writer.close()
    await server.stop(1)


@run
async def test_stop_closes_idle_connections_at_once():
    fake = Fake()
    server = await started(fake, keep_alive_s=60)
    reader, writer = await connect(server)
    writer.write(request("/echo"))
    await read_response(reader)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await server.stop(10)
    assert loop.time() - start < 2, "an idle kept connection does not hold the stop"
    assert await closed(reader)
    writer.close()


@run
async def test_httpx_reuses_one_connection_for_whole_and_streamed_answers():
    httpx = pytest.importorskip("httpx2")
    fake = Fake()
    server = await started(fake)
    ports = set()
    try:
        async with httpx.AsyncClient(base_url=f"http://{server.address}") as client:
            for _ in range(2):
                reply = await client.post("/echo", content=b"x")
                assert reply.json()["body"] == "x"
                ports.add(reply.extensions["network_stream"].get_extra_info("client_addr"))
                async with client.stream("GET", "/stream") as streamed:
                    assert [line async for line in streamed.aiter_lines() if line] == [
                        "data: 0", "data: 1", "data: 2"]
                    ports.add(
                        streamed.extensions["network_stream"].get_extra_info("client_addr"))
        assert len(ports) == 1, f"one connection for all: {ports}"
    finally:
        await server.stop(1)
