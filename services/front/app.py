"""The front's routes: OpenAI's API over lmx's workers, health and metrics.

    GET  /v1/models             the models the workers serve (admission's registry)
    POST /v1/chat/completions   a chat, streamed (server-sent events) or whole
    POST /v1/completions        raw text, likewise
    GET  /metrics               Prometheus
    GET  /health                200 once serving

A request goes to a worker of its model: the one holding a session whose
history is the longest prefix of the request (services/front/reuse.py), else
the one with the fewest sessions, in a new session. A refusal before the first
token is an HTTP status (429 with Retry-After when memory is short); after it,
an error event ends the stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
import structlog

from lmx.v1 import admission_pb2 as apb
from lmx.v1 import worker_pb2 as wpb
from services.front import openai_api as api
from services.front.http_server import HttpError, Request, Response, StreamResponse
from services.front.metrics import FrontMetrics, render
from services.front.reuse import Held, SessionCache
from services.front.settings import FrontSettings
from services.front.workers import Workers, api_error

log = structlog.get_logger(__name__)


def error_response(error: api.ApiError) -> Response:
    return Response.of_json(error.status, error.body(), error.headers())


def http_error_response(status: int, message: str) -> Response:
    return error_response(api.ApiError(status, message))


class FrontApp:
    def __init__(self, settings: FrontSettings):
        self.settings = settings
        self.workers = Workers(settings.admission, settings.request_timeout_s)
        self.cache = SessionCache(settings.sessions_per_worker)
        self.metrics = FrontMetrics()
        self._background: set[asyncio.Task] = set()
        self._kvstore = None
        if settings.kvstore:
            from lmx.v1 import kvstore_pb2_grpc
            from services.common import transport

            self._kvstore_channel = transport.aio_channel(settings.kvstore)
            self._kvstore = kvstore_pb2_grpc.KVStoreServiceStub(self._kvstore_channel)
        self._watching: asyncio.Task | None = None

    def start(self) -> None:
        """Count admission's events (parks, sleeps, wakes, reclaims) for
        /metrics, following the Watch stream again if it breaks."""
        self._watching = asyncio.create_task(self._watch(), name="watch")

    async def _watch(self) -> None:
        while True:
            try:
                async for event in self.workers.admission.watch():
                    self.metrics.saw(event)
            except grpc.aio.AioRpcError as exc:
                log.info("front_watch_broken", code=exc.code().name)
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
        if self._kvstore is not None:
            await self._kvstore_channel.close()
        for held in self.cache.held():
            await self.workers.close_session(held.worker, held.session_id, held.token)
        await self.workers.close()

    # ---- routing -----------------------------------------------------------
    async def handle(self, request: Request) -> Response | StreamResponse:
        endpoint = request.path
        try:
            response = await self._route(request)
        except api.ApiError as exc:
            response = error_response(exc)
        except HttpError as exc:
            response = http_error_response(exc.status, exc.message)
        except Exception as exc:  # noqa: BLE001 - one request fails, the front goes on
            log.error("front_request_failed", path=request.path, exc_info=exc)
            response = error_response(api.ApiError(500, f"internal error: {exc}",
                                                   type="api_error"))
        if endpoint.startswith("/v1/"):
            known = endpoint in ("/v1/models", "/v1/chat/completions", "/v1/completions")
            self.metrics.count(endpoint if known else "other", response.status)
        return response

    async def _route(self, request: Request) -> Response | StreamResponse:
        routes = {("GET", "/v1/models"): self._models,
                  ("POST", "/v1/chat/completions"): self._chat,
                  ("POST", "/v1/completions"): self._completion,
                  ("GET", "/metrics"): self._metrics,
                  ("GET", "/health"): self._health}
        handler = routes.get((request.method, request.path.rstrip("/") or "/"))
        if handler is None:
            known = {path for _, path in routes}
            if request.path in known:
                raise HttpError(405, f"{request.method} is not allowed on {request.path}")
            raise api.ApiError(404, f"no route {request.method} {request.path}",
                               type="not_found_error")
        return await handler(request)

    def _body(self, request: Request) -> object:
        try:
            return request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise api.bad(f"the body is not JSON: {exc}") from None

    # ---- the API -------------------------------------------------------------
    async def _models(self, request: Request) -> Response:
        models = await self.workers.models()
        return Response.of_json(200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "lmx"} for m in models]})

    async def _chat(self, request: Request) -> Response | StreamResponse:
        return await self._complete(api.parse_chat(self._body(request),
                                                   self.settings.default_max_tokens))

    async def _completion(self, request: Request) -> Response | StreamResponse:
        return await self._complete(api.parse_completion(self._body(request),
                                                         self.settings.default_max_tokens))

    async def _complete(self, call: api.Call) -> Response | StreamResponse:
        started = time.monotonic()
        key = call.messages if call.kind == "chat" else call.prompt
        workers = await self.workers.serving(call.model)
        held = self.cache.take([w.address for w in workers], key)
        if held is None:
            address = workers[0].address
            opened = await self.workers.open(address, call.model)
            held = self.cache.add(address, opened.session_id, opened.token)
            for old in self.cache.evict():
                self._spawn(self.workers.close_session(old.worker, old.session_id, old.token))
        self.metrics.running += 1
        replies = self.workers.generate(held.worker, held.session_id, held.token, call)
        stream = aiter(replies)
        try:
            first = await anext(stream)
        except asyncio.CancelledError:      # the client left before the first token
            replies.cancel()
            self.metrics.running -= 1
            self._drop(held)
            raise
        except grpc.aio.AioRpcError as exc:
            self.metrics.running -= 1
            self._drop(held)
            raise api_error(exc) from None
        except StopAsyncIteration:
            self.metrics.running -= 1
            self._drop(held)
            raise api.ApiError(502, "the worker ended the answer without a finish",
                               type="api_error") from None
        turn = _Turn(self, call, held, key, started, replies)
        if not call.stream:
            try:        # cancelled when the client leaves: close() cancels the generation
                return Response.of_json(200, await turn.whole(first, stream))
            finally:
                turn.close()
        return StreamResponse(turn.events(first, stream), on_close=turn.close)

    # ---- operations ----------------------------------------------------------
    async def _metrics(self, request: Request) -> Response:
        try:
            status = await self.workers.admission.stub.Status(apb.StatusRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            status = None
        store = None
        if self._kvstore is not None:
            from lmx.v1 import kvstore_pb2 as kpb
            try:
                store = await self._kvstore.GetStoreStatus(kpb.GetStoreStatusRequest(), timeout=5)
            except grpc.aio.AioRpcError:
                store = None
        text = render(self.metrics, self.cache.stats, status, store)
        return Response(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    async def _health(self, request: Request) -> Response:
        return Response.of_json(200, {"status": "ok"})

    def _drop(self, held: Held) -> None:
        self.cache.forget(held)
        self._spawn(self.workers.close_session(held.worker, held.session_id, held.token))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _Turn:
    """One generation's way back to the client, whole or streamed; its end
    (well or not) settles the session in the cache and the metrics."""

    def __init__(self, app: FrontApp, call: api.Call, held: Held, key, started: float,
                 rpc):
        self.app, self.call, self.held, self.key, self.started = app, call, held, key, started
        self.rpc = rpc                # the Generate call: cancelled if the turn ends early
        self.rid = api.new_id(call.kind)
        self.created = int(time.time())
        self.text: list[str] = []
        self.finish: wpb.GenerateFinish | None = None
        self.first_token_at: float | None = None
        self.closed = False

    def _take(self, reply: wpb.GenerateResponse) -> str | None:
        if reply.HasField("delta"):
            if self.first_token_at is None and reply.delta.token_ids:
                self.first_token_at = time.monotonic()
                self.app.metrics.ttft.observe(self.first_token_at - self.started)
            self.text.append(reply.delta.text)
            return reply.delta.text
        if reply.HasField("finish"):
            self.finish = reply.finish
        return None

    def _usage(self) -> dict:
        f = self.finish
        assert f is not None
        return api.usage(f.prompt_tokens, f.completion_tokens, f.reused_tokens)

    def _reason(self) -> str:
        assert self.finish is not None
        return api.FINISH.get(wpb.FinishReason.Name(self.finish.reason), "stop")

    async def whole(self, first: wpb.GenerateResponse,
                    stream: AsyncIterator[wpb.GenerateResponse]) -> dict:
        self._take(first)
        try:
            async for reply in stream:
                self._take(reply)
        except grpc.aio.AioRpcError as exc:
            raise api_error(exc) from None
        if self.finish is None:
            raise api.ApiError(502, "the worker ended the answer without a finish",
                               type="api_error")
        return api.response(self.call, self.rid, self.created, "".join(self.text),
                            self._reason(), self._usage())

    async def events(self, first: wpb.GenerateResponse,
                     stream: AsyncIterator[wpb.GenerateResponse]) -> AsyncIterator[bytes]:
        call, rid, created = self.call, self.rid, self.created
        try:
            if call.kind == "chat":
                yield api.sse(api.chunk(call, rid, created, "", None, first=True))
            replies = [first]
            while True:
                for reply in replies:
                    text = self._take(reply)
                    if text:
                        yield api.sse(api.chunk(call, rid, created, text, None))
                if self.finish is not None:
                    break
                try:
                    replies = [await anext(stream)]
                except StopAsyncIteration:
                    break
            if self.finish is None:
                yield api.sse(api.ApiError(502, "the worker ended the answer without a finish",
                                           type="api_error").body())
            else:
                yield api.sse(api.chunk(call, rid, created, None, self._reason()))
                if call.include_usage:
                    yield api.sse(api.chunk(call, rid, created, None, None, used=self._usage()))
            yield api.DONE
        except grpc.aio.AioRpcError as exc:
            yield api.sse(api_error(exc).body())
            yield api.DONE
        finally:
            self.close()

    def close(self) -> None:
        """The end of the turn: a finished one keeps its session for reuse,
        anything else (an error, a client that left) closes it."""
        if self.closed:
            return
        self.closed = True
        app = self.app
        app.metrics.running -= 1
        app.metrics.e2e.observe(time.monotonic() - self.started)
        if self.finish is None:
            self.rpc.cancel()         # the worker stops generating for nobody
            app._drop(self.held)
            return
        f = self.finish
        app.metrics.prompt_tokens += f.prompt_tokens
        app.metrics.generation_tokens += f.completion_tokens
        text = "".join(self.text)
        history = (self.key + (("assistant", text),) if self.call.kind == "chat"
                   else self.key + text)
        app.cache.done(self.held, history, f.reused_tokens, f.prompt_tokens)
        log.info("front_turn", model=self.call.model, kind=self.call.kind,
                 session_id=self.held.session_id, reused_tokens=f.reused_tokens,
                 prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens,
                 seconds=round(time.monotonic() - self.started, 3))
