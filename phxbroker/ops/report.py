"""The daemon's state as one JSON-ready report, for `GET /api/stats` and `phxbroker stats`.

Counters are totals since start; rates are left to the reader, who takes two reports and
divides by the time between them (`uptime` is the clock to use).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from phxbroker import __version__

if TYPE_CHECKING:
    from phxbroker.broker.core import Broker
    from phxbroker.daemon.server import Server

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


async def build_report(server: Server) -> dict[str, Any]:
    """A consistent snapshot: broker figures are taken between two broker batches."""
    view = await server.ask(broker_view, server.broker)
    counters = server.stats.snapshot()
    uptime = counters.pop("uptime")
    counters.pop("started_at", None)
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime": uptime,
        "rss_bytes": rss_bytes(),
        "connections": counters["connections_open"],  # every transport
        **view,
        "bans": {user: round(left, 1) for user, left in server.bans.active().items()},
        "counters": counters,
    }
