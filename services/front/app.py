"""The front's routes: OpenAI's API over lmx's workers, health and metrics.

    GET  /v1/models             the models the workers serve (admission's registry)
    GET  /v1/models/{id}        one of them (404 `model_not_found` if none serves it)
    POST /v1/chat/completions   a chat, streamed (server-sent events) or whole
    POST /v1/completions        raw text, likewise
    GET  /metrics               Prometheus
    GET  /health                200 once serving
    OPTIONS any                 204: a CORS preflight (services/front/cors.py)

The API's routes answer without their /v1 prefix too (as vLLM's and
llama.cpp's do). Every answer carries an `x-request-id` (the client's own if
it sent a sane one), which also goes to the worker with the call; answers to
an origin allowed by --cors-origins carry CORS headers.

A request goes to a worker of its model: the one holding a session whose
history is the longest prefix of the request (services/front/reuse.py), else
the one with the fewest sessions, in a new session. A refusal before the first
token is an HTTP status (429 with Retry-After when memory is short); after it,
an error event ends the stream."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import unquote

import grpc
import structlog

from lmx.v1 import admission_pb2 as apb
from lmx.v1 import worker_pb2 as wpb
from services.front import openai_api as api
from services.front import tool_calls
from services.front.cors import Cors
from services.front.http_server import HttpError, Request, Response, StreamResponse
from services.front.metrics import FrontMetrics, render
from services.front.reuse import Held, SessionCache
from services.front.settings import FrontSettings
from services.front.workers import Workers, api_error

log = structlog.get_logger(__name__)


#: The API's routes, answered with and without the /v1 prefix: path -> methods.
API_ROUTES = {"/models": ("GET",), "/models/{id}": ("GET",),
              "/chat/completions": ("POST",), "/completions": ("POST",)}
OPERATIONS = {"/metrics": ("GET",), "/health": ("GET",)}


def route_of(path: str) -> tuple[str, str | None, str]:
    """(route, model id or None, the metrics' endpoint label) of a request
    path: /v1/models/x and /models/x are ("/models/{id}", "x", ...); an
    unknown path's route is itself, its label "other"."""
    path = path.rstrip("/") or "/"
    if path in OPERATIONS:
        return path, None, path
    route = path.removeprefix("/v1") if path.startswith("/v1/") else path
    model = None
    if route.startswith("/models/") and len(route) > len("/models/"):
        route, model = "/models/{id}", unquote(route[len("/models/"):])
    if route in API_ROUTES:
        return route, model, "/v1" + route
    return path, None, "other"


def lmx_version() -> str:
    try:
        return importlib.metadata.version("lmx")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def error_response(error: api.ApiError) -> Response:
    return Response.of_json(error.status, error.body(), error.headers())


def http_error_response(status: int, message: str) -> Response:
    """For a request the HTTP server could not read: no handler saw it."""
    response = error_response(api.ApiError(status, message))
    response.headers["x-request-id"] = api.request_id(None)
    return response


class FrontApp:
    def __init__(self, settings: FrontSettings):
        self.settings = settings
        self.workers = Workers(settings.admission, settings.request_timeout_s)
        self.cache = SessionCache(settings.sessions_per_worker)
        self.metrics = FrontMetrics()
        self.cors = Cors(settings.cors_origins)
        self.version = lmx_version()
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
        rid = api.request_id(request.headers.get("x-request-id"))
        route, model, label = route_of(request.path)
        with structlog.contextvars.bound_contextvars(request_id=rid):
            try:
                response = await self._route(request, route, model, rid)
            except api.ApiError as exc:
                response = error_response(exc)
            except HttpError as exc:
                response = http_error_response(exc.status, exc.message)
            except Exception as exc:  # noqa: BLE001 - one request fails, the front goes on
                log.error("front_request_failed", path=request.path, exc_info=exc)
                response = error_response(api.ApiError(
                    500, f"internal error (request id {rid}); see the front's log",
                    type="server_error", code="internal_error"))
        if label not in OPERATIONS:        # scrapes and health checks are not counted
            self.metrics.count(label, response.status)
        response.headers["x-request-id"] = rid
        response.headers.update(self.cors.headers(request.headers.get("origin")))
        return response

    async def _route(self, request: Request, route: str, model: str | None, rid: str
                     ) -> Response | StreamResponse:
        if request.method == "OPTIONS":
            return self._options(request, route)
        handlers: dict[tuple[str, str], Callable[[], Awaitable[Response | StreamResponse]]] = {
            ("GET", "/models"): self._models,
            ("GET", "/models/{id}"): lambda: self._model(model or ""),
            ("POST", "/chat/completions"): lambda: self._chat(request, rid),
            ("POST", "/completions"): lambda: self._completion(request, rid),
            ("GET", "/metrics"): self._metrics,
            ("GET", "/health"): self._health}
        handler = handlers.get((request.method, route))
        if handler is None:
            if route in API_ROUTES or route in OPERATIONS:
                raise HttpError(405, f"{request.method} is not allowed on {request.path}")
            raise api.ApiError(404, f"no route {request.method} {request.path}",
                               code="not_found")
        return await handler()

    def _options(self, request: Request, route: str) -> Response:
        """A CORS preflight: 204 with what the origin may do, when it is
        allowed (403 when it is not); a plain OPTIONS: 204 with Allow."""
        methods = API_ROUTES.get(route) or OPERATIONS.get(route)
        if methods is None:
            raise api.ApiError(404, f"no route {request.path}", code="not_found")
        origin = request.headers.get("origin")
        preflight = origin and "access-control-request-method" in request.headers
        if preflight and not self.cors.allows(origin):
            raise api.ApiError(403, f"origin {origin!r} may not call this API (the front's "
                                    "--cors-origins)", type="permission_error",
                               code="cors_origin_not_allowed")
        headers = {"Allow": ", ".join((*methods, "OPTIONS"))}
        headers.update(self.cors.preflight(origin, request.headers.get(
            "access-control-request-headers")))
        return Response(204, headers=headers)

    def _body(self, request: Request) -> object:
        try:
            return request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise api.bad(f"the body is not JSON: {exc}", code=None) from None

    # ---- the API -------------------------------------------------------------
    async def _models(self) -> Response:
        models = await self.workers.models()
        return Response.of_json(200, {"object": "list", "data": [
            api.model_card(model, created) for model, created in models.items()]})

    async def _model(self, model: str) -> Response:
        created = (await self.workers.models()).get(model)
        if created is None:
            raise await self.workers.not_found(model)
        return Response.of_json(200, api.model_card(model, created))

    async def _chat(self, request: Request, rid: str) -> Response | StreamResponse:
        return await self._complete(api.parse_chat(self._body(request),
                                                   self.settings.default_max_tokens), rid)

    async def _completion(self, request: Request, rid: str) -> Response | StreamResponse:
        return await self._complete(api.parse_completion(self._body(request),
                                                         self.settings.default_max_tokens), rid)

    async def _complete(self, call: api.Call, rid: str) -> Response | StreamResponse:
        started = time.monotonic()
        # A chat's history starts with its tools: a session rendered with
        # other tools shares no prefix with it.
        key = (call.tools, *call.messages) if call.kind == "chat" else call.prompt
        workers = await self.workers.serving(call.model)
        held = self.cache.take([w.address for w in workers], key)
        if held is None:
            address = workers[0].address
            opened = await self.workers.open(address, call.model, rid)
            held = self.cache.add(address, opened.session_id, opened.token, opened.tool_format)
            for old in self.cache.evict():
                self._spawn(self.workers.close_session(old.worker, old.session_id, old.token))
        # The session's template says how calls are written (hermes when it
        # renders no tools: the worker refuses the tools then anyway).
        formats = tool_calls.FORMATS.get(held.tool_format, tool_calls.Hermes)
        grammar = call.grammar
        if call.tool_choice.forced:     # constrained decoding writes the call
            grammar = ("lark", formats.forced_grammar(call.tools, call.tool_choice.name or None))
        self.metrics.running += 1
        replies = self.workers.generate(held.worker, held.session_id, held.token, call, rid,
                                        grammar)
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
        answer = api.Answer(api.new_id(call.kind), int(time.time()),
                            api.fingerprint(call.model, self.version))
        turn = _Turn(self, call, answer, held, key, started, replies, rid, formats)
        if not call.stream:
            try:        # cancelled when the client leaves: close() cancels the generation
                return Response.of_json(200, await turn.whole(first, stream))
            finally:
                turn.close()
        return StreamResponse(turn.events(first, stream), on_close=turn.close)

    # ---- operations ----------------------------------------------------------
    async def _metrics(self) -> Response:
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

    async def _health(self) -> Response:
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
    (well or not) settles the session in the cache and the metrics. With
    tools, the answer's text is read for tool calls (tool_calls.py): they
    leave the content and come as `tool_calls`, finish_reason "tool_calls"."""

    def __init__(self, app: FrontApp, call: api.Call, answer: api.Answer, held: Held, key,
                 started: float, rpc, request_id: str, formats=tool_calls.Hermes):
        self.app, self.call, self.held, self.key, self.started = app, call, held, key, started
        self.answer = answer
        self.rpc = rpc                # the Generate call: cancelled if the turn ends early
        self.request_id = request_id
        self.text: list[str] = []
        self.finish: wpb.GenerateFinish | None = None
        self.first_token_at: float | None = None
        self.closed = False
        self.parser = formats.streaming() if call.parses_tools else None
        self.content: list[str] = []  # the answer's text outside tool calls
        self.calls: list[tool_calls.ToolCall] = []

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

    def _parse(self, text: str) -> list[tool_calls.Delta]:
        """Text in, what the client gets out: content, or whole calls."""
        if self.parser is None:
            out = [tool_calls.Delta(content=text)] if text else []
        else:
            out = self.parser.push(text)
        for delta in out:
            if delta.call is not None:
                self.calls.append(delta.call)
            else:
                self.content.append(delta.content)
        return out

    def _end_of_text(self) -> list[tool_calls.Delta]:
        """The answer ended: what the parser held is content."""
        if self.parser is None:
            return []
        held = self.parser.finish()
        for delta in held:
            self.content.append(delta.content)
        return held

    def _usage(self) -> dict:
        f = self.finish
        assert f is not None
        return api.usage(f.prompt_tokens, f.completion_tokens, f.reused_tokens)

    def _reason(self) -> str:
        assert self.finish is not None
        if self.calls:
            return "tool_calls"
        return api.FINISH.get(wpb.FinishReason.Name(self.finish.reason), "stop")

    def _openai_calls(self) -> list[dict]:
        return [call.to_openai() for call in self.calls]

    async def whole(self, first: wpb.GenerateResponse,
                    stream: AsyncIterator[wpb.GenerateResponse]) -> dict:
        self._parse(self._take(first) or "")
        try:
            async for reply in stream:
                self._parse(self._take(reply) or "")
        except grpc.aio.AioRpcError as exc:
            raise api_error(exc) from None
        if self.finish is None:
            raise api.ApiError(502, "the worker ended the answer without a finish",
                               type="api_error")
        self._end_of_text()
        content = "".join(self.content)
        if self.calls:
            content = content.strip()
        return api.response(self.call, self.answer, content, self._reason(), self._usage(),
                            self._openai_calls())

    def _sse(self, deltas: list[tool_calls.Delta]) -> list[bytes]:
        out = []
        call, answer = self.call, self.answer
        for delta in deltas:
            if delta.call is not None:
                out.append(api.sse(api.chunk(call, answer, None, None, tool_call=delta.call.
                                             to_openai(self.calls.index(delta.call)))))
            elif delta.content:
                out.append(api.sse(api.chunk(call, answer, delta.content, None)))
        return out

    async def events(self, first: wpb.GenerateResponse,
                     stream: AsyncIterator[wpb.GenerateResponse]) -> AsyncIterator[bytes]:
        call, answer = self.call, self.answer
        try:
            if call.kind == "chat":
                yield api.sse(api.chunk(call, answer, "", None, first=True))
            replies = [first]
            while True:
                for reply in replies:
                    text = self._take(reply)
                    if text:
                        for event in self._sse(self._parse(text)):
                            yield event
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
                for event in self._sse(self._end_of_text()):
                    yield event
                yield api.sse(api.chunk(call, answer, None, self._reason()))
                if call.include_usage:
                    yield api.sse(api.chunk(call, answer, None, None, used=self._usage()))
            yield api.DONE
        except grpc.aio.AioRpcError as exc:
            yield api.sse(api_error(exc).body())
            yield api.DONE
        finally:
            self.close()

    def _history(self):
        """What the session holds after this turn, as the client will send it
        back: its request, then the answer (content, and calls with the ids
        it was given)."""
        if self.call.kind != "chat":
            return self.key + "".join(self.text)
        content = "".join(self.content)
        if self.calls:
            return self.key + (api.Message("assistant", content.strip(),
                                           api.calls_json(self._openai_calls())),)
        if self.call.prefill:        # the answer continues the client's last message
            last = self.key[-1]
            return self.key[:-1] + (api.Message("assistant", last.content + content),)
        return self.key + (api.Message("assistant", content),)

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
        app.metrics.tool_calls += len(self.calls)
        app.cache.done(self.held, self._history(), f.reused_tokens, f.prompt_tokens)
        log.info("front_turn", request_id=self.request_id, model=self.call.model,
                 kind=self.call.kind,
                 session_id=self.held.session_id, reused_tokens=f.reused_tokens,
                 prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens,
                 tool_calls=len(self.calls),
                 seconds=round(time.monotonic() - self.started, 3))
