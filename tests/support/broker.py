"""A real `phxbroker serve` subprocess for end-to-end tests."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import tomli_w

LISTENING = re.compile(
    r"listening on (?P<scheme>https?)://(?P<host>\[[^\]]+\]|[^\s:/]+):(?P<port>\d+)"
)
EPHEMERAL_LISTEN = "127.0.0.1:0"
ADMIN_SOCKET = "admin.sock"  # relative to the config file: each broker has its own
SERVICE_MANAGER_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")


class BrokerError(AssertionError):
    """The broker did not do what the test waited for; the message carries its log."""


class BrokerProcess:
    """One `phxbroker serve` process started from a TOML config written to `workdir`.

    A config given as a dict is dumped with tomli-w and gets `[server] listen =
    "127.0.0.1:0"` and `[admin] socket = "admin.sock"` (in `workdir`) unless it names its
    own; a config given as a string is written verbatim, so it must choose its own listen
    address and admin socket. Both output streams are
    drained by threads into `lines` for as long as the process runs.

    `command` replaces `python -m phxbroker serve --config FILE` (e.g. a systemd unit's
    ExecStart line); "{config}" in it stands for the config file's path.
    """

    def __init__(
        self,
        config: str | Mapping[str, Any],
        workdir: Path,
        *,
        args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.config_path = self.workdir / "phxbroker.toml"
        self.config_path.write_text(_config_text(config))
        self.args = args
        self.env = env
        self.command = command
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._drainers: list[threading.Thread] = []
        self.scheme = self.host = ""
        self.port = 0

    def start(self, timeout: float = 10) -> BrokerProcess:
        """Start the process and return once it logged where it listens.

        Raises BrokerError (with the log) if it exits or stays silent for `timeout` s.
        """
        # The test run's own service-manager variables never reach the broker by accident.
        inherited = {k: v for k, v in os.environ.items() if k not in SERVICE_MANAGER_VARS}
        env = {**inherited, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        if self.command is None:
            command = [sys.executable, "-m", "phxbroker", "serve", "--config", "{config}"]
        else:
            command = list(self.command)
        command = [part.replace("{config}", str(self.config_path)) for part in command]
        self._proc = subprocess.Popen(
            [*command, *self.args],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        for stream in (self._proc.stdout, self._proc.stderr):
            drainer = threading.Thread(target=self._drain, args=(stream,), daemon=True)
            drainer.start()
            self._drainers.append(drainer)
        try:
            found = self.wait_for_log(LISTENING, timeout=timeout)
        except BrokerError:
            self.kill()
            raise
        self.scheme, self.host, self.port = found["scheme"], found["host"], int(found["port"])
        return self

    @property
    def pid(self) -> int:
        return self._require_proc().pid

    @property
    def url(self) -> str:
        """Base HTTP(S) URL, e.g. http://127.0.0.1:40123."""
        return f"{self.scheme}://{self.host}:{self.port}"

    def socket_url(self, path: str = "/socket") -> str:
        """The endpoint phoenix.js is given (it appends /websocket itself)."""
        ws_scheme = "wss" if self.scheme == "https" else "ws"
        return f"{ws_scheme}://{self.host}:{self.port}{path}"

    @property
    def log_text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def mark(self) -> int:
        """A position in the log, for waiting on lines logged after it."""
        with self._changed:
            return len(self.lines)

    def wait_for_log(
        self, pattern: str | re.Pattern[str], timeout: float = 5, since: int = 0
    ) -> re.Match[str]:
        """Return the match of the first log line at index >= `since` that matches `pattern`.

        Waits up to `timeout` s for it; raises BrokerError if it never comes or the
        process exits without logging it.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        checked = since
        with self._changed:
            while True:
                for line in self.lines[checked:]:
                    if found := regex.search(line):
                        return found
                checked = max(checked, len(self.lines))
                exited = self._proc is not None and self._proc.poll() is not None
                if exited and not any(t.is_alive() for t in self._drainers):
                    raise BrokerError(
                        f"phxbroker exited with code {self._proc.returncode} before logging "
                        f"{regex.pattern!r}; its log:\n{self.log_text}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerError(
                        f"phxbroker did not log {regex.pattern!r} within {timeout} s; "
                        f"its log:\n{self.log_text}"
                    )
                self._changed.wait(min(remaining, 0.2))

    def send_signal(self, signum: int) -> None:
        self._require_proc().send_signal(signum)

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def wait(self, timeout: float = 10) -> int:
        """Wait for the process to exit on its own; return its exit code."""
        proc = self._require_proc()
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(
                f"phxbroker still running after {timeout} s; its log:\n{self.log_text}"
            ) from exc
        for drainer in self._drainers:
            drainer.join(timeout=5)
        return code

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM the process and return its exit code (or the code it already exited with).

        A broker still running `timeout` s later is killed and BrokerError raised.
        """
        proc = self._require_proc()
        if proc.poll() is not None:
            return self.wait()
        proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except BrokerError:
            self.kill()
            raise

    def kill(self) -> None:
        """Kill the process at once (cleanup of last resort)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _drain(self, stream: TextIO) -> None:
        for raw in stream:
            with self._changed:
                self.lines.append(raw.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _require_proc(self) -> subprocess.Popen[str]:
        if self._proc is None:
            raise RuntimeError("the broker was not started: call start() first")
        return self._proc


def _config_text(config: str | Mapping[str, Any]) -> str:
    if isinstance(config, str):
        return config
    data = copy.deepcopy(dict(config))
    data.setdefault("server", {}).setdefault("listen", EPHEMERAL_LISTEN)
    data.setdefault("admin", {}).setdefault("socket", ADMIN_SOCKET)
    return tomli_w.dumps(data)
