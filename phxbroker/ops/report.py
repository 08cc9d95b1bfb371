"""The daemon's state as one JSON-ready report, for `GET /api/stats` and `phxbroker stats`.

Counters are totals since start; rates are left to the reader, who takes two reports and
divides by the time between them (`uptime` is the clock to use).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from phxbroker import __version__

if TYPE_CHECKING:
    from phxbroker.auth.bans import Bans
    from phxbroker.broker.core import Broker
    from phxbroker.broker.stats import Stats

TOP_TOPICS = 20  # topics listed in a report; `phxbroker topics` lists them all
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """This process's resident memory, from /proc (None where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def broker_view(broker: Broker) -> dict[str, Any]:
    """What the report needs from broker state; runs in the broker task."""
    topics = broker.topic_summary()
    topics.sort(key=lambda t: (-t["subscribers"], t["topic"]))
    return {
        "channels": sum(len(peer.channels) for peer in broker.peers),
        "topic_count": len(topics),
        "user_count": len(broker.users),
        "topics": topics[:TOP_TOPICS],
    }


def assemble_report(view: dict[str, Any], stats: Stats, bans: Bans) -> dict[str, Any]:
    """The report from a `broker_view` (taken in the broker task, between two batches),
    the counters and the bans."""
    counters = stats.snapshot()
    uptime = counters.pop("uptime")
    counters.pop("started_at", None)
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime": uptime,
        "rss_bytes": rss_bytes(),
        "connections": counters["connections_open"],  # every transport
        **view,
        "bans": {user: round(left, 1) for user, left in bans.active().items()},
        "counters": counters,
    }
