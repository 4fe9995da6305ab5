"""Fan-out of ledger events to Watch streams. Each event gets a sequence
number; a watcher too slow to keep up loses events (never blocks the ledger)
and sees the gap in the numbers."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from services.admission.ledger import Event

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Published:
    seq: int
    time_unix: float
    event: Event


_CLOSED = object()


class EventBus:
    def __init__(self, queue_size: int = 4096):
        self._queue_size = queue_size
        self._subscribers: set[asyncio.Queue] = set()
        self._seq = itertools.count(1)
        self._closed = False

    @property
    def num_subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, event: Event) -> None:
        seq = next(self._seq)  # numbered even when nobody watches
        if not self._subscribers:
            return
        item = Published(seq, time.time(), event)
        for queue in self._subscribers:
            try:
                queue.put_nowait(item)
            except asyncio.QueueFull:
                pass  # the watcher sees a gap in seq

    async def subscribe(self) -> AsyncIterator[Published]:
        """Events from now on, until the bus closes or the caller stops."""
        if self._closed:
            return
        queue: asyncio.Queue = asyncio.Queue(self._queue_size + 1)
        self._subscribers.add(queue)
        log.info("watch_started", watchers=len(self._subscribers))
        try:
            while True:
                item = await queue.get()
                if item is _CLOSED:
                    return
                yield item
        finally:
            self._subscribers.discard(queue)
            log.info("watch_ended", watchers=len(self._subscribers))

    def close(self) -> None:
        """End every subscription (server shutdown)."""
        self._closed = True
        for queue in self._subscribers:
            while queue.full():
                queue.get_nowait()
            queue.put_nowait(_CLOSED)
