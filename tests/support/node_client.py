"""A real phoenix.js client in a Node process, driven through tests/e2e/client.mjs."""

from __future__ import annotations

import base64
import itertools
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

E2E_DIR = Path(__file__).resolve().parent.parent / "e2e"
DRIVER = E2E_DIR / "client.mjs"
INSTALL_HINT = "run `npm ci --prefix tests/e2e` (Node 20+) to install phoenix.js"
BINARY_KEY = "__binary__"
# Events that mean the driver or the test went wrong: `expect` fails on them at once.
FAULTS = ("command_error", "exception", "decode_error")

Event = dict[str, Any]
Matcher = Callable[[Event], bool] | Mapping[str, Any]


class NodeClientError(AssertionError):
    """The client did not report what the test expected; the message lists what it did report."""


def check_node_installed() -> str:
    """Return the `node` executable, or raise NodeClientError saying how to install it."""
    node = shutil.which("node")
    if node is None:
        raise NodeClientError(f"`node` is not on PATH: install Node 20+ and {INSTALL_HINT}")
    if not (E2E_DIR / "node_modules" / "phoenix").is_dir():
        raise NodeClientError(f"{E2E_DIR / 'node_modules'} has no phoenix package: {INSTALL_HINT}")
    return node


def matches(event: Any, expected: Any) -> bool:
    """Whether `event` contains `expected`: dicts as recursive subsets, anything else by ==."""
    if isinstance(expected, Mapping):
        return isinstance(event, Mapping) and all(
            key in event and matches(event[key], value) for key, value in expected.items()
        )
    return event == expected


class NodeClient:
    """One phoenix.js Socket in a Node process.

    Commands go to the driver as JSON lines; its events are read by a thread into a
    queue. `expect` picks the first event (in arrival order) that matches and keeps
    the others for later expectations. Bytes in payloads travel as binary frames
    (ArrayBuffer) and come back as bytes.
    """

    def __init__(self, name: str = "client", env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.env = env
        self.events: list[Event] = []  # everything received, for diagnostics
        self.stderr_lines: list[str] = []
        self._pending: list[Event] = []  # received but not yet matched by expect
        self._inbox: queue.Queue[Event | None] = queue.Queue()
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen[str] | None = None
        self.phoenix_version = ""

    def start(self, timeout: float = 10) -> NodeClient:
        """Start the driver; return once phoenix.js is loaded."""
        node = check_node_installed()
        self._proc = subprocess.Popen(
            [node, str(DRIVER)],
            env={**os.environ, **(self.env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        threading.Thread(target=self._read_events, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.phoenix_version = self.expect({"type": "ready"}, timeout=timeout)["phoenix"]
        return self

    # -- low level -------------------------------------------------------------------

    def send(self, cmd: Mapping[str, Any]) -> str:
        """Send one command (an `id` is added if missing); return its id."""
        proc = self._require_proc()
        cmd = {"id": f"{self.name}-{next(self._ids)}", **cmd}
        try:
            proc.stdin.write(json.dumps(cmd, default=_to_wire) + "\n")
            proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise NodeClientError(f"{self.name}: the driver is gone; {self.diagnostics()}") from exc
        return cmd["id"]

    def command(self, cmd: Mapping[str, Any], timeout: float = 5) -> Event:
        """Send a command and return its ack; a command the driver rejects raises."""
        cmd_id = self.send(cmd)
        return self.expect({"type": "ack", "id": cmd_id}, timeout=timeout)

    def expect(self, match: Matcher, timeout: float = 5) -> Event:
        """Return (and consume) the first event matching `match` within `timeout` s.

        `match` is a predicate or a dict that must be a subset of the event. Raises
        NodeClientError, listing recent events, on timeout, when the driver exits,
        or when it reports a fault (command_error, exception) the test did not expect.
        """
        predicate = match if callable(match) else (lambda event: matches(event, match))
        for index, event in enumerate(self._pending):
            if predicate(event):
                return self._pending.pop(index)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NodeClientError(
                    f"{self.name}: no event matching {_describe(match)} within {timeout} s; "
                    + self.diagnostics()
                )
            try:
                event = self._inbox.get(timeout=remaining)
            except queue.Empty:
                continue
            if event is None:
                self._inbox.put(None)  # keep the end visible to later calls
                raise NodeClientError(
                    f"{self.name}: driver exited while waiting for {_describe(match)}; "
                    + self.diagnostics()
                )
            if predicate(event):
                return event
            if event["type"] in FAULTS:
                report = self.diagnostics()
                raise NodeClientError(f"{self.name}: driver reported {event}; {report}")
            self._pending.append(event)

    def seen(self, match: Matcher) -> list[Event]:
        """Every event received so far that matches (consumed or not); never waits."""
        predicate = match if callable(match) else (lambda event: matches(event, match))
        return [event for event in list(self.events) if predicate(event)]

    # -- phoenix.js operations ---------------------------------------------------------

    def connect(self, endpoint: str, params: Mapping[str, Any] | None = None, **opts: Any) -> Event:
        """Create and connect the Socket; returns the ack (use expect_open to wait for it).

        `opts` are the driver's connect options: vsn, authToken, transport
        ("websocket" | "longpoll"), longPollFallbackMs, heartbeatIntervalMs, timeout,
        reconnectAfterMs / rejoinAfterMs (lists of ms), caFile (a PEM CA the WebSocket
        trusts for wss://), origin (an Origin header the WebSocket sends, as a browser
        does). LongPoll goes through Node's fetch, which trusts a CA given as env
        NODE_EXTRA_CA_CERTS when the client is started.
        """
        cmd = {"cmd": "connect", "endpoint": endpoint, "params": params or {}}
        return self.command({**cmd, **opts})

    def expect_open(self, timeout: float = 5) -> Event:
        return self.expect({"type": "open"}, timeout=timeout)

    def join(
        self, topic: str, params: Mapping[str, Any] | None = None, timeout: float = 5
    ) -> Event:
        """Join `topic` and return phoenix.js's first outcome (status ok/error/timeout)."""
        cmd_id = self.command({"cmd": "join", "topic": topic, "params": params or {}})["id"]
        return self.expect({"type": "join", "id": cmd_id}, timeout=timeout)

    def on(self, topic: str, event: str) -> None:
        """Report every `event` phoenix.js delivers to the channel as a channel_event."""
        self.command({"cmd": "on", "topic": topic, "event": event})

    def push(self, topic: str, event: str, payload: Any = None) -> str:
        """Push through the channel without waiting; returns the command id."""
        cmd = {"cmd": "push", "topic": topic, "event": event, "payload": _or_empty(payload)}
        ack = self.command(cmd)
        return ack["id"]

    def call(self, topic: str, event: str, payload: Any = None, timeout: float = 5) -> Event:
        """Push through the channel and return the reply event (status ok/error/timeout)."""
        cmd_id = self.push(topic, event, payload)
        return self.expect({"type": "reply", "id": cmd_id}, timeout=timeout)

    def raw_push(
        self, topic: str, event: str, payload: Any = None, join_ref: str | None = None
    ) -> str:
        """Send a message with Socket.push, bypassing channels; returns its ref."""
        cmd = {"cmd": "raw_push", "topic": topic, "event": event, "payload": _or_empty(payload)}
        return self.command({**cmd, "join_ref": join_ref})["ref"]

    def expect_reply_to(self, ref: str, timeout: float = 5) -> Event:
        """The phx_reply message (as seen by socket.onMessage) answering `ref`."""
        return self.expect({"type": "message", "event": "phx_reply", "ref": ref}, timeout=timeout)

    def leave(self, topic: str, timeout: float = 5) -> Event:
        """Leave `topic`; returns phoenix.js's outcome, which it resolves locally at once."""
        cmd_id = self.command({"cmd": "leave", "topic": topic})["id"]
        return self.expect({"type": "leave", "id": cmd_id}, timeout=timeout)

    def disconnect(self, timeout: float = 5) -> None:
        """Disconnect the Socket (no reconnect) and wait until phoenix.js has closed it."""
        cmd_id = self.command({"cmd": "disconnect"})["id"]
        self.expect({"type": "disconnected", "id": cmd_id}, timeout=timeout)

    # -- lifecycle ---------------------------------------------------------------------

    def close(self, timeout: float = 5) -> None:
        """Ask the driver to exit (closing its socket); kill it if it lingers."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
            proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL the Node process: its socket drops without a close frame or a leave."""
        proc = self._require_proc()
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def diagnostics(self, last: int = 40) -> str:
        """The last events and the driver's stderr, for failure reports."""
        events = list(self.events)
        lines = [json.dumps(event, default=_to_wire) for event in events[-last:]]
        text = f"last {len(lines)} of {len(events)} events:\n" + "\n".join(lines)
        if self.stderr_lines:
            text += "\nstderr:\n" + "\n".join(self.stderr_lines[-last:])
        return text

    def _read_events(self) -> None:
        proc = self._require_proc()
        for line in proc.stdout:
            try:
                event = json.loads(line, object_hook=_from_wire)
            except json.JSONDecodeError:
                event = {"type": "unreadable", "line": line.rstrip("\n")}
            self.events.append(event)
            self._inbox.put(event)
        self._inbox.put(None)

    def _read_stderr(self) -> None:
        for line in self._require_proc().stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    def _require_proc(self) -> subprocess.Popen[str]:
        if self._proc is None:
            raise RuntimeError("the client was not started: call start() first")
        return self._proc


def _or_empty(payload: Any) -> Any:
    return {} if payload is None else payload


def _to_wire(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {BINARY_KEY: base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"{type(value).__name__} cannot be sent to the phoenix.js driver")


def _from_wire(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and isinstance(obj.get(BINARY_KEY), str):
        return base64.b64decode(obj[BINARY_KEY])
    return obj


def _describe(match: Matcher) -> str:
    if callable(match):
        return getattr(match, "__name__", repr(match))
    return json.dumps(match, default=_to_wire)
