"""OpenAI's HTTP API as lmx speaks it: request bodies checked and turned into
calls (every field honoured or refused naming it: params.py), responses and
stream chunks built (with a `system_fingerprint`), errors in OpenAI's shape
with their HTTP status and code, request ids. Pure: no HTTP, no gRPC."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass

from services.front import params
from services.worker.limits import MAX_STOP_CHARS, MAX_STOP_STRINGS

#: lmx's finish reasons (worker.proto) as OpenAI names them.
FINISH = {"FINISH_REASON_STOP": "stop", "FINISH_REASON_STOP_STRING": "stop",
          "FINISH_REASON_LENGTH": "length", "FINISH_REASON_CONTEXT_WINDOW": "length"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}
#: A function's name, as OpenAI allows it.
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
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
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@dataclass(frozen=True)
class Message:
    """A chat message as lmx passes it on (hashable: the front's session
    cache compares histories)."""
    role: str                   # system, user, assistant or tool
    content: str
    tool_calls: str = ""        # an assistant's calls, canonical JSON (calls_json)
    tool_call_id: str = ""      # a tool's result: the call it answers
    name: str = ""              # a tool's result: the function's name


@dataclass(frozen=True)
class ToolChoice:
    """none: the model is shown the tools but its answer is text; auto: it
    may call them; required: it calls one; function: it calls `name`."""
    mode: str = "none"
    name: str = ""

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")


@dataclass(frozen=True)
class Call:
    """One request: a chat (messages) or a completion (prompt)."""
    kind: str                                   # "chat" | "completion"
    model: str
    sampling: Sampling
    stream: bool
    include_usage: bool
    messages: tuple[Message, ...] = ()          # oldest first
    prompt: str = ""
    tools: str = ""                             # the tool definitions, canonical JSON
    tool_choice: ToolChoice = ToolChoice()
    #: Constrained decoding for a response_format: ("json_schema", the
    #: schema's text); None: free text. (A forced call's grammar depends on
    #: the worker's tool format: the front writes it once a session is
    #: chosen.)
    grammar: tuple[str, str] | None = None

    @property
    def parses_tools(self) -> bool:
        """Whether the answer's text is read for tool calls."""
        return bool(self.tools) and self.tool_choice.mode != "none"

    @property
    def prefill(self) -> bool:
        """The conversation ends with an assistant turn the answer continues."""
        return bool(self.messages) and self.messages[-1].role == "assistant"


def calls_json(calls: list[dict]) -> str:
    """Tool calls as one canonical JSON text: the same calls give the same
    text, however a client wrote them (key order, extra keys)."""
    return json.dumps([{"id": c["id"], "type": "function",
                        "function": {"name": c["function"]["name"],
                                     "arguments": c["function"]["arguments"]}} for c in calls],
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)


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
                    _number(body, "top_p", 1.0, 0.0, 1.0), seed, _stop(body.get("stop")),
                    _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                    _number(body, "presence_penalty", 0.0, -2.0, 2.0))


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


def _tools(body: dict) -> tuple[str, set[str]]:
    """The tool definitions as canonical JSON, and their names: a list of
    {"type": "function", "function": {"name", "description"?, "parameters"?,
    "strict"?}}."""
    tools = body.get("tools")
    if tools is None or tools == []:
        return "", set()
    if not isinstance(tools, list):
        raise bad("tools must be a list of function tools", "tools", "invalid_type")
    names: set[str] = set()
    out = []
    for index, tool in enumerate(tools):
        param = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or \
                not isinstance(tool.get("function"), dict):
            raise bad(f'{param} must be {{"type": "function", "function": {{...}}}} (lmx calls '
                      "functions only)", param, "invalid_type")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise bad(f"{param}.function.name must be 1 to 64 letters, digits, _ or -",
                      f"{param}.function.name")
        if name in names:
            raise bad(f"{param}.function.name: {name!r} is defined twice",
                      f"{param}.function.name")
        names.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise bad(f"{param}.function.description must be a string",
                      f"{param}.function.description", "invalid_type")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise bad(f"{param}.function.parameters must be a JSON schema object",
                      f"{param}.function.parameters", "invalid_type")
        kept = {"name": name}
        if description:
            kept["description"] = description
        kept["parameters"] = parameters if parameters is not None else \
            {"type": "object", "properties": {}}
        out.append({"type": "function", "function": kept})
    return json.dumps(out, sort_keys=True, ensure_ascii=False), names


def _tool_choice(body: dict, names: set[str]) -> ToolChoice:
    choice = body.get("tool_choice")
    if choice is None:
        return ToolChoice("auto" if names else "none")
    if choice in ("none", "auto", "required"):
        if choice == "required" and not names:
            raise bad('tool_choice "required" needs tools', "tool_choice")
        return ToolChoice(choice if names else "none")
    if isinstance(choice, dict) and choice.get("type") == "function" and \
            isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise bad(f"tool_choice names function {name!r}, which is not among the tools "
                      f"({', '.join(sorted(names)) or 'none'})", "tool_choice")
        return ToolChoice("function", name)
    raise bad('tool_choice must be "none", "auto", "required" or {"type": "function", '
              '"function": {"name": ...}}', "tool_choice")


def _tool_calls(value: object, index: int) -> str:
    """An assistant message's tool calls, as canonical JSON."""
    param = f"messages[{index}].tool_calls"
    if not isinstance(value, list):
        raise bad(f"{param} must be a list", param, "invalid_type")
    calls = []
    for i, call in enumerate(value):
        where = f"{param}[{i}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call.get("id"), str) or \
                not call["id"] or call.get("type", "function") != "function":
            raise bad(f'{where} must be {{"id", "type": "function", "function": {{"name", '
                      '"arguments"}}}}', where, "invalid_type")
        name, arguments = function.get("name"), function.get("arguments", "{}")
        if not isinstance(name, str) or not name:
            raise bad(f"{where}.function.name must be a non-empty string", f"{where}.function.name")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False)
        if not isinstance(arguments, str):
            raise bad(f"{where}.function.arguments must be JSON text",
                      f"{where}.function.arguments", "invalid_type")
        calls.append({"id": call["id"], "function": {"name": name, "arguments": arguments}})
    return calls_json(calls) if calls else ""


def _message(message: object, index: int) -> Message:
    if not isinstance(message, dict):
        raise bad("each message must be an object", f"messages[{index}]", "invalid_type")
    refusal = params.message_refusal(message, index)
    if refusal is not None:
        raise refused(refusal)
    role = ROLES.get(message.get("role"))
    if role is None:
        raise bad(f"role {message.get('role')!r} is not supported (system, developer, user, "
                  "assistant, tool)", f"messages[{index}].role")
    content = message.get("content")
    text = "" if content is None and role in ("assistant", "tool") else _content(content, index)
    calls = ""
    if message.get("tool_calls") not in (None, []):
        if role != "assistant":
            raise bad("only an assistant message holds tool_calls",
                      f"messages[{index}].tool_calls")
        calls = _tool_calls(message["tool_calls"], index)
    if role != "tool":
        return Message(role, text, calls)
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise bad("a tool message needs the tool_call_id of the call it answers",
                  f"messages[{index}].tool_call_id", "missing_required_parameter")
    name = message.get("name")
    return Message(role, text, "", call_id, name if isinstance(name, str) else "")


def parse_chat(body: object, default_max_tokens: int) -> Call:
    body = _object(body)
    model, stream, include_usage = _common(body, "chat")
    messages = body.get("messages")
    if messages is None:
        raise bad("messages is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    parsed = tuple(_message(message, index) for index, message in enumerate(messages))
    tools, names = _tools(body)
    choice = _tool_choice(body, names)
    last = parsed[-1]
    if last.role not in ("user", "tool", "assistant") or not (last.content or last.role == "tool"):
        raise bad("the last message must be a user or tool message, or an assistant message to "
                  "continue (a prefill), and not empty", "messages")
    if last.role == "assistant" and (last.tool_calls or choice.forced):
        raise bad("a final assistant message (a prefill) cannot hold tool calls, nor be "
                  "combined with a tool_choice that forces a call", "messages")
    grammar = _response_format(body.get("response_format"))
    if choice.forced and grammar is not None:
        raise bad("a response_format schema and a tool_choice that forces a call exclude "
                  "each other", "response_format")
    return Call("chat", model, _sampling(body, default_max_tokens), stream, include_usage,
                messages=parsed, tools=tools, tool_choice=choice, grammar=grammar)


def _response_format(value: object) -> tuple[str, str] | None:
    """OpenAI's response_format as a grammar: text (none), json_object (any
    JSON object), json_schema (one its schema accepts)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ("json_schema", json.dumps({"type": "object"}))
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema must be a JSON schema object",
                      "response_format.json_schema.schema")
        return ("json_schema", json.dumps(schema, ensure_ascii=False))
    raise bad('response_format.type must be "text", "json_object" or "json_schema"',
              "response_format")


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


def response(call: Call, answer: Answer, text: str, finish: str, used: dict,
             tool_calls: list[dict] | None = None) -> dict:
    """The whole answer; with tool calls, content null when there is no
    text, and finish_reason "tool_calls"."""
    if call.kind == "chat":
        message: dict = {"role": "assistant", "content": text}
        if tool_calls:
            message = {"role": "assistant", "content": text or None, "tool_calls": tool_calls}
            finish = "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        return {**_envelope(call, answer, "chat.completion"), "choices": [choice],
                "usage": used}
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {**_envelope(call, answer, "text_completion"), "choices": [choice], "usage": used}


def chunk(call: Call, answer: Answer, text: str | None, finish: str | None,
          *, first: bool = False, used: dict | None = None,
          tool_call: dict | None = None) -> dict:
    """One streamed piece: text (or, for a chat, the role first; or one
    whole tool call, with its index), then the finish reason; with
    include_usage, a last chunk with no choices."""
    if call.kind == "chat":
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if tool_call is not None:
            delta["tool_calls"] = [tool_call]
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
