"""The admin control protocol (sans-io), bans and durations, and the control socket of a
real in-process server."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import httpx
import pytest
import trio
from support.daemon import serve
from trio_websocket import ConnectionRejected, open_websocket_url

from phxbroker.auth.bans import Bans, parse_duration
from phxbroker.cli.control_client import AdminClient, DaemonUnreachable
from phxbroker.config.settings import parse_config
from phxbroker.daemon.assembly import Daemon, StartupError
from phxbroker.ops import control_protocol
from phxbroker.ops.control_protocol import AdminError, AdminProtocolError, LineBuffer

# -- protocol ------------------------------------------------------------------------------


def test_a_request_round_trips_without_its_unset_arguments() -> None:
    line = control_protocol.encode_request("kick", user="alice", topic=None, reason="spam", ban=600)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    request = control_protocol.decode_request(line)
    assert (request.command, request.args) == (
        "kick",
        {"user": "alice", "reason": "spam", "ban": 600},
    )


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b"not json", ("not a JSON line",)),
        (b"[1]", ("JSON object",)),
        (b'{"command": "explode"}', ("unknown command 'explode'", "stats")),
        (b'{"args": {}}', ("unknown command None",)),
        (b'{"command": "kick", "args": {}}', ("kick needs the argument 'user'",)),
        (b'{"command": "kick", "args": {"user": ""}}', ("needs the argument 'user'",)),
        (b'{"command": "kick", "args": {"user": "a", "ban": "10m"}}', ("'ban'", "wrong type")),
        (b'{"command": "kick", "args": {"user": "a", "ban": true}}', ("'ban'", "wrong type")),
        (b'{"command": "stats", "args": {"x": 1}}', ("stats takes no argument 'x'",)),
        (b'{"command": "publish", "args": []}', ('"args" of publish',)),
        (
            b'{"command": "publish", "args": {"topic": "t", "event": "e", "payload": [1]}}',
            ("'payload'",),
        ),
    ],
)
def test_bad_requests_are_refused_with_a_sentence(line: bytes, words: tuple[str, ...]) -> None:
    with pytest.raises(AdminProtocolError) as info:
        control_protocol.decode_request(line)
    for word in words:
        assert word in str(info.value)


def test_responses_carry_a_result_or_the_daemons_sentence() -> None:
    assert control_protocol.decode_response(control_protocol.encode_result({"closed": 2})) == {
        "closed": 2
    }
    with pytest.raises(AdminError, match=r"^no such thing$"):
        control_protocol.decode_response(control_protocol.encode_error("no such thing"))
    with pytest.raises(AdminProtocolError):
        control_protocol.decode_response(b'{"result": 1}')


def test_the_line_buffer_splits_a_stream_and_bounds_a_line() -> None:
    lines = LineBuffer(limit=16)
    assert lines.feed(b'{"a"') == []
    assert lines.partial
    assert lines.feed(b':1}\n\n{"b":2}\n{') == [b'{"a":1}', b'{"b":2}']
    with pytest.raises(AdminProtocolError, match="longer than 16 bytes"):
        lines.feed(b"x" * 20)
    with pytest.raises(AdminProtocolError, match="longer than 16 bytes"):
        LineBuffer(limit=16).feed(b"y" * 20 + b"\n")


# -- bans ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400),
     ("1.5m", 90), (" 10 m ", 600)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10x", "m", "-5m", "0s", "10m5", "ten minutes"])
def test_bad_durations_say_what_a_duration_looks_like(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_a_ban_lasts_its_time_and_can_be_lifted() -> None:
    now = [100.0]
    bans = Bans(clock=lambda: now[0])
    bans.ban("alice", 60)
    bans.ban("bob", 10)
    assert bans.remaining("alice") == 60
    now[0] += 30
    assert bans.remaining("bob") is None  # expired
    assert bans.active() == {"alice": 30}
    assert bans.lift("alice") is True
    assert bans.lift("alice") is False
    assert bans.remaining("alice") is None


def test_a_banned_user_is_refused_whatever_the_token() -> None:
    from phxbroker.auth.authenticator import Authenticator, Refused

    config = parse_config({"auth": {"tokens": [{"user": "alice", "token": "t"}]}})
    bans = Bans()
    authenticator = Authenticator(config.auth, bans)
    assert authenticator.authenticate({"token": "t"}).user == "alice"
    bans.ban("alice", 60)
    with pytest.raises(Refused) as info:
        authenticator.authenticate({"token": "t"})
    assert info.value.reason == "banned"
    assert "banned" in str(info.value)


async def test_a_ban_refuses_websocket_and_long_poll_connects_alike(tmp_path: Path) -> None:
    async with serve(config_with_socket(tmp_path / "control_protocol.sock")) as (server, port):
        server.bans.ban("alice", 60)
        url = f"ws://127.0.0.1:{port}/socket/websocket?token=alice-token&vsn=2.0.0"
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(url):
                pass
        assert info.value.status_code == 403
        async with httpx.AsyncClient() as client:
            poll = await client.get(
                f"http://127.0.0.1:{port}/socket/longpoll?token=alice-token&vsn=2.0.0"
            )
        assert poll.json() == {"status": 403}
        assert server.stats.refusals["banned"] == 2
        assert server.stats.auth_failures == 0
        server.bans.lift("alice")
        async with open_websocket_url(url):
            pass


# -- the control socket --------------------------------------------------------------------


def config_with_socket(path: Path, mode: int | None = None) -> str:
    mode_line = f"mode = {oct(mode)}" if mode is not None else ""
    return f"""
[server]
listen = "127.0.0.1:0"
[admin]
socket = "{path}"
{mode_line}
[[auth.tokens]]
user = "alice"
token = "alice-token"
[[topics]]
pattern = "room:*"
"""


async def call(path: Path, command: str, **args):
    def run():
        with AdminClient(path, timeout=5) as client:
            return client.call(command, **args)

    return await trio.to_thread.run_sync(run)


async def test_the_control_socket_is_0600_answers_and_is_removed_at_exit(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control_protocol.sock"
    async with serve(config_with_socket(path)):
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        report = await call(path, "stats")
        assert report["connections"] == 0 and report["pid"] == os.getpid()
        with pytest.raises(AdminError, match="reserved"):
            await call(path, "publish", topic="room:a", event="phx_close")
        assert await call(path, "publish", topic="room:a", event="e") == {"subscribers": 0}
    assert not path.exists()


async def test_a_configured_mode_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "control_protocol.sock"
    async with serve(config_with_socket(path, 0o660)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


async def test_a_socket_left_by_a_dead_daemon_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "control_protocol.sock"
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(path))
    leftover.close()  # the file stays, nobody listens
    async with serve(config_with_socket(path)):
        assert (await call(path, "stats"))["connections"] == 0


async def test_a_second_daemon_on_the_same_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "control_protocol.sock"
    async with serve(config_with_socket(path)):
        import tomllib

        second = Daemon(parse_config(tomllib.loads(config_with_socket(path)), "<second>"))
        with pytest.raises(StartupError, match=f"another phxbroker is already serving {path}"):
            await second.serve()
        assert (await call(path, "stats"))["connections"] == 0  # the first one is untouched


async def test_a_file_in_the_way_is_never_removed(tmp_path: Path) -> None:
    path = tmp_path / "control_protocol.sock"
    path.write_text("precious")
    import tomllib

    server = Daemon(parse_config(tomllib.loads(config_with_socket(path)), "<cfg>"))
    with pytest.raises(StartupError, match="exists and is not a socket"):
        await server.serve()
    assert path.read_text() == "precious"


async def test_one_connection_carries_many_requests_and_bad_lines_get_errors(
    tmp_path: Path,
) -> None:
    path = tmp_path / "control_protocol.sock"
    async with serve(config_with_socket(path)):
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(b'{"command": "topics"}\n{"command": "nope"}\nnot json\n')
            data = b""
            with trio.fail_after(5):
                while data.count(b"\n") < 3:
                    data += await stream.receive_some()
        first, second, third = (json.loads(line) for line in data.splitlines())
        assert first == {"ok": True, "result": []}
        assert second["ok"] is False and "unknown command 'nope'" in second["error"]
        assert third["ok"] is False and "not a JSON line" in third["error"]


def test_the_client_says_in_one_sentence_when_no_daemon_runs(tmp_path: Path) -> None:
    path = tmp_path / "control_protocol.sock"
    with pytest.raises(DaemonUnreachable) as info:
        AdminClient(path)
    assert str(info.value) == f"no phxbroker is running: cannot connect to {path}"
