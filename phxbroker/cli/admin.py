"""CLI commands that talk to a running daemon over its admin control socket."""

from __future__ import annotations

import json
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from phxbroker.auth.bans import parse_duration
from phxbroker.cli.common import admin_socket_path, config_option, fail
from phxbroker.cli.control_client import AdminClient, AdminError, DaemonUnreachable
from phxbroker.cli.statsview import QUIT_HINT, format_duration, literal, rates, render
from phxbroker.protocol import messages


@contextmanager
def daemon(config_path: Path) -> Iterator[AdminClient]:
    """A connection to the daemon `config_path` configures; failures become one sentence."""
    path = admin_socket_path(config_path)
    try:
        with AdminClient(path) as client:
            yield client
    except (DaemonUnreachable, AdminError) as exc:
        fail(str(exc))


def call(config_path: Path, command: str, **args: Any) -> Any:
    with daemon(config_path) as client:
        return client.call(command, **args)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


@click.command()
@config_option
@click.option("--once", is_flag=True, help="Print one view (two samples) and exit.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of the view (one per line).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds between samples.",
)
def stats(config_path: Path, once: bool, as_json: bool, interval: float) -> None:
    """Watch the daemon live: connections, topics, rates, memory (q or Ctrl-C quits)."""
    source = str(admin_socket_path(config_path))
    with daemon(config_path) as client:
        previous = client.call("stats")
        if once:
            time.sleep(interval)
            current = client.call("stats")
            per_second = rates(previous, current)
            if as_json:
                print_json({**current, "rates": per_second})
            else:
                Console().print(render(current, per_second, source))
            return
        try:
            if as_json:
                _stream_json(client, previous, interval)
            else:
                _live_view(client, previous, interval, source)
        except KeyboardInterrupt:
            pass


def _stream_json(client: AdminClient, previous: dict[str, Any], interval: float) -> None:
    while True:
        time.sleep(interval)
        current = client.call("stats")
        click.echo(json.dumps({**current, "rates": rates(previous, current)}, sort_keys=True))
        previous = current


def _live_view(client: AdminClient, previous: dict[str, Any], interval: float, source: str) -> None:
    first = render(previous, None, source, QUIT_HINT)
    with (
        key_presses() as wait_for_key,
        Live(first, auto_refresh=False, vertical_overflow="crop") as live,
    ):
        while True:
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                if wait_for_key(left) in ("q", "Q"):
                    return
            current = client.call("stats")
            live.update(render(current, rates(previous, current), source, QUIT_HINT), refresh=True)
            previous = current


@contextmanager
def key_presses() -> Iterator[Callable[[float], str | None]]:
    """A function waiting up to N seconds for a key press on the terminal and returning it
    (None when none came). The terminal is in cbreak mode meanwhile (keys arrive unbuffered
    and unechoed, Ctrl-C still interrupts) and restored after. Without a terminal it only
    waits."""
    if sys.stdin is None or not sys.stdin.isatty():
        yield lambda timeout: time.sleep(timeout)
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def wait_for_key(timeout: float) -> str | None:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode(errors="replace") if ready else None

    try:
        yield wait_for_key
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def topics(config_path: Path, as_json: bool) -> None:
    """List topics with their subscribers, users, presences and hits."""
    result = call(config_path, "topics")
    if as_json:
        print_json(result)
        return
    clustered = any("nodes" in t for t in result)
    table = Table("topic", "subscribers", "users", "presences", "hits", box=None)
    if clustered:
        table.add_column("subscribers per node")
    for t in result:
        presences = "" if t["presences"] is None else str(t["presences"])
        row: list[RenderableType] = [
            literal(t["topic"]),
            str(t["subscribers"]),
            str(t["users"]),
            presences,
            str(t["hits"]),
        ]
        if clustered:
            row.append(_per_node(t.get("nodes", {})))
        table.add_row(*row)
    Console().print(table if result else "no topics")


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def users(config_path: Path, as_json: bool) -> None:
    """List connected users, their connections and topics, and current bans."""
    result = call(config_path, "users")
    if as_json:
        print_json(result)
        return
    console = Console()
    if result["users"]:
        clustered = any("nodes" in u for u in result["users"])
        table = Table("user", "connections", "topics", box=None)
        if clustered:
            table.add_column("connections per node")
        for u in result["users"]:
            row: list[RenderableType] = [
                literal(u["user"]),
                str(u["connections"]),
                literal(" ".join(u["topics"])),
            ]
            if clustered:
                row.append(_per_node(u.get("nodes", {})))
            table.add_row(*row)
        console.print(table)
    else:
        console.print("no users connected")
    for user, left in result["bans"].items():
        console.print(
            Text.assemble("banned: ", literal(user), f" for {format_duration(left)} more")
        )


@click.command()
@config_option
@click.argument("user")
@click.option("--topic", help="Only remove the user from this topic (phx_close).")
@click.option("--reason", default="", help="Sent in the websocket close frame.")
@click.option(
    "--ban",
    metavar="DURATION",
    help="Refuse the user's connects for this long (30s, 10m, 2h, 1d): phoenix.js "
    "reconnects at once after a kick without one.",
)
def kick(config_path: Path, user: str, topic: str | None, reason: str, ban: str | None) -> None:
    """Close USER's sockets (code 1001), or remove USER from one topic."""
    ban_seconds = None
    if ban is not None:
        try:
            ban_seconds = parse_duration(ban)
        except ValueError as exc:
            fail(f"--ban: {exc}", 2)
        if topic is not None:
            fail("--ban refuses connects, so it cannot be combined with --topic", 2)
    result = call(config_path, "kick", user=user, topic=topic, reason=reason, ban=ban_seconds)
    # In a cluster the other nodes act too, and their counts are not known here.
    everywhere = (
        " on this node; every other node of the cluster was told"
        if result.get("everywhere")
        else ""
    )
    if topic is not None:
        if not result["removed"] and not everywhere:
            fail(f"{user} has not joined {topic}: nobody was removed")
        click.echo(
            f"removed {user} from {topic} ({_count(result['removed'], 'channel')}{everywhere})"
        )
        return
    if ban_seconds is None:
        if not result["closed"] and not everywhere:
            fail(f"{user} has no open connection: nobody was kicked")
        click.echo(f"kicked {user} ({_count(result['closed'], 'connection')} closed{everywhere})")
        return
    kicked = (
        f"kicked {user} ({_count(result['closed'], 'connection')} closed)"
        if result["closed"]
        else f"{user} has no open connection"
    )
    click.echo(f"{kicked}, connects refused for {format_duration(ban_seconds)}")


@click.command()
@config_option
@click.argument("user")
def unban(config_path: Path, user: str) -> None:
    """Lift a ban set with `kick --ban`."""
    result = call(config_path, "unban", user=user)
    click.echo(f"lifted the ban on {user}" if result["lifted"] else f"{user} was not banned")


@click.command()
@config_option
@click.argument("topic")
@click.argument("event")
@click.argument("payload_json", metavar="[PAYLOAD_JSON]", required=False, default="{}")
def publish(config_path: Path, topic: str, event: str, payload_json: str) -> None:
    """Broadcast EVENT with PAYLOAD_JSON (a JSON object, default {}) to TOPIC's subscribers."""
    try:
        payload = messages.loads(payload_json)
    except ValueError as exc:
        fail(f"PAYLOAD_JSON is not valid JSON ({exc})", 2)
    if not isinstance(payload, dict):
        fail('PAYLOAD_JSON must be a JSON object, e.g. \'{"text": "hi"}\'', 2)
    result = call(config_path, "publish", topic=topic, event=event, payload=payload)
    click.echo(f"published {event} to {topic} ({_count(result['subscribers'], 'subscriber')})")


@click.command()
@config_option
def reload(config_path: Path) -> None:
    """Re-read the config and tokens files (as SIGHUP does); connections stay up."""
    result = call(config_path, "reload")
    click.echo(f"reloaded {result['path']}")


def _per_node(counts: dict[str, int]) -> str:
    """A cluster's per-node counts: "a 3, b 1" (nodes with none left out)."""
    return ", ".join(f"{node} {n}" for node, n in sorted(counts.items()) if n)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


COMMANDS = (stats, topics, users, kick, unban, publish, reload)
