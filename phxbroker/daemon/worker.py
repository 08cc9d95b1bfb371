"""A worker's side of `[server] workers`: its role, and its link to the supervisor.

The supervisor (supervisor.py) starts each worker as `phxbroker serve --worker N ...` with
one end of a socket pair (SOCK_SEQPACKET: one message per packet, and an end of file when
the other side goes). Up the link the worker says what a daemon tells systemd (READY=1,
STATUS=, RELOADING=1, STOPPING=1, WATCHDOG=1, as sd_notify's `KEY=value` lines), with
CONNECTIONS=<n> beside each STATUS= and, after a reload the supervisor asked for, RELOADED=1
or RELOAD_REFUSED=<why>. Down the link come single words: `reload`, `drain`, `hurry`. When
the link ends (the supervisor died) the worker drains as a SIGTERM would make it: a worker
never outlives its supervisor for long, and never talks to systemd itself.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from phxbroker.ops.notify import Notifier

log = logging.getLogger("phxbroker")

MAX_MESSAGE = 4096

# What the supervisor sends down the link.
RELOAD, DRAIN, HURRY = b"reload", b"drain", b"hurry"


class Supervised(Protocol):
    """What the link asks of the worker's daemon."""

    reload_error: str | None

    async def reload(self) -> bool: ...

    def request_stop(self, why: str) -> bool: ...

    def hurry(self) -> None: ...


class SupervisorLink(Notifier):
    """The worker's notifier (to the supervisor, not systemd) and the reader of what the
    supervisor asks."""

    def __init__(self, fd: int) -> None:
        super().__init__(None)
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.connections: Callable[[], int] = lambda: 0  # set by the daemon

    @property
    def enabled(self) -> bool:
        return True

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` fields as one message; a status carries the connection count."""
        if not fields:
            return False
        message = list(fields)
        for field in fields:
            if field.startswith("STATUS="):
                self.last_status = field[len("STATUS=") :]
                message.append(f"CONNECTIONS={self.connections()}")
                break
        try:
            self.sock.send("\n".join(message).encode()[:MAX_MESSAGE])
        except OSError as exc:
            # Never fatal: the supervisor notices a silent worker by its missing pings.
            level = logging.DEBUG if self._failed else logging.WARNING
            log.log(level, "cannot tell the supervisor: %s", exc.strerror or exc)
            self._failed = True
            return False
        return True

    def close(self) -> None:
        self.sock.close()

    async def follow(self, daemon: Supervised) -> None:
        """Do what the supervisor asks until the link ends; then drain."""
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    await trio.lowlevel.wait_readable(self.sock)
                    data = self.sock.recv(MAX_MESSAGE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    daemon.request_stop("the supervisor is gone")
                    return
                command = data.strip()
                if command == RELOAD:
                    nursery.start_soon(self._reload, daemon)
                elif command == DRAIN:
                    daemon.request_stop("asked by the supervisor")
                elif command == HURRY:
                    daemon.request_stop("asked by the supervisor")
                    daemon.hurry()
                else:
                    log.warning("ignoring an unknown request from the supervisor: %r", command)

    async def _reload(self, daemon: Supervised) -> None:
        if await daemon.reload():
            self.send("RELOADED=1")
        else:
            why = " ".join((daemon.reload_error or "refused").split())
            self.send(f"RELOAD_REFUSED={why}")


@dataclass(frozen=True)
class WorkerRole:
    """What makes a daemon one of the supervisor's workers."""

    index: int
    node: str  # its cluster node name, also the tag of its log lines
    link: SupervisorLink
    admin_socket: Path | None  # its own control socket, beside the supervisor's
