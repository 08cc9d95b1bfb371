"""The broker task: the one task that touches broker state.

Every other task reaches it through its `BrokerGateway` methods (`tell`, `tell_soon`,
`ask`), which queue calls on one bounded memory channel. The task runs them in arrival
order, so each connection's messages are handled in the order it sent them, as Phoenix
does; up to MAX_BATCH per batch, then the broker's timers (`tick`) and one flush of every
socket written to. A full queue makes readers wait, which slows clients down instead of
growing memory.

No exception in a unit of work (one command, the timers, the flush) ends the task: it is
logged once with what it was working on, counted (`internal_errors`), and that unit is
skipped. A bug may cost one message or one flush, never the daemon.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from phxbroker.broker.core import Broker
from phxbroker.broker.stats import Stats
from phxbroker.transport.sockets import SocketHub

log = logging.getLogger("phxbroker")

BROKER_QUEUE = 4096  # calls waiting for the broker; a full queue slows readers down
MAX_BATCH = 256  # calls the broker runs before it flushes sockets

T = TypeVar("T")
Command = tuple[Callable[..., object], tuple[Any, ...]]


class BrokerTask:
    """The broker's command queue and the loop that serves it (a `BrokerGateway`)."""

    def __init__(self, broker: Broker, hub: SocketHub, stats: Stats) -> None:
        self.broker = broker
        self.hub = hub
        self.stats = stats
        self._commands, self._inbox = trio.open_memory_channel[Command](BROKER_QUEUE)
        self._nursery: trio.Nursery | None = None

    # -- the gateway -----------------------------------------------------------------------

    async def tell(self, fn: Callable[..., object], *args: Any) -> None:
        # Waits only when the queue is full: a memory channel's send() would also yield to
        # the scheduler every time, which a reader about to wait for its socket does anyway.
        try:
            self._commands.send_nowait((fn, args))
        except trio.WouldBlock:
            await self._commands.send((fn, args))

    def tell_soon(self, fn: Callable[..., object], *args: Any) -> None:
        try:
            self._commands.send_nowait((fn, args))
        except trio.WouldBlock:
            if self._nursery is not None:
                self._nursery.start_soon(self.tell, fn, *args)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the daemon is stopping; nothing is left to tell

    async def ask(self, fn: Callable[..., T], *args: Any) -> T:
        done = trio.Event()
        outcome: list[tuple[bool, Any]] = []

        def run() -> None:
            try:
                outcome.append((True, fn(*args)))
            except Exception as exc:
                outcome.append((False, exc))
            finally:
                done.set()

        await self._commands.send((run, ()))
        await done.wait()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    # -- for health and metrics ------------------------------------------------------------

    async def answers_within(self, seconds: float) -> bool:
        """Whether the broker runs a no-op queued now within `seconds` (a broker stuck
        behind a full queue is not ready for more clients)."""
        answered = trio.Event()
        with trio.move_on_after(seconds):
            await self._commands.send((answered.set, ()))
            await answered.wait()
        return answered.is_set()

    def queue_statistics(self) -> trio.MemoryChannelStatistics:
        """Depth of the command queue and how many tasks wait to add to it."""
        return self._commands.statistics()

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve commands until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._loop()

    async def _loop(self) -> None:
        broker = self.broker
        inbox = self._inbox
        stats = self.stats
        batches = stats.broker_batches
        clock = time.perf_counter
        run = self._run
        while True:
            deadline = broker.next_deadline()
            ran = 0
            with trio.move_on_at(math.inf if deadline is None else deadline):
                command = await inbox.receive()
                # Timed per batch, not per command, so the measurement stays off the hot path.
                started = clock()
                run(command)
                ran = 1
                for _ in range(MAX_BATCH - 1):
                    try:
                        command = inbox.receive_nowait()
                    except trio.WouldBlock:
                        break
                    run(command)
                    ran += 1
            if not ran:
                started = clock()
            self._isolated(broker.tick, "the broker's timers")
            self._isolated(self.hub.flush, "writing to sockets")
            batches.observe(clock() - started)
            stats.broker_commands += ran

    def _run(self, command: Command) -> None:
        fn, args = command
        try:
            fn(*args)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("internal error in broker command %s", _describe(fn, args))

    def _isolated(self, fn: Callable[[], object], what: str) -> None:
        try:
            fn()
        except Exception:
            self.stats.internal_errors += 1
            log.exception("internal error in %s; skipped", what)


def _describe(fn: Callable[..., object], args: tuple[Any, ...]) -> str:
    """The command's name and the connection and topic it concerns (never a payload, which
    may carry a secret)."""
    name = getattr(fn, "__qualname__", None) or repr(fn)
    about = []
    for arg in args:
        if hasattr(arg, "channels") and hasattr(arg, "serializer"):
            about.append(f"for {arg!r}")
        topic = getattr(arg, "topic", None)
        if isinstance(topic, str):
            about.append(f"on {topic!r}")
    return " ".join([name, *about])
