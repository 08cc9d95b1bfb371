"""End to end: what an operator sees in the log at the default level while phoenix.js
clients come and go (connect, join and leave lines as Phoenix writes them, refused joins
with the rule that refused, refused origins once each with the line that allows them)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from support.broker import BrokerProcess
from support.node_client import NodeClient

CONFIG: dict[str, Any] = {
    "server": {"check_origin": ["https://app.example.com"]},
    "longpoll": {"window_ms": 500},
    "auth": {"tokens": [{"user": "alice", "token": "alice-token"}]},
    "topics": [
        {"pattern": "room:*", "echo": ["ping"]},
        {"pattern": "users:{user}", "join": "self"},
    ],
}
NO_RETRY = {"reconnectAfterMs": [60_000], "rejoinAfterMs": [60_000]}

Factory = Callable[..., Any]


@pytest.mark.parametrize("transport", ["websocket", "longpoll"])
def test_connects_joins_and_leaves_are_logged_as_phoenix_writes_them(
    broker_factory: Factory, node_client_factory: Factory, transport: str
) -> None:
    broker: BrokerProcess = broker_factory(CONFIG)
    client: NodeClient = node_client_factory()
    client.connect(
        broker.socket_url(), {"token": "alice-token", "mood": "fine"}, transport=transport
    )
    client.expect_open()
    assert client.join("room:lobby", {"topic_secret": "s3cr3t", "n": 1})["status"] == "ok"

    connected = broker.wait_for_log(
        rf"CONNECTED TO /socket in \d+(µs|ms): {transport} (?P<id>\d+), user alice from "
        r"127\.0\.0\.1:\d+, serializer V2, parameters (?P<params>\{.*\})$"
    )
    logged = connected["params"]
    assert '"token":"[FILTERED]"' in logged and '"mood":"fine"' in logged
    peer = f"{transport} {connected['id']}"
    broker.wait_for_log(
        rf'JOINED room:lobby in \d+(µs|ms): {peer}, user alice, parameters '
        r'\{"topic_secret":"\[FILTERED\]","n":1\}$'
    )  # fmt: skip

    client.leave("room:lobby")
    broker.wait_for_log(rf"LEFT room:lobby: {peer}, user alice$")
    client.disconnect()
    if transport == "websocket":  # phoenix.js's LongPoll never says it is leaving
        broker.wait_for_log(rf"DISCONNECTED {peer}, user alice from 127\.0\.0\.1:\d+, leaving 0")
    assert "alice-token" not in broker.log_text and "s3cr3t" not in broker.log_text


def test_a_refused_join_names_the_rule_and_the_user(
    broker_factory: Factory, node_client_factory: Factory
) -> None:
    broker: BrokerProcess = broker_factory(CONFIG)
    client: NodeClient = node_client_factory()
    client.connect(broker.socket_url(), {"token": "alice-token"}, **NO_RETRY)
    client.expect_open()

    assert client.join("users:bob")["status"] == "error"

    broker.wait_for_log(
        r"INFO phxbroker.broker: REFUSED JOIN users:bob in \d+(µs|ms): websocket \d+, user "
        r'alice: \[\[topics\]\] pattern "users:\{user\}" has join = "self": only user bob may '
        r"join$"
    )


def test_the_switch_turns_the_lines_off(
    broker_factory: Factory, node_client_factory: Factory
) -> None:
    broker: BrokerProcess = broker_factory({**CONFIG, "log": {"connections": False}})
    client: NodeClient = node_client_factory()
    client.connect(broker.socket_url(), {"token": "alice-token"}, **NO_RETRY)
    client.expect_open()
    assert client.join("room:lobby")["status"] == "ok"
    assert client.join("users:bob")["status"] == "error"

    broker.wait_for_log("REFUSED JOIN users:bob")  # refusals stay on
    assert not re.search(r"CONNECTED TO|JOINED", broker.log_text), broker.log_text


def test_a_refused_origin_is_logged_once_with_the_line_that_allows_it(
    broker_factory: Factory, node_client_factory: Factory
) -> None:
    broker: BrokerProcess = broker_factory(CONFIG)
    fast_retry = {"reconnectAfterMs": [20], "rejoinAfterMs": [60_000]}
    client: NodeClient = node_client_factory()
    client.connect(
        broker.socket_url(),
        {"token": "alice-token"},
        origin="https://www.example.com",
        **fast_retry,
    )
    # phoenix.js retries for ever: let it try a few times.
    for _ in range(4):
        client.expect({"type": "close"})
    other: NodeClient = node_client_factory()
    other.connect(
        broker.socket_url(), {"token": "alice-token"}, origin="http://localhost:8080", **NO_RETRY
    )
    other.expect({"type": "close"})
    broker.wait_for_log("'http://localhost:8080'")

    # One line per origin, however often phoenix.js came back, with the line to add.
    refused = [line for line in broker.lines if ": refused connect from" in line]
    assert len(refused) == 2, refused
    assert re.search(
        r"refused connect from 127\.0\.0\.1:\d+ on /socket/websocket: origin "
        r"'https://www\.example\.com' is not allowed \(check_origin lists the allowed origins\); "
        r'to allow it, add "https://www\.example\.com" to \[server\] check_origin '
        r"\(logged once per origin\)$",
        refused[0],
    ), refused[0]
    assert 'add "http://localhost:8080" to [server] check_origin' in refused[1]
