"""Which fields of an OpenAI request lmx honours, accepts as harmless, or
refuses: every field a client sends is in one of these lists, or refused
naming it. Nothing is ignored silently. Pure: `refusal` says what is wrong,
openai_api.py turns it into a 400.

Honoured (parsed by openai_api.py): `model`, `messages` (chat) or `prompt`
(completions), `max_tokens`, `max_completion_tokens`, `temperature`,
`top_p`, `seed`, `stop` (up to 16 strings), `stream`, `stream_options`
(`include_usage`; its other keys are ignored), `frequency_penalty` and
`presence_penalty`; `tools`, `tool_choice` and `response_format` (chat).

Accepted and ignored, as they ask nothing of the answer (IGNORED): `user`,
`metadata`, `store`, `service_tier`, `prompt_cache_key` (lmx reuses
prefixes anyway), `safety_identifier`, `parallel_tool_calls` (an answer
may hold several calls either way).

Accepted at their neutral value only, refused otherwise (NEUTRAL): `n` and
`best_of` 1, `logprobs` false (chat), `top_logprobs` 0, `logit_bias` {},
`echo` false, `suffix` "", the legacy `functions` [] and `function_call`
"none" or "auto", `modalities` ["text"]; and `audio`, `prediction`, `web_search_options`,
`reasoning_effort`, `verbosity` and a completion's `logprobs` only null.

A null value is the field's default, so it is always accepted. Anything
else is an unknown parameter (OpenAI's `unknown_parameter`).

In a chat message: `role`, `content`, `tool_calls` (assistant),
`tool_call_id` and `name` (tool) are honoured (`name` is ignored on the
other roles); other fields only empty
(null, "", [] or {}: what an SDK's `message.model_dump()` holds, e.g.
`refusal`, `annotations`); the legacy `function_call` only empty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

HONOURED_COMMON = frozenset({"model", "max_tokens", "max_completion_tokens", "temperature",
                             "top_p", "seed", "stop", "stream", "stream_options",
                             "frequency_penalty", "presence_penalty"})
HONOURED = {"chat": HONOURED_COMMON | {"messages", "tools", "tool_choice", "response_format"},
            "completion": HONOURED_COMMON | {"prompt"}}
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key",
                     "safety_identifier", "parallel_tool_calls"})
MESSAGE_HONOURED = frozenset({"role", "content", "tool_calls", "tool_call_id", "name"})
MESSAGE_IGNORED = frozenset()


@dataclass(frozen=True)
class Neutral:
    """A field lmx does not implement, accepted at the values that ask for
    nothing (`accepts`); `values` names them for the error message, "" when
    only null is."""
    accepts: Callable[[object], bool]
    values: str
    why: str


def _is(*values: object) -> Callable[[object], bool]:
    """Equal to one of `values`: a number to a number (not a bool: in Python
    `False == 0`), a bool or a string to itself."""
    def accepts(value: object) -> bool:
        for wanted in values:
            if isinstance(wanted, (bool, str)):
                if type(value) is type(wanted) and value == wanted:
                    return True
            elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and value == wanted:
                return True
        return False
    return accepts


def _never(value: object) -> bool:
    return False


LEGACY = "the legacy function calling API: use tools and tool_choice"
NEUTRAL_COMMON = {
    "n": Neutral(_is(1), "1", "one choice per request"),
    "logit_bias": Neutral(lambda v: v == {}, "{}", "logit_bias is not implemented"),
}
NEUTRAL = {
    "chat": {
        **NEUTRAL_COMMON,
        "logprobs": Neutral(_is(False), "false", "logprobs are not implemented"),
        "top_logprobs": Neutral(_is(0), "0", "logprobs are not implemented"),
        "functions": Neutral(lambda v: v == [], "[]", LEGACY),
        "function_call": Neutral(_is("none", "auto"), '"none" or "auto"', LEGACY),
        "modalities": Neutral(lambda v: v == ["text"], '["text"]', "text only"),
        "audio": Neutral(_never, "", "text only"),
        "prediction": Neutral(_never, "", "predicted outputs are not implemented"),
        "web_search_options": Neutral(_never, "", "lmx does not search the web"),
        "reasoning_effort": Neutral(_never, "", "lmx's models do not reason apart"),
        "verbosity": Neutral(_never, "", "not implemented"),
    },
    "completion": {
        **NEUTRAL_COMMON,
        "best_of": Neutral(_is(1), "1", "one candidate per request"),
        "logprobs": Neutral(_never, "", "logprobs are not implemented"),
        "echo": Neutral(_is(False), "false", "the prompt is not echoed"),
        "suffix": Neutral(_is(""), '""', "insertion is not implemented"),
    },
}


@dataclass(frozen=True)
class Refusal:
    param: str
    message: str
    code: str      # OpenAI's: unknown_parameter, unsupported_parameter, unsupported_value


def refusal(body: dict, kind: str) -> Refusal | None:
    """The first field of a request (`kind` "chat" or "completion") that
    lmx neither honours nor may ignore, in the body's order; None if none."""
    honoured, neutral = HONOURED[kind], NEUTRAL[kind]
    for name, value in body.items():
        if value is None or name in honoured or name in IGNORED:
            continue
        rule = neutral.get(name)
        if rule is None:
            return Refusal(name, f"Unknown parameter: {name!r} (lmx's OpenAI API: "
                                 "see its README for what is supported)", "unknown_parameter")
        if rule.accepts(value):
            continue
        if rule.values:
            return Refusal(name, f"Unsupported value: {name} must be {rule.values} on lmx "
                                 f"({rule.why}); got {_show(value)}", "unsupported_value")
        return Refusal(name, f"Unsupported parameter: {name} is not supported by lmx "
                             f"({rule.why})", "unsupported_parameter")
    return None


def message_refusal(message: dict, index: int) -> Refusal | None:
    """A chat message's field that is neither honoured, ignored nor empty."""
    for name, value in message.items():
        if name in MESSAGE_HONOURED or name in MESSAGE_IGNORED or value in (None, "", [], {}):
            continue
        param = f"messages[{index}].{name}"
        if name == "function_call":
            return Refusal(param, f"{param}: {LEGACY}", "unsupported_parameter")
        return Refusal(param, f"Unknown parameter: {param!r}", "unknown_parameter")
    return None


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
