"""The operator's CLI against a real `phxbroker serve`: the admin commands over the control
socket, their one-sentence failures, and the socket's permissions."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w
from support.broker import BrokerProcess
from support.cli import assert_one_sentence, cli
from support.node_client import NodeClient

CONFIG = {
    "auth": {
        "tokens": [
            {"user": "alice", "token": "alice-token"},
            {"user": "bob", "token": "bob-token"},
        ]
    },
    "topics": [{"pattern": "room:*", "relay": ["new_msg"], "echo": ["ping"], "presence": True}],
    # The stats test keeps a client pinging as fast as it can: no message rate limit.
    "limits": {"message_rate": 0},
}

ADMIN_COMMANDS = [
    ["stats"],
    ["stats", "--once", "--json"],
    ["topics"],
    ["users"],
    ["kick", "alice"],
    ["kick", "alice", "--topic", "room:a"],
    ["unban", "alice"],
    ["publish", "room:a", "hello"],
    ["reload"],
]


def connected(
    node_client_factory: Callable[..., NodeClient], broker: BrokerProcess, token: str, *topics: str
) -> NodeClient:
    client = node_client_factory(token.removesuffix("-token"))
    client.connect(broker.socket_url(), {"token": token})
    client.expect_open()
    for topic in topics:
        assert client.join(topic)["status"] == "ok"
    return client


# -- no daemon, bad arguments --------------------------------------------------------------


@pytest.mark.parametrize("args", ADMIN_COMMANDS, ids=" ".join)
def test_without_a_daemon_every_admin_command_says_so_in_one_sentence(
    tmp_path: Path, args: list[str]
) -> None:
    config = tmp_path / "phxbroker.toml"
    config.write_text('[admin]\nsocket = "admin.sock"\n')

    result = cli(*args, "--config", config)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"phxbroker: no phxbroker is running: cannot connect to {tmp_path / 'admin.sock'}\n"
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["publish", "room:a", "e", "{not json"], ["PAYLOAD_JSON is not valid JSON"]),
        (["publish", "room:a", "e", "[1, 2]"], ["PAYLOAD_JSON must be a JSON object"]),
        (["kick", "alice", "--ban", "10x"], ["--ban", "not a duration"]),
        (["kick", "alice", "--ban", "0s"], ["--ban", "positive"]),
        (["kick", "alice", "--ban", "1m", "--topic", "room:a"], ["cannot be combined"]),
        (["stats", "--interval", "0"], ["--interval"]),
        (["kick"], ["Missing argument 'USER'"]),
        (["publish", "room:a"], ["Missing argument 'EVENT'"]),
        (["frobnicate"], ["No such command"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0] != "-" else None,
)
def test_bad_arguments_get_one_sentence(tmp_path: Path, args: list[str], words: list[str]) -> None:
    config = tmp_path / "phxbroker.toml"
    config.write_text('[admin]\nsocket = "admin.sock"\n')
    assert_one_sentence(cli(*args, "--config", config), 2, *words)


def test_a_missing_or_broken_config_is_one_sentence(tmp_path: Path) -> None:
    assert_one_sentence(
        cli("stats", "--config", tmp_path / "nope.toml"), 2, str(tmp_path / "nope.toml"), "exist"
    )
    broken = tmp_path / "broken.toml"
    broken.write_text("[admin\n")
    assert_one_sentence(cli("topics", "--config", broken), 2, str(broken), "not valid TOML")
    off = tmp_path / "off.toml"
    off.write_text('[admin]\nsocket = ""\n')
    assert_one_sentence(cli("users", "--config", off), 2, "turns the admin socket off")


def test_check_config_takes_the_file_as_every_command_does(tmp_path: Path) -> None:
    config = tmp_path / "phxbroker.toml"
    config.write_text(tomli_w.dumps(CONFIG))
    for args in (["--config", config], [config], [config, "--config", config]):
        result = cli("check-config", *args)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{config}: ok (1 topic patterns, 2 static tokens)\n"
        assert result.stderr == ""
    other = tmp_path / "other.toml"
    assert_one_sentence(cli("check-config", config, "--config", other), 2, "give the config")
    assert_one_sentence(cli("check-config", "--config", other), 2, str(other), "does not exist")


def test_check_config_passes_a_config_that_lets_nobody_in_with_a_warning(tmp_path: Path) -> None:
    config = tmp_path / "phxbroker.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:4000"\n')
    result = cli("check-config", "--config", config)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{config}: ok (0 topic patterns, 0 static tokens)\n"
    assert result.stderr.splitlines() == [
        f"phxbroker: warning: {config}: no [[topics]]: every join is refused with "
        '"unmatched topic"',
        f"phxbroker: warning: {config}: no connect tokens ([[auth.tokens]] or the tokens file), "
        "no [auth.jwt], no [auth.phoenix_token] and allow_anonymous = false: every connect is "
        "refused",
    ]


# -- against a live daemon -----------------------------------------------------------------


def test_serve_logs_the_same_warnings_when_it_starts(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    broker = broker_factory({"server": {}})
    broker.wait_for_log(r"WARNING phxbroker: .*phxbroker\.toml: no \[\[topics\]\]: every join")
    broker.wait_for_log(r"WARNING phxbroker: .*: no connect tokens .*: every connect is refused")


def test_stats_once_json_reports_the_live_daemon(
    broker_factory: Callable[..., BrokerProcess], node_client_factory: Callable[..., NodeClient]
) -> None:
    broker = broker_factory(CONFIG)
    alice = connected(node_client_factory, broker, "alice-token", "room:lobby")
    connected(node_client_factory, broker, "bob-token", "room:lobby", "room:side")

    proc = subprocess.Popen(
        [sys.executable, "-m", "phxbroker", "stats", "--once", "--json", "--interval", "0.5",
         "--config", str(broker.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    # Keep traffic flowing for as long as the two samples are being taken.
    while proc.poll() is None:
        assert alice.call("room:lobby", "ping", {"n": 1})["status"] == "ok"
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err

    report = json.loads(out)
    assert report["pid"] == broker.pid
    assert (report["connections"], report["channels"], report["user_count"]) == (2, 3, 2)
    assert report["topic_count"] == 2
    lobby = report["topics"][0]
    assert (lobby["topic"], lobby["subscribers"], lobby["presences"]) == ("room:lobby", 2, 2)
    assert report["counters"]["joins"] == 3
    assert report["rss_bytes"] > 1_000_000
    assert report["rates"]["messages_in_per_s"] > 0
    assert report["rates"]["messages_out_per_s"] > 0
    assert report["rates"]["deliveries_per_s"] >= 0  # broadcast copies, counted apart
    assert report["rates"]["bytes_in_per_s"] > 0


def test_stats_once_prints_the_view(broker_factory: Callable[..., BrokerProcess]) -> None:
    broker = broker_factory(CONFIG)
    result = cli("stats", "--once", "--interval", "0.1", "--config", broker.config_path)
    assert result.returncode == 0, result.stderr
    assert f"pid {broker.pid}" in result.stdout
    for label in (
        "connections",
        "messages in",
        "bytes out",
        "auth failures",
        "internal errors",
        "memory",
    ):
        assert label in result.stdout


def test_topics_users_and_publish(
    broker_factory: Callable[..., BrokerProcess], node_client_factory: Callable[..., NodeClient]
) -> None:
    broker = broker_factory(CONFIG)
    alice1 = connected(node_client_factory, broker, "alice-token", "room:lobby")
    alice2 = connected(node_client_factory, broker, "alice-token", "room:lobby")
    connected(node_client_factory, broker, "bob-token", "room:side")
    for client in (alice1, alice2):
        client.on("room:lobby", "note")

    topics = json.loads(cli("topics", "--json", "--config", broker.config_path).stdout)
    assert [(t["topic"], t["subscribers"]) for t in topics] == [
        ("room:lobby", 2),
        ("room:side", 1),
    ]
    users = json.loads(cli("users", "--json", "--config", broker.config_path).stdout)
    assert users["users"] == [
        {"user": "alice", "connections": 2, "topics": ["room:lobby"]},
        {"user": "bob", "connections": 1, "topics": ["room:side"]},
    ]
    table = cli("users", "--config", broker.config_path).stdout
    assert "alice" in table and "room:side" in table

    result = cli("publish", "room:lobby", "note", '{"text": "hé"}', "--config", broker.config_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "published note to room:lobby (2 subscribers)\n"
    for client in (alice1, alice2):
        got = client.expect({"type": "channel_event", "event": "note"})
        assert got["payload"] == {"text": "hé"}

    refused = cli("publish", "room:lobby", "phx_close", "--config", broker.config_path)
    assert_one_sentence(refused, 1, "reserved")


def test_kick_and_publish_say_so_when_they_reach_nobody(
    broker_factory: Callable[..., BrokerProcess], node_client_factory: Callable[..., NodeClient]
) -> None:
    broker = broker_factory(CONFIG)
    connected(node_client_factory, broker, "bob-token", "room:lobby")
    config = broker.config_path

    assert_one_sentence(cli("kick", "carol", "--config", config), 1, "carol has no open connection")
    assert_one_sentence(
        cli("kick", "bob", "--topic", "room:side", "--config", config),
        1,
        "bob has not joined room:side",
    )
    assert_one_sentence(
        cli("publish", "lobby", "note", "--config", config),
        1,
        "no [[topics]] pattern matches 'lobby', so no client can join it",
    )
    # A ban still does something, and a topic clients may join is published to.
    banned = cli("kick", "carol", "--ban", "1m", "--config", config)
    assert (banned.returncode, banned.stdout) == (
        0,
        "carol has no open connection, connects refused for 1m 00s\n",
    )
    quiet = cli("publish", "room:empty", "note", "--config", config)
    assert (quiet.returncode, quiet.stdout) == (0, "published note to room:empty (0 subscribers)\n")
    kicked = cli("kick", "bob", "--topic", "room:lobby", "--config", config)
    assert (kicked.returncode, kicked.stdout) == (0, "removed bob from room:lobby (1 channel)\n")


def test_reload_applies_a_good_config_and_refuses_a_broken_one(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    broker = broker_factory(CONFIG)
    mark = broker.mark()
    result = cli("reload", "--config", broker.config_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"reloaded {broker.config_path}\n"
    broker.wait_for_log("reloaded config from", since=mark)

    good = broker.config_path.read_text()
    broker.config_path.write_text(good + '\n[[topics]]\npattern = "x"\njoin = "everyone"\n')
    broken = cli("reload", "--config", broker.config_path)
    assert_one_sentence(broken, 1, "reload refused, the running config is kept", "topics[1].join")
    broker.config_path.write_text(good)
    assert cli("topics", "--config", broker.config_path).returncode == 0  # still serving


# -- the control socket's permissions ------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="phxbroker-admin-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def connect_as(uid: int, path: Path) -> str:
    """What a process of `uid` gets when it asks the control socket for stats."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become `uid`, ask, report, and leave at once
        try:
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                sock.sendall(b'{"command": "stats"}\n')
                answer = sock.recv(65536).decode()
        except OSError as exc:
            answer = f"{type(exc).__name__}"
        os.write(write_end, answer.encode()[:4000])
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as f:
        return f.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_the_control_socket_serves_only_root_and_its_own_user(
    broker_factory: Callable[..., BrokerProcess], shared_dir: Path
) -> None:
    nobody = 65534
    private = shared_dir / "private.sock"
    open_mode = shared_dir / "open.sock"
    broker_factory({**CONFIG, "admin": {"socket": str(private)}})
    broker = broker_factory({**CONFIG, "admin": {"socket": str(open_mode), "mode": 0o666}})

    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # Mode 0600: the file system already keeps other users out.
    assert connect_as(nobody, private) == "PermissionError"
    # Mode 0666 lets them reach the socket, and the daemon still refuses them.
    mark = broker.mark()
    answer = json.loads(connect_as(nobody, open_mode))
    assert answer == {
        "ok": False,
        "error": f"permission denied: uid {nobody} is neither root nor the daemon's user",
    }
    broker.wait_for_log(rf"refused admin connection from uid {nobody}", since=mark)
    assert json.loads(connect_as(0, open_mode))["ok"] is True
