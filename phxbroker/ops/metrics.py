"""`GET /metrics`: the daemon's counters in the Prometheus exposition formats.

The hot path only bumps plain integers in `Stats`; a collector turns them into metric
families when Prometheus scrapes. prometheus_client does the exposition, including the
OpenMetrics format when the scraper's Accept header asks for it, and contributes the
standard process metrics (memory, CPU, open file descriptors).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from phxbroker.broker.stats import Stats
from phxbroker.transport.http import HttpConnection, Request

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


Handler = Callable[[HttpConnection, Request], Awaitable[None]]


class QueueStatistics(Protocol):
    @property
    def current_buffer_used(self) -> int: ...

    @property
    def tasks_waiting_send(self) -> int: ...


class Observed(Protocol):
    """What the metrics read, at scrape time, beyond the counters."""

    def queue_statistics(self) -> QueueStatistics: ...

    def topic_count(self) -> int: ...


class StatsCollector:
    """Reads the daemon's counters at scrape time."""

    def __init__(self, stats: Stats, observed: Observed) -> None:
        self.stats = stats
        self.observed = observed

    def collect(self) -> Iterator[Metric]:
        stats = self.stats

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

        queue = self.observed.queue_statistics()
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
            PREFIX + "topics",
            "Topics with subscribers or state.",
            value=self.observed.topic_count(),
        )

        yield from _hook_metrics(stats)

        batches = stats.broker_batches
        buckets = [(_le(bound), count) for bound, count in batches.cumulative()]
        yield HistogramMetricFamily(
            PREFIX + "broker_batch_duration_seconds",
            "Time the broker task took for one batch of commands and the socket flush after it.",
            buckets=buckets,
            sum_value=batches.sum,
        )


def _hook_metrics(stats: Stats) -> Iterator[Metric]:
    """The calls to the app's back end (nothing until [hooks] is configured)."""
    if not stats.hook_calls:
        return
    calls = CounterMetricFamily(
        PREFIX + "hook_calls",
        "Calls to the app's back end, by kind (connect, join, event, events) and outcome.",
        labels=["kind", "outcome"],
    )
    for key, count in sorted(stats.hook_calls.items()):
        kind, _, outcome = key.partition(":")
        calls.add_metric([kind, outcome], count)
    yield calls
    latency = stats.hook_latency
    yield HistogramMetricFamily(
        PREFIX + "hook_call_duration_seconds",
        "Time a call to the app's back end took, retries included.",
        buckets=[(_le(bound), count) for bound, count in latency.cumulative()],
        sum_value=latency.sum,
    )
    yield GaugeMetricFamily(
        PREFIX + "hook_calls_in_flight",
        "Calls to the app's back end under way now.",
        value=stats.hook_in_flight,
    )
    breaker = GaugeMetricFamily(
        PREFIX + "hook_breaker",
        "The circuit breaker before the app's back end: 1 for its current state.",
        labels=["state"],
    )
    for state in ("closed", "open", "half_open"):
        breaker.add_metric([state], 1 if stats.hook_breaker == state else 0)
    yield breaker
    yield GaugeMetricFamily(
        PREFIX + "hook_lifecycle_backlog",
        "Lifecycle events waiting to be delivered to the app's back end.",
        value=stats.hook_backlog,
    )


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def metrics_registry(stats: Stats, observed: Observed) -> CollectorRegistry:
    """A registry holding the daemon's metrics and the process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats, observed))
    ProcessCollector(registry=registry)
    return registry


class Metrics:
    """`GET /metrics`; `routes()` lists it for the route table (none when disabled)."""

    def __init__(self, stats: Stats, observed: Observed) -> None:
        self.registry = metrics_registry(stats, observed)

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [("GET", "/metrics", self.metrics)]

    async def metrics(self, conn: HttpConnection, request: Request) -> None:
        await conn.read_body(request, 0)
        encode, content_type = choose_encoder(request.header("accept"))
        body = encode(self.registry)
        await conn.respond(200, body, content_type=content_type, headers=NO_STORE)
