"""Every bound on what a client sends a worker, checked here (the core,
the session table and the sampling parameters call these before any work):

  - prompt, whole_prompt, a chat message's content: at most
    --max-prompt-chars characters (1,000,000 by default), not empty;
  - conversation: 1 to MAX_CONVERSATION_MESSAGES messages, roles system,
    user, assistant or tool, a user turn last (or, with tools, a tool turn; or
    an assistant turn, which the answer continues),
    --max-prompt-chars characters of content in all; tools: at most
    MAX_TOOLS definitions and MAX_TOOLS_CHARS of JSON, tool calls likewise;
  - chat_template and system_prompt: at most MAX_TEMPLATE_CHARS and
    MAX_SYSTEM_PROMPT_CHARS characters (a client's template is then rendered
    in a bounded sandbox: templates.py);
  - sampling.stop: at most MAX_STOP_STRINGS strings of 1 to MAX_STOP_CHARS
    characters; sampling.max_tokens: 1 to the model's window - 1;
  - a text longer than any text the model's window can hold
    (tokens.window_chars): refused before it is tokenized;
  - ids and tokens (session_id, token, entry_id, model): at most
    MAX_ID_CHARS characters;
  - the whole message: --max-message-bytes (gRPC, every service).
"""

from __future__ import annotations

from services.common.errors import InvalidArgument

#: Default longest prompt or message (characters): --max-prompt-chars.
MAX_PROMPT_CHARS = 1_000_000
MAX_CONVERSATION_MESSAGES = 10_000
MAX_SYSTEM_PROMPT_CHARS = 64_000
MAX_TEMPLATE_CHARS = 64_000
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_ID_CHARS = 256
MAX_TOOLS = 128
MAX_TOOLS_CHARS = 256 << 10
ROLES = ("system", "user", "assistant", "tool")
#: The reason (ErrorInfo) of a request that does not fit the model's window.
CONTEXT_LENGTH_EXCEEDED = "CONTEXT_LENGTH_EXCEEDED"


def check_id(field: str, value: str, required: bool = True) -> None:
    if required and not value:
        raise InvalidArgument(field, "is required")
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(field, f"at most {MAX_ID_CHARS} characters")


def check_open(chat_template: str | None, system_prompt: str) -> None:
    if chat_template is not None and len(chat_template) > MAX_TEMPLATE_CHARS:
        raise InvalidArgument("chat_template", f"at most {MAX_TEMPLATE_CHARS} characters")
    if len(system_prompt) > MAX_SYSTEM_PROMPT_CHARS:
        raise InvalidArgument("system_prompt", f"at most {MAX_SYSTEM_PROMPT_CHARS} characters")


def check_text(field: str, text: str | None, max_chars: int) -> None:
    if text is None:
        return
    if not text:
        raise InvalidArgument(field, "must not be empty")
    if len(text) > max_chars:
        raise InvalidArgument(field, f"at most {max_chars} characters (--max-prompt-chars)")


def check_message(message: dict[str, str], max_chars: int) -> None:
    """A turn to answer."""
    if message.get("role") != "user":
        raise InvalidArgument("message.role", "a turn to answer must be role 'user'")
    if not message.get("content"):
        raise InvalidArgument("message.content", "must not be empty")
    if len(message["content"]) > max_chars:
        raise InvalidArgument("message.content", f"at most {max_chars} characters "
                                                 "(--max-prompt-chars)")


def check_conversation(messages: list[dict], max_chars: int, tools: bool = False) -> None:
    """A whole conversation to answer: known roles, a user turn last (or a
    tool's result, with tools; or an assistant's to continue: a prefill), at
    most MAX_CONVERSATION_MESSAGES messages and --max-prompt-chars of text."""
    if not messages:
        raise InvalidArgument("conversation", "must hold at least one message")
    if len(messages) > MAX_CONVERSATION_MESSAGES:
        raise InvalidArgument("conversation", f"at most {MAX_CONVERSATION_MESSAGES} messages, "
                                              f"got {len(messages)}")
    for index, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise InvalidArgument(f"conversation.messages[{index}].role",
                                  f"must be one of {', '.join(ROLES)}")
        if (message.get("tool_calls") or message["role"] == "tool") and not tools:
            raise InvalidArgument(f"conversation.messages[{index}]",
                                  "tool calls and tool turns need the conversation's tools")
    last = messages[-1]
    ends = ("user", "tool", "assistant") if tools else ("user", "assistant")
    if last["role"] not in ends or not (last.get("content") or last["role"] == "tool"):
        raise InvalidArgument("conversation", f"must end with a {', '.join(ends[:-1])} or "
                                              f"{ends[-1]} turn that is not empty (an assistant "
                                              "turn last is a prefill: the answer continues it)")
    if last["role"] == "assistant" and last.get("tool_calls"):
        raise InvalidArgument("conversation", "a prefill (an assistant turn last) cannot hold "
                                              "tool calls: their results come first")
    if sum(len(m.get("content", "")) for m in messages) > max_chars:
        raise InvalidArgument("conversation", f"at most {max_chars} characters in all "
                                              "(--max-prompt-chars)")


def check_tools_json(field: str, text: str) -> list:
    """OpenAI's JSON list (tool definitions, an assistant's tool calls),
    parsed; [] for empty text."""
    import json

    if not text:
        return []
    if len(text) > MAX_TOOLS_CHARS:
        raise InvalidArgument(field, f"at most {MAX_TOOLS_CHARS} characters of JSON")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(field, f"is not JSON: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise InvalidArgument(field, "must be a JSON list of objects")
    if len(value) > MAX_TOOLS:
        raise InvalidArgument(field, f"at most {MAX_TOOLS} entries, got {len(value)}")
    return value


def check_stop(stop: tuple[str, ...]) -> None:
    if len(stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise InvalidArgument("sampling.stop", f"at most {MAX_STOP_STRINGS} non-empty strings "
                                               f"of at most {MAX_STOP_CHARS} characters")


def input_chars(prompt: str | None, message: dict | None, conversation: list[dict] | None,
                whole_prompt: str | None) -> tuple[str, int]:
    """The field of the input given, and its characters of text."""
    if conversation is not None:
        return "conversation", sum(len(m.get("content") or "") for m in conversation)
    if message is not None:
        return "message.content", len(message.get("content") or "")
    if prompt is not None:
        return "prompt", len(prompt)
    return "whole_prompt", len(whole_prompt or "")


def check_fits_window(field: str, chars: int, window_chars: int, max_context: int,
                      model: str) -> None:
    """A text too long for the model's window whatever its tokens
    (tokens.window_chars), refused before it is tokenized."""
    if chars > window_chars:
        raise InvalidArgument(field, f"{chars} characters cannot fit {model}'s context of "
                                     f"{max_context} tokens (at most {window_chars} "
                                     "characters could)", reason=CONTEXT_LENGTH_EXCEEDED)


def check_max_tokens(max_tokens: int, max_context: int, model: str) -> None:
    if max_tokens >= max_context:
        raise InvalidArgument("sampling.max_tokens", f"at most {max_context - 1}: {model}'s "
                                                     f"context holds {max_context} tokens, the "
                                                     "prompt's included",
                              reason=CONTEXT_LENGTH_EXCEEDED)
