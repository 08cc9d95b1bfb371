"""A stand-in for systemd's notify socket, for tests of the sd_notify protocol."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

Message = dict[str, str]


class NotifySocket:
    """Binds a Unix datagram socket, as systemd does for NOTIFY_SOCKET, and collects each
    datagram as a dict of its `KEY=value` fields.

    `address` is what goes into $NOTIFY_SOCKET: a file path, or "@name" for an abstract
    socket. A thread reads datagrams into `messages` until `close()`.
    """

    def __init__(self, *, abstract: bool = False) -> None:
        self._dir: str | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"phxbroker-test-{os.getpid()}-{secrets.token_hex(6)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            # A short directory: socket paths are limited to 107 bytes.
            self._dir = tempfile.mkdtemp(prefix="phxn-", dir="/tmp")
            self.address = str(Path(self._dir) / "notify")
            self.sock.bind(self.address)
        self.sock.settimeout(0.2)
        self.messages: list[Message] = []
        self.raw: list[bytes] = []
        self._changed = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a child that should talk to this socket."""
        return {"NOTIFY_SOCKET": self.address, **extra}

    def mark(self) -> int:
        with self._changed:
            return len(self.messages)

    def wait_for(
        self,
        match: Mapping[str, str] | Callable[[Message], bool],
        timeout: float = 5,
        since: int = 0,
    ) -> tuple[int, Message]:
        """The first message at index >= `since` that contains `match` (fields, compared
        exactly) or satisfies it (a predicate); AssertionError after `timeout` s."""
        predicate = (
            match if callable(match) else lambda m: all(m.get(k) == v for k, v in match.items())
        )
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in range(since, len(self.messages)):
                    if predicate(self.messages[index]):
                        return index, self.messages[index]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no notify message matching {match!r} within {timeout} s; "
                        f"received: {self.messages[since:]!r}"
                    )
                self._changed.wait(remaining)

    def close(self) -> None:
        self._closed = True
        self._reader.join(timeout=2)
        self.sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            with self._changed:
                self.raw.append(data)
                self.messages.append(fields)
                self._changed.notify_all()
