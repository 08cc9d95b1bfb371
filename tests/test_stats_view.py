"""`phxbroker stats` as an operator sees it: run in a pseudo-terminal, its screen read with
a terminal emulator (pyte) while phoenix.js clients come and go."""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable, Iterator

import pytest
from rich.console import Console
from support.broker import BrokerProcess
from support.node_client import NodeClient
from support.terminal import COLUMNS, Terminal

from phxbroker.cli.statsview import rates, render

TOKENS = [{"user": "alice", "token": "alice-token"}, {"user": "bob", "token": "bob-token"}]
CONFIG = {
    "auth": {"tokens": TOKENS},
    "topics": [{"pattern": "room:*", "echo": ["ping"], "presence": True}],
}


def figure(text: str, label: str) -> str | None:
    """The value column of the row named `label` on the stats screen."""
    found = re.search(rf"^{re.escape(label)}\s+(\S+)", text, re.MULTILINE)
    return found.group(1) if found else None


def shows(label: str, value: str) -> Callable[[str], bool]:
    return lambda text: figure(text, label) == value


@pytest.fixture
def terminal() -> Iterator[Callable[[list[str]], Terminal]]:
    opened: list[Terminal] = []

    def open_terminal(argv: list[str]) -> Terminal:
        opened.append(Terminal(argv))
        return opened[-1]

    yield open_terminal
    for term in opened:
        term.close()


def test_the_live_view_refreshes_in_place_as_clients_come_and_go(
    broker_factory: Callable[..., BrokerProcess],
    node_client_factory: Callable[..., NodeClient],
    terminal: Callable[[list[str]], Terminal],
) -> None:
    broker = broker_factory(CONFIG)
    argv = [sys.executable, "-m", "phxbroker", "stats", "--interval", "0.2"]
    term = terminal([*argv, "--config", str(broker.config_path)])

    text = term.wait_for(shows("connections", "0"), "0 connections")
    assert f"pid {broker.pid}" in text
    for label in ("memory", "messages in", "bytes out", "slow clients dropped", "auth failures"):
        assert label in text

    clients = []
    for token in ("alice-token", "bob-token"):
        client = node_client_factory(token.removesuffix("-token"))
        client.connect(broker.socket_url(), {"token": token})
        client.expect_open()
        assert client.join("room:lobby")["status"] == "ok"
        clients.append(client)
    text = term.wait_for(shows("connections", "2"), "2 connections")
    text = term.wait_for(
        lambda t: re.search(r"^room:lobby\s+2\s+2\s+2\s+0$", t, re.MULTILINE) is not None,
        "room:lobby with 2 subscribers and 2 presences",
    )
    assert figure(text, "users") == "2"

    # Traffic shows as a rate while it flows.
    def busy(text: str) -> bool:
        clients[0].call("room:lobby", "ping", {})
        rate = re.search(r"^messages in\s+\S+\s+([\d,.]+)/s", text, re.MULTILINE)
        return rate is not None and float(rate.group(1).replace(",", "")) > 0

    term.wait_for(busy, "a messages-in rate above zero")

    clients[1].disconnect()
    text = term.wait_for(shows("connections", "1"), "1 connection")
    # Refreshed in place: one view on the screen, not a scroll of copies.
    assert text.count("slow clients dropped") == 1

    os.killpg(term.proc.pid, signal.SIGINT)  # what the terminal sends on Ctrl-C
    assert term.proc.wait(timeout=10) == 0
    assert "Traceback" not in term.text()


def test_the_live_view_says_how_to_quit_and_quits_on_q(
    broker_factory: Callable[..., BrokerProcess], terminal: Callable[[list[str]], Terminal]
) -> None:
    broker = broker_factory(CONFIG)
    argv = [sys.executable, "-m", "phxbroker", "stats", "--interval", "5"]
    term = terminal([*argv, "--config", str(broker.config_path)])
    text = term.wait_for(lambda t: "q or Ctrl-C to quit" in t, "the quit hint")
    assert figure(text, "connections") == "0"

    os.write(term.master, b"q")  # long before the next sample is due

    assert term.proc.wait(timeout=3) == 0
    assert "Traceback" not in term.text()


def report(messages_in: int, messages_out: int, deliveries: int, uptime: float) -> dict:
    counters = {
        "messages_in": messages_in,
        "messages_out": messages_out,
        "deliveries": deliveries,
        "bytes_in": 0,
        "bytes_out": 0,
        "joins": 0,
        "slow_client_drops": 0,
        "auth_failures": 0,
        "refusals": {},
    }
    return {
        "version": "0", "pid": 1, "uptime": uptime, "rss_bytes": None, "connections": 0,
        "channels": 0, "user_count": 0, "topic_count": 0, "topics": [], "counters": counters,
    }  # fmt: skip


def test_each_word_means_one_thing_in_the_view_and_in_json() -> None:
    before, after = report(10, 20, 300, 100.0), report(30, 60, 1300, 102.0)

    per_second = rates(before, after)

    # messages_out is what the counter of that name counts (replies and pushes);
    # broadcast deliveries have a name of their own.
    assert per_second == {
        "messages_in_per_s": 10.0,
        "messages_out_per_s": 20.0,
        "deliveries_per_s": 500.0,
        "bytes_in_per_s": 0.0,
        "bytes_out_per_s": 0.0,
    }
    console = Console(width=COLUMNS, record=True)
    console.print(render(after, per_second, "test"))
    text = console.export_text()
    assert re.search(r"^messages out\s+60\s+20\.0/s$", text, re.MULTILINE), text
    assert re.search(r"^broadcast deliveries\s+1,300\s+500\.0/s$", text, re.MULTILINE), text
