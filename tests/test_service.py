"""phxbroker as a systemd service: the unit's own command lines, the notify protocol,
reload and drain as phoenix.js clients see them, and logs that never hold a secret."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
from base64 import b64encode
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import tomli_w
from support.broker import BrokerProcess
from support.node_client import NodeClient
from support.notify_socket import NotifySocket
from support.unit_file import UNIT, UnitFile, localize, run_commands

BrokerFactory = Callable[..., BrokerProcess]
NodeClientFactory = Callable[..., NodeClient]

ALICE_TOKEN = "alice-Xq9-secret-token"
BOB_TOKEN = "bob-Kv2-secret-token"
SHARED_PASS = "shared-Zr7-password"
TOPIC = "room:lobby"
# Runs a command as systemd does with StandardError=journal: $JOURNAL_STREAM names the
# device and inode of its stderr.
UNDER_JOURNALD = ["sh", "-c", 'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$@"', "sh"]


def config(*, echo: tuple[str, ...] = (), drain_timeout: float = 5, **log: str) -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:0", "drain_timeout": drain_timeout},
        "auth": {
            "tokens": [
                {"user": "alice", "token": ALICE_TOKEN},
                {"user": "bob", "token": BOB_TOKEN},
            ]
        },
        "topics": [{"pattern": "room:*", "relay": ["new_msg"], "echo": list(echo)}],
        "log": {"level": "info", **log},
    }


def unit_exec_start() -> list[str]:
    """The unit's ExecStart=, run from this checkout on the test's config file."""
    [argv] = UnitFile().commands("ExecStart")
    return localize(argv, "{config}")


def start_unit(
    broker_factory: BrokerFactory,
    cfg: dict[str, Any] | str,
    env: dict[str, str] | None = None,
    journald: bool = False,
) -> BrokerProcess:
    command = [*UNDER_JOURNALD, *unit_exec_start()] if journald else unit_exec_start()
    return broker_factory(cfg, command=command, env=env)


@pytest.fixture
def systemd() -> Iterator[NotifySocket]:
    with NotifySocket() as sock:
        yield sock


def joined(
    node_client_factory: NodeClientFactory, broker: BrokerProcess, name: str, token: str
) -> NodeClient:
    client = node_client_factory(name)
    client.connect(broker.socket_url(), {"token": token}, reconnectAfterMs=[100])
    client.expect_open()
    assert client.join(TOPIC)["status"] == "ok"
    client.on(TOPIC, "new_msg")
    return client


def relay_reaches(sender: NodeClient, receiver: NodeClient, body: str) -> None:
    sender.push(TOPIC, "new_msg", {"body": body})
    receiver.expect({"type": "channel_event", "event": "new_msg", "payload": {"body": body}})


def raw_websocket(broker: BrokerProcess, token: str) -> socket.socket:
    """A websocket client that completes the handshake and then never reads again, so it
    never answers a close frame."""
    sock = socket.create_connection((broker.host, broker.port), timeout=5)
    key = b64encode(b"0123456789abcdef").decode()
    sock.sendall(
        f"GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: x\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed during the handshake: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server still sends, until it closes or resets the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


# -- the unit file ---------------------------------------------------------------------


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip(
            "systemd-analyze is not installed here (Debian/Ubuntu: apt-get install systemd)"
        )
    unit = tmp_path / "phxbroker.service"
    # verify checks that the executables exist: point them at this checkout.
    text = UNIT.read_text()
    text = text.replace(
        "/opt/phxbroker/bin/phxbroker", localize(["/opt/phxbroker/bin/phxbroker"], "")[0]
    )
    unit.write_text(text)
    result = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_the_unit_is_hardened_and_sized_for_many_connections() -> None:
    unit = UnitFile()
    assert unit.value("Type") == "notify"
    assert unit.value("WatchdogSec")
    assert unit.value("User") == "phxbroker" and unit.value("DynamicUser") in (None, "no")
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "SystemCallArchitectures": "native",
        "RuntimeDirectory": "phxbroker",
    }.items():
        assert unit.value(key) == value, f"{key}= should be {value!r}"
    assert "@system-service" in unit.values("SystemCallFilter")
    assert int(unit.value("LimitNOFILE") or 0) >= 20_000
    assert unit.commands("ExecStartPre")[0][1] == "check-config"
    assert unit.commands("ExecReload")[-1] == ["/bin/kill", "-HUP", "$MAINPID"]
    drain_default = 10
    stop_timeout = int((unit.value("TimeoutStopSec") or "90").removesuffix("s"))
    assert stop_timeout > drain_default, "systemd must not SIGKILL during a default drain"


def test_exec_start_pre_passes_a_good_config_and_stops_a_bad_one(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(tomli_w.dumps(config()))
    [result] = run_commands("ExecStartPre", str(good))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""

    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\ndrain_timeout = "soon"\n')
    missing = tmp_path / "missing.toml"
    # A file the config refers to is read by check-config too.
    no_tokens = tmp_path / "no-tokens.toml"
    no_tokens.write_text('[auth]\ntokens_file = "gone.toml"\n')
    tokens_dir = tmp_path / "dir-tokens.toml"
    tokens_dir.write_text(f'[auth]\ntokens_file = "{tmp_path}"\n')
    no_cert = tmp_path / "no-cert.toml"
    no_cert.write_text(f'[server]\ntls_cert = "{tmp_path}/c.pem"\ntls_key = "{tmp_path}/k.pem"\n')
    no_secret = tmp_path / "no-secret.toml"
    no_secret.write_text(f'[auth.jwt]\nalgorithms = ["HS256"]\nsecret_file = "{tmp_path}/s"\n')
    for path, named, words in [
        (bad, bad, "at server.drain_timeout: expected a number"),
        (missing, missing, "does not exist"),
        (tmp_path, tmp_path, "cannot be read"),  # a directory: unreadable as a file
        (no_tokens, no_tokens, f"at auth.tokens_file: {tmp_path}/gone.toml: the file does not"),
        (tokens_dir, tokens_dir, f"at auth.tokens_file: {tmp_path}: cannot be read"),
        (no_cert, no_cert, f"at server.tls_cert: '{tmp_path}/c.pem' does not exist"),
        (no_secret, no_secret, f"at auth.jwt.secret_file: '{tmp_path}/s' does not exist"),
    ]:
        [result] = run_commands("ExecStartPre", str(path))
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1, result.stderr
        assert f"config error in {named}" in result.stderr and words in result.stderr
        assert "Traceback" not in result.stderr and "Usage" not in result.stderr


def test_under_journald_the_refusal_is_filed_as_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[surver]\n")
    [argv] = UnitFile().commands("ExecStartPre")
    result = subprocess.run(
        [*UNDER_JOURNALD, *localize(argv, str(bad))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr == f"<3>phxbroker: config error in {bad} at surver: unknown key\n"


# -- the notify protocol ---------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path_socket", "abstract_socket"])
def test_the_unit_command_notifies_ready_status_and_watchdog(
    abstract: bool, broker_factory: BrokerFactory, node_client_factory: NodeClientFactory
) -> None:
    with NotifySocket(abstract=abstract) as systemd:
        env = systemd.env(WATCHDOG_USEC="200000")
        broker = start_unit(broker_factory, config(), env=env)
        _, ready = systemd.wait_for({"READY": "1"})
        assert ready["STATUS"] == "serving 0 connections"
        # READY=1 comes once the port accepts connections.
        socket.create_connection((broker.host, broker.port), timeout=5).close()
        mark = systemd.mark()
        systemd.wait_for({"WATCHDOG": "1"}, since=mark)
        systemd.wait_for({"WATCHDOG": "1"}, since=systemd.mark())

        alice = joined(node_client_factory, broker, "alice", ALICE_TOKEN)
        systemd.wait_for({"STATUS": "serving 1 connection"})
        broker.send_signal(signal.SIGTERM)
        _, stopping = systemd.wait_for({"STOPPING": "1"})
        assert stopping["STATUS"].startswith("draining")
        alice.expect({"type": "close", "code": 1001})
        assert broker.wait() == 0


# -- reload ----------------------------------------------------------------------------


def test_reload_applies_a_good_config_and_refuses_a_broken_one_while_clients_stay(
    broker_factory: BrokerFactory, node_client_factory: NodeClientFactory, systemd: NotifySocket
) -> None:
    broker = start_unit(broker_factory, config(), env=systemd.env())
    systemd.wait_for({"READY": "1"})
    alice = joined(node_client_factory, broker, "alice", ALICE_TOKEN)
    bob = joined(node_client_factory, broker, "bob", BOB_TOKEN)
    relay_reaches(alice, bob, "before")
    assert alice.call(TOPIC, "ping", {"n": 1})["status"] == "error"  # no echo rule yet

    # A good config through the unit's ExecReload= lines (check-config, then SIGHUP).
    broker.config_path.write_text(tomli_w.dumps(config(echo=("ping",))))
    mark, notes = broker.mark(), systemd.mark()
    results = run_commands("ExecReload", str(broker.config_path), MAINPID=str(broker.pid))
    assert [r.returncode for r in results] == [0, 0], results
    index, reloading = systemd.wait_for({"RELOADING": "1"}, since=notes)
    assert int(reloading["MONOTONIC_USEC"]) > 0
    _, ready = systemd.wait_for({"READY": "1"}, since=index + 1)
    assert ready["STATUS"].startswith("serving 2 connections; config reloaded at ")
    broker.wait_for_log(r"reloaded config from .*: 1 topic patterns, 2 static tokens", since=mark)
    reply = alice.call(TOPIC, "ping", {"n": 2})
    assert (reply["status"], reply["response"]) == ("ok", {"n": 2})  # the new rule
    relay_reaches(bob, alice, "after a good reload")

    # A broken config: the unit's ExecReload= stops at check-config (systemctl reload
    # fails), and a SIGHUP sent anyway is refused by the daemon with one log line.
    broken = config()
    broken["topics"][0]["relay"] = "new_msg"  # a string where a list belongs
    broker.config_path.write_text(tomli_w.dumps(broken))
    results = run_commands("ExecReload", str(broker.config_path), MAINPID=str(broker.pid))
    assert [r.returncode for r in results] == [2]
    assert results[0].stderr.count("\n") == 1 and str(broker.config_path) in results[0].stderr
    mark, notes = broker.mark(), systemd.mark()
    broker.send_signal(signal.SIGHUP)
    index, _ = systemd.wait_for({"RELOADING": "1"}, since=notes)
    _, ready = systemd.wait_for({"READY": "1"}, since=index + 1)
    assert "reload refused" in ready["STATUS"]
    refused = broker.wait_for_log("reload refused", since=mark).string
    assert refused.endswith(
        f"reload refused, keeping the running config: config error in {broker.config_path} "
        "at topics[0].relay: expected a list of strings, got str 'new_msg'"
    )
    reply = alice.call(TOPIC, "ping", {"n": 3})
    assert (reply["status"], reply["response"]) == ("ok", {"n": 3})  # still the good rules
    relay_reaches(alice, bob, "after a refused reload")
    assert broker.lines[mark:] == [refused], "the refusal is one line, and the only one"

    for client in (alice, bob):
        assert client.seen({"type": "close"}) == [], "a reload closed a socket"
        assert client.seen({"type": "channel_close"}) == []
        assert client.seen({"type": "channel_error"}) == []


def test_phxbroker_reload_is_logged_and_notified_like_sighup(
    broker_factory: BrokerFactory, systemd: NotifySocket
) -> None:
    broker = start_unit(broker_factory, config(), env=systemd.env())
    systemd.wait_for({"READY": "1"})
    reload = [*localize(["/opt/phxbroker/bin/phxbroker"], ""), "reload", "--config"]

    broken = config()
    broken["admin"] = {"socket": "admin.sock"}  # where the CLI finds this daemon
    broken["topics"][0]["join"] = "everyone"
    broker.config_path.write_text(tomli_w.dumps(broken))
    mark, notes = broker.mark(), systemd.mark()
    result = subprocess.run([*reload, str(broker.config_path)], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "reload refused, the running config is kept: " in result.stderr
    assert "at topics[0].join" in result.stderr
    index, _ = systemd.wait_for({"RELOADING": "1"}, since=notes)
    _, ready = systemd.wait_for({"READY": "1"}, since=index + 1)
    assert "reload refused" in ready["STATUS"]
    refused = broker.wait_for_log("reload refused", since=mark).string
    assert "at topics[0].join" in refused and broker.lines[mark:] == [refused]

    good = {**config(echo=("ping",)), "admin": {"socket": "admin.sock"}}
    broker.config_path.write_text(tomli_w.dumps(good))
    notes = systemd.mark()
    result = subprocess.run([*reload, str(broker.config_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    _, ready = systemd.wait_for({"READY": "1"}, since=notes)
    assert "config reloaded at" in ready["STATUS"]


# -- drain -----------------------------------------------------------------------------


def test_sigterm_drains_phoenix_clients_with_1001_and_they_try_to_reconnect(
    broker_factory: BrokerFactory, node_client_factory: NodeClientFactory, systemd: NotifySocket
) -> None:
    broker = start_unit(broker_factory, config(drain_timeout=30), env=systemd.env())
    alice = joined(node_client_factory, broker, "alice", ALICE_TOKEN)
    bob = joined(node_client_factory, broker, "bob", BOB_TOKEN)
    mark = broker.mark()
    broker.send_signal(signal.SIGTERM)
    systemd.wait_for({"STOPPING": "1"})
    for client in (alice, bob):
        close = client.expect({"type": "close"})
        assert close["code"] == 1001, close
        client.expect({"type": "error"})  # phoenix.js tried again; nobody listens any more
    assert broker.wait() == 0
    broker.wait_for_log(r"draining: stopped accepting; closing 2 websockets with 1001", since=mark)
    broker.wait_for_log(r"drained in [\d.]+ s: every connection closed", since=mark)
    assert "drain timeout" not in broker.log_text


def test_sigterm_ends_long_poll_sessions_and_phoenix_js_tries_to_reconnect(
    broker_factory: BrokerFactory, node_client_factory: NodeClientFactory
) -> None:
    broker = start_unit(broker_factory, config(drain_timeout=30))
    alice = node_client_factory("alice")
    alice.connect(
        broker.socket_url(), {"token": ALICE_TOKEN}, transport="longpoll", reconnectAfterMs=[100]
    )
    alice.expect_open()
    assert alice.join(TOPIC)["status"] == "ok"
    mark = broker.mark()
    broker.send_signal(signal.SIGTERM)
    # A poll held at that moment is answered 410, which phoenix.js 1.8 reads as "session
    # gone" (3410); one between two polls finds the listener closed (1011). Either way it
    # tries to reconnect.
    assert alice.expect({"type": "close"})["code"] in (3410, 1011)
    alice.expect({"type": "error"})
    assert broker.wait() == 0
    broker.wait_for_log(r"closing 0 websockets with 1001 and 1 long-poll sessions", since=mark)
    broker.wait_for_log(r"drained in [\d.]+ s: every connection closed", since=mark)


def test_a_client_that_ignores_the_close_is_cut_at_the_drain_timeout(
    broker_factory: BrokerFactory, node_client_factory: NodeClientFactory
) -> None:
    broker = start_unit(broker_factory, config(drain_timeout=1))
    alice = joined(node_client_factory, broker, "alice", ALICE_TOKEN)
    deaf = raw_websocket(broker, BOB_TOKEN)
    broker.send_signal(signal.SIGTERM)
    alice.expect({"type": "close", "code": 1001})
    assert broker.wait() == 0
    broker.wait_for_log(r"drain timeout after 1 s: cutting 1 connections that did not close")
    # The deaf client was sent the close frame, then its connection was cut.
    deaf.settimeout(5)
    received = read_until_closed(deaf)
    assert received.startswith(b"\x88") and received[4:].startswith(b"server shutting down")
    deaf.close()


def test_a_drain_timeout_longer_than_the_close_handshake_grace_is_honoured(
    broker_factory: BrokerFactory,
) -> None:
    """The idle sweeper aborts a connection stuck closing after 5 s, but not during a drain:
    there the client gets the whole drain timeout."""
    broker = start_unit(broker_factory, config(drain_timeout=7))
    deaf = raw_websocket(broker, BOB_TOKEN)
    broker.send_signal(signal.SIGTERM)
    broker.wait_for_log(r"drain timeout after 7 s: cutting 1 connections", timeout=15)
    assert broker.wait() == 0
    deaf.close()


def test_a_second_sigterm_during_the_drain_stops_at_once(broker_factory: BrokerFactory) -> None:
    broker = start_unit(broker_factory, config(drain_timeout=600))
    deaf = raw_websocket(broker, BOB_TOKEN)
    broker.send_signal(signal.SIGTERM)
    broker.wait_for_log(r"draining: stopped accepting")
    broker.send_signal(signal.SIGTERM)
    assert broker.wait(timeout=10) == 0
    broker.wait_for_log(r"received SIGTERM again: stopping without waiting")
    broker.wait_for_log(r"stopping now: cutting 1 connections")
    deaf.close()


def test_sigint_drains_like_sigterm(
    broker_factory: BrokerFactory, node_client_factory: NodeClientFactory
) -> None:
    broker = start_unit(broker_factory, config())
    alice = joined(node_client_factory, broker, "alice", ALICE_TOKEN)
    broker.send_signal(signal.SIGINT)
    alice.expect({"type": "close", "code": 1001})
    assert broker.wait() == 0
    broker.wait_for_log(r"received SIGINT: shutting down")
    broker.wait_for_log(r"drained in")


# -- logs ------------------------------------------------------------------------------

SECRETS = [ALICE_TOKEN, BOB_TOKEN, SHARED_PASS, "eyJzdWIiOiJldmUifQ", "bearer-Qm8-secret"]


def send_raw(broker: BrokerProcess, request: bytes) -> bytes:
    with socket.create_connection((broker.host, broker.port), timeout=5) as sock:
        sock.sendall(request)
        return read_until_closed(sock)


@pytest.mark.parametrize("shape", ["text", "journald", "json"])
def test_no_token_reaches_the_log(
    shape: str, broker_factory: BrokerFactory, node_client_factory: NodeClientFactory
) -> None:
    cfg = config(level="debug", format="json" if shape == "json" else "text")
    cfg["auth"]["tokens"].append({"user": "*", "token": SHARED_PASS})
    cfg["auth"]["user_param"] = "user"
    broker = start_unit(broker_factory, cfg, journald=shape == "journald")

    # Tokens as phoenix.js sends them: in the query string and as the authToken subprotocol.
    alice = node_client_factory("alice")
    alice.connect(broker.socket_url(), {"token": ALICE_TOKEN})
    alice.expect_open()
    bob = node_client_factory("bob")
    bob.connect(broker.socket_url(), {}, authToken=BOB_TOKEN)
    bob.expect_open()
    eve = node_client_factory("eve")
    eve.connect(broker.socket_url(), {"token": SHARED_PASS, "user": "eve"})
    eve.expect_open()
    # Malformed requests carrying secrets (h11 quotes such lines in its errors).
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJldmUifQ.c2ln"
    bad_requests = [
        f"GET /socket/websocket?vsn=2.0.0&token={ALICE_TOKEN} HTTP/1.1 extra\r\n\r\n",
        f"GET /socket/websocket?user=x&token={SHARED_PASS} HTTP/1.1 extra\r\n\r\n",
        f"GET /socket/{jwt} HTTP/1.1 extra\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer bearer-Qm8-secret\r\n\r\n",
    ]
    for request in bad_requests:
        assert send_raw(broker, request.encode()).startswith(b"HTTP/1.1 400")
    # A client that appends its params with a second "?" sends its token inside vsn, and
    # the refusal names the vsn it got.
    glued = f"/socket/websocket?vsn=2.0.0?token={BOB_TOKEN}"
    answer = send_raw(broker, f"GET {glued} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403")
    broker.send_signal(signal.SIGHUP)
    broker.wait_for_log("reloaded config")
    assert broker.stop() == 0

    lines = broker.lines
    quoted = [line for line in lines if "bad HTTP request" in line]
    assert len(quoted) == len(bad_requests), "the malformed requests were logged"
    [vsn] = [line for line in lines if "unsupported vsn" in line]
    assert "unsupported vsn '2.0.0?token=[redacted]'" in vsn, vsn
    for secret in SECRETS:
        assert secret not in broker.log_text, f"{secret!r} was logged"
    if shape == "journald":
        assert all(re.match(r"<[2-7]>", line) for line in lines), lines
        assert not any(re.match(r"<\d>\d{4}-\d\d-\d\dT", line) for line in lines)
        assert any(line.startswith("<7>") for line in lines)  # debug lines keep their level
    if shape == "json":
        events = [orjson.loads(line) for line in lines]
        assert {"time", "level", "logger", "message"} <= set(events[0])
        assert any(e["message"].startswith("listening on") for e in events)
