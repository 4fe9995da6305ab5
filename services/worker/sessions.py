"""Agent sessions: each holds its context (the tokens whose KV is in the
pool) and, for chat, its messages. A session is reached with its id and a
secret token handed out once, at OpenSession."""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import FailedPrecondition, NotFound, PermissionDenied
from services.worker import limits



@dataclass
class Session:
    session_id: str
    token: str
    chat_template: str | None
    messages: list[dict[str, str]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    busy: bool = False
    #: Parked: the kvstore entry holding its KV (the pool holds none of it).
    parked_entry: str | None = None
    #: Where this worker wrote that KV (parking.ParkedAt): its unpark copies
    #: from there while the kvstore confirms the entry is still there.
    parked_at: Any = None
    #: Being parked or restored (its KV is being copied).
    moving: bool = False
    #: Requests past the wake gate, not yet in the engine (their turn is
    #: being prepared): the session is not idle, nothing parks it.
    entering: int = 0
    created_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def state(self) -> str:
        """As status shows it: moving, parked, generating or active."""
        if self.moving:
            return "moving"
        if self.parked_entry:
            return "parked"
        return "generating" if self.busy else "active"


class SessionTable:
    def __init__(self, max_sessions: int = 1024):
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def open(self, chat_template: str | None = None, system_prompt: str = "") -> Session:
        if len(self._sessions) >= self.max_sessions:
            raise FailedPrecondition(f"this worker holds its maximum of {self.max_sessions} "
                                     "sessions; close one first", reason="TOO_MANY_SESSIONS")
        limits.check_open(chat_template, system_prompt)
        session = Session(f"sess-{secrets.token_hex(8)}", secrets.token_urlsafe(24), chat_template)
        if system_prompt:
            session.messages.append({"role": "system", "content": system_prompt})
        self._sessions[session.session_id] = session
        return session

    def adopt(self, token: str, chat_template: str | None, messages: list[dict[str, str]],
              tokens: list[int], session_id: str | None = None) -> Session:
        """A new session for a restored context, keeping its token (and its id,
        when given: a session this worker's previous run parked)."""
        if len(self._sessions) >= self.max_sessions:
            raise FailedPrecondition(f"this worker holds its maximum of {self.max_sessions} "
                                     "sessions; close one first", reason="TOO_MANY_SESSIONS")
        session = Session(session_id or f"sess-{secrets.token_hex(8)}", token, chat_template,
                          messages=list(messages), tokens=list(tokens))
        self._sessions[session.session_id] = session
        return session

    def find_parked(self, entry_id: str) -> Session | None:
        return next((s for s in self._sessions.values() if s.parked_entry == entry_id), None)

    def remove(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def get(self, session_id: str, token: str) -> Session:
        limits.check_id("session_id", session_id)
        limits.check_id("token", token, required=False)
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFound("session", session_id, "it was closed, or opened on another worker")
        if not hmac.compare_digest(session.token.encode(), token.encode()):
            raise PermissionDenied("token", "does not match the session's token")
        return session

    def close(self, session_id: str, token: str) -> Session:
        session = self.get(session_id, token)
        del self._sessions[session_id]
        return session
