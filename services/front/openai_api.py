"""OpenAI's HTTP API as lmx speaks it: request bodies checked and turned into
calls, responses and stream chunks built, errors in OpenAI's shape with their
HTTP status. Pure: no HTTP, no gRPC."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

#: lmx's finish reasons (worker.proto) as OpenAI names them.
FINISH = {"FINISH_REASON_STOP": "stop", "FINISH_REASON_STOP_STRING": "stop",
          "FINISH_REASON_LENGTH": "length", "FINISH_REASON_CONTEXT_WINDOW": "length"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DONE = b"data: [DONE]\n\n"


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


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


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
        raise bad("the body must be a JSON object")
    return body


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{name} must be a number", name)
    if not low <= value <= high:
        raise bad(f"{name} must be within [{low}, {high}]", name)
    return float(value)


def _sampling(body: dict, default_max_tokens: int) -> Sampling:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad("max_tokens must be a positive integer", "max_tokens")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise bad("seed must be a non-negative integer", "seed")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = tuple(stop)
    else:
        raise bad("stop must be a string or a list of at most 4 strings", "stop")
    if body.get("n", 1) != 1:
        raise bad("only n=1 is supported", "n")
    for unsupported in ("tools", "functions", "logit_bias", "response_format"):
        if body.get(unsupported):
            raise bad(f"{unsupported} is not supported by lmx", unsupported)
    if body.get("logprobs"):
        raise bad("logprobs are not supported by lmx", "logprobs")
    return Sampling(int(max_tokens), _number(body, "temperature", 1.0, 0.0, 2.0),
                    _number(body, "top_p", 1.0, 0.0, 1.0), seed, stops)


def _common(body: dict) -> tuple[str, bool, bool]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required", "model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    return model, stream, bool(options.get("include_usage"))


def _content(value: object, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad("only text content parts are supported",
                          f"messages[{index}].content")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise bad("content must be a string or a list of text parts", f"messages[{index}].content")


def parse_chat(body: object, default_max_tokens: int) -> Call:
    body = _object(body)
    model, stream, include_usage = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad("each message must be an object", f"messages[{index}]")
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
    model, stream, include_usage = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt must be a non-empty string (one prompt per request)", "prompt")
    if body.get("echo"):
        raise bad("echo is not supported by lmx", "echo")
    if body.get("suffix"):
        raise bad("suffix is not supported by lmx", "suffix")
    return Call("completion", model, _sampling(body, default_max_tokens), stream, include_usage,
                prompt=prompt)


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage: prompt tokens count the whole context the answer read
    (reused ones included, as cached_tokens)."""
    prompt = prompt_tokens + cached_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def response(call: Call, rid: str, created: int, text: str, finish: str,
             used: dict) -> dict:
    if call.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": finish, "logprobs": None}
        return {"id": rid, "object": "chat.completion", "created": created,
                "model": call.model, "choices": [choice], "usage": used}
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "text_completion", "created": created, "model": call.model,
            "choices": [choice], "usage": used}


def chunk(call: Call, rid: str, created: int, text: str | None, finish: str | None,
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
        out = {"id": rid, "object": "chat.completion.chunk", "created": created,
               "model": call.model, "choices": choices}
    else:
        choices = [] if used is not None else [
            {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
        out = {"id": rid, "object": "text_completion", "created": created, "model": call.model,
               "choices": choices}
    if used is not None:
        out["usage"] = used
    return out


def sse(value: dict) -> bytes:
    return b"data: " + json.dumps(value).encode() + b"\n\n"
