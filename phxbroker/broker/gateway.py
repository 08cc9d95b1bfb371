"""How code outside the broker task reaches it: the one interface every transport and
operator surface is given (the daemon's `BrokerTask` implements it).

Broker state has one owner, the broker task. Everyone else hands it work: `tell` queues a
call and waits only for room in the queue (a client's messages, in the order received),
`tell_soon` queues one from code that cannot wait (cleanup when a connection ends), and
`ask` queues one and returns its result, which the broker computed between two of its
batches, in order with every client's messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class BrokerGateway(Protocol):
    """The broker task, as seen from every other task."""

    async def tell(self, fn: Callable[..., object], *args: Any) -> None:
        """Queue `fn(*args)` for the broker task; waits while its queue is full."""
        ...

    def tell_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Queue `fn(*args)` without waiting: now if there is room, else as soon as there
        is. Nothing told this way is lost while the daemon runs."""
        ...

    async def ask(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in the broker task and return its result (or raise its error)."""
        ...
