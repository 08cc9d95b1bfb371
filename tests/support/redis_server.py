"""A real `redis-server` on a free port for cluster tests: no persistence, stopped at the end."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

INSTALL_HINT = "run scripts/install-system-packages.sh (it installs Debian's redis-server)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """`redis-server --port N --save "" --appendonly no`, restartable on the same port."""

    def __init__(
        self, workdir: Path, port: int | None = None, extra_args: tuple[str, ...] = ()
    ) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise AssertionError(f"redis-server is not installed: {INSTALL_HINT}")
        self.executable = executable
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_args = extra_args  # e.g. TLS or a password
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> RedisServer:
        """Start the server and return once it answers PING."""
        self._proc = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *self.extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise AssertionError(f"redis-server on port {self.port} exited at start")
            reply = self.command("PING") or b""
            if reply == b"+PONG\r\n" or reply.startswith(b"-NOAUTH"):
                return self
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)

    def command(self, *words: str) -> bytes | None:
        """Send one inline command and return the raw reply (None if unreachable)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(" ".join(words).encode() + b"\r\n")
                return s.recv(65536)
        except OSError:
            return None

    def stop(self) -> None:
        """Kill the server (as a crash or an outage would) and wait for it to go."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)  # in case it was frozen
            self._proc.kill()
            self._proc.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered or delivered."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()
