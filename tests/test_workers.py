"""`[server] workers = 2`: a supervisor and two worker processes on one port
(SO_REUSEPORT), each a node of the cluster on a real `redis-server`, with phoenix.js
clients, the CLI through the supervisor's control socket, and a fake systemd."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from support.broker import BrokerProcess
from support.cli import assert_one_sentence
from support.cli import cli as run_cli
from support.node_client import NodeClient
from support.notify_socket import NotifySocket
from support.redis_server import RedisServer

from phxbroker.cli.statsview import rates, render
from phxbroker.config.settings import config_warnings, parse_config
from phxbroker.config.table import ConfigError
from phxbroker.daemon.supervisor import merge_reports

BrokerFactory = Callable[..., BrokerProcess]
NodeFactory = Callable[..., NodeClient]

TOPIC = "room:lobby"
WORKERS_LISTENING = re.compile(r"2 workers listening on http://\S+ \(pids (\d+), (\d+)\)")
CONFIG: dict[str, Any] = {
    "server": {"workers": 2, "drain_timeout": 5},
    "auth": {
        "token_param": "token",
        "tokens": [
            {"user": "alice", "token": "alice-token"},
            {"user": "bob", "token": "bob-token"},
        ],
    },
    "longpoll": {"enabled": False},
    "topics": [{"pattern": "room:*", "relay": ["new_msg"], "presence": True, "coalesce_ms": 20}],
}


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir).start()
    yield server
    server.stop()


def start_workers(
    factory: BrokerFactory, redis: RedisServer, env: dict[str, str] | None = None, **extra: Any
) -> BrokerProcess:
    """`phxbroker serve` with two workers named t-w0 and t-w1, once both listen."""
    config = {**CONFIG, **extra, "cluster": {"redis_url": redis.url, "node": "t", "down_after": 2}}
    supervisor = factory(config, env=env)
    supervisor.wait_for_log(WORKERS_LISTENING, timeout=15)
    for node in ("t-w0", "t-w1"):
        supervisor.wait_for_log(rf"cluster: node {node} connected to Redis", timeout=10)
    return supervisor


def cli(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--config", broker.config_path)


def connected_to(broker: BrokerProcess, user: str, since: int) -> str:
    """The worker (node name) whose activity log shows `user` connecting after `since`."""
    found = broker.wait_for_log(
        rf"phxbroker\.activity\[(?P<node>t-w\d)\]: CONNECTED TO /socket .* user {user} ",
        since=since,
    )
    return found["node"]


def connect_on(
    client: NodeClient, broker: BrokerProcess, user: str, *, avoid: str | None = None, **opts: Any
) -> str:
    """Connect `client` as `user` (again and again while it lands on `avoid`: the kernel
    picks the worker by the connection's ports); the worker it landed on."""
    for _ in range(40):
        mark = broker.mark()
        client.connect(broker.socket_url(), {"token": f"{user}-token"}, **opts)
        client.expect_open()
        node = connected_to(broker, user, mark)
        if node != avoid:
            return node
        client.disconnect()
    raise AssertionError(f"{user} never landed on a worker other than {avoid}")


def joined(client: NodeClient) -> None:
    assert client.join(TOPIC)["status"] == "ok"
    client.on(TOPIC, "new_msg")


def presence_is(client: NodeClient, users: set[str], timeout: float = 5) -> None:
    """Wait until phoenix.js Presence's latest sync of the topic lists exactly `users`."""
    client.expect(
        lambda e: e["type"] == "presence" and e["topic"] == TOPIC and set(e["state"]) == users,
        timeout=timeout,
    )


def stats(broker: BrokerProcess) -> dict[str, Any]:
    result = cli(broker, "stats", "--once", "--json", "--interval", "0.05")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def eventually(probe: Callable[[], Any], timeout: float = 8) -> Any:
    """Poll `probe` (figures workers publish every 2 s) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never true within {timeout} s: {probe}")
        time.sleep(0.1)


def test_two_workers_serve_phoenix_clients_as_one_broker(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory, redis: RedisServer
) -> None:
    broker = start_workers(broker_factory, redis)
    alice, bob = node_client_factory("alice"), node_client_factory("bob")
    alice_on = connect_on(alice, broker, "alice")
    bob_on = connect_on(bob, broker, "bob", avoid=alice_on, reconnectAfterMs=[60_000])
    assert {alice_on, bob_on} == {"t-w0", "t-w1"}
    for client in (alice, bob):
        joined(client)
    for client in (alice, bob):
        presence_is(client, {"alice", "bob"})

    # A relayed push crosses from one worker to the other, through the cluster.
    alice.push(TOPIC, "new_msg", {"body": "from alice"})
    bob.push(TOPIC, "new_msg", {"body": "from bob"})
    for client in (alice, bob):
        bodies = {
            client.expect({"type": "channel_event", "event": "new_msg"})["payload"]["body"]
            for _ in range(2)
        }
        assert bodies == {"from alice", "from bob"}

    # `stats` through the supervisor asks both workers and adds them up.
    report = stats(broker)
    assert report["connections"] == 2 and report["channels"] == 2
    rows = {row["node"]: row for row in report["workers"]}
    assert set(rows) == {"t-w0", "t-w1"}
    assert all(row["connections"] == 1 and row["state"] == "serving" for row in rows.values())
    assert report["pid"] == broker.pid and broker.pid not in {r["pid"] for r in rows.values()}
    assert [t["subscribers"] for t in report["topics"] if t["topic"] == TOPIC] == [2]
    assert report["topic_count"] == 1
    view = cli(broker, "stats", "--once", "--interval", "0.05")
    assert "2 workers" in view.stdout and re.search(r"w1\s+t-w1\s+\d+\s+serving", view.stdout)

    # `topics` (one worker answers for the cluster) counts the subscribers of both.
    def lobby() -> dict[str, Any] | None:
        topics = json.loads(cli(broker, "topics", "--json").stdout)
        found = next(t for t in topics if t["topic"] == TOPIC)
        return found if found["nodes"] == {"t-w0": 1, "t-w1": 1} else None

    assert eventually(lobby)["subscribers"] == 2

    # A kick through the supervisor reaches bob on whichever worker holds him.
    result = cli(broker, "kick", "bob")
    assert result.returncode == 0, result.stderr
    bob.expect({"type": "close", "code": 1001, "reason": "kicked"})
    presence_is(alice, {"alice"})
    assert "Traceback" not in broker.log_text


def test_a_killed_worker_is_replaced_and_its_clients_reconnect_to_the_pool(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory, redis: RedisServer
) -> None:
    broker = start_workers(broker_factory, redis)
    alice, bob = node_client_factory("alice"), node_client_factory("bob")
    alice_on = connect_on(alice, broker, "alice")
    bob_on = connect_on(bob, broker, "bob", avoid=alice_on)
    for client in (alice, bob):
        joined(client)
    pids = {row["node"]: row["pid"] for row in stats(broker)["workers"]}
    victim = pids[bob_on]

    mark = broker.mark()
    os.kill(victim, signal.SIGKILL)
    index = bob_on[-1]
    broker.wait_for_log(
        rf"worker w{index} \(pid {victim}\) exited with signal SIGKILL; starting a new one",
        since=mark,
    )
    # phoenix.js reconnects at once, to whichever worker listens, and rejoins.
    bob.expect({"type": "close", "code": 1006})
    bob.expect_open()
    found = broker.wait_for_log(
        rf"worker w{index} \(pid (?P<pid>\d+)\) is serving again", since=mark, timeout=15
    )
    assert int(found["pid"]) != victim
    presence_is(alice, {"alice", "bob"}, timeout=10)

    # The pool serves both as one broker again, the new worker included.
    alice.push(TOPIC, "new_msg", {"body": "after"})
    assert bob.expect({"type": "channel_event", "event": "new_msg"})["payload"]["body"] == "after"
    rows = {row["node"]: row for row in stats(broker)["workers"]}
    assert rows[bob_on]["pid"] == int(found["pid"]) and rows[bob_on]["restarts"] == 1
    assert all(row["state"] == "serving" for row in rows.values())
    carol = node_client_factory("carol")
    assert connect_on(carol, broker, "alice", avoid=alice_on) == bob_on


def test_reload_and_drain_reach_every_worker_and_only_the_supervisor_tells_systemd(
    broker_factory: BrokerFactory, node_client_factory: NodeFactory, redis: RedisServer
) -> None:
    with NotifySocket() as systemd:
        broker = start_workers(broker_factory, redis, env=systemd.env(WATCHDOG_USEC="2000000"))
        _, ready = systemd.wait_for({"READY": "1"})
        assert ready["STATUS"] == "2 workers serving 0 connections (w0 0, w1 0)"
        systemd.wait_for({"WATCHDOG": "1"})
        alice, bob = node_client_factory("alice"), node_client_factory("bob")
        alice_on = connect_on(alice, broker, "alice", reconnectAfterMs=[60_000])
        connect_on(bob, broker, "bob", avoid=alice_on, reconnectAfterMs=[60_000])
        for client in (alice, bob):
            joined(client)
        systemd.wait_for({"STATUS": "2 workers serving 2 connections (w0 1, w1 1)"})

        # SIGHUP: every worker re-reads the file; systemd sees one reload.
        mark, notes = broker.mark(), systemd.mark()
        broker.send_signal(signal.SIGHUP)
        for node in ("t-w0", "t-w1"):
            broker.wait_for_log(rf"phxbroker\[{node}\]: reloaded config from", since=mark)
        broker.wait_for_log(r"supervisor: reloaded config from .* in 2 workers", since=mark)
        index, _ = systemd.wait_for({"RELOADING": "1"}, since=notes)
        systemd.wait_for({"READY": "1"}, since=index + 1)

        # `phxbroker reload` through the supervisor's socket: refused for a broken file,
        # with the reason, and nothing changes.
        text = broker.config_path.read_text()
        broker.config_path.write_text(text.replace("workers = 2", "workers = 2\nbogus = 1"))
        result = cli(broker, "reload")
        assert_one_sentence(result, 1, "reload refused", "bogus")
        broker.config_path.write_text(text)
        mark = broker.mark()
        result = cli(broker, "reload")
        assert result.returncode == 0, result.stderr
        for node in ("t-w0", "t-w1"):
            broker.wait_for_log(rf"phxbroker\[{node}\]: reloaded config from", since=mark)

        # SIGTERM: both workers drain their clients with 1001; the supervisor exits 0.
        mark = broker.mark()
        broker.send_signal(signal.SIGTERM)
        _, stopping = systemd.wait_for({"STOPPING": "1"})
        assert stopping["STATUS"].startswith("draining")
        for client in (alice, bob):
            client.expect({"type": "close", "code": 1001})
        assert broker.wait() == 0
        for node in ("t-w0", "t-w1"):
            broker.wait_for_log(rf"phxbroker\[{node}\]: drained in", since=mark)

        # The workers never spoke to systemd: one READY for the start, one per reload.
        messages = systemd.messages
        assert sum(1 for m in messages if m.get("READY") == "1") == 4  # start + 3 reloads
        assert sum(1 for m in messages if m.get("STOPPING") == "1") == 1
        statuses = [m["STATUS"] for m in messages if "STATUS" in m]
        assert all(s.startswith(("2 workers", "draining", "reloading")) for s in statuses)


def test_sigterm_to_every_process_at_once_drains_without_hurrying(
    broker_factory: BrokerFactory, redis: RedisServer
) -> None:
    """As systemd stops a unit (KillMode=control-group): the supervisor's own request to
    drain and the worker's own SIGTERM count as one."""
    broker = start_workers(broker_factory, redis, server={**CONFIG["server"], "drain_timeout": 1})
    pids = [int(p) for p in broker.wait_for_log(WORKERS_LISTENING).groups()]
    # A websocket that never answers the close keeps its worker draining until the timeout.
    silent = raw_websocket(broker)
    mark = broker.mark()
    for pid in (broker.pid, *pids):
        os.kill(pid, signal.SIGTERM)
    assert broker.wait() == 0
    text = "\n".join(broker.lines[mark:])
    assert "stopping without waiting" not in text and "stopping now" not in text
    assert re.search(r"drain timeout after 1 s: cutting 1 connections", text), text
    silent.close()


def raw_websocket(broker: BrokerProcess) -> socket.socket:
    """A websocket that completes its handshake and never reads again."""
    sock = socket.create_connection((broker.host, broker.port), timeout=5)
    sock.sendall(
        b"GET /socket/websocket?vsn=2.0.0&token=alice-token HTTP/1.1\r\nHost: x\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    return sock


def test_a_worker_that_cannot_start_stops_the_start_with_one_sentence(tmp_path: Path) -> None:
    config = tmp_path / "phxbroker.toml"
    config.write_text(
        tomli_w.dumps(
            {
                **CONFIG,
                "server": {**CONFIG["server"], "listen": "127.0.0.1:0"},
                "admin": {"socket": "admin.sock"},
                # No Redis is needed to start: a node serves alone until it answers.
                "cluster": {"redis_url": "redis://127.0.0.1:9/0", "node": "t"},
            }
        )
    )
    (tmp_path / "admin.sock.w1").write_text("in the way")
    result = run_cli("serve", "--config", config)
    assert result.returncode == 1, result.stderr
    assert "admin.sock.w1 exists and is not a socket" in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last == "phxbroker: worker w1 exited with code 1 while starting (its log says why)"
    assert "Traceback" not in result.stderr
    # Worker w0, which could start, was stopped with the supervisor.
    assert subprocess.run(["pgrep", "-f", str(config)], capture_output=True).stdout == b""
    assert not (tmp_path / "admin.sock").exists()


def test_workers_without_a_cluster_is_one_config_error(tmp_path: Path) -> None:
    config = tmp_path / "phxbroker.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:0"\nworkers = 2\n')
    for command in ("check-config", "serve"):
        result = run_cli(command, "--config", config)
        assert_one_sentence(result, 2, "server.workers", "[cluster]")


def test_the_config_checks_what_workers_need(tmp_path: Path) -> None:
    cluster = {"redis_url": "redis://127.0.0.1:6379/0"}
    config = parse_config({"server": {"workers": 2}, "cluster": cluster}, tmp_path / "p.toml")
    assert config.server.workers == 2
    assert any("[longpoll] enabled" in w for w in config_warnings(config))
    cores = os.cpu_count() or 1
    many = parse_config(
        {"server": {"workers": cores + 1}, "cluster": cluster, "longpoll": {"enabled": False}}
    )
    assert [w for w in config_warnings(many) if "workers" in w] == [
        f"[server] workers = {cores + 1} on a machine with {cores} cores: workers beyond one "
        "per core only add overhead"
    ]
    for data, key in (
        ({"server": {"workers": 0}}, "server.workers"),
        ({"server": {"workers": 2}, "cluster": {**cluster, "node": "n" * 98}}, "cluster.node"),
        (
            {"server": {"workers": 2}, "cluster": cluster, "admin": {"socket": "/" + "s" * 104}},
            "admin.socket",
        ),
    ):
        with pytest.raises(ConfigError) as error:
            parse_config(data)
        assert error.value.key == key, error.value


COUNTED = ("joins", "messages_in", "messages_out", "bytes_in", "bytes_out")
COUNTED += ("slow_client_drops", "auth_failures")


def test_the_workers_reports_add_up_to_one_for_the_host() -> None:
    def report(connections: int, topics: list[dict[str, Any]], **counters: Any) -> dict[str, Any]:
        return {
            "version": "x",
            "pid": 1,
            "uptime": 5.0,
            "rss_bytes": 100,
            "connections": connections,
            "channels": connections,
            "user_count": connections,
            "topic_count": len(topics),
            "topics": topics,
            "bans": {"mallory": 10.0},
            "counters": {
                **dict.fromkeys(COUNTED, 1),
                "deliveries": 10,
                "refusals": {"origin": 1},
                "hook_breaker": "closed",
                **counters,
            },
        }

    lobby = {"topic": "room:lobby", "subscribers": 2, "users": 2, "presences": 3, "hits": 7}
    other = {"topic": "room:x", "subscribers": 1, "users": 1, "presences": None, "hits": 0}
    merged = merge_reports(
        [
            report(2, [lobby]),
            report(2, [{**lobby, "subscribers": 1, "users": 1}, other], hook_breaker="open"),
        ],
        pid=9,
        uptime=6.0,
        rss=50,
        workers=[{"worker": "w0", "pid": 10}, {"worker": "w1", "pid": 11}],
    )
    assert merged["connections"] == 4 and merged["rss_bytes"] == 250 and merged["pid"] == 9
    assert merged["topic_count"] == 2  # room:lobby on both workers is one topic
    assert merged["topics"][0] == {**lobby, "subscribers": 3, "users": 3}
    assert merged["counters"] == {
        **dict.fromkeys(COUNTED, 2),
        "deliveries": 20,
        "refusals": {"origin": 2},
        "hook_breaker": "closed,open",
    }
    assert merged["bans"] == {"mallory": 10.0}
    # A worker restarted between two samples: no rates rather than negative ones.
    later = {**merged, "uptime": 7.0, "workers": [{"worker": "w0", "pid": 10}, {"pid": 12}]}
    assert rates(merged, later) is None
    render(merged, None, "admin.sock")  # the view takes the merged report as it is
