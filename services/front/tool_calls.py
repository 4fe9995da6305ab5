"""Tool calls in a model's text, as OpenAI's API returns them (pure).

One small parser per output format, as vLLM's tool parsers are, each with
`extract` for a whole answer, a streaming parser (`push` deltas of text,
`finish`) and the grammar that forces a call in that format. The worker
says which format a session's chat template asks for (OpenSessionResponse.
tool_format); FORMATS maps it to its parser.

"hermes" (NousResearch; also Qwen 2.5, and lmx's ChatML template with tools,
deploy/templates/chatml-tools.jinja):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text outside the tags is the message's content. A block that is not a JSON
object with a string "name" (and an object "arguments", or none) stays in
the content as written: nothing a model says is dropped.

"llama3_json" (Llama 3.1-3.3's JSON tool calling, vLLM's llama3_json): an
answer that is calls and nothing else, JSON objects separated by "; ",
perhaps after <|python_tag|>:

    {"name": "get_weather", "parameters": {"city": "Paris"}}

An answer that does not start so is content; one that does but does not
parse stays content too.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str          # JSON text, as OpenAI's API carries it

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            call["index"] = index
        return call


#: How llguidance writes JSON under a grammar: the spacing a model trained
#: on Hermes' format writes (no free whitespace, which a small model can
#: fill without end).
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def call_schema(tools_json: str, name: str | None, arguments_key: str) -> dict:
    """The JSON schema of one call of the function `name` or of any of the
    tools, written as {"name": ..., arguments_key: ...}: its name one of
    theirs, its arguments what the function's parameters schema accepts (no
    properties beyond those it names, unless it says otherwise, as OpenAI's
    strict mode does); in JSON_STYLE."""
    options = []
    for tool in json.loads(tools_json):
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        parameters = dict(function.get("parameters") or {"type": "object"})
        if parameters.get("type") == "object":
            parameters.setdefault("additionalProperties", False)
        options.append({"type": "object", "additionalProperties": False,
                        "required": ["name", arguments_key],
                        "properties": {"name": {"const": function["name"]},
                                       arguments_key: parameters}})
    return {"x-guidance": JSON_STYLE, "anyOf": options}


def forced_grammar(tools_json: str, name: str | None) -> str:
    """A Lark grammar (llguidance's syntax: `%json` embeds a JSON schema)
    for an answer that is one call in this format (call_schema)."""
    schema = call_schema(tools_json, name, "arguments")
    return (f"start: {json.dumps(OPEN + chr(10))} call {json.dumps(chr(10) + CLOSE)}\n"
            f"call: %json {json.dumps(schema)}\n")


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def parse_block(body: str) -> ToolCall | None:
    """One block's JSON as a call; None if it is not one."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):          # some models write the JSON text itself
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


def extract(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole answer."""
    content: list[str] = []
    calls: list[ToolCall] = []
    rest = text
    while True:
        start = rest.find(OPEN)
        if start < 0:
            content.append(rest)
            break
        end = rest.find(CLOSE, start + len(OPEN))
        if end < 0:                        # cut short (max_tokens): a block never closed
            content.append(rest)
            break
        call = parse_block(rest[start + len(OPEN):end])
        if call is None:
            content.append(rest[:end + len(CLOSE)])
        else:
            content.append(rest[:start])
            calls.append(call)
        rest = rest[end + len(CLOSE):]
    return "".join(content).strip() if calls else "".join(content), calls


@dataclass(frozen=True, slots=True)
class Delta:
    """What a push gives: content text, or one whole tool call."""
    content: str = ""
    call: ToolCall | None = None


class StreamingParser:
    """Deltas of text in, content deltas and tool calls out. Text that may
    be the start of a tag is held back until it is known not to be; a call
    is given once its block has closed (OpenAI's clients accumulate a call's
    argument deltas, so one delta with the whole arguments is a valid
    stream)."""

    def __init__(self) -> None:
        self._held = ""            # text not given out yet
        self._inside = False       # within a block
        self.num_calls = 0

    def push(self, text: str) -> list[Delta]:
        self._held += text
        out: list[Delta] = []
        while True:
            if self._inside:
                end = self._held.find(CLOSE)
                if end < 0:
                    return out
                body, self._held = self._held[:end], self._held[end + len(CLOSE):]
                self._inside = False
                call = parse_block(body)
                if call is None:
                    out.append(Delta(content=OPEN + body + CLOSE))
                else:
                    self.num_calls += 1
                    out.append(Delta(call=call))
                continue
            start = self._held.find(OPEN)
            if start >= 0:
                if start:
                    out.append(Delta(content=self._held[:start]))
                self._held = self._held[start + len(OPEN):]
                self._inside = True
                continue
            keep = _partial_tag(self._held)
            if len(self._held) > keep:
                out.append(Delta(content=self._held[:len(self._held) - keep]))
                self._held = self._held[len(self._held) - keep:]
            return out

    def finish(self) -> list[Delta]:
        """The end of the answer: whatever is held is content (a block never
        closed included, with its tag)."""
        held = (OPEN if self._inside else "") + self._held
        self._held, self._inside = "", False
        return [Delta(content=held)] if held else []


def _partial_tag(text: str) -> int:
    """Length of the longest end of `text` that starts OPEN."""
    for n in range(min(len(text), len(OPEN) - 1), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


class Hermes:
    """<tool_call>{...}</tool_call> blocks among the text."""
    name = "hermes"
    extract = staticmethod(extract)
    streaming = StreamingParser
    forced_grammar = staticmethod(forced_grammar)


PYTHON_TAG = "<|python_tag|>"


def _llama3_calls(text: str) -> list[ToolCall] | None:
    """The calls of an answer that is only calls; None if it is not."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return None
    calls: list[ToolCall] = []
    decoder = json.JSONDecoder()
    at = 0
    while at < len(body):
        try:
            value, end = decoder.raw_decode(body, at)
        except ValueError:
            return None
        call = parse_block(json.dumps(value)) if isinstance(value, dict) else None
        if call is None:
            return None
        calls.append(call)
        at = end
        rest = body[at:].lstrip()
        if not rest:
            break
        if not rest.startswith(";"):
            return None
        at = len(body) - len(rest[1:].lstrip())
    return calls


class Llama3JsonStreaming:
    """Content streams as it comes, unless the answer starts as calls: then
    it is held to the end and given as calls (or, if it does not parse, as
    the content it is)."""

    def __init__(self) -> None:
        self._held = ""
        self._calls: bool | None = None    # None: not known yet
        self.num_calls = 0

    def push(self, text: str) -> list[Delta]:
        if self._calls is False:
            return [Delta(content=text)] if text else []
        self._held += text
        start = self._held.lstrip()
        if not start:
            return []
        if start.startswith("{") or start.startswith(PYTHON_TAG):
            self._calls = True
            return []
        if PYTHON_TAG.startswith(start):
            return []                      # may yet be the tag
        self._calls = False
        held, self._held = self._held, ""
        return [Delta(content=held)]

    def finish(self) -> list[Delta]:
        held, self._held = self._held, ""
        if not held:
            return []
        calls = _llama3_calls(held) if self._calls else None
        if not calls:
            return [Delta(content=held)]
        self.num_calls = len(calls)
        return [Delta(call=call) for call in calls]


def _llama3_extract(text: str) -> tuple[str, list[ToolCall]]:
    calls = _llama3_calls(text)
    return ("", calls) if calls else (text, [])


def _llama3_forced_grammar(tools_json: str, name: str | None) -> str:
    """One call, {"name": ..., "parameters": ...} (call_schema)."""
    return f"start: %json {json.dumps(call_schema(tools_json, name, 'parameters'))}\n"


class Llama3Json:
    """An answer that is JSON calls, "; "-separated."""
    name = "llama3_json"
    extract = staticmethod(_llama3_extract)
    streaming = Llama3JsonStreaming
    forced_grammar = staticmethod(_llama3_forced_grammar)


#: A worker's OpenSessionResponse.tool_format -> its parser.
FORMATS = {"hermes": Hermes, "llama3_json": Llama3Json}
