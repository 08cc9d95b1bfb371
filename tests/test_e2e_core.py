"""End to end: the real phoenix.js client against a real `phxbroker serve`.

Every test asserts on what phoenix.js itself reports (replies, messages seen by
`socket.onMessage`, socket open/close/error).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from support.broker import BrokerProcess
from support.node_client import NodeClient

CHAT_CONFIG = {
    "server": {"socket_paths": ["/socket"]},
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
        },
        {"pattern": "users:{user}", "join": "self"},
    ],
}

STATUS_CONFIG = {
    "server": {"socket_paths": ["/socket"]},
    "auth": {
        "token_param": "pass",
        "user_param": "user",
        "tokens": [{"user": "*", "token": "status-secret"}],
    },
    "topics": [
        {
            "pattern": "all",
            "join": "authenticated",
            "count": ["hit"],
            "presence": True,
            "history": 20,
            "status_event": "status_users",
        }
    ],
}

# phoenix.js retries refused sockets and joins for ever; these tests want the first answer.
NO_RETRY = {"reconnectAfterMs": [60_000], "rejoinAfterMs": [60_000]}
REFUSAL_LOGGED = r"(?i)refus|reject|denied|forbidden|unauthori[sz]ed|\b403\b"
OK_EMPTY = {"status": "ok", "response": {}}

Connect = Callable[..., NodeClient]


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_factory(CHAT_CONFIG)


@pytest.fixture
def connect(broker: BrokerProcess, node_client_factory: Callable[..., NodeClient]) -> Connect:
    """Open a phoenix.js socket to `broker` with a token; returns the client once open."""

    def open_socket(token: str = "alice-token", name: str | None = None, **opts: Any) -> NodeClient:
        client = node_client_factory(name)
        client.connect(broker.socket_url(), {"token": token}, **opts)
        client.expect_open()
        return client

    return open_socket


def expect_refused(client: NodeClient) -> None:
    """The socket errored and closed with 1006 without ever opening, as a browser sees a 403."""
    error = client.expect({"type": "error"})
    assert "403" in error["message"], error
    closed = client.expect({"type": "close"})
    assert closed["code"] == 1006, closed
    assert client.seen({"type": "open"}) == []


def test_driver_runs_phoenix_1_8(node_client_factory: Callable[..., NodeClient]) -> None:
    client = node_client_factory()
    assert client.phoenix_version.startswith("1.8."), client.phoenix_version


@pytest.mark.parametrize("vsn", ["2.0.0", "1.0.0"])
def test_join_and_push_round_trip(connect: Connect, vsn: str) -> None:
    alice = connect(vsn=vsn)

    joined = alice.join("room:lobby")
    assert (joined["status"], joined["response"]) == ("ok", {"joined": "lobby"})

    payload = {"n": 1, "text": "héllo", "list": [1, None, True]}
    reply = alice.call("room:lobby", "ping", payload)
    assert (reply["status"], reply["response"]) == ("ok", payload)


@pytest.mark.parametrize(
    ("transport", "opened_as"), [("websocket", "WebSocket"), ("longpoll", "LongPoll")]
)
def test_an_endpoint_written_with_a_trailing_slash_connects_and_joins(
    broker: BrokerProcess,
    node_client_factory: Callable[..., NodeClient],
    transport: str,
    opened_as: str,
) -> None:
    # phoenix.js appends "/websocket" (or "/longpoll") to the endpoint as written, so
    # new Socket("/socket/") asks for /socket//websocket; Plug ignores the empty segment.
    alice = node_client_factory()
    alice.connect(broker.socket_url("/socket/"), {"token": "alice-token"}, transport=transport)

    assert alice.expect_open()["transport"] == opened_as
    joined = alice.join("room:lobby")
    assert (joined["status"], joined["response"]) == ("ok", {"joined": "lobby"})
    reply = alice.call("room:lobby", "ping", {"a": 1})
    assert (reply["status"], reply["response"]) == ("ok", {"a": 1})


@pytest.mark.parametrize("params", [{"token": "wrong-token"}, {}], ids=["bad-token", "no-token"])
def test_connect_without_a_valid_token_is_refused(
    broker: BrokerProcess, node_client_factory: Callable[..., NodeClient], params: dict[str, str]
) -> None:
    client = node_client_factory()
    mark = broker.mark()

    client.connect(broker.socket_url(), params, **NO_RETRY)

    expect_refused(client)
    broker.wait_for_log(REFUSAL_LOGGED, since=mark)


def test_heartbeats_are_answered_and_the_socket_stays_open(connect: Connect) -> None:
    # phoenix.js closes the socket if a reply takes longer than the interval: keep it roomy.
    alice = connect(heartbeatIntervalMs=1000)

    for _ in range(2):
        reply = alice.expect({"type": "message", "topic": "phoenix", "event": "phx_reply"})
        assert reply["payload"] == OK_EMPTY
        assert reply["join_ref"] is None

    assert alice.command({"cmd": "state"})["connection"] == "open"
    assert alice.seen({"type": "close"}) == []


def test_join_reply_carries_the_configured_response(connect: Connect) -> None:
    alice = connect()

    joined = alice.join("room:kitchen:sink")

    assert (joined["status"], joined["response"]) == ("ok", {"joined": "kitchen:sink"})
    raw = alice.expect_reply_to(joined["ref"])
    assert raw["join_ref"] == joined["ref"]
    assert raw["topic"] == "room:kitchen:sink"


def test_user_topic_admits_only_its_own_user(connect: Connect) -> None:
    alice = connect(**NO_RETRY)

    refused = alice.join("users:bob")
    assert (refused["status"], refused["response"]) == ("error", {"reason": "unauthorized"})

    joined = alice.join("users:alice")
    assert (joined["status"], joined["response"]) == ("ok", {})


def test_join_of_an_unmatched_topic_is_refused(connect: Connect) -> None:
    alice = connect(**NO_RETRY)

    refused = alice.join("nope:1")

    assert (refused["status"], refused["response"]) == ("error", {"reason": "unmatched topic"})
    raw = alice.expect_reply_to(refused["ref"])
    assert raw["join_ref"] is None
    assert alice.command({"cmd": "state"})["connection"] == "open"


def test_echo_event_replies_with_its_payload(connect: Connect) -> None:
    alice = connect()
    joined = alice.join("room:lobby")

    payload = {"a": 1, "nested": {"b": [1, 2, {"c": "d"}]}, "s": "x" * 1000}
    reply = alice.call("room:lobby", "ping", payload)

    assert (reply["status"], reply["response"]) == ("ok", payload)
    raw = alice.expect_reply_to(reply["ref"])
    assert raw["join_ref"] == joined["ref"]


def test_relayed_event_reaches_every_subscriber_stamped_with_the_sender(connect: Connect) -> None:
    alice = connect(name="alice")
    bob = connect("bob-token", name="bob")
    for client in (alice, bob):
        assert client.join("room:lobby")["status"] == "ok"
        client.on("room:lobby", "new_msg")

    alice.push("room:lobby", "new_msg", {"body": "hi"})

    for client in (alice, bob):
        got = client.expect({"type": "channel_event", "event": "new_msg"})
        assert got["payload"] == {"body": "hi", "user": "alice"}, client.name


def test_binary_push_to_an_echo_event_gets_a_binary_reply(connect: Connect) -> None:
    alice = connect()
    assert alice.join("room:lobby")["status"] == "ok"

    data = bytes(range(256))
    reply = alice.call("room:lobby", "ping", data)

    assert reply["status"] == "ok"
    assert reply["response"] == data


def test_binary_relay_reaches_the_other_client_as_binary(connect: Connect) -> None:
    alice = connect(name="alice")
    bob = connect("bob-token", name="bob")
    for client in (alice, bob):
        assert client.join("room:lobby")["status"] == "ok"
        client.on("room:lobby", "new_msg")

    data = b"\x00\xffbinary\x01"
    alice.push("room:lobby", "new_msg", data)

    got = bob.expect({"type": "channel_event", "event": "new_msg"})
    assert got["payload"] == data


def test_leave_is_acknowledged_and_the_topic_is_then_unmatched(connect: Connect) -> None:
    alice = connect()
    joined = alice.join("room:lobby")
    assert joined["status"] == "ok"

    left = alice.leave("room:lobby")
    assert left["status"] == "ok"  # phoenix.js resolves this locally; the server's reply:
    assert alice.expect_reply_to(left["ref"])["payload"] == OK_EMPTY
    closed = alice.expect({"type": "message", "event": "phx_close", "topic": "room:lobby"})
    assert closed["join_ref"] == joined["ref"]

    ref = alice.raw_push("room:lobby", "ping", {"a": 1}, join_ref=joined["ref"])
    after = alice.expect_reply_to(ref)
    assert after["payload"] == {"status": "error", "response": {"reason": "unmatched topic"}}


def test_status_app_connects_with_user_and_pass_and_joins_all(
    broker_factory: Callable[..., BrokerProcess], node_client_factory: Callable[..., NodeClient]
) -> None:
    broker = broker_factory(STATUS_CONFIG)
    carol = node_client_factory("carol")

    carol.connect(broker.socket_url(), {"user": "carol", "pass": "status-secret"})
    carol.expect_open()

    joined = carol.join("all")
    assert (joined["status"], joined["topic"]) == ("ok", "all"), joined


def test_status_app_knows_the_user_by_the_user_param(
    broker_factory: Callable[..., BrokerProcess], node_client_factory: Callable[..., NodeClient]
) -> None:
    broker = broker_factory(STATUS_CONFIG)
    carol = node_client_factory("carol")
    carol.connect(broker.socket_url(), {"user": "carol", "pass": "status-secret"})
    carol.expect_open()

    assert carol.join("all")["status"] == "ok"

    # Presence is keyed by user, so "carol" can only come from the `user` param.
    synced = carol.expect(lambda event: event["type"] == "presence" and event["state"])
    assert list(synced["state"]) == ["carol"]


def test_status_app_refuses_a_wrong_pass(
    broker_factory: Callable[..., BrokerProcess], node_client_factory: Callable[..., NodeClient]
) -> None:
    broker = broker_factory(STATUS_CONFIG)
    mallory = node_client_factory("mallory")
    mark = broker.mark()

    mallory.connect(broker.socket_url(), {"user": "mallory", "pass": "guess"}, **NO_RETRY)

    expect_refused(mallory)
    broker.wait_for_log(REFUSAL_LOGGED, since=mark)
