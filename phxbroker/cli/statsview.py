"""What `phxbroker stats` shows: rates from two reports, and the rich view of one.

Pure functions of the daemon's reports (report.py), so the view can be checked without a
terminal. Every string a client or operator chose (topics, users, reasons) goes through
`literal`: shown as it is, never read as rich markup, emoji codes or terminal controls.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

RATE_FIELDS = ("messages_in", "messages_out", "bytes_in", "bytes_out")


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
    """Monotonic totals the rates are computed from. Messages out are the replies and pushes
    sent to one client plus every broadcast delivery."""
    c = report["counters"]
    return {
        "messages_in": c["messages_in"],
        "messages_out": c["messages_out"] + c["deliveries"],
        "bytes_in": c["bytes_in"],
        "bytes_out": c["bytes_out"],
    }


def rates(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, float] | None:
    """Per-second rates between two reports of the same daemon, or None if there is no
    time between them (or the daemon restarted in between)."""
    elapsed = current["uptime"] - previous["uptime"]
    if elapsed <= 0 or current.get("pid") != previous.get("pid"):
        return None
    before, after = totals(previous), totals(current)
    return {f"{name}_per_s": (after[name] - before[name]) / elapsed for name in RATE_FIELDS}


def render(report: dict[str, Any], per_second: dict[str, float] | None, source: str) -> Group:
    """The stats screen for one report."""
    c = report["counters"]
    rss = report.get("rss_bytes")
    header = Text.assemble(
        ("phxbroker ", "bold"),
        f"{report['version']} · pid {report['pid']} · up {format_duration(report['uptime'])}"
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

    all_totals = totals(report)
    figures.add_row("connections", f"{report['connections']:,}", "")
    figures.add_row("channels joined", f"{report['channels']:,}", "")
    figures.add_row("joins since start", f"{c['joins']:,}", "")
    figures.add_row("users", f"{report['user_count']:,}", "")
    figures.add_row("topics", f"{report['topic_count']:,}", "")
    figures.add_row("messages in", f"{all_totals['messages_in']:,}", rate("messages_in"))
    figures.add_row("messages out", f"{all_totals['messages_out']:,}", rate("messages_out"))
    figures.add_row("bytes in", format_bytes(c["bytes_in"]), rate("bytes_in", True))
    figures.add_row("bytes out", format_bytes(c["bytes_out"]), rate("bytes_out", True))
    figures.add_row("slow clients dropped", f"{c['slow_client_drops']:,}", "")
    figures.add_row("auth failures", f"{c['auth_failures']:,}", "")
    # Failures the broker survived by skipping one unit of work (see the daemon's log).
    figures.add_row("internal errors", f"{c.get('internal_errors', 0):,}", "")
    refusals = c.get("refusals") or {}
    detail = ", ".join(f"{k} {v}" for k, v in sorted(refusals.items()))
    figures.add_row("refusals", f"{sum(refusals.values()):,}", literal(detail))
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
    return Group(header, Text(""), figures, Text(""), topics)


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
