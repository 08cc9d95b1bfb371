"""Non-blocking socket plumbing shared by every connection: the hub that batches writes.

Peers append ready-made bytes to their own outbox and register as dirty; whoever finishes
a batch of work (the broker after its commands, a connection after its read) calls
`SocketHub.flush()`, which writes each dirty outbox with one non-blocking `send`. So a
broadcast costs a list append per subscriber, and frames queued for one connection in the
same batch leave in one write. Only a connection whose socket is full gets a task of its
own, which waits until the socket is writable again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from phxbroker.broker.stats import Stats
from phxbroker.config.settings import LimitsConfig, ServerConfig

log = logging.getLogger("phxbroker.sockets")

RECV_SIZE = 65536


class ClientSocket(Protocol):
    """A connected non-blocking socket as the transports use it: a plain socket, or a
    `TlsSocket` with the same surface and the same non-blocking semantics."""

    def recv(self, size: int, flags: int = 0, /) -> bytes: ...

    def send(self, data: bytes | memoryview, /) -> int: ...

    def shutdown(self, how: int, /) -> None: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class Flushable(Protocol):
    def flush(self) -> None: ...


class SocketHub:
    """What all client connections share: the dirty list, a coarse clock, stats and the
    per-connection limits (read on the hot path, so plain attributes)."""

    def __init__(
        self, stats: Stats, server: ServerConfig | None = None, limits: LimitsConfig | None = None
    ) -> None:
        self.stats = stats
        self.dirty: list[Flushable] = []
        self.now = trio.current_time() if _in_trio() else 0.0
        self._nursery: trio.Nursery | None = None
        self.configure(server or ServerConfig(), limits or LimitsConfig())

    def configure(self, server: ServerConfig, limits: LimitsConfig) -> None:
        """Apply (reloaded) limits; connections opened before keep their own buckets."""
        self.outbox_limit = server.outbox_limit
        self.max_frame_size = server.max_frame_size
        self.message_rate = limits.message_rate
        self.message_burst = limits.message_burst
        self.rate_limit_close_after = limits.rate_limit_close_after
        self.frame_rate = limits.frame_rate
        self.frame_burst = limits.frame_burst
        self.max_fragments = limits.max_fragments

    def attach(self, nursery: trio.Nursery) -> None:
        """Where write-drain tasks for full sockets are started."""
        self._nursery = nursery

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is None:
            raise RuntimeError("SocketHub.attach() was not called")
        self._nursery.start_soon(fn)

    def flush(self) -> None:
        """Write out every outbox that received bytes since the last flush."""
        while self.dirty:
            dirty, self.dirty = self.dirty, []
            for peer in dirty:
                peer.flush()


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


async def recv_some(sock: ClientSocket, size: int = RECV_SIZE) -> bytes:
    """Read what is available (b"" at end of stream); raises OSError on a broken socket."""
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def send_all(sock: ClientSocket, data: bytes | memoryview) -> None:
    """Write everything, waiting for the socket when it is full."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


def close_socket(sock: ClientSocket) -> None:
    """Close a socket other tasks may be waiting on (they get ClosedResourceError)."""
    if sock.fileno() < 0:
        return
    trio.lowlevel.notify_closing(sock)
    sock.close()


def shutdown(sock: ClientSocket, how: int) -> None:
    """shutdown() that ignores a socket the peer already dropped."""
    with contextlib.suppress(OSError):
        sock.shutdown(how)
