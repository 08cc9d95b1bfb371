"""End to end with phoenix.js: presence, the status app, and what an operator does to a
running daemon (kick, ban, token rotation), each seen from the client's side."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.broker import BrokerProcess
from support.cli import add_token, cli
from support.node_client import NodeClient

BrokerFactory = Callable[..., BrokerProcess]
NodeFactory = Callable[..., NodeClient]

TOKENS = [
    {"user": "alice", "token": "alice-token"},
    {"user": "bob", "token": "bob-token"},
    {"user": "carol", "token": "carol-token"},
]
ROOM = {"pattern": "room:*", "echo": ["ping"], "presence": True}
CHAT = {"auth": {"tokens": TOKENS}, "topics": [ROOM]}
# Reconnect quickly (phoenix.js's own first steps are 10 ms, 50 ms...), but not in a storm.
FAST_RECONNECT = {"reconnectAfterMs": [100, 200, 400]}
REFUSED_LOG = r"INFO phxbroker.http: refused connect from .*: "


def connect(
    factory: NodeFactory, broker: BrokerProcess, params: dict[str, Any], name: str, **opts: Any
) -> NodeClient:
    client = factory(name)
    client.connect(broker.socket_url(), params, **opts)
    client.expect_open()
    return client


def presence_is(client: NodeClient, topic: str, users: set[str], timeout: float = 5) -> dict:
    """Wait for a Presence.onSync whose state lists exactly `users`; returns the state."""
    event = client.expect(
        lambda e: e["type"] == "presence" and e["topic"] == topic and set(e["state"]) == users,
        timeout=timeout,
    )
    return event["state"]


def expect_refused_reconnect(client: NodeClient) -> None:
    """phoenix.js tries again and is refused at the handshake, as a browser sees a 403."""
    error = client.expect({"type": "error"})
    assert "403" in error["message"], error
    assert client.expect({"type": "close"})["code"] == 1006


def still_connected(client: NodeClient, topic: str) -> None:
    assert client.call(topic, "ping", {"still": "here"})["status"] == "ok"
    assert client.command({"cmd": "state"})["connection"] == "open"


# -- presence ------------------------------------------------------------------------------


def test_presence_syncs_two_then_three_clients_and_drops_a_killed_one(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory
) -> None:
    broker = broker_factory(CHAT)
    alice = connect(node_client_factory, broker, {"token": "alice-token"}, "alice")
    assert alice.join("room:lobby")["status"] == "ok"
    presence_is(alice, "room:lobby", {"alice"})

    bob = connect(node_client_factory, broker, {"token": "bob-token"}, "bob")
    assert bob.join("room:lobby")["status"] == "ok"
    for client in (alice, bob):
        presence_is(client, "room:lobby", {"alice", "bob"})

    carol = connect(node_client_factory, broker, {"token": "carol-token"}, "carol")
    assert carol.join("room:lobby")["status"] == "ok"
    for client in (alice, bob, carol):
        state = presence_is(client, "room:lobby", {"alice", "bob", "carol"})
        assert all(len(entry["metas"]) == 1 for entry in state.values()), state

    # No leave, no close frame: the Node process dies and only its TCP connection ends.
    carol.kill()
    for client in (alice, bob):
        state = presence_is(client, "room:lobby", {"alice", "bob"})
        assert "carol" not in state

    bob.kill()
    presence_is(alice, "room:lobby", {"alice"})


# -- the status app ------------------------------------------------------------------------

STATUS_APP = {
    "auth": {
        "token_param": "pass",
        "user_param": "user",
        "tokens": [{"user": "*", "token": "status-secret"}],
    },
    "topics": [
        {
            "pattern": "all",
            "count": ["hit"],
            "relay": ["msg"],
            "history": 20,
            "status_event": "status_users",
        }
    ],
}


def test_status_app_counts_hits_keeps_messages_and_lists_a_user_once(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory
) -> None:
    broker = broker_factory(STATUS_APP)
    clients = []
    for name, user in (("carol-1", "carol"), ("carol-2", "carol"), ("dave", "dave")):
        client = connect(node_client_factory, broker, {"user": user, "pass": "status-secret"}, name)
        assert client.join("all")["status"] == "ok"
        clients.append(client)
    carol1, _carol2, dave = clients

    carol1.push("all", "hit", {})
    carol1.push("all", "hit", {})
    dave.push("all", "msg", {"text": "hello"})

    expected = {
        "users": ["carol", "dave"],  # carol has two sockets and is listed once
        "user_count": 2,
        "hits": 2,
        "msgs": [{"text": "hello"}],
    }
    for client in clients:
        event = client.expect(
            lambda e: (
                e["type"] == "message"
                and e["event"] == "status_users"
                and e["payload"]["hits"] == 2
                and e["payload"]["msgs"]
            )
        )
        assert event["payload"] == expected, client.name

    # A late joiner is pushed the current map at once (socket.onMessage sees every frame).
    erin = connect(node_client_factory, broker, {"user": "erin", "pass": "status-secret"}, "erin")
    assert erin.join("all")["status"] == "ok"
    first = erin.expect({"type": "message", "event": "status_users"})
    assert (first["payload"]["hits"], first["payload"]["msgs"]) == (2, [{"text": "hello"}])


# -- kick and ban --------------------------------------------------------------------------


def test_kick_closes_every_socket_of_the_user_with_1001_and_they_come_back(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory
) -> None:
    broker = broker_factory(CHAT)
    alice1 = connect(node_client_factory, broker, {"token": "alice-token"}, "alice-1")
    alice2 = connect(node_client_factory, broker, {"token": "alice-token"}, "alice-2")
    bob = connect(node_client_factory, broker, {"token": "bob-token"}, "bob")
    for client in (alice1, alice2, bob):
        assert client.join("room:lobby")["status"] == "ok"

    result = cli("kick", "alice", "--reason", "spam", "--config", broker.config_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "kicked alice (2 connections closed)\n"
    for client in (alice1, alice2):
        closed = client.expect({"type": "close"})
        assert (closed["code"], closed["reason"]) == (1001, "spam")
        # Without a ban phoenix.js reconnects at once and is let in again.
        client.expect({"type": "open"})
    # Both of alice's sockets rejoined: two metas under one key.
    state = presence_is(bob, "room:lobby", {"alice", "bob"})
    while len(state["alice"]["metas"]) != 2:
        state = presence_is(bob, "room:lobby", {"alice", "bob"})
    still_connected(bob, "room:lobby")
    assert bob.seen({"type": "close"}) == []


def test_kick_from_one_topic_closes_only_that_channel(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory
) -> None:
    broker = broker_factory(CHAT)
    alice = connect(node_client_factory, broker, {"token": "alice-token"}, "alice")
    bob = connect(node_client_factory, broker, {"token": "bob-token"}, "bob")
    for topic in ("room:lobby", "room:side"):
        assert alice.join(topic)["status"] == "ok"
    assert bob.join("room:lobby")["status"] == "ok"
    presence_is(bob, "room:lobby", {"alice", "bob"})

    result = cli("kick", "alice", "--topic", "room:lobby", "--config", broker.config_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "removed alice from room:lobby (1 channel)\n"
    alice.expect({"type": "channel_close", "topic": "room:lobby"})
    presence_is(bob, "room:lobby", {"bob"})
    still_connected(alice, "room:side")
    channels = {c["topic"]: c["state"] for c in alice.command({"cmd": "state"})["channels"]}
    assert channels == {"room:lobby": "closed", "room:side": "joined"}
    assert alice.seen({"type": "close"}) == []


def test_a_ban_refuses_the_reconnect_until_it_is_lifted(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory
) -> None:
    broker = broker_factory(CHAT)
    alice = connect(
        node_client_factory, broker, {"token": "alice-token"}, "alice", **FAST_RECONNECT
    )
    bob = connect(node_client_factory, broker, {"token": "bob-token"}, "bob")
    for client in (alice, bob):
        assert client.join("room:lobby")["status"] == "ok"
    mark = broker.mark()

    result = cli("kick", "alice", "--ban", "10m", "--config", broker.config_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "kicked alice (1 connection closed), connects refused for 10m 00s\n"
    assert alice.expect({"type": "close"})["code"] == 1001
    expect_refused_reconnect(alice)
    expect_refused_reconnect(alice)  # and again: the ban holds
    broker.wait_for_log(REFUSED_LOG + r"user 'alice' is banned for \d+ s more", since=mark)
    presence_is(bob, "room:lobby", {"bob"})
    still_connected(bob, "room:lobby")

    users = cli("users", "--config", broker.config_path).stdout
    assert "banned: alice for 9m" in users
    stats = cli("stats", "--once", "--json", "--interval", "0.1", "--config", broker.config_path)
    counters = json.loads(stats.stdout)["counters"]
    assert counters["refusals"]["banned"] >= 2
    assert counters["auth_failures"] == 0  # a ban is a refusal, not a failed login

    assert cli("unban", "alice", "--config", broker.config_path).stdout == (
        "lifted the ban on alice\n"
    )
    alice.expect({"type": "open"})
    presence_is(bob, "room:lobby", {"alice", "bob"})


# -- token rotation ------------------------------------------------------------------------


@pytest.fixture
def tokens_setup(tmp_path: Path) -> tuple[Path, Path]:
    """A tokens file (made with the CLI) and a config naming it, before any daemon runs."""
    tokens_path = tmp_path / "tokens.toml"
    prepare = tmp_path / "prepare.toml"
    prepare.write_text(f'[auth]\ntokens_file = "{tokens_path}"\nuser_param = "user"\n')
    return prepare, tokens_path


def test_tokens_added_and_revoked_take_effect_on_reload_without_dropping_others(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory, tokens_setup
) -> None:
    prepare, tokens_path = tokens_setup
    alice_token = add_token(prepare, "alice")
    bob_token = add_token(prepare, "bob")
    broker = broker_factory({"auth": {"tokens_file": str(tokens_path)}, "topics": [ROOM]})
    config = broker.config_path

    alice = connect(node_client_factory, broker, {"token": alice_token}, "alice", **FAST_RECONNECT)
    bob = connect(node_client_factory, broker, {"token": bob_token}, "bob")
    for client in (alice, bob):
        assert client.join("room:lobby")["status"] == "ok"

    # A new token works only once the daemon reloads.
    carol_token = add_token(config, "carol")
    carol = node_client_factory("carol")
    carol.connect(broker.socket_url(), {"token": carol_token}, **FAST_RECONNECT)
    expect_refused_reconnect(carol)
    assert cli("reload", "--config", config).returncode == 0
    carol.expect({"type": "open"})
    assert carol.join("room:lobby")["status"] == "ok"

    # A revoked token: its socket is closed and its reconnects refused; the others stay.
    closes_before = {c.name: len(c.seen({"type": "close"})) for c in (bob, carol)}
    mark = broker.mark()
    assert cli("token", "revoke", "alice", "--config", config).returncode == 0
    assert cli("reload", "--config", config).returncode == 0
    closed = alice.expect({"type": "close"})
    assert (closed["code"], closed["reason"]) == (1001, "credential revoked")
    expect_refused_reconnect(alice)
    broker.wait_for_log(REFUSED_LOG + "token not recognised", since=mark)
    for client in (bob, carol):
        still_connected(client, "room:lobby")
        assert len(client.seen({"type": "close"})) == closes_before[client.name]
        presence_is(client, "room:lobby", {"bob", "carol"})

    # SIGHUP does the same as `phxbroker reload`.
    assert cli("token", "revoke", "bob", "--config", config).returncode == 0
    broker.send_signal(signal.SIGHUP)
    assert bob.expect({"type": "close"})["code"] == 1001
    still_connected(carol, "room:lobby")


def test_revoking_a_shared_secret_closes_every_user_it_admitted(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory, tokens_setup
) -> None:
    prepare, tokens_path = tokens_setup
    shared = add_token(prepare, "*")
    own = add_token(prepare, "frank")
    broker = broker_factory(
        {
            "auth": {"tokens_file": str(tokens_path), "token_param": "pass", "user_param": "user"},
            "topics": [ROOM],
        }
    )
    dave = connect(node_client_factory, broker, {"user": "dave", "pass": shared}, "dave")
    erin = connect(node_client_factory, broker, {"user": "erin", "pass": shared}, "erin")
    frank = connect(node_client_factory, broker, {"user": "frank", "pass": own}, "frank")

    assert cli("token", "revoke", "*", "--config", broker.config_path).returncode == 0
    assert cli("reload", "--config", broker.config_path).returncode == 0

    for client in (dave, erin):
        assert client.expect({"type": "close"})["code"] == 1001
    assert frank.join("room:lobby")["status"] == "ok"
    assert frank.seen({"type": "close"}) == []


# -- from nothing to a running daemon ------------------------------------------------------


def test_a_daemon_started_from_init_accepts_the_secrets_it_printed(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory, tmp_path: Path
) -> None:
    target = tmp_path / "etc"
    result = cli("init", target, "--user", "alice")
    assert result.returncode == 0, result.stderr
    secrets = dict(line.rsplit(": ", 1) for line in result.stdout.splitlines())
    config = (target / "phxbroker.toml").read_text()
    # Run it where a test may: an ephemeral port, files by absolute path, a private socket.
    config = config.replace('listen = "127.0.0.1:4000"', 'listen = "127.0.0.1:0"')
    config = config.replace('tokens_file = "tokens.toml"', f'tokens_file = "{target}/tokens.toml"')
    broker = broker_factory(config + '\n[admin]\nsocket = "admin.sock"\n')

    alice = connect(node_client_factory, broker, {"token": secrets["token alice"]}, "alice")
    assert alice.join("room:lobby")["status"] == "ok"
    alice.on("room:lobby", "news")
    response = httpx.post(
        f"{broker.url}/api/broadcast",
        json={"topic": "room:lobby", "event": "news", "payload": {"n": 1}},
        headers={"authorization": f"Bearer {secrets['api key backend']}"},
    )
    assert response.json() == {"ok": True, "subscribers": 1}
    assert alice.expect({"type": "channel_event", "event": "news"})["payload"] == {"n": 1}

    # Rotate the API key without a restart: the new one works and the old one is refused.
    new_key = add_token(broker.config_path, "backend-2", "--api")
    assert (
        cli("token", "revoke", "backend", "--api", "--config", broker.config_path).returncode == 0
    )
    assert cli("reload", "--config", broker.config_path).returncode == 0
    for key, status in ((new_key, 200), (secrets["api key backend"], 401)):
        stats = httpx.get(f"{broker.url}/api/stats", headers={"authorization": f"Bearer {key}"})
        assert stats.status_code == status, stats.text
    assert stats.json()["error"] == "the API key is not recognised"
    assert alice.command({"cmd": "state"})["connection"] == "open"
    assert alice.seen({"type": "close"}) == []
