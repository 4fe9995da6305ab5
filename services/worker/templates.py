"""Chat templates from clients, rendered where they cannot hurt anyone.

A chat template is a Jinja program. The model's own template comes from its
files (the operator's choice) and is rendered in a thread; a template a client
sends with OpenSession is untrusted: Jinja's sandbox stops it from touching
Python's internals but not from looping for hours
(`{% for i in range(100000) %}{% for j in range(100000) %}...`) or building a
string of gigabytes. So a client's template is rendered in a child process
(spawned: it imports jinja2 and transformers' template code, never torch),
with bounds:
  - time: at most `timeout_s` (--template-timeout-s); past it the child is
    killed and started again, and the request is refused with
    INVALID_ARGUMENT naming chat_template;
  - output: at most `max_chars` characters (rendered in pieces, stopped at
    the bound);
  - memory: the child's address space grows at most MEMORY_BYTES past what it
    had after its imports;
  - CPU: the child runs at the lowest priority (nice 19), so that a template
    that loops takes what the worker's sessions leave.
One child renders one template at a time; renders queue behind each other
(each waits its turn, then at most timeout_s). `--client-templates off`
refuses client templates at OpenSession instead.

The render is transformers' own (`_compile_jinja_template`: the sandboxed
environment, its filters and globals) so that the text is the same as
`tokenizer.apply_chat_template` gives.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Any

import structlog

from services.common.errors import InvalidArgument

log = structlog.get_logger(__name__)

#: What the child may allocate past its imports.
MEMORY_BYTES = 1 << 30
#: How long the child may take to start (imports).
START_TIMEOUT_S = 60.0


def with_chat_template(loaded, path: str):
    """The model with the operator's chat template (--chat-template FILE)
    in place of its own: a tokenizer's template is what every chat session
    renders (trusted: the operator chose it)."""
    import dataclasses
    from pathlib import Path

    source = Path(path).read_text()
    compile_template(source)
    loaded.tokenizer.chat_template = source
    log.info("chat_template_set", path=path, renders_tools="tools" in source)
    return dataclasses.replace(loaded, has_chat_template=True)


def compile_template(source: str) -> None:
    """Raises InvalidArgument for a template that does not parse (nothing is
    run: compiling is safe in the worker itself)."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(source)
    except TemplateError as exc:
        raise InvalidArgument("chat_template", f"does not parse: {exc}") from None


def render(source: str, messages: list[dict[str, Any]], special: dict[str, str],
           max_chars: int, tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation rendered for the assistant's reply, at most max_chars
    (ValueError past it). Used by the child, and in a thread for the model's
    own template. `tools`: OpenAI's tool definitions, given to the template
    as apply_chat_template gives them (None: no tools). A conversation that
    ends with an assistant turn is a prefill: rendered without a generation
    prompt and cut after that turn's content, so that the reply continues it
    (apply_chat_template's continue_final_message)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = _compile_jinja_template(source)
    pieces: list[str] = []
    size = 0
    extra = {} if tools is None else {"tools": tools}
    prefill = bool(messages) and messages[-1].get("role") == "assistant"
    if prefill:     # marked, to cut the rendering where the content ends
        messages = [*messages[:-1], {**messages[-1],
                                     "content": (messages[-1].get("content") or "") + PREFILL_TAG}]
    for piece in template.generate(messages=messages, add_generation_prompt=not prefill,
                                   **special, **extra):
        size += len(piece)
        if size > max_chars:
            raise ValueError(f"renders more than {max_chars} characters")
        pieces.append(piece)
    text = "".join(pieces)
    return _cut_at_tag(text) if prefill else text


#: transformers' continue_final_message marker, cut off as it cuts it.
PREFILL_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _cut_at_tag(text: str) -> str:
    tag = PREFILL_TAG.strip()
    if tag not in text:
        raise ValueError("the chat template does not render the final assistant turn's "
                         "content as given, so the answer cannot continue it")
    at = text.rindex(tag)
    return text[:at] if text[at:at + len(PREFILL_TAG)] == PREFILL_TAG else text[:at].rstrip()


def _child(conn, parent_pid: int) -> None:
    """The child's loop: (source, messages, special, max_chars) in,
    (True, text) or (False, message) out. It dies with the worker (a
    template still looping would otherwise run on for hours)."""
    import ctypes
    import os
    import resource
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        return

    import transformers.utils.chat_template_utils  # noqa: F401 - imported before the limit

    try:
        os.nice(19)   # a template that loops takes what the sessions leave, not more
    except OSError:
        pass

    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[0])
        grown = pages * resource.getpagesize() + MEMORY_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (grown, grown))
    except (OSError, ValueError):
        pass
    conn.send((True, "ready"))
    while True:
        try:
            source, messages, special, max_chars, tools = conn.recv()
        except EOFError:
            return
        try:
            conn.send((True, render(source, messages, special, max_chars, tools)))
        except MemoryError:
            conn.send((False, f"needs more than {MEMORY_BYTES >> 20} MiB to render"))
        except Exception as exc:  # noqa: BLE001 - the template's own error, told the client
            conn.send((False, f"{type(exc).__name__}: {exc}"))


@dataclass
class SandboxStats:
    renders: int = 0
    refused: int = 0
    timeouts: int = 0
    restarts: int = 0


class TemplateSandbox:
    """A child process that renders client templates within bounds."""

    def __init__(self, timeout_s: float = 2.0, max_chars: int = 4_000_000):
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self.stats = SandboxStats()
        self._context = multiprocessing.get_context("spawn")
        self._process = None
        self._conn = None
        self._lock = asyncio.Lock()

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_child, args=(child, os.getpid()), daemon=True,
                                        name="lmx-template-sandbox")
        process.start()
        child.close()
        if not parent.poll(START_TIMEOUT_S):
            process.kill()
            raise RuntimeError("the template sandbox did not start")
        parent.recv()
        self._process, self._conn = process, parent
        log.info("template_sandbox_started", pid=process.pid)

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None

    def _render(self, source: str, messages: list[dict[str, Any]], special: dict[str, str],
                tools: list[dict[str, Any]] | None) -> tuple[bool, str]:
        """In a thread: (ok, text or why), or None past the timeout."""
        if self._process is None or not self._process.is_alive():
            if self._process is not None:
                self.stats.restarts += 1
            self._kill()
            self._start()
        try:
            self._conn.send((source, messages, special, self.max_chars, tools))
        except OSError:   # it died since (a broken pipe): once more, on a fresh child
            self._kill()
            self._start()
            self._conn.send((source, messages, special, self.max_chars, tools))
        if not self._conn.poll(self.timeout_s):
            self._kill()
            self.stats.timeouts += 1
            return False, (f"rendering took more than {self.timeout_s:g} s "
                           "(--template-timeout-s); it was stopped")
        try:
            return self._conn.recv()
        except EOFError:   # the child died (a crash, or killed by the memory limit)
            self._kill()
            return False, "the template's rendering ended its process"

    async def render(self, source: str, messages: list[dict[str, Any]],
                     special: dict[str, str], tools: list[dict[str, Any]] | None = None) -> str:
        async with self._lock:
            started = time.perf_counter()
            ok, text = await asyncio.to_thread(self._render, source, messages, special, tools)
        self.stats.renders += 1
        if not ok:
            self.stats.refused += 1
            log.warning("chat_template_refused", reason=text,
                        seconds=round(time.perf_counter() - started, 3))
            raise InvalidArgument("chat_template", text)
        return text

    def close(self) -> None:
        self._kill()
