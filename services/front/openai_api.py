"""OpenAI's HTTP API as lmx speaks it: request bodies checked and turned into
calls (every field honoured or refused naming it: params.py), responses and
stream chunks built (with a `system_fingerprint`), errors in OpenAI's shape
with their HTTP status and code, request ids. Pure: no HTTP, no gRPC."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass

from services.front import params
from services.worker.limits import MAX_STOP_CHARS, MAX_STOP_STRINGS

#: lmx's finish reasons (worker.proto) as OpenAI names them.
FINISH = {"FINISH_REASON_STOP": "stop", "FINISH_REASON_STOP_STRING": "stop",
          "FINISH_REASON_LENGTH": "length", "FINISH_REASON_CONTEXT_WINDOW": "length"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DONE = b"data: [DONE]\n\n"
#: A client's x-request-id is echoed when it is 1 to this many printable
#: ASCII characters (the workers' gRPC interceptor takes the same).
MAX_REQUEST_ID_CHARS = 128


class ApiError(Exception):
    """An answer in OpenAI's error shape, with its HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.retry_after_s = param, code, retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after_s + 0.499)))}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value"
        ) -> ApiError:
    """A 400 naming the field, with OpenAI's code (invalid_value,
    invalid_type, missing_required_parameter, ...)."""
    return ApiError(400, message, param=param, code=code)


def refused(refusal: params.Refusal) -> ApiError:
    return bad(refusal.message, refusal.param, refusal.code)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]


@dataclass(frozen=True)
class Call:
    """One request: a chat (messages) or a completion (prompt)."""
    kind: str                                   # "chat" | "completion"
    model: str
    sampling: Sampling
    stream: bool
    include_usage: bool
    messages: tuple[tuple[str, str], ...] = ()  # (role, content), oldest first
    prompt: str = ""


def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object", code="invalid_type")
    return body


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{name} must be a number", name, "invalid_type")
    if not low <= value <= high:
        raise bad(f"{name} must be within [{low}, {high}]", name)
    return float(value)


def _sampling(body: dict, default_max_tokens: int) -> Sampling:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad(f"{name} must be a positive integer", name)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise bad("seed must be a non-negative integer", "seed")
    return Sampling(int(max_tokens), _number(body, "temperature", 1.0, 0.0, 2.0),
                    _number(body, "top_p", 1.0, 0.0, 1.0), seed, _stop(body.get("stop")))


def _stop(stop: object) -> tuple[str, ...]:
    """A string or a list of up to MAX_STOP_STRINGS (16, the workers'
    bound) strings of 1 to MAX_STOP_CHARS characters."""
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop",
                  "array_above_max_length")
    if not all(1 <= len(s) <= MAX_STOP_CHARS for s in stops):
        raise bad(f"stop: each string must hold 1 to {MAX_STOP_CHARS} characters", "stop")
    return tuple(stops)


def _common(body: dict, kind: str) -> tuple[str, bool, bool]:
    refusal = params.refusal(body, kind)
    if refusal is not None:
        raise refused(refusal)
    model = body.get("model")
    if model is None:
        raise bad("model is required", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise bad("model must be a non-empty string", "model")
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options", "invalid_type")
    return model, stream, bool(options.get("include_usage"))


def _content(value: object, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad("only text content parts are supported",
                          f"messages[{index}].content", "unsupported_value")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise bad("content must be a string or a list of text parts", f"messages[{index}].content",
              "invalid_type")


def parse_chat(body: object, default_max_tokens: int) -> Call:
    body = _object(body)
    model, stream, include_usage = _common(body, "chat")
    messages = body.get("messages")
    if messages is None:
        raise bad("messages is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad("each message must be an object", f"messages[{index}]", "invalid_type")
        refusal = params.message_refusal(message, index)
        if refusal is not None:
            raise refused(refusal)
        role = ROLES.get(message.get("role"))
        if role is None:
            raise bad(f"role {message.get('role')!r} is not supported (system, developer, user, "
                      "assistant)", f"messages[{index}].role")
        parsed.append((role, _content(message.get("content"), index)))
    if parsed[-1][0] != "user" or not parsed[-1][1]:
        raise bad("the last message must be a user message that is not empty", "messages")
    return Call("chat", model, _sampling(body, default_max_tokens), stream, include_usage,
                messages=tuple(parsed))


def parse_completion(body: object, default_max_tokens: int) -> Call:
    body = _object(body)
    model, stream, include_usage = _common(body, "completion")
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt must be a non-empty string (one prompt per request)", "prompt")
    return Call("completion", model, _sampling(body, default_max_tokens), stream, include_usage,
                prompt=prompt)


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def request_id(sent: str | None) -> str:
    """A response's x-request-id: the client's own when it sent a sane one
    (1 to MAX_REQUEST_ID_CHARS printable ASCII characters), else a new one."""
    if sent and len(sent) <= MAX_REQUEST_ID_CHARS and all(" " <= c <= "~" for c in sent):
        return sent
    return "req_" + secrets.token_hex(16)


def fingerprint(model: str, version: str) -> str:
    """OpenAI's `system_fingerprint`: what served the answer (lmx's version
    and the model), so that a client sees when it changes."""
    return "lmx-" + hashlib.sha256(f"{version}/{model}".encode()).hexdigest()[:10]


def model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "lmx"}


@dataclass(frozen=True)
class Answer:
    """What every piece of one answer carries."""
    id: str
    created: int                   # Unix seconds
    fingerprint: str


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage: prompt tokens count the whole context the answer read
    (reused ones included, as cached_tokens)."""
    prompt = prompt_tokens + cached_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _envelope(call: Call, answer: Answer, kind: str) -> dict:
    return {"id": answer.id, "object": kind, "created": answer.created, "model": call.model,
            "system_fingerprint": answer.fingerprint}


def response(call: Call, answer: Answer, text: str, finish: str, used: dict) -> dict:
    if call.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": finish, "logprobs": None}
        return {**_envelope(call, answer, "chat.completion"), "choices": [choice],
                "usage": used}
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {**_envelope(call, answer, "text_completion"), "choices": [choice], "usage": used}


def chunk(call: Call, answer: Answer, text: str | None, finish: str | None,
          *, first: bool = False, used: dict | None = None) -> dict:
    """One streamed piece: text (or, for a chat, the role first), then the
    finish reason; with include_usage, a last chunk with no choices."""
    if call.kind == "chat":
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choices = [] if used is not None else [
            {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        out = {**_envelope(call, answer, "chat.completion.chunk"), "choices": choices}
    else:
        choices = [] if used is not None else [
            {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
        out = {**_envelope(call, answer, "text_completion"), "choices": choices}
    if used is not None:
        out["usage"] = used
    return out


def sse(value: dict) -> bytes:
    return b"data: " + json.dumps(value).encode() + b"\n\n"
