"""Temporary bans: users whose connects are refused until a deadline.

phoenix.js reconnects about 20 ms after any close it did not start, so closing a user's
sockets only sticks while that user is refused at the handshake. Bans live in memory (a
restart lifts them) and outlast config reloads. Sans-io: the clock is injected.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "10m", "2h", "1d" or a sum such as "1h30m"; ValueError says why."""
    compact = text.strip().lower().replace(" ", "")
    if not compact:
        raise ValueError("a duration is needed, such as 30s, 10m, 2h or 1d")
    total = 0.0
    position = 0
    parts = list(_DURATION.finditer(compact))
    for match in parts:
        if match.start() != position or (not match.group(2) and len(parts) > 1):
            break  # a gap, or a bare number among units ("10m5"): ambiguous
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(compact):
        raise ValueError(f"{text!r} is not a duration such as 30s, 10m, 2h or 1d")
    if total <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return total


class Bans:
    """Users refused until a time on `clock` (monotonic seconds)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._until: dict[str, float] = {}

    def ban(self, user: str, seconds: float) -> None:
        """Refuse `user` for `seconds` from now (replacing any earlier ban)."""
        self._until[user] = self.clock() + seconds

    def lift(self, user: str) -> bool:
        """End a ban early; whether there was one."""
        return self._until.pop(user, None) is not None

    def remaining(self, user: str) -> float | None:
        """Seconds left on `user`'s ban, or None when not banned."""
        until = self._until.get(user)
        if until is None:
            return None
        left = until - self.clock()
        if left <= 0:
            del self._until[user]
            return None
        return left

    def active(self) -> dict[str, float]:
        """Every current ban: user -> seconds left."""
        for user in list(self._until):
            self.remaining(user)
        now = self.clock()
        return {user: until - now for user, until in self._until.items()}
