"""What `phxbroker stats` shows: rates from two reports, and the rich view of one.

Pure functions of the daemon's reports (report.py), so the view can be checked without a
terminal. Every string a client or operator chose (topics, users, reasons) goes through
`literal`: shown as it is, never read as rich markup, emoji codes or terminal controls.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

# One name per meaning, in the view, in --json and in /metrics alike:
#   messages_in   client messages received (heartbeats included)
#   messages_out  replies and pushes sent to one client
#   deliveries    broadcast copies handed to subscribers (one broadcast, many deliveries)
RATE_FIELDS = ("messages_in", "messages_out", "deliveries", "bytes_in", "bytes_out")
QUIT_HINT = "q or Ctrl-C to quit"


def literal(value: object) -> Text:
    """A client-chosen string as rich should print it: exactly its characters, with
    control and format characters (escape sequences, bidi overrides) written as escapes."""
    text = str(value)
    if text.isprintable():
        return Text(text)
    return Text("".join(_visible(ch) for ch in text))


def _visible(ch: str) -> str:
    if ch.isprintable() or ch == " ":
        return ch
    if unicodedata.category(ch) in ("Zs",):  # other spaces are harmless
        return ch
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def totals(report: dict[str, Any]) -> dict[str, int]:
    """Monotonic totals the rates are computed from, named as the report's counters."""
    c = report["counters"]
    return {name: c[name] for name in RATE_FIELDS}


def rates(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, float] | None:
    """Per-second rates between two reports of the same daemon, or None if there is no
    time between them (or the daemon, or one of its workers, restarted in between)."""
    elapsed = current["uptime"] - previous["uptime"]
    if elapsed <= 0 or _pids(current) != _pids(previous):
        return None
    before, after = totals(previous), totals(current)
    return {f"{name}_per_s": (after[name] - before[name]) / elapsed for name in RATE_FIELDS}


def _pids(report: dict[str, Any]) -> list[Any]:
    return [report.get("pid"), *(w.get("pid") for w in report.get("workers", []))]


def render(
    report: dict[str, Any], per_second: dict[str, float] | None, source: str, footer: str = ""
) -> Group:
    """The stats screen for one report, with an optional last line (the live view's quit
    hint)."""
    c = report["counters"]
    rss = report.get("rss_bytes")
    workers = report.get("workers")
    pid = f"pid {report['pid']}" + (f", {len(workers)} workers" if workers else "")
    header = Text.assemble(
        ("phxbroker ", "bold"),
        f"{report['version']} · {pid} · up {format_duration(report['uptime'])}"
        f" · memory {format_bytes(rss) if rss is not None else 'n/a'} · ",
        literal(source),
    )

    figures = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    figures.add_column("", min_width=22)
    figures.add_column("now / total", justify="right", min_width=12)
    figures.add_column("per second", justify="right", min_width=12)

    def rate(name: str, as_bytes: bool = False) -> str:
        if per_second is None:
            return "…"
        value = per_second[f"{name}_per_s"]
        return f"{format_bytes(value)}/s" if as_bytes else f"{value:,.1f}/s"

    figures.add_row("connections", f"{report['connections']:,}", "")
    figures.add_row("channels joined", f"{report['channels']:,}", "")
    figures.add_row("joins since start", f"{c['joins']:,}", "")
    figures.add_row("users", f"{report['user_count']:,}", "")
    figures.add_row("topics", f"{report['topic_count']:,}", "")
    figures.add_row("messages in", f"{c['messages_in']:,}", rate("messages_in"))
    figures.add_row("messages out", f"{c['messages_out']:,}", rate("messages_out"))
    figures.add_row("broadcast deliveries", f"{c['deliveries']:,}", rate("deliveries"))
    figures.add_row("bytes in", format_bytes(c["bytes_in"]), rate("bytes_in", True))
    figures.add_row("bytes out", format_bytes(c["bytes_out"]), rate("bytes_out", True))
    figures.add_row("slow clients dropped", f"{c['slow_client_drops']:,}", "")
    figures.add_row("auth failures", f"{c['auth_failures']:,}", "")
    # Failures the broker survived by skipping one unit of work (see the daemon's log).
    figures.add_row("internal errors", f"{c.get('internal_errors', 0):,}", "")
    refusals = c.get("refusals") or {}
    detail = ", ".join(f"{k} {v}" for k, v in sorted(refusals.items()))
    figures.add_row("refusals", f"{sum(refusals.values()):,}", literal(detail))
    hook_calls = c.get("hook_calls") or {}
    if hook_calls:
        outcomes: dict[str, int] = {}
        for key, count in hook_calls.items():
            outcome = key.partition(":")[2]
            outcomes[outcome] = outcomes.get(outcome, 0) + count
        figures.add_row(
            "app hook calls",
            f"{sum(outcomes.values()):,}",
            ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
        )
        figures.add_row(
            "app hooks now",
            f"{c.get('hook_in_flight', 0):,} in flight",
            f"breaker {c.get('hook_breaker', 'closed')}, "
            f"{c.get('hook_backlog', 0):,} lifecycle events waiting",
        )
    bans = report.get("bans") or {}
    if bans:
        figures.add_row(
            "bans",
            f"{len(bans)}",
            literal(", ".join(f"{u} {format_duration(s)}" for u, s in bans.items())),
        )

    topics = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    topics.add_column(f"topics (busiest {len(report['topics'])} of {report['topic_count']})")
    topics.add_column("subscribers", justify="right")
    topics.add_column("users", justify="right")
    topics.add_column("presences", justify="right")
    topics.add_column("hits", justify="right")
    for t in report["topics"]:
        presences = "" if t["presences"] is None else f"{t['presences']:,}"
        topics.add_row(
            literal(t["topic"]),
            f"{t['subscribers']:,}",
            f"{t['users']:,}",
            presences,
            f"{t['hits']:,}",
        )
    parts: list[RenderableType] = [header, Text(""), figures, Text(""), topics]
    if workers:
        parts += [Text(""), render_workers(workers)]
    if report.get("cluster"):
        parts += [Text(""), *render_cluster(report["cluster"])]
    if footer:
        parts += [Text(""), Text(footer, style="dim")]
    return Group(*parts)


def render_workers(workers: list[dict[str, Any]]) -> Table:
    """A row per worker of a supervisor ([server] workers)."""
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    columns = ("worker", "node", "pid", "state", "connections", "channels", "users", "deliveries")
    for column in (*columns, "restarts"):
        table.add_column(column, justify="left" if column in columns[:4] else "right")
    for w in workers:
        table.add_row(
            str(w.get("worker")),
            str(w.get("node")),
            str(w.get("pid") or ""),
            str(w.get("state")),
            f"{w.get('connections', 0):,}",
            f"{w.get('channels', 0):,}",
            f"{w.get('user_count', 0):,}",
            f"{w.get('deliveries', 0):,}",
            f"{w.get('restarts', 0):,}",
        )
    return table


def render_cluster(cluster: dict[str, Any]) -> list[Text | Table]:
    """The cluster's state as this node sees it, its totals and a row per node."""
    state = Text.assemble(
        ("cluster ", "bold"),
        f"node {cluster['node']} · ",
        (cluster["state"], "green" if cluster["state"] == "connected" else "bold red"),
        f" for {format_duration(cluster['for'])} · {cluster['redis']} prefix {cluster['prefix']}"
        f" · published {cluster['published']:,} received {cluster['received']:,}"
        f" dropped {cluster['dropped']:,} reconnects {cluster['reconnects']:,}",
    )
    nodes = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    for column in ("node", "connections", "channels", "topics", "users", "deliveries", "state"):
        nodes.add_column(column, justify="left" if column in ("node", "state") else "right")
    for row in cluster.get("nodes", []):
        nodes.add_row(
            str(row.get("node")),
            f"{row.get('connections', 0):,}",
            f"{row.get('channels', 0):,}",
            f"{row.get('topic_count', 0):,}",
            f"{row.get('user_count', 0):,}",
            f"{row.get('deliveries', 0):,}",
            str((row.get("cluster") or {}).get("state", "")),
        )
    t = cluster.get("totals", {})
    nodes.add_row(
        Text("all nodes", style="bold"),
        f"{t.get('connections', 0):,}",
        f"{t.get('channels', 0):,}",
        f"{t.get('topic_count', 0):,}",
        f"{t.get('user_count', 0):,}",
        f"{t.get('deliveries', 0):,}",
        "",
    )
    return [state, nodes]


def format_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
