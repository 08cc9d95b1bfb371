"""A cluster end to end: real `phxbroker serve` nodes sharing a real `redis-server`, with
phoenix.js clients on different nodes."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from support.broker import BrokerProcess
from support.certs import TestCA
from support.node_client import NodeClient
from support.redis_server import RedisServer, free_port

BrokerFactory = Callable[..., BrokerProcess]
NodeFactory = Callable[..., NodeClient]

API_KEY = "cluster-api-key"
DOWN_AFTER = 1.5  # seconds: short, so a killed node's presences leave quickly
CONNECTED = re.compile(r"cluster: node (\S+) connected to Redis")

CONFIG: dict[str, Any] = {
    "auth": {
        "token_param": "token",
        "tokens": [
            {"user": "alice", "token": "alice-token"},
            {"user": "bob", "token": "bob-token"},
            {"user": "carol", "token": "carol-token"},
        ],
    },
    "api": {"keys": [{"name": "backend", "key": API_KEY}]},
    "topics": [
        {
            "pattern": "room:*",
            "relay": ["new_msg"],
            "relay_user_key": "user",
            "presence": True,
            "coalesce_ms": 20,
        },
    ],
}

STATUS_CONFIG: dict[str, Any] = {
    "auth": {
        "token_param": "pass",
        "user_param": "user",
        "tokens": [{"user": "*", "token": "status-secret"}],
    },
    "topics": [
        {
            "pattern": "all",
            "count": ["hit"],
            "presence": True,
            "history": 20,
            "status_event": "status_users",
            "coalesce_ms": 20,
        }
    ],
}


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir).start()
    yield server
    server.stop()


def start_node(
    factory: BrokerFactory,
    redis: RedisServer,
    name: str,
    config: dict[str, Any] = CONFIG,
    **cluster: Any,
) -> BrokerProcess:
    """A node of the cluster on `redis`, started and connected to it."""
    section = {"redis_url": redis.url, "node": name, "down_after": DOWN_AFTER, **cluster}
    node = factory({**config, "cluster": section})
    node.wait_for_log(CONNECTED, timeout=10)
    return node


def client_on(
    factory: NodeFactory, node: BrokerProcess, params: dict[str, Any], name: str, **opts: Any
) -> NodeClient:
    client = factory(name)
    client.connect(node.socket_url(), params, **opts)
    client.expect_open()
    return client


def presence_is(client: NodeClient, topic: str, users: set[str], timeout: float = 5) -> dict:
    """Wait until phoenix.js Presence's latest sync of `topic` lists exactly `users`."""
    deadline = time.monotonic() + timeout
    while True:
        syncs = [e for e in client.events if e["type"] == "presence" and e["topic"] == topic]
        if syncs and set(syncs[-1]["state"]) == users:
            return syncs[-1]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"{client.name}: presence on {topic} never became {users}; " + client.diagnostics()
            )
        try:
            client.expect(
                lambda e: e["type"] == "presence" and e["topic"] == topic, timeout=remaining
            )
        except AssertionError:
            continue


def eventually(probe: Callable[[], Any], timeout: float = 8) -> Any:
    """Poll `probe` until it returns something true (figures other nodes publish now and
    then); the last value it returned, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
        except (AssertionError, StopIteration, KeyError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never true within {timeout} s: {probe}")
        time.sleep(0.1)


def api(node: BrokerProcess, method: str, path: str, body: Any = None) -> Any:
    response = httpx.request(
        method,
        f"{node.url}{path}",
        json=body,
        headers={"authorization": f"Bearer {API_KEY}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()


def cli(node: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phxbroker", *args, "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_three_nodes_share_pushes_api_broadcasts_presence_and_kicks(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory, redis: RedisServer
) -> None:
    a, b, c = (start_node(broker_factory, redis, name) for name in ("a", "b", "c"))
    alice = client_on(node_client_factory, a, {"token": "alice-token"}, "alice@a")
    bob = client_on(node_client_factory, b, {"token": "bob-token"}, "bob@b")
    carol = client_on(
        node_client_factory, c, {"token": "carol-token"}, "carol@c", reconnectAfterMs=[60_000]
    )
    for client in (alice, bob, carol):
        assert client.join("room:lobby")["status"] == "ok"
        client.on("room:lobby", "new_msg")
        client.on("room:lobby", "news")

    # Presence: everyone on every node, as phoenix.js Presence merges it.
    for client in (alice, bob, carol):
        presence_is(client, "room:lobby", {"alice", "bob", "carol"})

    # A relayed push from node B reaches the subscribers of A and C once, in order.
    for n in range(3):
        bob.push("room:lobby", "new_msg", {"n": n})
    for client in (alice, bob, carol):
        got = [
            client.expect({"type": "channel_event", "event": "new_msg"})["payload"]
            for _ in range(3)
        ]
        assert got == [{"n": n, "user": "bob"} for n in range(3)]

    # An API broadcast on node C reaches all three nodes; it reports its own subscribers.
    assert api(
        c, "POST", "/api/broadcast", {"topic": "room:lobby", "event": "news", "payload": {"x": 1}}
    ) == {"ok": True, "subscribers": 1}
    for client in (alice, bob, carol):
        assert client.expect({"type": "channel_event", "event": "news"})["payload"] == {"x": 1}
    for client in (alice, bob, carol):
        assert len(client.seen({"type": "channel_event", "event": "news"})) == 1

    # A kick on node A closes carol's socket on node C.
    result = cli(a, "kick", "carol")
    assert result.returncode == 0, result.stderr
    assert carol.expect({"type": "close"})["code"] == 1001
    presence_is(alice, "room:lobby", {"alice", "bob"})

    # Stats show the cluster: a row per node and the totals.
    report = api(b, "GET", "/api/stats")["cluster"]
    assert report["state"] == "connected"
    assert sorted(row["node"] for row in report["nodes"]) == ["a", "b", "c"]

    # `topics` on node A counts the lobby's subscribers on every node (each node publishes
    # its figures every few seconds).
    def lobby() -> dict[str, Any]:
        topics = json.loads(cli(a, "topics", "--json").stdout)
        return next(t for t in topics if t["topic"] == "room:lobby")

    assert eventually(lambda: lobby()["nodes"] == {"a": 1, "b": 1} and lobby())["subscribers"] == 2
    stats = cli(b, "stats", "--once", "--interval", "0.1")
    assert stats.returncode == 0, stats.stderr
    assert re.search(r"cluster.*connected", stats.stdout) and "node" in stats.stdout


def test_a_ban_set_on_one_node_refuses_connects_on_every_node(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory, redis: RedisServer
) -> None:
    a, b = (start_node(broker_factory, redis, name) for name in ("a", "b"))
    bob = client_on(node_client_factory, b, {"token": "bob-token"}, "bob@b")
    assert bob.join("room:x")["status"] == "ok"
    result = cli(a, "kick", "bob", "--ban", "1h")
    assert result.returncode == 0, result.stderr
    assert bob.expect({"type": "close"})["code"] == 1001
    again = node_client_factory("bob-again@b")
    again.connect(b.socket_url(), {"token": "bob-token"}, reconnectAfterMs=[60_000])
    again.expect({"type": "error"})
    b.wait_for_log(r"banned")
    # A node started after the ban learns it from Redis.
    late = start_node(broker_factory, redis, "late")
    third = node_client_factory("bob@late")
    third.connect(late.socket_url(), {"token": "bob-token"}, reconnectAfterMs=[60_000])
    third.expect({"type": "error"})

    # The back end's /api/disconnect on node A closes carol's socket on node B.
    carol = client_on(
        node_client_factory, b, {"token": "carol-token"}, "carol@b", reconnectAfterMs=[60_000]
    )
    assert api(a, "POST", "/api/disconnect", {"user": "carol"}) == {"ok": True, "connections": 0}
    assert carol.expect({"type": "close"})["code"] == 1001

    # A token revoked by a reload of node A closes the sockets it admitted on node B.
    alice = client_on(
        node_client_factory, b, {"token": "alice-token"}, "alice@b", reconnectAfterMs=[60_000]
    )
    assert alice.join("room:x")["status"] == "ok"
    still = {
        **CONFIG,
        "auth": {
            **CONFIG["auth"],
            "tokens": [t for t in CONFIG["auth"]["tokens"] if t["user"] != "alice"],
        },
    }
    text = a.config_path.read_text()
    a.config_path.write_text(
        text[: text.index("[auth]")]
        + tomli_w.dumps({"auth": still["auth"]})
        + text[text.index("[api]") - 1 :]
        if "[api]" in text
        else text
    )
    result = cli(a, "reload")
    assert result.returncode == 0, result.stderr
    assert alice.expect({"type": "close"})["code"] == 1001
    b.wait_for_log(r"credential was revoked on another node")


def test_a_killed_node_s_presences_leave_the_others_within_down_after(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory, redis: RedisServer
) -> None:
    a, b = (start_node(broker_factory, redis, name) for name in ("a", "b"))
    alice = client_on(node_client_factory, a, {"token": "alice-token"}, "alice@a")
    bob = client_on(node_client_factory, b, {"token": "bob-token"}, "bob@b")
    assert alice.join("room:lobby")["status"] == "ok"
    assert bob.join("room:lobby")["status"] == "ok"
    presence_is(alice, "room:lobby", {"alice", "bob"})
    b.send_signal(signal.SIGKILL)
    b.wait()
    presence_is(alice, "room:lobby", {"alice"}, timeout=DOWN_AFTER + 3)
    a.wait_for_log(r"node b silent for")
    alice.expect(  # the leave reached phoenix.js as a presence_diff
        lambda e: (
            e["type"] == "message"
            and e.get("event") == "presence_diff"
            and "bob" in e["payload"]["leaves"]
        )
    )

    # The node restarts under the same name: its new incarnation leaves no ghost.
    b2 = start_node(broker_factory, redis, "b")
    bob2 = client_on(node_client_factory, b2, {"token": "bob-token"}, "bob@b2")
    assert bob2.join("room:lobby")["status"] == "ok"
    state = presence_is(alice, "room:lobby", {"alice", "bob"})["state"]
    assert len(state["bob"]["metas"]) == 1

    # A node that stops gracefully says so: its entries leave at once, not after a silence.
    mark = a.mark()
    assert b2.stop() == 0
    presence_is(alice, "room:lobby", {"alice"})
    a.wait_for_log(r"the entries of node b left", since=mark)
    assert not re.search(r"node b silent", "\n".join(a.lines[mark:]))


def test_redis_stopped_and_started_while_clients_stay_joined(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory, redis: RedisServer
) -> None:
    a, b = (start_node(broker_factory, redis, name) for name in ("a", "b"))
    alice = client_on(node_client_factory, a, {"token": "alice-token"}, "alice@a")
    alice2 = client_on(node_client_factory, a, {"token": "alice-token"}, "alice2@a")
    bob = client_on(node_client_factory, b, {"token": "bob-token"}, "bob@b")
    for client in (alice, alice2, bob):
        assert client.join("room:lobby")["status"] == "ok"
        client.on("room:lobby", "new_msg")
    presence_is(bob, "room:lobby", {"alice", "bob"})

    mark_a = a.mark()
    redis.stop()
    a.wait_for_log(r"cluster: lost Redis", since=mark_a)
    ready = httpx.get(f"{a.url}/readyz")
    assert ready.status_code == 200 and "degraded" in ready.text
    # Local delivery goes on; the other node's presences stay.
    alice.push("room:lobby", "new_msg", {"during": "outage"})
    got = alice2.expect({"type": "channel_event", "event": "new_msg"})
    assert got["payload"] == {"during": "outage", "user": "alice"}
    metrics = httpx.get(f"{a.url}/metrics").text
    assert "phxbroker_cluster_connected 0.0" in metrics

    redis.start()
    a.wait_for_log(CONNECTED, since=mark_a)
    b.wait_for_log(
        CONNECTED, since=1 + b.lines.index(next(line for line in b.lines if "lost Redis" in line))
    )
    assert httpx.get(f"{a.url}/readyz").text == "ready\n"
    alice.push("room:lobby", "new_msg", {"after": "outage"})
    got = bob.expect(lambda e: e["type"] == "channel_event" and "after" in e["payload"])
    assert got["payload"] == {"after": "outage", "user": "alice"}
    assert bob.seen(lambda e: e["type"] == "channel_event" and "during" in e["payload"]) == []
    assert bob.seen({"type": "close"}) == [] and alice.seen({"type": "close"}) == []
    presence_is(bob, "room:lobby", {"alice", "bob"})


def test_the_status_app_on_two_nodes_counts_hits_once(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory, redis: RedisServer
) -> None:
    a, b = (start_node(broker_factory, redis, name, STATUS_CONFIG) for name in ("a", "b"))
    ann = client_on(node_client_factory, a, {"user": "ann", "pass": "status-secret"}, "ann@a")
    ben = client_on(node_client_factory, b, {"user": "ben", "pass": "status-secret"}, "ben@b")
    for client in (ann, ben):
        assert client.join("all")["status"] == "ok"
        client.on("all", "status_users")
    for _ in range(3):
        ann.push("all", "hit")
    for _ in range(2):
        ben.push("all", "hit")
    for client in (ann, ben):
        status = client.expect(
            lambda e: (
                e["type"] == "channel_event"
                and e["payload"]["hits"] == 5
                and e["payload"]["user_count"] == 2
            )
        )["payload"]
        assert sorted(status["users"]) == ["ann", "ben"]
    for client in (ann, ben):
        assert not client.seen(
            lambda e: (
                e["type"] == "channel_event"
                and e.get("event") == "status_users"
                and e["payload"]["hits"] > 5
            )
        )


def test_malformed_messages_from_redis_are_logged_and_skipped(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory, redis: RedisServer
) -> None:
    a, b = (start_node(broker_factory, redis, name) for name in ("a", "b"))
    alice = client_on(node_client_factory, a, {"token": "alice-token"}, "alice@a")
    bob = client_on(node_client_factory, b, {"token": "bob-token"}, "bob@b")
    for client in (alice, bob):
        assert client.join("room:lobby")["status"] == "ok"
        client.on("room:lobby", "new_msg")
    for garbage in (
        "phxbroker:ctl not-a-message",
        'phxbroker:ctl J{"k":"p"}',
        "phxbroker:t:room:lobby Bshort",
        "phxbroker:t:room:lobby {}",
    ):
        assert redis.command("PUBLISH", garbage) is not None
    a.wait_for_log(r"skipped a message from Redis that no phxbroker node sends")
    bob.push("room:lobby", "new_msg", {"still": "working"})
    assert alice.expect({"type": "channel_event", "event": "new_msg"})["payload"]["still"]
    assert "Traceback" not in a.log_text


def test_a_connection_that_silently_stops_delivering_is_noticed(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory, redis: RedisServer
) -> None:
    a = start_node(broker_factory, redis, "a")
    mark = a.mark()
    redis.freeze()  # the TCP connection stays open; nothing comes back
    try:
        a.wait_for_log(r"lost Redis .*probe did not come back", since=mark, timeout=10)
    finally:
        redis.thaw()
    a.wait_for_log(CONNECTED, since=mark, timeout=10)


def test_rediss_with_a_password_from_the_environment_verifies_the_certificate(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path)
    cert = ca.issue("redis", hosts=("localhost", "127.0.0.1"))
    tls_port = free_port()
    workdir = tmp_path / "redis-tls"
    workdir.mkdir()
    server = RedisServer(
        workdir,
        extra_args=(
            "--requirepass",
            "s3cret",
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(cert.cert_file),
            "--tls-key-file",
            str(cert.key_file),
            "--tls-ca-cert-file",
            str(ca.ca_file),
            "--tls-auth-clients",
            "no",
        ),
    ).start()
    try:
        url = f"rediss://:s3cret@localhost:{tls_port}/0"
        config = {
            **CONFIG,
            "cluster": {"redis_url_env": "TEST_REDIS_URL", "node": "a", "tls_ca": str(ca.ca_file)},
        }
        a = broker_factory(config, env={"TEST_REDIS_URL": url})
        a.wait_for_log(CONNECTED)
        assert "s3cret" not in a.log_text
        # A node that trusts another CA refuses the server and serves its clients alone.
        (tmp_path / "other").mkdir()
        other = TestCA(tmp_path / "other")
        config["cluster"] = {**config["cluster"], "node": "b", "tls_ca": str(other.ca_file)}
        b = broker_factory(config, env={"TEST_REDIS_URL": url})
        b.wait_for_log(r"cannot reach Redis .*(?i:certificate)")
        alice = client_on(node_client_factory, b, {"token": "alice-token"}, "alice@b")
        assert alice.join("room:lobby")["status"] == "ok"
        assert "s3cret" not in b.log_text
    finally:
        server.stop()
