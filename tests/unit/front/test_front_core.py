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
    assert call.messages == (("system", "Be brief."), ("user", "Hi there"))
    assert call.sampling.max_tokens == 64 and call.sampling.temperature == 1.0
    assert not call.stream


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
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
    wrong = api_error(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "too long",
                                 field="conversation"))
    assert wrong.status == 400 and wrong.param == "conversation" and not wrong.headers()
    gone = api_error(_rpc_error(grpc.StatusCode.UNAVAILABLE, "worker down"))
    assert gone.status == 503 and gone.headers() == {"Retry-After": "1"}
