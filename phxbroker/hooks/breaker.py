"""A circuit breaker for the hook calls (sans-io): fail fast while the back end is down.

Closed, it lets every call through and watches the last `window` seconds: once at least
`min_calls` calls were made there and `threshold` of them failed, it opens. Open, it
refuses every call for `open_for` seconds, then lets `trials` calls through (half open):
the first to succeed closes it, a failure opens it again.
"""

from __future__ import annotations

from collections import deque

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """Whether the next call may go out, from the outcomes of the last ones."""

    def __init__(
        self,
        *,
        window: float = 10.0,
        min_calls: int = 10,
        threshold: float = 0.8,
        open_for: float = 5.0,
        trials: int = 3,
    ) -> None:
        self.window = window
        self.min_calls = min_calls
        self.threshold = threshold
        self.open_for = open_for
        self.trials = trials
        self.state = CLOSED
        self.opened_at = 0.0
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._failures = 0
        self._trials_out = 0

    def allow(self, now: float) -> bool:
        """Whether a call may go out now; a call let through must be `record`ed."""
        if self.state == OPEN:
            if now - self.opened_at < self.open_for:
                return False
            self.state = HALF_OPEN
            self._trials_out = 0
        if self.state == HALF_OPEN:
            if self._trials_out >= self.trials:
                return False
            self._trials_out += 1
        return True

    def record(self, now: float, ok: bool) -> None:
        """The outcome of a call `allow` let through."""
        if self.state == HALF_OPEN:
            self._trials_out = max(0, self._trials_out - 1)
            if ok:
                self._close()
            else:
                self._open(now)
            return
        outcomes = self._outcomes
        outcomes.append((now, ok))
        self._failures += not ok
        while outcomes and now - outcomes[0][0] > self.window:
            _, old_ok = outcomes.popleft()
            self._failures -= not old_ok
        if (
            self.state == CLOSED
            and len(outcomes) >= self.min_calls
            and self._failures >= self.threshold * len(outcomes)
        ):
            self._open(now)

    def _open(self, now: float) -> None:
        self.state = OPEN
        self.opened_at = now
        self._outcomes.clear()
        self._failures = 0

    def _close(self) -> None:
        self.state = CLOSED
        self._outcomes.clear()
        self._failures = 0
