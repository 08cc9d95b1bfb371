"""What operators and the app's back end can do to the running broker, in one place.

The HTTP API, the control socket, health and metrics each see this object through a
narrow interface of their own (`ApiBackend`, `Operator`, `Liveness`, `Observed`). Every
change to broker state goes through the broker task.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from phxbroker.auth.bans import Bans
from phxbroker.broker.core import Broker
from phxbroker.broker.stats import Stats
from phxbroker.broker.topics import find_rule
from phxbroker.daemon.runtime import BrokerTask
from phxbroker.ops.report import assemble_report, broker_view
from phxbroker.protocol import close_codes

if TYPE_CHECKING:
    from phxbroker.cluster.node import ClusterNode


class Operations:
    """Publish, disconnect, kick, ban, report and reload, for every operator surface."""

    def __init__(
        self,
        broker_task: BrokerTask,
        broker: Broker,
        stats: Stats,
        bans: Bans,
        *,
        is_draining: Callable[[], bool],
        reload: Callable[[], Awaitable[str | None]],
        config_path: Callable[[], Path | None],
        cluster: ClusterNode | None = None,
    ) -> None:
        self.broker_task = broker_task
        self.broker = broker
        self.stats = stats
        self.bans = bans
        self._is_draining = is_draining
        self._reload = reload
        self._config_path = config_path
        self.cluster = cluster  # None: a single process

    @property
    def draining(self) -> bool:
        """True once shutdown began: no new clients, nothing promised to those leaving."""
        return self._is_draining()

    @property
    def clustered(self) -> bool:
        """Whether kicks and broadcasts also act on other nodes (whose counts are unknown)."""
        return self.cluster is not None

    @property
    def config_path(self) -> Path | None:
        return self._config_path()

    def topic_declared(self, topic: str) -> bool:
        """Whether a [[topics]] pattern matches `topic` (else no client can ever join it)."""
        return find_rule(self.broker.rules, topic) is not None

    async def publish(self, topic: str, event: str, payload: dict[str, Any]) -> int:
        """Broadcast to a topic; how many subscribers it reached."""
        return await self.broker_task.ask(self.broker.publish, topic, event, payload)

    async def disconnect_user(
        self, user: str, code: int = close_codes.GOING_AWAY, reason: str = "disconnected"
    ) -> int:
        """Close every connection of a user; how many were closed."""
        return await self.broker_task.ask(self.broker.disconnect_user, user, code, reason)

    async def kick(self, user: str, topic: str) -> int:
        """Remove a user from one topic; how many channels were closed."""
        return await self.broker_task.ask(self.broker.kick, user, topic)

    def ban(self, user: str, seconds: float) -> None:
        self.bans.ban(user, seconds)

    def unban(self, user: str) -> bool:
        return self.bans.lift(user)

    def active_bans(self) -> dict[str, float]:
        return self.bans.active()

    async def topics(self) -> list[dict[str, Any]]:
        """Every topic; in a cluster, subscribers are counted on every node."""
        local = await self.broker_task.ask(self.broker.topic_summary)
        return local if self.cluster is None else await self.cluster.topics(local)

    async def users(self) -> list[dict[str, Any]]:
        """Every connected user; in a cluster, connections are counted on every node."""
        local = await self.broker_task.ask(self.broker.user_summary)
        return local if self.cluster is None else await self.cluster.users(local)

    async def report(self) -> dict[str, Any]:
        """A consistent snapshot: broker figures are taken between two broker batches."""
        view = await self.broker_task.ask(broker_view, self.broker)
        report = assemble_report(view, self.stats, self.bans)
        if self.cluster is not None:
            report["cluster"] = await self.cluster.report()
        return report

    async def reload(self) -> str | None:
        return await self._reload()

    # -- what health and metrics read ------------------------------------------------------

    async def answers_within(self, seconds: float) -> bool:
        return await self.broker_task.answers_within(seconds)

    def queue_statistics(self) -> trio.MemoryChannelStatistics:
        return self.broker_task.queue_statistics()

    def topic_count(self) -> int:
        return len(self.broker.topics)
