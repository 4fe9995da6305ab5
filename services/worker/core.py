"""The worker's core: sessions and generation over the engine, with input
checked and errors as domain errors. No grpc here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.worker import limits
from services.worker.constraints import Grammars, GrammarSpec
from services.worker.engine import Delta, Engine, Failed, Finished
from services.worker.models import LoadedModel
from services.worker.parking import Parked, Parking, Restored
from services.worker.pressure import PressureRelief
from services.worker.sampling import SamplingParams
from services.worker.prompts import PromptBuilder, tool_format
from services.worker.limits import MAX_PROMPT_CHARS, MAX_TEMPLATE_CHARS
from services.worker.sessions import Session, SessionTable
from services.worker.templates import TemplateSandbox, compile_template
from services.worker.tokens import window_chars

#: How long a Generate waits for its session to finish moving (park/restore).
MOVING_WAIT_S = 60.0


def template_chars(max_prompt_chars: int) -> int:
    """The most text a chat rendering may give: the prompt bound, and as
    much again for the template's own markup around the turns."""
    return 2 * max_prompt_chars + MAX_TEMPLATE_CHARS


@dataclass(frozen=True, slots=True)
class OpenedSession:
    session: Session
    model: str
    max_context: int
    chat: bool
    tool_format: str = ""      # prompts.tool_format of the session's template


class WorkerCore:
    def __init__(self, loaded: LoadedModel, engine: Engine, sessions: SessionTable,
                 parking: Parking | None = None, pressure: PressureRelief | None = None,
                 max_prompt_chars: int = MAX_PROMPT_CHARS,
                 sandbox: TemplateSandbox | None = None, client_templates: bool = True,
                 tool_format_setting: str = "auto"):
        self.loaded = loaded
        self.tool_format_setting = tool_format_setting
        self.max_prompt_chars = max_prompt_chars
        #: Past this many characters a text cannot fit the window.
        self.window_chars = window_chars(loaded.tokenizer, loaded.max_context)
        #: Client templates: rendered in `sandbox` (made on first use when
        #: not given), or refused at OpenSession.
        self.client_templates = client_templates
        self.sandbox = sandbox if sandbox is not None or not client_templates else (
            TemplateSandbox(max_chars=template_chars(max_prompt_chars)))
        self.prompts = PromptBuilder(loaded, self.sandbox, template_chars(max_prompt_chars))
        self.grammars = Grammars(loaded.tokenizer, loaded.eos_token_ids)
        self.engine = engine
        self.sessions = sessions
        self.parking = parking or Parking(loaded, engine, sessions, None)
        #: Sleep and wake under memory pressure (None: the model never sleeps).
        self.pressure = pressure

    @staticmethod
    async def _still(session: Session) -> None:
        """Until the session is not being parked or restored."""
        deadline = time.monotonic() + MOVING_WAIT_S
        while session.moving:
            if time.monotonic() > deadline:
                raise FailedPrecondition(f"session {session.session_id} is being parked or "
                                         "restored", reason="SESSION_BUSY")
            await asyncio.sleep(0.005)

    @asynccontextmanager
    async def _awake(self) -> AsyncIterator[None]:
        """Awake for a request's way in (see PressureRelief.entry)."""
        if self.pressure is None:
            yield
            return
        async with self.pressure.entry():
            yield

    def open_session(self, model: str = "", chat_template: str | None = None,
                     system_prompt: str = "") -> OpenedSession:
        if model and model != self.loaded.name:
            raise InvalidArgument("model", f"this worker serves {self.loaded.name!r}, not "
                                  f"{model!r}; find the worker for a model through admission")
        if chat_template:
            if not self.client_templates:
                raise InvalidArgument("chat_template", "this worker does not take templates "
                                      "from clients (--client-templates off): leave it empty to "
                                      "use the model's")
            if len(chat_template) <= MAX_TEMPLATE_CHARS:   # longer: refused by the table
                compile_template(chat_template)
        chat = bool(chat_template or self.loaded.has_chat_template)
        if system_prompt and not chat:
            raise InvalidArgument("system_prompt", f"{self.loaded.name} has no chat template; "
                                  "give a chat_template to use a system prompt")
        session = self.sessions.open(chat_template, system_prompt)
        template = chat_template or getattr(self.loaded.tokenizer, "chat_template", None) or ""
        return OpenedSession(session, self.loaded.name, self.loaded.max_context, chat,
                             tool_format(template, self.tool_format_setting))

    async def _session(self, session_id: str, token: str) -> Session:
        """The session; one that a previous run of this worker parked (it was
        restarted on the same address) is brought back under its id first."""
        try:
            return self.sessions.get(session_id, token)
        except NotFound:
            if not token or self.parking.orphan_entry(session_id) is None:
                raise
        async with self._awake():
            return await self.parking.adopt_orphan(session_id, token)

    async def close_session(self, session_id: str, token: str) -> int:
        """Close a session (waiting for a park or restore of it to finish)."""
        await self._still(await self._session(session_id, token))
        session = self.sessions.close(session_id, token)
        freed = self.engine.pool.length(session_id)
        self.engine.drop_session(session)
        self.parking.forget(session)
        return freed

    async def park_session(self, session_id: str, token: str) -> Parked:
        return await self.parking.park(await self._session(session_id, token))

    async def restore_session(self, entry_id: str, token: str) -> Restored:
        limits.check_id("entry_id", entry_id)
        limits.check_id("token", token)
        async with self._awake():
            return await self.parking.restore(entry_id, token)

    async def generate(self, session_id: str, token: str, params: SamplingParams, *,
                       prompt: str | None = None,
                       message: dict[str, str] | None = None,
                       conversation: list[dict[str, str]] | None = None,
                       whole_prompt: str | None = None,
                       tools: list[dict] | None = None,
                       grammar: GrammarSpec | None = None) -> AsyncIterator[Delta | Finished]:
        """Stream the answer. If the caller stops iterating (cancels), the
        generation stops and the session keeps only what was yielded.
        `conversation` and `whole_prompt` replace the session's context,
        keeping the prefix they share with it (Engine.submit). `grammar`:
        the answer's tokens follow it (constraints.py)."""
        session = await self._session(session_id, token)
        given = [x for x in (prompt, message, conversation, whole_prompt) if x is not None]
        if len(given) != 1:
            raise InvalidArgument("input", "give one of prompt, message, conversation or "
                                           "whole_prompt")
        limits.check_text("prompt", prompt, self.max_prompt_chars)
        limits.check_text("whole_prompt", whole_prompt, self.max_prompt_chars)
        limits.check_max_tokens(params.max_tokens, self.loaded.max_context, self.loaded.name)
        if tools and conversation is None:
            raise InvalidArgument("conversation.tools_json", "tools come with a conversation")
        if conversation is not None:
            limits.check_conversation(conversation, self.max_prompt_chars, tools=bool(tools))
        if message is not None:
            limits.check_message(message, self.max_prompt_chars)
        field, chars = limits.input_chars(prompt, message, conversation, whole_prompt)
        limits.check_fits_window(field, chars, self.window_chars, self.loaded.max_context,
                                 self.loaded.name)
        constraint = None
        if grammar is not None:       # compiling a large schema takes a while: off the loop
            constraint = await asyncio.to_thread(self.grammars.compile, grammar)
        async with self._awake():
            # Past the gate the session is claimed: no park takes it while its
            # turn is prepared (the tokenizer runs in a thread), which would
            # free the KV under the request about to run on it.
            session.entering += 1
            try:
                # Being parked (memory pressure, or a ParkSession): wait, then
                # restore.
                await self._still(session)
                if session.parked_entry:
                    await self.parking.unpark(session)
                prepared = await self.prompts.prepare(session, prompt=prompt, message=message,
                                                      conversation=conversation,
                                                      whole_prompt=whole_prompt, tools=tools)
                request = self.engine.submit_prepared(session, params, prepared, constraint)
            finally:
                session.entering -= 1
        finished = False
        later = None          # an ending taken from the queue behind deltas
        try:
            while True:
                event, later = (later, None) if later is not None else (
                    await request.out.get(), None)
                if isinstance(event, Delta):
                    event, later = _coalesce(event, request.out)
                if isinstance(event, Failed):
                    finished = True
                    raise event.error
                if isinstance(event, Delta):
                    # Counted when handed to the transport: a cancel or deadline
                    # may interrupt the send of a delta the caller still receives.
                    self.engine.delivered(request, len(event.token_ids))
                else:
                    finished = True
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.engine.cancel(request)


def _coalesce(delta: Delta, queue: asyncio.Queue) -> tuple[Delta, object | None]:
    """The deltas that queued up while this stream was behind, as one (their
    text and tokens in order), and the event that ended the run, if one did:
    a stream that cannot keep up with the steps sends fewer, larger messages
    instead of falling further behind (64 sessions make 64 deltas a step)."""
    texts, ids = [delta.text], list(delta.token_ids)
    while not queue.empty():
        event = queue.get_nowait()
        if not isinstance(event, Delta):
            return (Delta("".join(texts), ids) if len(texts) > 1 else delta), event
        texts.append(event.text)
        ids.extend(event.token_ids)
    return (Delta("".join(texts), ids) if len(texts) > 1 else delta), None
