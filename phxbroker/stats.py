"""Counters the daemon keeps for `stats`, the API and metrics.

Plain integer attributes, so the hot path pays one addition per event; readers take a
snapshot() when they need a consistent view.
"""

from __future__ import annotations

import time
from typing import Any


class Stats:
    """Process-wide counters (monotonic unless named *_open)."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.connections_total = 0
        self.connections_open = 0
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
        self.protocol_errors = 0
        self.auth_failures = 0
        self.refusals: dict[str, int] = {}

    def count_refusal(self, reason: str) -> None:
        """Count one refused connect, join or message, by a short machine-readable reason."""
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        data["refusals"] = dict(self.refusals)
        data["uptime"] = time.time() - self.started_at
        return data
