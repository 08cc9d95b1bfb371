"""Lifecycle events for the app's back end: batched, sent in the background, retried.

What a Phoenix channel learns in `terminate/2`, and what Pusher and Centrifugo call
webhooks: a client joined or left a topic, a socket disconnected, a topic was occupied
(its first subscriber) or vacated (its last one left). Events are gathered for at most
`window` seconds and sent as one batch to `<url>/events`; a batch that is not answered
2xx is sent again with back-off (up to `max_backoff` seconds apart) for as long as the
back end is down, while clients are never held up. A vacated event waits `vacated_delay`
seconds and is dropped with the occupied event that follows it within that time, so a
quick reconnect does not look like an empty topic. The backlog is bounded: beyond
`max_backlog` events the oldest are dropped, and counted.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger("phxbroker.hooks")

MAX_BATCH = 1000


class LifecycleEvents:
    """The queue of lifecycle events and the task that delivers it."""

    def __init__(
        self,
        *,
        window: float = 0.1,
        vacated_delay: float = 5.0,
        max_backlog: int = 100_000,
        max_backoff: float = 30.0,
    ) -> None:
        self.window = window
        self.vacated_delay = vacated_delay
        self.max_backlog = max_backlog
        self.max_backoff = max_backoff
        self.queue: deque[dict[str, Any]] = deque()
        self.dropped = 0  # events lost to a full backlog
        self.delivered = 0
        self._vacated: dict[str, tuple[float, dict[str, Any]]] = {}  # topic -> (due, event)
        self._wake: trio.Event | None = None
        self._ids = itertools.count(1)
        self._prefix = os.urandom(6).hex()

    @property
    def backlog(self) -> int:
        """Events waiting to be delivered (delayed vacated events included)."""
        return len(self.queue) + len(self._vacated)

    def add(
        self, kind: str, topic: str | None, user: str | None, socket: str | None, now: float
    ) -> None:
        """Record an event; never blocks. `now` is the trio clock (for the vacated delay)."""
        event = {
            "id": f"{self._prefix}-{next(self._ids)}",
            "type": kind,
            "topic": topic,
            "user": user,
            "socket": socket,
            "at": int(time.time() * 1000),
        }
        if kind == "vacated" and topic is not None:
            self._vacated[topic] = (now + self.vacated_delay, event)
        elif kind == "occupied" and topic is not None and topic in self._vacated:
            del self._vacated[topic]  # it never really emptied: neither event goes out
            return
        else:
            self._append(event)
        if self._wake is not None:
            self._wake.set()

    def _append(self, event: dict[str, Any]) -> None:
        if len(self.queue) >= self.max_backlog:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(event)

    async def run(self, send: Callable[[list[dict[str, Any]]], Awaitable[bool]]) -> None:
        """Deliver batches with `send` (True when the back end took it) until cancelled."""
        backoff = 0.0
        while True:
            self._release_due(trio.current_time())
            if not self.queue:
                self._wake = trio.Event()
                due = min((d for d, _ in self._vacated.values()), default=None)
                with trio.move_on_at(due if due is not None else float("inf")):
                    await self._wake.wait()
                continue
            await trio.sleep(self.window)  # gather what comes with it into one batch
            batch = list(itertools.islice(self.queue, MAX_BATCH))
            if await send(batch):
                sent = {event["id"] for event in batch}  # the oldest may have been dropped
                while self.queue and self.queue[0]["id"] in sent:
                    self.queue.popleft()
                self.delivered += len(batch)
                backoff = 0.0
                continue
            backoff = min(self.max_backoff, max(1.0, backoff * 2))
            log.warning(
                "lifecycle events not delivered (%d waiting); trying again in %g s",
                self.backlog,
                backoff,
            )
            await trio.sleep(backoff)

    def _release_due(self, now: float) -> None:
        for topic, (due, event) in list(self._vacated.items()):
            if due <= now:
                del self._vacated[topic]
                self._append(event)
