"""`GET /metrics`: the daemon's counters in the Prometheus exposition formats.

The hot path only bumps plain integers in `Stats`; a collector turns them into metric
families when Prometheus scrapes. prometheus_client does the exposition, including the
OpenMetrics format when the scraper's Accept header asks for it, and contributes the
standard process metrics (memory, CPU, open file descriptors).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from phxbroker.transport.http import HttpConnection, Request

if TYPE_CHECKING:
    from phxbroker.daemon.server import Server

PREFIX = "phxbroker_"
NO_STORE = [("cache-control", "no-store")]

# (Stats attribute, metric name without prefix and _total, help text)
COUNTERS = (
    ("joins", "joins", "Channel joins accepted."),
    ("join_errors", "join_errors", "Channel joins refused (unmatched topic, unauthorized...)."),
    ("leaves", "leaves", "Channels left, closed or dropped with their connection."),
    ("messages_in", "messages_received", "Client messages received (heartbeats included)."),
    ("messages_out", "messages_sent", "Replies and pushes sent to a single client."),
    ("bytes_in", "received_bytes", "Bytes received from clients."),
    ("bytes_out", "sent_bytes", "Bytes sent to clients."),
    ("broadcasts", "broadcasts", "Broadcasts to a topic (relays, publishes, presence, status)."),
    ("deliveries", "deliveries", "Broadcast copies handed to subscribers (fan-out)."),
    ("slow_client_drops", "slow_client_drops", "Clients dropped for not keeping up."),
    (
        "longpoll_binary_dropped",
        "longpoll_binary_dropped",
        "Binary messages not sent because long-poll clients cannot receive binary frames.",
    ),
    ("protocol_errors", "protocol_errors", "Client frames that were not Phoenix messages."),
    (
        "internal_errors",
        "internal_errors",
        "Failures inside the broker that were logged and survived by skipping one command, "
        "one topic's flush or one topic's re-check on reload.",
    ),
    ("auth_failures", "auth_failures", "Connects refused by authentication."),
    ("broker_commands", "broker_commands", "Commands run by the broker task."),
)


class StatsCollector:
    """Reads the server's counters at scrape time."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        stats = server.stats

        open_now = GaugeMetricFamily(
            PREFIX + "open_connections", "Connections open now.", labels=["transport"]
        )
        open_now.add_metric(["websocket"], stats.connections_open - stats.longpoll_open)
        open_now.add_metric(["longpoll"], stats.longpoll_open)
        yield open_now
        opened = CounterMetricFamily(
            PREFIX + "connections", "Connections accepted since start.", labels=["transport"]
        )
        opened.add_metric(["websocket"], stats.connections_total - stats.longpoll_total)
        opened.add_metric(["longpoll"], stats.longpoll_total)
        yield opened

        for attribute, name, help_text in COUNTERS:
            yield CounterMetricFamily(PREFIX + name, help_text, value=getattr(stats, attribute))

        refusals = CounterMetricFamily(
            PREFIX + "refusals",
            "Refused connects, joins and requests, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(stats.refusals.items()):
            refusals.add_metric([reason], count)
        yield refusals

        queue = server.commands.statistics()
        yield GaugeMetricFamily(
            PREFIX + "broker_queue_depth",
            "Commands waiting for the broker task.",
            value=queue.current_buffer_used,
        )
        yield GaugeMetricFamily(
            PREFIX + "broker_queue_blocked_senders",
            "Tasks waiting because the broker's queue is full.",
            value=queue.tasks_waiting_send,
        )
        yield GaugeMetricFamily(
            PREFIX + "topics", "Topics with subscribers or state.", value=len(server.broker.topics)
        )

        batches = stats.broker_batches
        buckets = [(_le(bound), count) for bound, count in batches.cumulative()]
        yield HistogramMetricFamily(
            PREFIX + "broker_batch_duration_seconds",
            "Time the broker task took for one batch of commands and the socket flush after it.",
            buckets=buckets,
            sum_value=batches.sum,
        )


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def metrics_registry(server: Server) -> CollectorRegistry:
    """A registry holding this server's metrics and the process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(server))
    ProcessCollector(registry=registry)
    return registry


def install_metrics(server: Server) -> None:
    """Serve GET /metrics unless [metrics] enabled = false."""
    if not server.config.metrics.enabled:
        return
    registry = metrics_registry(server)

    async def metrics(conn: HttpConnection, request: Request) -> None:
        await conn.read_body(request, 0)
        encode, content_type = choose_encoder(request.header("accept"))
        body = encode(registry)
        await conn.respond(200, body, content_type=content_type, headers=NO_STORE)

    server.frontdoor.route("GET", "/metrics", metrics)
