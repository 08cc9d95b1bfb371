"""Counters the daemon keeps for `stats`, the API and metrics.

Plain integer attributes, so the hot path pays one addition per event; readers take a
snapshot() when they need a consistent view.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any

# Upper bounds (seconds) of the broker batch duration histogram's buckets.
BATCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class Histogram:
    """Observation counts per bucket; `counts[i]` holds values <= bounds[i] (and above the
    previous bound), the last slot everything beyond. Cumulated only when read."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, ending with (inf, total)."""
        out = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class Stats:
    """Process-wide counters (monotonic unless named *_open)."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.connections_total = 0  # every transport
        self.connections_open = 0
        self.longpoll_total = 0  # the long-poll part of the two above
        self.longpoll_open = 0
        self.joins = 0
        self.join_errors = 0
        self.leaves = 0
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.broadcasts = 0
        self.deliveries = 0
        self.slow_client_drops = 0
        self.longpoll_binary_dropped = 0  # binary frames a long-poll client cannot receive
        self.protocol_errors = 0
        self.internal_errors = 0  # failures the broker survived by skipping one unit of work
        self.auth_failures = 0
        self.refusals: dict[str, int] = {}
        self.broker_commands = 0
        # Time the broker task spends on one batch of commands plus the socket flush.
        self.broker_batches = Histogram(BATCH_BUCKETS)

    def count_refusal(self, reason: str) -> None:
        """Count one refused connect, join or message, by a short machine-readable reason."""
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        data = {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and not isinstance(v, Histogram)
        }
        data["refusals"] = dict(self.refusals)
        data["uptime"] = time.time() - self.started_at
        return data
