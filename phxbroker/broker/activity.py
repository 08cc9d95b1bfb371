"""What clients do, in the log: connect, join and leave lines as Phoenix writes them.

Phoenix logs every connect and join at info (`CONNECTED TO MyAppWeb.UserSocket in 120µs`
with the transport, serializer and filtered parameters; `JOINED room:lobby in 20µs`), so
an operator sees life at the default level. `ActivityLog` writes the same lines, one
line per event (shown here wrapped):

    CONNECTED TO /socket in 120µs: websocket 3, user alice from 127.0.0.1:51000,
        serializer V2, parameters {"token":"[FILTERED]","vsn":"2.0.0"}
    JOINED room:lobby in 20µs: websocket 3, user alice, parameters {}
    REFUSED JOIN users:2 in 9µs: websocket 3, user 1: [[topics]] pattern "users:{user}"
        has join = "self": only user 2 may join
    LEFT room:lobby: websocket 3, user alice
    DISCONNECTED websocket 3, user alice from 127.0.0.1:51000, leaving 1 channel

Parameters whose names contain a secret word (`token`, `password`, ...) show as
"[FILTERED]", as Phoenix's `filter_parameters` does; the log formatter's redaction
(ops/logs.py) then catches secrets anywhere else in the line.

A connect storm must not become thousands of lines a second: beyond `lines_per_second`
lines in one second, events are only counted, and one line per second sums them up
("... and 1,234 more connects and 1,200 joins in the last second").

Sans-io and cheap: callers pass what happened and a `time.perf_counter()` start; the
per-second budget runs on the caller's clock (the broker's), and whoever owns that clock
calls `tick()` by `next_deadline()` so a summary is written even when the storm stops.
Connect, join and leave lines go to the `phxbroker.activity` logger, which `[log]
connections = false` silences; refused joins go to `phxbroker.broker` and stay on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

ACTIVITY_LOGGER = "phxbroker.activity"
REFUSALS_LOGGER = "phxbroker.broker"

# Parameter names whose values are secrets: a connect param, query param or config key
# containing one of these (case-insensitively) is never written.
SECRET_PARAMS = (
    "token",
    "access_token",
    "auth_token",
    "authtoken",
    "api_key",
    "apikey",
    "pass",
    "passwd",
    "password",
    "secret",
    "jwt",
)
FILTERED = "[FILTERED]"
LINES_PER_SECOND = 20
MAX_PARAMETERS_SHOWN = 300  # characters of rendered parameters in one line

# Event kinds, in the order a summary names them: (singular, plural).
_KINDS = {
    "connect": ("connect", "connects"),
    "join": ("join", "joins"),
    "refused_join": ("refused join", "refused joins"),
    "leave": ("leave", "leaves"),
    "disconnect": ("disconnect", "disconnects"),
}


class ActivityLog:
    """Writes connect, join and leave lines, at most `lines_per_second` a second."""

    __slots__ = (
        "_clock",
        "_lines",
        "_refusals",
        "_suppressed",
        "_window_end",
        "_written",
        "lines_per_second",
    )

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        lines_per_second: int = LINES_PER_SECOND,
        lines: logging.Logger | None = None,
        refusals: logging.Logger | None = None,
    ) -> None:
        self._clock = clock
        self.lines_per_second = lines_per_second
        self._lines = lines or logging.getLogger(ACTIVITY_LOGGER)
        self._refusals = refusals or logging.getLogger(REFUSALS_LOGGER)
        self._window_end = float("-inf")
        self._written = 0
        self._suppressed: dict[str, int] = {}

    # -- events --------------------------------------------------------------------------

    def connected(self, peer: Any, path: str, params: Mapping[str, Any], started: float) -> None:
        """A connection was admitted on `path` (its transport's URL, e.g.
        /socket/websocket) with connect `params`; `started` is when its request arrived."""
        if not self._lines.isEnabledFor(logging.INFO) or not self._admit("connect"):
            return
        self._lines.info(
            "CONNECTED TO %s in %s: %s %s, user %s from %s, serializer V%s, parameters %s",
            path.rpartition("/")[0] or path,
            duration(time.perf_counter() - started),
            peer.transport,
            peer.id,
            _user(peer),
            peer.remote,
            peer.serializer.vsn.partition(".")[0],
            render_parameters(params),
        )

    def joined(self, peer: Any, topic: str, params: Any, started: float) -> None:
        """A join of `topic` with join `params` was accepted."""
        if not self._lines.isEnabledFor(logging.INFO) or not self._admit("join"):
            return
        self._lines.info(
            "JOINED %s in %s: %s %s, user %s, parameters %s",
            topic,
            duration(time.perf_counter() - started),
            peer.transport,
            peer.id,
            _user(peer),
            render_parameters(params),
        )

    def join_refused(self, peer: Any, topic: str, why: str, started: float) -> None:
        """A join was refused; `why` names the rule that refused it."""
        if not self._refusals.isEnabledFor(logging.INFO) or not self._admit("refused_join"):
            return
        self._refusals.info(
            "REFUSED JOIN %s in %s: %s %s, user %s: %s",
            topic,
            duration(time.perf_counter() - started),
            peer.transport,
            peer.id,
            _user(peer),
            why,
        )

    def left(self, peer: Any, topic: str) -> None:
        """The client left `topic` (phx_leave)."""
        if not self._lines.isEnabledFor(logging.INFO) or not self._admit("leave"):
            return
        self._lines.info("LEFT %s: %s %s, user %s", topic, peer.transport, peer.id, _user(peer))

    def disconnected(self, peer: Any, channels: int) -> None:
        """A connection ended while it had `channels` channels joined."""
        if not self._lines.isEnabledFor(logging.INFO) or not self._admit("disconnect"):
            return
        self._lines.info(
            "DISCONNECTED %s %s, user %s from %s, leaving %d channel%s",
            peer.transport,
            peer.id,
            _user(peer),
            peer.remote,
            channels,
            "" if channels == 1 else "s",
        )

    # -- the per-second budget -----------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `tick()` has a summary to write (on the clock given), or None."""
        return self._window_end if self._suppressed else None

    def tick(self, now: float | None = None) -> None:
        """Write the summary of the second that ended, if events were left out of it."""
        if now is None:
            now = self._clock()
        if self._suppressed and now >= self._window_end:
            self._new_window(now)

    def _admit(self, kind: str) -> bool:
        """Whether a line of `kind` may be written now; counts it for the summary if not."""
        now = self._clock()
        if now >= self._window_end:
            self._new_window(now)
        if self._written < self.lines_per_second:
            self._written += 1
            return True
        self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
        return False

    def _new_window(self, now: float) -> None:
        if self._suppressed:
            logger = self._lines if self._lines.isEnabledFor(logging.INFO) else self._refusals
            logger.info(
                "... and %s in the last second (at most %d lines a second are written "
                "about connects and joins)",
                _summary(self._suppressed),
                self.lines_per_second,
            )
            self._suppressed = {}
        self._written = 0
        self._window_end = now + 1.0


def duration(seconds: float) -> str:
    """A duration as Phoenix's logger writes it: whole µs up to 1,000 µs, then whole ms."""
    micros = int(seconds * 1_000_000)
    if micros > 1000:
        return f"{micros // 1000}ms"
    return f"{max(micros, 0)}µs"


def is_secret(name: str) -> bool:
    """Whether a parameter of this name holds a secret (Phoenix filters by substring)."""
    lowered = name.lower()
    return any(word in lowered for word in SECRET_PARAMS)


def filter_parameters(value: Any) -> Any:
    """`value` with the values of secret-named keys replaced by "[FILTERED]", at any depth."""
    if isinstance(value, Mapping):
        return {
            k: FILTERED if isinstance(k, str) and is_secret(k) else filter_parameters(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [filter_parameters(v) for v in value]
    return value


def render_parameters(params: Any) -> str:
    """Filtered parameters as compact JSON, shortened to MAX_PARAMETERS_SHOWN characters."""
    text = orjson.dumps(filter_parameters(params), default=_unrenderable).decode()
    if len(text) > MAX_PARAMETERS_SHOWN:
        return text[:MAX_PARAMETERS_SHOWN] + "..."
    return text


def _unrenderable(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    return f"<{type(value).__name__}>"


def _user(peer: Any) -> str:
    return "anonymous" if peer.user is None else str(peer.user)


def _summary(counts: dict[str, int]) -> str:
    """E.g. "1,234 more connects, 3 joins and 1 leave"."""
    parts = [
        f"{counts[kind]:,} {singular if counts[kind] == 1 else plural}"
        for kind, (singular, plural) in _KINDS.items()
        if counts.get(kind)
    ]
    count, _, words = parts[0].partition(" ")
    parts[0] = f"{count} more {words}"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
