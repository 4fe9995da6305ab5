"""Prefix reuse for a stateless API: agents resend their whole, growing
history on every turn. The front keeps a worker session per conversation it
has seen, and sends a request to the session whose history (what it was sent
and what it answered) is the longest prefix of the request's; the worker
then keeps the tokens they share and computes only the rest. Pure: no I/O.

A history is, for a chat, a tuple of the tools' JSON ("" for none) and then
the messages (openai_api.Message); for a completion, a string. A session
serves one request at a time."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

History = tuple | str


def is_prefix(shorter: History, longer: History) -> bool:
    if isinstance(shorter, str) != isinstance(longer, str):
        return False
    return len(shorter) <= len(longer) and longer[:len(shorter)] == shorter


@dataclass
class Held:
    """A worker session the front keeps open."""
    worker: str                   # its address
    session_id: str
    token: str
    history: History
    busy: bool = False
    #: How its template writes tool calls (OpenSessionResponse.tool_format).
    tool_format: str = ""
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class ReuseStats:
    hits: int = 0                 # requests sent to a session holding a prefix of them
    misses: int = 0               # requests that needed a new session
    reused_tokens: int = 0        # context tokens the workers kept (not computed again)
    computed_tokens: int = 0      # prompt tokens the workers computed


class SessionCache:
    def __init__(self, per_worker: int):
        self.per_worker = per_worker
        self._held: list[Held] = []
        self.stats = ReuseStats()

    def take(self, workers: list[str], history: History) -> Held | None:
        """The idle session, on one of `workers`, whose history is the
        longest prefix of `history` (marked busy); None for a new one."""
        best = None
        for held in self._held:
            if held.busy or held.worker not in workers or not is_prefix(held.history, history):
                continue
            if best is None or len(held.history) > len(best.history):
                best = held
        if best is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        best.busy = True
        best.last_used = time.monotonic()
        return best

    def add(self, worker: str, session_id: str, token: str, tool_format: str = "") -> Held:
        held = Held(worker, session_id, token, (), busy=True, tool_format=tool_format)
        self._held.append(held)
        return held

    def done(self, held: Held, history: History, reused: int, computed: int) -> None:
        """The request ended well: the session now holds `history`."""
        held.history, held.busy, held.last_used = history, False, time.monotonic()
        self.stats.reused_tokens += reused
        self.stats.computed_tokens += computed

    def forget(self, held: Held) -> None:
        """The request failed or was cut short: what the session holds is not
        known well enough to reuse; the caller closes it."""
        if held in self._held:
            self._held.remove(held)

    def evict(self) -> list[Held]:
        """Idle sessions past `per_worker` on a worker, least recently used
        first: the caller closes them."""
        out = []
        for worker in {h.worker for h in self._held}:
            mine = sorted((h for h in self._held if h.worker == worker),
                          key=lambda h: h.last_used)
            extra = len(mine) - self.per_worker
            for held in mine:
                if extra <= 0:
                    break
                if not held.busy:
                    out.append(held)
                    extra -= 1
        for held in out:
            self._held.remove(held)
        return out

    def held(self) -> list[Held]:
        return list(self._held)
