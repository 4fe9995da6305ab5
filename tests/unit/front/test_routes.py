"""The front's routes and what every answer carries (services/front/app.py,
cors.py), with admission's registry faked and no worker: a model retrieved by
id (its `created` when the front first saw it served), the routes without
their /v1 prefix, CORS (--cors-origins) and x-request-id (issue 23)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from lmx.v1 import admission_pb2 as apb
from services.common.errors import ConfigError
from services.front.app import FrontApp, route_of
from services.front.cors import Cors, parse_origins
from services.front.http_server import Request
from services.front.settings import FrontSettings, load_settings

MODEL = "smollm2-135m"


def test_routes_answer_with_and_without_v1():
    assert route_of("/v1/chat/completions") == ("/chat/completions", None,
                                                "/v1/chat/completions")
    assert route_of("/chat/completions") == route_of("/v1/chat/completions/")
    assert route_of("/completions")[2] == "/v1/completions"
    assert route_of("/models") == ("/models", None, "/v1/models")
    assert route_of("/v1/models/org%2Fname") == ("/models/{id}", "org/name", "/v1/models/{id}")
    assert route_of("/models/HuggingFaceTB/SmolLM2")[1] == "HuggingFaceTB/SmolLM2"
    assert route_of("/metrics") == ("/metrics", None, "/metrics")
    assert route_of("/v1/metrics")[2] == "other", "operations have no /v1 form"
    assert route_of("/v1/nowhere")[2] == "other" and route_of("/v1")[2] == "other"


def test_cors_origins_are_parsed_and_matched():
    assert parse_origins("") == ()
    assert parse_origins("*") == ("*",)
    assert parse_origins("http://localhost:3000, HTTPS://App.example/") == (
        "http://localhost:3000", "https://app.example")
    assert parse_origins(["http://a.example"]) == ("http://a.example",)     # TOML
    for wrong in ("localhost:3000", "http://a.example/path", "*,http://a.example", "ftp://x"):
        with pytest.raises(ValueError):
            parse_origins(wrong)
    with pytest.raises(ConfigError) as error:
        load_settings(["--cors-origins", "example.com"])
    assert error.value.args and "cors_origins" in str(error.value)
    assert load_settings(["--cors-origins", "http://a.example,http://b.example"]
                         ).cors_origins == ("http://a.example", "http://b.example")
    assert load_settings([]).cors_origins == () and load_settings([]).keep_alive_s == 5.0

    some = Cors(("http://a.example",))
    assert some.allows("http://a.example") and some.allows("HTTP://A.example")
    assert not some.allows("http://b.example") and not some.allows(None)
    assert some.headers("http://a.example")["Access-Control-Allow-Origin"] == "http://a.example"
    assert some.headers("http://a.example")["Vary"] == "Origin"
    assert some.headers("http://b.example") == {}
    assert Cors(("*",)).headers("http://any.example")["Access-Control-Allow-Origin"] == "*"
    assert Cors().headers("http://a.example") == {} and Cors().preflight("http://a", None) == {}
    pre = some.preflight("http://a.example", "authorization, x-stainless-os")
    assert pre["Access-Control-Allow-Headers"] == "authorization, x-stainless-os"
    assert "POST" in pre["Access-Control-Allow-Methods"]


def request(method: str, path: str, body: object = None, **headers: str) -> Request:
    data = b"" if body is None else json.dumps(body).encode()
    return Request(method, path, {}, {k.replace("_", "-"): v for k, v in headers.items()},
                   data)


def answers(requests: list[Request], **settings) -> list:
    """The app's answers to `requests`, admission's registry listing one
    smollm2 worker."""
    async def main() -> list:
        app = FrontApp(FrontSettings(**settings))

        async def list_workers(request, timeout=None):
            return apb.ListWorkersResponse(workers=[apb.WorkerInfo(
                worker_id="w1", model=MODEL, address="127.0.0.1:1",
                state=apb.WORKER_STATE_READY)])

        app.workers.admission.stub.ListWorkers = list_workers
        try:
            return [await app.handle(r) for r in requests]
        finally:
            await app.close()

    return asyncio.run(main())


def test_a_model_is_retrieved_by_id_with_or_without_v1():
    before = int(time.time())
    one, bare, listed, missing = answers([
        request("GET", f"/v1/models/{MODEL}"), request("GET", f"/models/{MODEL}"),
        request("GET", "/models"), request("GET", "/v1/models/gpt-4o")])
    card = json.loads(one.body)
    assert one.status == 200 and card["id"] == MODEL and card["object"] == "model"
    assert before <= card["created"] <= time.time(), "created: when the front first saw it"
    assert json.loads(bare.body) == card
    assert json.loads(listed.body)["data"] == [card]
    error = json.loads(missing.body)["error"]
    assert missing.status == 404 and error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error" and error["param"] == "model"
    assert MODEL in error["message"]


def test_unprefixed_completions_refuse_an_unknown_parameter_before_any_worker():
    chat, completion, wrong_method, nowhere = answers([
        request("POST", "/chat/completions", {"model": MODEL, "top_k": 5, "messages": [
            {"role": "user", "content": "hi"}]}),
        request("POST", "/completions", {"model": MODEL, "prompt": "x", "best_of": 3}),
        request("GET", "/chat/completions"), request("GET", "/nowhere")])
    assert chat.status == 400 and json.loads(chat.body)["error"]["param"] == "top_k"
    assert json.loads(chat.body)["error"]["code"] == "unknown_parameter"
    assert completion.status == 400 and json.loads(completion.body)["error"]["param"] == "best_of"
    assert wrong_method.status == 405 and nowhere.status == 404


def test_every_answer_carries_a_request_id_the_clients_own_when_sane():
    mine, made, other, error = answers([
        request("GET", "/v1/models", x_request_id="trace-42"),
        request("GET", "/v1/models"), request("GET", "/v1/models"),
        request("GET", "/v1/models/none", x_request_id="x" * 500)])
    assert mine.headers["x-request-id"] == "trace-42"
    assert made.headers["x-request-id"].startswith("req_")
    assert made.headers["x-request-id"] != other.headers["x-request-id"]
    assert error.status == 404 and error.headers["x-request-id"].startswith("req_")


def test_cors_preflight_and_answers_for_allowed_origins_only():
    allowed, refused, answer, stranger, plain = answers([
        request("OPTIONS", "/v1/chat/completions", origin="http://localhost:3000",
                access_control_request_method="POST",
                access_control_request_headers="authorization, content-type"),
        request("OPTIONS", "/v1/chat/completions", origin="http://evil.example",
                access_control_request_method="POST"),
        request("GET", "/models", origin="http://localhost:3000"),
        request("GET", "/models", origin="http://evil.example"),
        request("OPTIONS", "/models")],
        cors_origins=("http://localhost:3000",))
    assert allowed.status == 204 and allowed.body == b""
    assert allowed.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert allowed.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
    assert "x-request-id" in allowed.headers
    assert refused.status == 403 and "Access-Control-Allow-Origin" not in refused.headers
    assert answer.status == 200
    assert answer.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "x-request-id" in answer.headers["Access-Control-Expose-Headers"]
    assert "Access-Control-Allow-Origin" not in stranger.headers
    assert plain.status == 204 and plain.headers["Allow"] == "GET, OPTIONS"


def test_without_cors_origins_no_cors_headers_are_sent():
    preflight, answer = answers([
        request("OPTIONS", "/v1/models", origin="http://localhost:3000",
                access_control_request_method="GET"),
        request("GET", "/v1/models", origin="http://localhost:3000")])
    assert preflight.status == 403
    assert not any(h.startswith("Access-Control") for h in answer.headers)
    star = answers([request("GET", "/v1/models", origin="http://x.example")],
                   cors_origins=("*",))[0]
    assert star.headers["Access-Control-Allow-Origin"] == "*"
