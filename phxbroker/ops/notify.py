"""The systemd notify protocol (sd_notify(3)), without a dependency.

Each message is one datagram of newline-separated `KEY=value` fields sent to the Unix
socket named by $NOTIFY_SOCKET (a leading "@" means an abstract socket). Without
$NOTIFY_SOCKET every call does nothing, so the daemon runs the same outside systemd.

The watchdog and status reporter is a task in the event loop, not a thread, on purpose: a
loop that stops turning stops pinging, and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

import trio

log = logging.getLogger("phxbroker.notify")

STATUS_INTERVAL = 2.0  # how often, at least, the status line is refreshed if it changed


class Notifier:
    """Sends notify messages to systemd; a no-op when not started by systemd."""

    def __init__(self, address: str | None) -> None:
        self.address: str | bytes | None = None
        if address:
            # A leading "@" names an abstract socket: its first byte is NUL on the wire.
            self.address = b"\0" + address[1:].encode() if address.startswith("@") else address
        self.last_status: str | None = None
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        return cls((os.environ if environ is None else environ).get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` fields as one message; True if systemd took it."""
        if self.address is None or not fields:
            return False
        for field in fields:
            if field.startswith("STATUS="):
                self.last_status = field[len("STATUS=") :]
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            # Never fatal: the service keeps serving; systemd will notice on its own.
            level = logging.DEBUG if self._failed else logging.WARNING
            log.log(level, "cannot notify systemd at %s: %s", self.address, exc.strerror or exc)
            self._failed = True
            return False
        return True

    def ready(self, status: str) -> None:
        """Startup (or a reload) is complete."""
        self.send("READY=1", _status(status))

    def status(self, status: str) -> None:
        self.send(_status(status))

    def reloading(self, status: str = "reloading the config") -> None:
        """A reload begins; `ready()` ends it. MONOTONIC_USEC lets Type=notify-reload
        (systemd 253+) match this message to the SIGHUP it sent."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", _status(status))

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", _status(status))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of $WATCHDOG_USEC, as sd_watchdog_enabled(3)
    advises), or None when systemd does not watch this process."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (e.g. a wrapper that exec'd us differently)
    return int(usec) / 1e6 / 2


async def keep_informed(
    notifier: Notifier, describe: Callable[[], str], *, watchdog: float | None
) -> None:
    """Ping the watchdog every `watchdog` s and send STATUS= whenever `describe()` (which
    must be cheap) has changed, checked at least every STATUS_INTERVAL s."""
    if not notifier.enabled:
        return
    interval = min(watchdog, STATUS_INTERVAL) if watchdog else STATUS_INTERVAL
    while True:
        fields = ["WATCHDOG=1"] if watchdog else []
        status = _status(describe())
        if status != f"STATUS={notifier.last_status}":
            fields.append(status)
        notifier.send(*fields)
        await trio.sleep(interval)


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.split())  # one line, whatever the text held
