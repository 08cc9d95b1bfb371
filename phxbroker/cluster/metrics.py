"""The cluster's metric families for `/metrics` (a collector the daemon registers)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from phxbroker.cluster.node import ClusterNode

PREFIX = "phxbroker_cluster_"

# (ClusterStats attribute, metric name without prefix and _total, help text)
COUNTERS = (
    ("published", "published_messages", "Messages this node published to Redis."),
    ("received", "received_messages", "Messages this node received from Redis."),
    ("broadcasts_received", "received_broadcasts", "Broadcasts received from other nodes."),
    ("dropped", "dropped_messages", "Messages for other nodes dropped (Redis away or slow)."),
    ("malformed", "malformed_messages", "Messages from Redis that did not decode (skipped)."),
    ("disconnects", "disconnects", "Times the connection to Redis was lost."),
    ("probe_failures", "probe_failures", "Probes to itself that did not come back in time."),
    ("nodes_down", "nodes_down", "Other nodes taken for dead after down_after of silence."),
)


class ClusterCollector:
    """Reads the node's cluster counters at scrape time."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        yield GaugeMetricFamily(
            PREFIX + "connected",
            "1 while this node is connected to Redis (0: serving local clients only).",
            value=1 if node.connected else 0,
        )
        yield GaugeMetricFamily(
            PREFIX + "other_nodes",
            "Other nodes this node hears from.",
            value=len(node.replica.views),
        )
        yield GaugeMetricFamily(
            PREFIX + "topic_channels",
            "Topic channels this node is subscribed to.",
            value=sum(1 for state in node._channels.values() if state == "subscribed"),
        )
        for attribute, name, help_text in COUNTERS:
            yield CounterMetricFamily(
                PREFIX + name, help_text, value=getattr(node.stats, attribute)
            )
