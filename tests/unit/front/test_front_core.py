"""The front's pure parts: OpenAI request checking, the session cache for
prefix reuse, the metrics text, and gRPC errors as OpenAI errors (429 with
Retry-After when memory is short)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from services.front import openai_api as api
from services.front.metrics import FrontMetrics, render
from services.front.reuse import SessionCache, is_prefix
from services.front.workers import api_error


def test_a_chat_is_checked_and_its_defaults_are_openais():
    call = api.parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text",
                                                                       "text": "there"}]}]}, 64)
    assert call.messages == (api.Message("system", "Be brief."), api.Message("user", "Hi there"))
    assert call.tools == "" and call.tool_choice.mode == "none" and call.grammar is None
    assert call.sampling.max_tokens == 64 and call.sampling.temperature == 1.0
    assert not call.stream


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]},
     "messages[0].tool_call_id"),
    ({"model": "m", "messages": [{"role": "critic", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "assistant", "content": ""}]}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "presence_penalty": -3},
     "presence_penalty"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "frequency_penalty": "1"},
     "frequency_penalty"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["x"] * 17},
     "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
])
def test_bad_chats_are_400_naming_the_field(body, param):
    with pytest.raises(api.ApiError) as error:
        api.parse_chat(body, 16)
    assert error.value.status == 400 and error.value.param == param
    assert set(error.value.body()["error"]) == {"message", "type", "param", "code"}


def test_prefix_reuse_picks_the_longest_idle_prefix():
    cache = SessionCache(per_worker=2)
    a = cache.add("w1", "s1", "t1")
    cache.done(a, (("user", "hi"), ("assistant", "hello")), 0, 5)
    b = cache.add("w1", "s2", "t2")
    cache.done(b, (("user", "hi"),), 0, 3)
    request = (("user", "hi"), ("assistant", "hello"), ("user", "more"))
    assert cache.take(["w1"], request) is a and a.busy
    assert cache.take(["w1"], request) is b, "a busy session is not shared"
    assert cache.take(["w1"], request) is None
    assert cache.take(["w2"], (("user", "hi"),)) is None, "only the model's workers"
    assert cache.stats.hits == 2 and cache.stats.misses == 2
    assert is_prefix("The sea", "The sea is") and not is_prefix("The sea", (("user", "x"),))
    cache.done(a, request, 10, 2)
    cache.done(b, (("user", "hi"),), 0, 1)
    c = cache.add("w1", "s3", "t3")
    cache.done(c, (("user", "other"),), 0, 1)
    evicted = cache.evict()
    assert [h.session_id for h in evicted] == ["s1"], "least recently used first"
    assert cache.stats.reused_tokens == 10


def test_metrics_follow_the_text_format():
    metrics = FrontMetrics()
    metrics.count("/v1/chat/completions", 200)
    metrics.ttft.observe(0.03)
    text = render(metrics, SessionCache(1).stats, None)
    assert '# TYPE lmx:time_to_first_token_seconds histogram' in text
    assert 'lmx:time_to_first_token_seconds_bucket{le="0.05"} 1' in text
    assert 'lmx:requests_total{endpoint="/v1/chat/completions",status="200"} 1' in text
    assert text.endswith("\n")


def _rpc_error(code: grpc.StatusCode, message: str, retry_s: float | None = None,
               field: str = "") -> grpc.aio.AioRpcError:
    status = status_pb2.Status(code=code.value[0], message=message)
    if retry_s is not None:
        status.details.add().Pack(error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=int(retry_s),
                                              nanos=int(retry_s % 1 * 1e9))))
    if field:
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]))
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, message)


def test_memory_short_is_429_with_retry_after_and_a_bad_field_400():
    short = api_error(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "no KV memory", 2.5))
    assert short.status == 429 and short.headers() == {"Retry-After": "3"}
    assert short.type == "rate_limit_error"
    assert short.code == "rate_limit_exceeded"
    wrong = api_error(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "too long",
                                 field="conversation"))
    assert wrong.status == 400 and wrong.param == "messages" and not wrong.headers()
    assert wrong.code == "invalid_value"
    gone = api_error(_rpc_error(grpc.StatusCode.UNAVAILABLE, "worker down"))
    assert gone.status == 503 and gone.headers() == {"Retry-After": "1"}


# ---- every parameter honoured or refused naming it (issue 23) -------------

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize("field, value, code", [
    ("n", 3, "unsupported_value"),
    ("logprobs", True, "unsupported_value"),
    ("top_logprobs", 2, "unsupported_value"),
    ("logit_bias", {"50256": -100}, "unsupported_value"),
    ("functions", [{"name": "f"}], "unsupported_value"),
    ("function_call", {"name": "f"}, "unsupported_value"),
    ("audio", {"voice": "alloy"}, "unsupported_parameter"),
    ("reasoning_effort", "high", "unsupported_parameter"),
    ("top_k", 40, "unknown_parameter"),
    ("repetition_penalty", 1.1, "unknown_parameter"),
])
def test_a_chat_parameter_lmx_does_not_honour_is_refused_naming_it(field, value, code):
    with pytest.raises(api.ApiError) as error:
        api.parse_chat({**CHAT, field: value}, 16)
    assert error.value.status == 400, field
    assert error.value.param == field and error.value.code == code
    assert field in error.value.message


@pytest.mark.parametrize("field, value", [
    ("best_of", 2), ("echo", True), ("suffix", "end"), ("logprobs", 0), ("n", 2),
    ("frequency_penalty", 2.5), ("messages", []),
])
def test_a_completion_parameter_lmx_does_not_honour_is_refused_naming_it(field, value):
    with pytest.raises(api.ApiError) as error:
        api.parse_completion({"model": "m", "prompt": "x", field: value}, 16)
    assert error.value.status == 400 and error.value.param == field


def test_neutral_values_and_harmless_fields_are_accepted():
    call = api.parse_chat({**CHAT, "frequency_penalty": 0, "presence_penalty": 0.0, "n": 1,
                           "logprobs": False, "top_logprobs": 0, "logit_bias": {},
                           "tools": [], "tool_choice": "none", "response_format":
                           {"type": "text"}, "user": "u1", "metadata": {"k": "v"},
                           "store": False, "parallel_tool_calls": True, "service_tier": "auto",
                           "stream_options": {"include_usage": True}, "seed": None,
                           "max_completion_tokens": 5}, 16)
    assert call.sampling.max_tokens == 5 and call.include_usage
    completion = api.parse_completion({"model": "m", "prompt": "x", "best_of": 1,
                                       "echo": False, "suffix": None, "logprobs": None}, 16)
    assert completion.prompt == "x"


def test_a_history_resent_from_an_sdk_message_dump_is_accepted():
    """An agent appends `reply.choices[0].message.model_dump()`: its empty
    fields (refusal, annotations, tool_calls...) are not refusals; a message
    field that asks for something is."""
    dumped = {"role": "assistant", "content": "Hello", "refusal": None, "annotations": [],
              "audio": None, "function_call": None, "tool_calls": None}
    call = api.parse_chat({"model": "m", "messages": [
        {"role": "user", "content": "Hi", "name": "ann"}, dumped,
        {"role": "user", "content": "More"}]}, 16)
    assert [m.role for m in call.messages] == ["user", "assistant", "user"]
    with pytest.raises(api.ApiError) as error:
        api.parse_chat({"model": "m", "messages": [
            {"role": "user", "content": "Hi", "cache_control": {"type": "ephemeral"}}]}, 16)
    assert error.value.param == "messages[0].cache_control"


def test_sixteen_stop_strings_are_accepted_as_the_workers_take():
    from services.worker.limits import MAX_STOP_STRINGS

    stops = [f"s{i}" for i in range(16)]
    assert MAX_STOP_STRINGS == 16
    assert api.parse_chat({**CHAT, "stop": stops}, 16).sampling.stop == tuple(stops)
    with pytest.raises(api.ApiError) as error:
        api.parse_chat({**CHAT, "stop": [""]}, 16)
    assert error.value.param == "stop"


def test_answers_carry_a_system_fingerprint_and_requests_an_id():
    call = api.parse_chat(CHAT, 16)
    answer = api.Answer("chatcmpl-1", 1_700_000_000, api.fingerprint("m", "0.1.0"))
    assert answer.fingerprint.startswith("lmx-") and len(answer.fingerprint) == 14
    assert answer.fingerprint == api.fingerprint("m", "0.1.0") != api.fingerprint("m", "0.2.0")
    whole = api.response(call, answer, "hi", "stop", api.usage(1, 1, 0))
    assert whole["system_fingerprint"] == answer.fingerprint
    for piece in (api.chunk(call, answer, "hi", None, first=True),
                  api.chunk(call, answer, None, None, used=api.usage(1, 1, 0)),
                  api.chunk(api.parse_completion({"model": "m", "prompt": "x"}, 4), answer,
                            "x", "stop")):
        assert piece["system_fingerprint"] == answer.fingerprint
    assert api.request_id("abc-123") == "abc-123"
    for bad_id in (None, "", "x" * 129, "tab\there", "caf\xe9"):
        made = api.request_id(bad_id)
        assert made.startswith("req_") and made != bad_id
    assert api.request_id(None) != api.request_id(None)


# ---- the worker's refusals as OpenAI's codes (issue 23) --------------------

def _worker_refusal(exc: Exception) -> grpc.aio.AioRpcError:
    """What the front receives when a worker raises `exc`: the status the
    workers' interceptor makes of it."""
    from services.common.interceptors import to_status

    status = to_status(exc, "rid")
    return grpc.aio.AioRpcError(status.code, grpc.aio.Metadata(),
                                grpc.aio.Metadata(*status.trailing_metadata), status.details)


@pytest.mark.parametrize("field, param", [
    ("conversation", "messages"), ("message", "messages"), ("whole_prompt", "prompt"),
    ("prompt", "prompt")])
def test_a_prompt_past_the_window_is_context_length_exceeded(field, param):
    from services.common.errors import InvalidArgument

    # What services/worker/engine.py `_queue` raises.
    exc = InvalidArgument(field, "the context would hold 5000 tokens; smollm2-135m takes at "
                                 "most 2047 before generating")
    error = api_error(_worker_refusal(exc))
    assert error.status == 400 and error.code == "context_length_exceeded"
    assert error.type == "invalid_request_error" and error.param == param
    assert error.message.startswith(param + ": the context would hold 5000 tokens")


def test_the_workers_reason_alone_makes_context_length_exceeded():
    """Whatever the message says: the worker's ErrorInfo reason decides."""
    from services.common.errors import InvalidArgument
    from services.worker.limits import CONTEXT_LENGTH_EXCEEDED

    exc = InvalidArgument("conversation", "some other wording", reason=CONTEXT_LENGTH_EXCEEDED)
    error = api_error(_worker_refusal(exc))
    assert error.code == "context_length_exceeded" and error.param == "messages"


def test_max_tokens_past_the_window_is_context_length_exceeded():
    from services.common.errors import InvalidArgument
    from services.worker.limits import check_max_tokens, check_stop

    with pytest.raises(InvalidArgument) as raised:
        check_max_tokens(5000, 2048, "smollm2-135m")
    error = api_error(_worker_refusal(raised.value))
    assert error.code == "context_length_exceeded" and error.param == "max_tokens"
    assert error.message.startswith("max_tokens: at most 2047")
    with pytest.raises(InvalidArgument) as raised:
        check_stop(("",))
    other = api_error(_worker_refusal(raised.value))
    assert other.code == "invalid_value" and other.param == "stop"
    bad_role = api_error(_worker_refusal(InvalidArgument("conversation.messages[2].role",
                                                         "must be one of system, user")))
    assert bad_role.param == "messages[2].role" and bad_role.code == "invalid_value"
    no_tools = api_error(_worker_refusal(InvalidArgument("conversation.tools_json",
                                                         "the template renders no tools")))
    assert no_tools.param == "tools"


def test_other_refusals_get_openai_codes():
    from services.common.errors import Aborted, FailedPrecondition, NotFound

    busy = api_error(_worker_refusal(FailedPrecondition("busy", reason="SESSION_BUSY")))
    assert busy.status == 409 and busy.code == "session_busy"
    lost = api_error(_worker_refusal(Aborted("lease lost", reason="LEASE_LOST")))
    assert lost.status == 503 and lost.headers() == {"Retry-After": "1"}
    missing = api_error(_worker_refusal(NotFound("session", "s1")))
    assert missing.status == 404 and missing.code == "not_found" and missing.param is None
    broken = api_error(_worker_refusal(RuntimeError("boom")))
    assert broken.status == 500 and broken.type == "server_error"
