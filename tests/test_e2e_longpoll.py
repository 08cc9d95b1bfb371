"""End to end: phoenix.js's own LongPoll transport against a real `phxbroker serve`.

A long-polling client is a full citizen: it joins, gets replies and presence, relays to
and from websocket clients, and is closed (and comes back) when its credential is
revoked. Behind a proxy that sabotages websocket upgrades, phoenix.js's
`longPollFallbackMs` ends up on LongPoll without any help.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import pytest
import tomli_w
from support.broker import BrokerProcess
from support.hostile_proxy import HostileProxy
from support.node_client import NodeClient

WINDOW_MS = 500  # polls are held half a second, so expiry (1.5 windows) is quick too

CONFIG: dict[str, Any] = {
    "server": {"socket_paths": ["/socket"]},
    "longpoll": {"window_ms": WINDOW_MS},
    "auth": {
        "token_param": "token",
        "tokens": [
            {"user": "alice", "token": "alice-token"},
            {"user": "bob", "token": "bob-token"},
        ],
    },
    "topics": [
        {
            "pattern": "room:*",
            "join": "authenticated",
            "relay": ["new_msg"],
            "echo": ["ping"],
            "join_reply": {"joined": "{suffix}"},
            "relay_user_key": "user",
            "presence": True,
            "coalesce_ms": 0,
        }
    ],
}

# Quick reconnects, so a test waits for the broker rather than for phoenix.js's backoff.
FAST_RETRY = {"reconnectAfterMs": [50], "rejoinAfterMs": [100]}

Factory = Callable[..., Any]


def open_client(factory: Factory, endpoint: str, token: str, name: str, **opts: Any) -> NodeClient:
    client = factory(name)
    client.connect(endpoint, {"token": token}, **opts)
    return client


def presence_names(event: dict[str, Any]) -> set[str]:
    return set(event["state"])


def test_a_longpoll_client_joins_pushes_relays_and_leaves(
    broker_factory: Factory, node_client_factory: Factory
) -> None:
    broker: BrokerProcess = broker_factory(CONFIG)
    alice = open_client(
        node_client_factory, broker.socket_url(), "alice-token", "alice", transport="longpoll"
    )
    assert alice.expect_open()["transport"] == "LongPoll"
    bob = open_client(node_client_factory, broker.socket_url(), "bob-token", "bob")
    assert bob.expect_open()["transport"] == "WebSocket"

    joined = alice.join("room:lobby")
    assert joined["status"] == "ok" and joined["response"] == {"joined": "lobby"}
    assert bob.join("room:lobby")["status"] == "ok"
    # Presence travels both ways: each sees the other.
    alice.expect(lambda e: e["type"] == "presence" and presence_names(e) == {"alice", "bob"})
    bob.expect(lambda e: e["type"] == "presence" and presence_names(e) == {"alice", "bob"})

    reply = alice.call("room:lobby", "ping", {"n": 1})
    assert (reply["status"], reply["response"]) == ("ok", {"n": 1})

    alice.on("room:lobby", "new_msg")
    bob.on("room:lobby", "new_msg")
    bob.push("room:lobby", "new_msg", {"body": "from the websocket"})
    got = alice.expect({"type": "channel_event", "event": "new_msg"})
    assert got["payload"] == {"body": "from the websocket", "user": "bob"}
    alice.push("room:lobby", "new_msg", {"body": "from the long poll"})
    got = bob.expect({"type": "channel_event", "event": "new_msg", "payload": {"user": "alice"}})
    assert got["payload"] == {"body": "from the long poll", "user": "alice"}

    # Pushes made in one tick travel in one ndjson POST; all are answered, in order.
    refs = [alice.push("room:lobby", "ping", {"n": n}) for n in range(2, 7)]
    answers = [alice.expect({"type": "reply", "id": ref}) for ref in refs]
    assert [a["response"] for a in answers] == [{"n": n} for n in range(2, 7)]

    alice.leave("room:lobby")
    bob.expect(lambda e: e["type"] == "presence" and presence_names(e) == {"bob"})
    alice.expect({"type": "message", "event": "phx_close", "topic": "room:lobby"})


def test_a_silent_longpoll_client_expires_and_leaves_presence(
    broker_factory: Factory, node_client_factory: Factory
) -> None:
    """phoenix.js in Node never says it is leaving: the session ends once polls stop."""
    broker: BrokerProcess = broker_factory(CONFIG)
    bob = open_client(node_client_factory, broker.socket_url(), "bob-token", "bob")
    bob.expect_open()
    assert bob.join("room:lobby")["status"] == "ok"
    alice = open_client(
        node_client_factory, broker.socket_url(), "alice-token", "alice", transport="longpoll"
    )
    alice.expect_open()
    assert alice.join("room:lobby")["status"] == "ok"
    bob.expect(lambda e: e["type"] == "presence" and presence_names(e) == {"alice", "bob"})

    alice.close()  # the Node process exits; its poll is simply abandoned
    bob.expect(lambda e: e["type"] == "presence" and presence_names(e) == {"bob"}, timeout=5)
    broker.wait_for_log(r"ending <longpoll \d+ alice@.*>: no poll for 0\.75 s")


def test_revoking_a_longpoll_clients_token_closes_its_session_and_it_comes_back(
    broker_factory: Factory, node_client_factory: Factory
) -> None:
    """A session closed by the server is "gone" (410) on its next poll: phoenix.js 1.8.3+
    closes with 3410 and reconnects, here refused (1008) until the token is restored."""
    broker: BrokerProcess = broker_factory(CONFIG)
    alice = open_client(
        node_client_factory,
        broker.socket_url(),
        "alice-token",
        "alice",
        transport="longpoll",
        **FAST_RETRY,
    )
    alice.expect_open()
    assert alice.join("room:lobby")["status"] == "ok"

    revoked = {**CONFIG, "auth": {**CONFIG["auth"], "tokens": CONFIG["auth"]["tokens"][1:]}}
    rewrite_config(broker, revoked)
    mark = broker.mark()
    broker.send_signal(signal.SIGHUP)
    broker.wait_for_log(r"closing <longpoll \d+ alice@", since=mark)
    alice.expect({"type": "close", "code": 3410, "reason": "session_gone"})
    alice.expect({"type": "close", "code": 1008})  # the reconnect is refused (403)

    rewrite_config(broker, CONFIG)
    broker.send_signal(signal.SIGHUP)
    alice.expect_open(timeout=10)
    rejoined = alice.expect({"type": "message", "event": "phx_reply", "topic": "room:lobby"})
    assert rejoined["payload"] == {"status": "ok", "response": {"joined": "lobby"}}


def rewrite_config(broker: BrokerProcess, config: dict[str, Any]) -> None:
    data = {**config, "server": {**config["server"], "listen": f"127.0.0.1:{broker.port}"}}
    broker.config_path.write_text(tomli_w.dumps(data))


@pytest.mark.parametrize("mode", ["refuse", "reset", "silent"])
def test_behind_a_websocket_hostile_proxy_phoenix_js_falls_back_to_longpoll(
    mode: str, broker_factory: Factory, node_client_factory: Factory
) -> None:
    broker: BrokerProcess = broker_factory(CONFIG)
    with HostileProxy(("127.0.0.1", broker.port), mode) as proxy:
        alice = open_client(
            node_client_factory, proxy.endpoint(), "alice-token", "alice", longPollFallbackMs=500
        )
        # In "silent" mode the websocket opens first, then fails phoenix.js's health check.
        alice.expect({"type": "open", "transport": "LongPoll"}, timeout=10)
        assert proxy.upgrades_sabotaged >= 1
        assert alice.join("room:lobby")["status"] == "ok"
        assert alice.call("room:lobby", "ping", {"via": mode})["response"] == {"via": mode}

        # A websocket client that reaches the broker directly talks with it as usual.
        bob = open_client(node_client_factory, broker.socket_url(), "bob-token", "bob")
        bob.expect_open()
        assert bob.join("room:lobby")["status"] == "ok"
        alice.on("room:lobby", "new_msg")
        bob.push("room:lobby", "new_msg", {"body": "through the proxy"})
        got = alice.expect({"type": "channel_event", "event": "new_msg"})
        assert got["payload"]["body"] == "through the proxy"
        assert proxy.connections_forwarded >= 1  # alice only knows the proxy: it went through
