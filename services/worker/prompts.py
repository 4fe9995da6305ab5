"""A request's input turned into tokens, before it reaches the engine.

Rendering a chat template and tokenizing a long prompt cost CPU in
proportion to what a client sends (a 1 MB prompt, a conversation of
thousands of turns, a template that loops): done on the event loop, they
would stall every other session's stream, health checks and lease renewals.
PromptBuilder does them in a thread, and a client's own template in the
sandbox (templates.py); the engine then only compares token lists.

`prepare` is the same work done inline, for in-process callers with trusted
input (tests, benchmarks, the warm-up).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidArgument
from services.worker.sessions import Session
from services.worker.templates import TemplateSandbox, render


@dataclass(frozen=True, slots=True)
class Prepared:
    """Tokens ready for Engine.submit_prepared.

    replace: `tokens` is the session's whole new context (a chat turn, a
    conversation, a whole prompt: the prefix it shares with the session's is
    kept); else `tokens` are appended (a raw prompt)."""

    field: str
    tokens: list[int]
    replace: bool
    history: list[dict[str, str]] | None = None
    message: dict[str, str] | None = None
    #: The session's message count it was rendered from (a turn that
    #: finished meanwhile makes it stale).
    basis: int = 0


def _which(prompt, message, conversation, whole_prompt) -> str:
    return ("conversation" if conversation is not None else
            "message" if message is not None else
            "whole_prompt" if whole_prompt is not None else "prompt")


def _template(loaded, session: Session, field: str) -> tuple[str, bool]:
    """(template, from the client)."""
    if session.chat_template:
        return session.chat_template, True
    template = getattr(loaded.tokenizer, "chat_template", None)
    if not template:
        raise InvalidArgument(field, f"{loaded.name} has no chat template (it is a base model): "
                                     "send a raw prompt, or open the session with a "
                                     "chat_template")
    return template, False


def special_tokens(tokenizer) -> dict[str, Any]:
    """What apply_chat_template gives a template besides the messages."""
    return dict(getattr(tokenizer, "special_tokens_map", {}) or {})


def _tokenize_chat(tokenizer, text: str) -> list[int]:
    """A rendered chat's tokens (the template wrote the special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def renders_tools(template: str) -> bool:
    """Whether a chat template uses the tools it is given (transformers
    checks the same way: the variable appears in its source)."""
    return "tools" in template


def tool_format(template: str, setting: str = "auto") -> str:
    """How a template asks the model to write tool calls (the front parses
    that format: services/front/tool_calls.py FORMATS): "" when it renders
    no tools; else `setting` unless "auto", which reads it from the
    template: "llama3_json" where it speaks of <|python_tag|> (Llama 3.1's),
    "hermes" otherwise (<tool_call> blocks: Hermes, Qwen 2.5, lmx's
    chatml-tools)."""
    if not template or not renders_tools(template):
        return ""
    if setting != "auto":
        return setting
    return "llama3_json" if "<|python_tag|>" in template and "<tool_call>" not in template \
        else "hermes"


def _check_tools(loaded, template: str, tools) -> None:
    if tools and not renders_tools(template):
        raise InvalidArgument("conversation.tools_json",
                              f"{loaded.name}'s chat template renders no tools: start its worker "
                              "with --chat-template deploy/templates/chatml-tools.jinja (ChatML "
                              "models), or open the session with a chat_template that does")


def chat_tokens(tokenizer, messages: list[dict], template: str,
                tools: list[dict] | None = None) -> list[int]:
    """The whole conversation rendered with the chat template, ready for the
    assistant's reply (as tokenizer.apply_chat_template renders it), and
    tokenized. The session keeps the longest prefix of its context that
    this rendering shares and computes only the rest."""
    return _tokenize_chat(tokenizer, render(template, messages, special_tokens(tokenizer),
                                            1 << 62, tools))


def _render_trusted(loaded, template: str, messages, field: str, max_chars: int,
                    tools=None) -> str:
    try:
        return render(template, messages, special_tokens(loaded.tokenizer), max_chars, tools)
    except Exception as exc:  # noqa: BLE001 - jinja's errors (raise_exception: a role it rejects)
        raise InvalidArgument(field, f"the chat template refused it: "
                                     f"{type(exc).__name__}: {exc}") from None


def _split(session: Session, message, conversation):
    if conversation is not None:
        return list(conversation[:-1]), conversation[-1]
    return list(session.messages), message


def prepare(loaded, session: Session, *, prompt: str | None = None,
            message: dict[str, str] | None = None,
            conversation: list[dict[str, str]] | None = None,
            whole_prompt: str | None = None, max_chars: int = 1 << 62,
            tools: list[dict] | None = None) -> Prepared:
    """Inline, trusted input (the template, even a session's, rendered here)."""
    field = _which(prompt, message, conversation, whole_prompt)
    tokenizer = loaded.tokenizer
    if message is not None or conversation is not None:
        history, turn = _split(session, message, conversation)
        template, _ = _template(loaded, session, field)
        _check_tools(loaded, template, tools)
        text = _render_trusted(loaded, template, [*history, turn], field, max_chars, tools)
        return Prepared(field, _tokenize_chat(tokenizer, text), True, history, turn,
                        len(session.messages))
    if whole_prompt is not None:
        return Prepared(field, tokenizer(whole_prompt, add_special_tokens=True)["input_ids"],
                        True, [], None, len(session.messages))
    assert prompt is not None
    return Prepared(field, tokenizer(prompt, add_special_tokens=not session.tokens)["input_ids"],
                    False, None, None, len(session.messages))


class PromptBuilder:
    """`prepare` off the event loop: a thread for the model's own template
    and for tokenizing, the sandbox for a client's template."""

    def __init__(self, loaded, sandbox: TemplateSandbox | None, max_chars: int):
        self.loaded = loaded
        self.sandbox = sandbox
        #: The most text a rendering may give (the prompt bound, and the
        #: template's own markup around it).
        self.max_chars = max_chars

    async def prepare(self, session: Session, *, prompt: str | None = None,
                      message: dict[str, str] | None = None,
                      conversation: list[dict[str, str]] | None = None,
                      whole_prompt: str | None = None,
                      tools: list[dict] | None = None) -> Prepared:
        field = _which(prompt, message, conversation, whole_prompt)
        if message is None and conversation is None:
            return await asyncio.to_thread(prepare, self.loaded, session, prompt=prompt,
                                           whole_prompt=whole_prompt)
        history, turn = _split(session, message, conversation)
        basis = len(session.messages)
        template, from_client = _template(self.loaded, session, field)
        _check_tools(self.loaded, template, tools)
        messages = [*history, turn]
        if from_client:
            if self.sandbox is None:
                raise InvalidArgument("chat_template", "this worker does not render client "
                                                       "templates (--client-templates off)")
            text = await self.sandbox.render(template, messages,
                                             special_tokens(self.loaded.tokenizer), tools)
        else:
            text = await asyncio.to_thread(_render_trusted, self.loaded, template, messages,
                                           field, self.max_chars, tools)
        tokens = await asyncio.to_thread(_tokenize_chat, self.loaded.tokenizer, text)
        return Prepared(field, tokens, True, history, turn, basis)
