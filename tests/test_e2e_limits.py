"""End to end: each per-client limit trips for the abusive client only.

phoenix.js sees a refused handshake as an error and close 1006 (browsers hide the
status), so the HTTP status is checked with a plain HTTP client as well.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable
from typing import Any

from support.broker import BrokerProcess
from support.node_client import NodeClient

NO_RETRY = {"reconnectAfterMs": [60_000], "rejoinAfterMs": [60_000]}


def config(**limits: Any) -> dict[str, Any]:
    return {
        "auth": {
            "tokens": [
                {"user": "alice", "token": "alice-token"},
                {"user": "bob", "token": "bob-token"},
            ]
        },
        "topics": [{"pattern": "room:*", "echo": ["ping"], "relay": ["new_msg"]}],
        "limits": limits,
    }


def open_client(
    broker: BrokerProcess, factory: Callable[..., NodeClient], name: str, token: str, **opts: Any
) -> NodeClient:
    client = factory(name)
    client.connect(broker.socket_url(), {"token": token}, **opts)
    client.expect_open()
    assert client.join("room:lobby")["status"] == "ok"
    return client


def http_status(broker: BrokerProcess, path: str) -> int:
    conn = http.client.HTTPConnection(broker.host, broker.port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def still_fine(*clients: NodeClient) -> None:
    for n, client in enumerate(clients):
        assert client.call("room:lobby", "ping", {"n": n})["response"] == {"n": n}
        assert client.seen({"type": "close"}) == []


def test_connections_per_address_over_the_limit_are_refused_with_429(
    broker_factory: Callable[..., BrokerProcess], node_client_factory: Callable[..., NodeClient]
) -> None:
    broker = broker_factory({**config(max_connections_per_ip=2), "log": {"level": "debug"}})
    alice = open_client(broker, node_client_factory, "alice", "alice-token")
    bob = open_client(broker, node_client_factory, "bob", "bob-token")

    mark = broker.mark()
    third = node_client_factory("third")
    third.connect(broker.socket_url(), {"token": "alice-token"}, **NO_RETRY)
    assert "429" in third.expect({"type": "error"})["message"]
    assert third.expect({"type": "close"})["code"] == 1006
    broker.wait_for_log(r"refused connect .*: 3 connections from 127\.0\.0\.1 \(limit 2\)", mark)
    assert http_status(broker, "/socket/websocket?token=bob-token&vsn=2.0.0") == 429

    still_fine(alice, bob)
    mark = broker.mark()
    bob.disconnect()  # a freed slot is usable again
    broker.wait_for_log(r"disconnected <websocket \d+ bob@", since=mark)
    again = open_client(broker, node_client_factory, "again", "bob-token")
    still_fine(alice, again)


def test_connections_over_the_total_limit_are_refused_with_503(
    broker_factory: Callable[..., BrokerProcess], node_client_factory: Callable[..., NodeClient]
) -> None:
    broker = broker_factory(config(max_connections=2, max_connections_per_ip=0))
    alice = open_client(broker, node_client_factory, "alice", "alice-token")
    bob = open_client(broker, node_client_factory, "bob", "bob-token")

    mark = broker.mark()
    third = node_client_factory("third")
    third.connect(broker.socket_url(), {"token": "alice-token"}, **NO_RETRY)
    assert "503" in third.expect({"type": "error"})["message"]
    broker.wait_for_log(r"refused connect .*: 3 connections open \(limit 2\)", mark)

    still_fine(alice, bob)


def test_a_client_over_the_message_rate_gets_errors_then_is_closed_with_1008(
    broker_factory: Callable[..., BrokerProcess], node_client_factory: Callable[..., NodeClient]
) -> None:
    broker = broker_factory(
        config(
            message_rate=0.001, message_burst=3, rate_limit_close_after=5, max_connections_per_ip=0
        )
    )
    flooder = open_client(broker, node_client_factory, "flooder", "alice-token", **NO_RETRY)
    bob = open_client(broker, node_client_factory, "bob", "bob-token")

    mark = broker.mark()
    pushes = [flooder.push("room:lobby", "ping", {"n": n}) for n in range(12)]

    # The join took one token of the burst of 3; two pings pass, five get an error reply,
    # the sixth refused in a row closes the socket.
    replies = [flooder.expect({"type": "reply", "id": push}) for push in pushes[:7]]
    assert [r["status"] for r in replies] == ["ok"] * 2 + ["error"] * 5
    assert replies[2]["response"] == {"reason": "rate limited"}
    closed = flooder.expect({"type": "close"})
    assert (closed["code"], closed["reason"]) == (1008, "rate limited")
    broker.wait_for_log(r"rate limiting <websocket \d+ alice@", since=mark)
    broker.wait_for_log(r"closing <websocket \d+ alice@.*: 6 messages in a row over the", mark)
    assert sum("rate limiting" in line for line in broker.lines[mark:]) == 1

    still_fine(bob)


def test_a_long_polling_client_over_the_message_rate_is_limited_the_same_way(
    broker_factory: Callable[..., BrokerProcess], node_client_factory: Callable[..., NodeClient]
) -> None:
    broker = broker_factory(
        {
            **config(message_rate=0.001, message_burst=3, rate_limit_close_after=8),
            "longpoll": {"window_ms": 500},
        }
    )
    flooder = open_client(
        broker, node_client_factory, "flooder", "alice-token", transport="longpoll", **NO_RETRY
    )
    bob = open_client(broker, node_client_factory, "bob", "bob-token")

    mark = broker.mark()
    pushes = [flooder.push("room:lobby", "ping", {"n": n}) for n in range(5)]
    replies = [flooder.expect({"type": "reply", "id": push}) for push in pushes]
    assert [r["status"] for r in replies] == ["ok"] * 2 + ["error"] * 3
    assert replies[2]["response"] == {"reason": "rate limited"}

    for n in range(10):
        flooder.push("room:lobby", "ping", {"n": n})
    flooder.expect({"type": "close"})  # the session ended: its next poll says so
    broker.wait_for_log(r"closing <longpoll \d+ alice@.*: 9 messages in a row over the", mark)

    still_fine(bob)
