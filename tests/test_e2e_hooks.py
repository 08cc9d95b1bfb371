"""The app's own channel logic through hooks, end to end: phoenix.js clients, a real
`phxbroker serve`, and a real back end answering over signed HTTP (a controllable one in
a thread here; the example board app in test_e2e_board.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from support.broker import BrokerProcess
from support.cli import cli
from support.hook_backend import SECRET, HookBackend
from support.node_client import NodeClient

Start = Callable[..., BrokerProcess]
Client = Callable[..., NodeClient]
EVENTS = ["count", "echo", "slow", "noreply", "bcast*", "elsewhere", "stop_*", "bye", "bad"]


@pytest.fixture
def backend() -> Iterator[HookBackend]:
    server = HookBackend()
    yield server
    server.close()


def hooks_config(backend: HookBackend, **hooks: Any) -> dict[str, Any]:
    return {
        "hooks": {
            "url": backend.url,
            "secret_env": "TEST_HOOK_SECRET",
            "timeout_ms": 2000,
            "vacated_delay_ms": 200,
            **hooks,
        },
        "auth": {"hook": True, "token_param": "token"},
        "topics": [
            {"pattern": "hooked:*", "join": "hook", "hook_events": EVENTS, "presence": True},
            {"pattern": "plain:*", "join": "anyone", "relay": ["msg"]},
        ],
    }


def start(broker_factory: Start, backend: HookBackend, **hooks: Any) -> BrokerProcess:
    env = {"TEST_HOOK_SECRET": hooks.pop("secret", SECRET)}
    return broker_factory(hooks_config(backend, **hooks), env=env)


def connected(node_client_factory: Client, broker: BrokerProcess, user: str) -> NodeClient:
    client = node_client_factory(user)
    client.connect(broker.socket_url(), {"user": user}, rejoinAfterMs=[100, 200, 400])
    client.expect_open()
    return client


def test_connect_join_and_events_are_answered_by_the_back_end_with_assigns(
    broker_factory: Start, node_client_factory: Client, backend: HookBackend
) -> None:
    broker = start(broker_factory, backend)
    alice = connected(node_client_factory, broker, "alice")
    joined = alice.join("hooked:a")
    assert joined["status"] == "ok"
    assert joined["response"] == {"joined": "hooked:a", "socket_assigns": {"plan": "gold"}}
    welcome = alice.expect({"type": "message", "event": "welcome"})
    assert welcome["payload"] == {"to": "alice"} and welcome["join_ref"] == joined["ref"]
    # The channel's assigns go out with every call and come back changed.
    assert [alice.call("hooked:a", "count")["response"]["n"] for _ in range(3)] == [0, 1, 2]
    connect = backend.calls_of("connect")[0]
    assert connect["params"]["user"] == "alice" and connect["transport"] == "websocket"
    event = backend.calls_of("event")[-1]
    assert event["assigns"] == {"n": 2} and event["socket"]["user"] == "alice"
    assert event["socket"]["assigns"] == {"plan": "gold"}
    # Presence carries the meta the join answer gave.
    synced = alice.expect(lambda e: e["type"] == "presence" and "alice" in e["state"])
    assert synced["state"]["alice"]["metas"][0]["role"] == "tester"


def test_a_refused_connect_and_a_refused_join_carry_the_back_ends_answer(
    broker_factory: Start, node_client_factory: Client, backend: HookBackend
) -> None:
    broker = start(broker_factory, backend)
    since = broker.mark()
    nobody = node_client_factory("nobody")
    nobody.connect(broker.socket_url(), {"user": "nobody"})
    assert nobody.expect({"type": "close"})["code"] == 1006  # a 403 the browser hides
    broker.wait_for_log(r"refused connect .*the app's back end refused the connect", since=since)
    alice = connected(node_client_factory, broker, "alice")
    refused = alice.join("hooked:a", {"refuse": "not a member"})
    assert refused["status"] == "error" and refused["response"] == {"reason": "not a member"}


def test_a_slow_event_on_one_channel_does_not_delay_another_channel_of_the_socket(
    broker_factory: Start, node_client_factory: Client, backend: HookBackend
) -> None:
    broker = start(broker_factory, backend)
    alice = connected(node_client_factory, broker, "alice")
    assert alice.join("hooked:a")["status"] == "ok"
    assert alice.join("hooked:b")["status"] == "ok"
    assert alice.join("plain:c")["status"] == "ok"
    alice.on("plain:c", "msg")
    slow = alice.push("hooked:a", "slow")
    backend.wait_for("the slow event", lambda: bool(backend.calls_of("event")))
    # Same socket, other channels: answered while the slow one waits.
    assert alice.call("hooked:b", "echo", {"x": 1})["response"] == {"x": 1}
    alice.push("plain:c", "msg", {"y": 2})
    assert alice.expect({"type": "channel_event", "event": "msg"})["payload"] == {"y": 2}
    assert not alice.seen({"type": "reply", "id": slow})
    backend.gate.set()
    assert alice.expect({"type": "reply", "id": slow})["response"] == {"slow": True}


def test_events_of_one_channel_reach_the_back_end_and_are_answered_in_order(
    broker_factory: Start, node_client_factory: Client, backend: HookBackend
) -> None:
    broker = start(broker_factory, backend)
    alice = connected(node_client_factory, broker, "alice")
    assert alice.join("hooked:a")["status"] == "ok"
    # A hooked event, then a message handled by the broker alone, then more hooked ones:
    # each waits for the one before, as in a Phoenix channel process.
    ids = [alice.push("hooked:a", "echo", {"n": n}) for n in range(5)]
    replies = [alice.expect({"type": "reply", "id": i}) for i in ids]
    assert [r["response"]["n"] for r in replies] == [0, 1, 2, 3, 4]
    sent = [c["payload"]["n"] for c in backend.calls_of("event")]
    assert sent == [0, 1, 2, 3, 4]
    refs = [int(r["ref"]) for r in replies]
    assert refs == sorted(refs)


def test_answers_push_broadcast_stop_and_disconnect_as_a_channel_would(
    broker_factory: Start, node_client_factory: Client, backend: HookBackend
) -> None:
    broker = start(broker_factory, backend)
    alice = connected(node_client_factory, broker, "alice")
    bob = connected(node_client_factory, broker, "bob")
    for client in (alice, bob):
        assert client.join("hooked:a")["status"] == "ok"
        client.on("hooked:a", "news")
    assert bob.join("plain:elsewhere")["status"] == "ok"
    bob.on("plain:elsewhere", "news")

    assert alice.call("hooked:a", "bcast", {"k": 1})["status"] == "ok"
    for client in (alice, bob):
        assert client.expect({"type": "channel_event", "event": "news"})["payload"] == {"k": 1}
    assert alice.call("hooked:a", "bcast_from", {"k": 2})["status"] == "ok"
    assert bob.expect({"type": "channel_event", "event": "news"})["payload"] == {"k": 2}
    assert alice.call("hooked:a", "elsewhere", {"topic": "plain:elsewhere"})["status"] == "ok"
    news = bob.expect({"type": "channel_event", "topic": "plain:elsewhere", "event": "news"})
    assert news["payload"] == {"topic": "plain:elsewhere"}
    assert not alice.seen({"type": "channel_event", "event": "news", "payload": {"k": 2}})

    # {:noreply, socket}: no reply, so phoenix.js's own push timeout fires.
    noreply = alice.command(
        {"cmd": "push", "topic": "hooked:a", "event": "noreply", "payload": {}, "timeout": 300}
    )
    assert alice.expect({"type": "reply", "id": noreply["id"]})["status"] == "timeout"
    assert alice.call("hooked:a", "stop_close")["status"] == "ok"
    alice.expect({"type": "channel_close", "topic": "hooked:a"})
    assert bob.call("hooked:a", "stop_error")["status"] == "ok"
    bob.expect({"type": "channel_error", "topic": "hooked:a"})
    assert bob.expect({"type": "join", "topic": "hooked:a", "status": "ok"})  # it rejoins
    bob.call("hooked:a", "bye")
    assert bob.expect({"type": "close"})["code"] == 1001


def test_a_broken_answer_or_a_wrong_secret_gives_the_client_an_error_not_silence(
    broker_factory: Start, node_client_factory: Client, backend: HookBackend
) -> None:
    broker = start(broker_factory, backend)
    alice = connected(node_client_factory, broker, "alice")
    assert alice.join("hooked:a")["status"] == "ok"
    bad = alice.call("hooked:a", "bad")
    assert (bad["status"], bad["response"]) == ("error", {"reason": "unavailable"})
    broker.wait_for_log(r"the event hook for 'hooked:a' failed: .*\"reply\"")

    wrong = start(broker_factory, backend, secret="not-the-back-ends-secret")
    refused = node_client_factory("refused")
    refused.connect(wrong.socket_url(), {"user": "carol"})
    assert refused.expect({"type": "close"})["code"] == 1006
    wrong.wait_for_log(r"the connect hook failed: the back end answered HTTP 401")


def test_a_back_end_that_goes_away_and_comes_back(
    broker_factory: Start, node_client_factory: Client, backend: HookBackend
) -> None:
    broker = start(broker_factory, backend)
    alice = connected(node_client_factory, broker, "alice")
    assert alice.join("hooked:a")["status"] == "ok"
    backend.down = True
    failed = alice.call("hooked:a", "echo", {})
    assert (failed["status"], failed["response"]) == ("error", {"reason": "unavailable"})
    join = alice.join("hooked:b")
    assert (join["status"], join["response"]) == ("error", {"reason": "unavailable"})
    late = node_client_factory("late")
    late.connect(broker.socket_url(), {"user": "late"})
    assert late.expect({"type": "close"})["code"] == 1006  # 503 to the upgrade
    backend.down = False
    # phoenix.js retries the refused join on its rejoin timer, and connects again.
    assert alice.expect({"type": "join", "topic": "hooked:b", "status": "ok"}, timeout=10)
    late.expect_open(timeout=10)


def test_lifecycle_events_arrive_in_batches_and_are_retried_after_an_outage(
    broker_factory: Start, node_client_factory: Client, backend: HookBackend
) -> None:
    broker = start(broker_factory, backend)
    backend.events_down = True
    alice = connected(node_client_factory, broker, "alice")
    assert alice.join("hooked:a")["status"] == "ok"
    alice.leave("hooked:a")
    broker.wait_for_log(r"lifecycle events not delivered")
    backend.events_down = False
    kinds = ["occupied", "join", "leave", "vacated"]

    def arrived() -> bool:
        return [e["type"] for e in backend.events if e["topic"] == "hooked:a"] == kinds

    backend.wait_for("join, leave, occupied and vacated", arrived)
    join = next(e for e in backend.events if e["type"] == "join")
    assert join["user"] == "alice" and join["socket"] and join["at"] > 0
    alice.disconnect()
    backend.wait_for(
        "the disconnect", lambda: any(e["type"] == "disconnect" for e in backend.events)
    )
    ids = [e["id"] for e in backend.events]
    assert len(ids) == len(set(ids))


def test_operators_see_the_hook_calls_in_metrics_and_stats(
    broker_factory: Start, node_client_factory: Client, backend: HookBackend
) -> None:
    broker = start(broker_factory, backend)
    alice = connected(node_client_factory, broker, "alice")
    assert alice.join("hooked:a")["status"] == "ok"
    assert alice.call("hooked:a", "bad")["status"] == "error"
    metrics = httpx.get(f"http://127.0.0.1:{broker.port}/metrics").text
    assert 'phxbroker_hook_calls_total{kind="join",outcome="ok"} 1.0' in metrics
    assert 'phxbroker_hook_calls_total{kind="event",outcome="bad_answer"} 1.0' in metrics
    assert 'phxbroker_hook_breaker{state="closed"} 1.0' in metrics
    assert "phxbroker_hook_call_duration_seconds_count" in metrics
    shown = cli("stats", "--once", "--config", broker.config_path)
    assert shown.returncode == 0, shown.stderr
    assert "app hook calls" in shown.stdout and "bad_answer 1" in shown.stdout
    report = json.loads(cli("stats", "--once", "--json", "--config", broker.config_path).stdout)
    assert report["counters"]["hook_calls"]["connect:ok"] == 1
