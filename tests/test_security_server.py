"""Refusals as the running server counts them, secrets kept out of stats, and reloads that
rotate a key. Each test runs a real server in-process and talks to it over real sockets."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest
import trio
from support.daemon import serve
from support.phoenix_token_mint import mint
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from phxbroker.config.settings import load_config
from phxbroker.daemon.assembly import Daemon

JWT_SECRET = "in-process-jwt-secret-0123456789abcdef"
SKB = "in-process-secret-key-base-0123456789abcdefghijklmnopqrstuvwxyz"
TIMEOUT = 5

CONFIG = """
[server]
listen = "127.0.0.1:0"
max_frame_size = 1024
max_channels = 2
check_origin = ["https://app.example.com"]
[auth]
[[auth.tokens]]
user = "carol"
token = "carol-static-token"
[auth.jwt]
secret_env = "PHX_JWT_SECRET"
[auth.phoenix_token]
secret_key_base_env = "PHX_SECRET_KEY_BASE"
[[topics]]
pattern = "room:*"
echo = ["ping"]
[limits]
max_connections_per_ip = 3
message_rate = 0.001  # refills too slowly to matter during a test
message_burst = 4
rate_limit_close_after = 3
"""


@pytest.fixture(autouse=True)
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHX_JWT_SECRET", JWT_SECRET)
    monkeypatch.setenv("PHX_SECRET_KEY_BASE", SKB)


def url(port: int, token: str) -> str:
    return f"ws://127.0.0.1:{port}/socket/websocket?token={token}&vsn=2.0.0"


def a_jwt(sub: str = "42", exp_in: float = 60, key: str = JWT_SECRET) -> str:
    return jwt.encode({"sub": sub, "exp": time.time() + exp_in}, key, "HS256")


def a_phoenix_token(salt: str = "user socket") -> str:
    return mint(42, secret_key_base=SKB, salt=salt, signed_at_ms=int(time.time() * 1000))


async def rejected(port: int, token: str, **headers: str) -> int:
    with pytest.raises(ConnectionRejected) as refused:
        async with open_websocket_url(url(port, token), extra_headers=list(headers.items())):
            pass
    return refused.value.status_code


async def until_closed(server: Daemon) -> None:
    """Wait until the server has seen every client connection close."""
    with trio.fail_after(TIMEOUT):
        while server.admission.connections.total:
            await trio.sleep(0.01)


async def call(ws, ref: str, topic: str, event: str, payload: object) -> list:
    await ws.send_message(json.dumps(["1", ref, topic, event, payload]))
    with trio.fail_after(TIMEOUT):
        while True:
            frame = json.loads(await ws.get_message())
            if frame[1] == ref:
                return frame


async def test_refusals_are_counted_by_reason_and_stats_hold_no_secret() -> None:
    good, expired = a_jwt(), a_jwt(exp_in=-10)
    wrong_salt = a_phoenix_token("other salt")
    async with serve(CONFIG) as (server, port):
        assert await rejected(port, expired) == 403
        assert await rejected(port, wrong_salt) == 403
        assert await rejected(port, good, origin="https://evil.example.com") == 403

        async with open_websocket_url(url(port, good)) as ws:
            await call(ws, "1", "room:a", "phx_join", {})
            await call(ws, "2", "room:b", "phx_join", {})
            too_many = await call(ws, "3", "room:c", "phx_join", {})
            assert too_many[4] == {
                "status": "error",
                "response": {"reason": "too many channels joined"},
            }
            # The three joins and this ping use up the burst of 4.
            assert (await call(ws, "4", "room:a", "ping", {}))[4]["status"] == "ok"
            for n in range(2):
                reply = await call(ws, f"p{n}", "room:a", "ping", {})
                assert reply[4] == {"status": "error", "response": {"reason": "rate limited"}}
        # Three connections from one address are allowed; a fourth is not.
        await until_closed(server)
        async with (
            open_websocket_url(url(port, "carol-static-token")),
            open_websocket_url(url(port, "carol-static-token")),
            open_websocket_url(url(port, "carol-static-token")),
        ):
            assert await rejected(port, "carol-static-token") == 429
        async with open_websocket_url(url(port, good)) as ws:
            await ws.send_message("x" * 2000)
            with pytest.raises(ConnectionClosed), trio.fail_after(TIMEOUT):
                await ws.get_message()

        refusals = server.stats.refusals
        assert refusals["jwt_expired"] == 1
        assert refusals["phoenix_token_invalid"] == 1
        assert refusals["origin"] == 1
        assert refusals["too_many_channels"] == 1
        assert refusals["rate_limited"] == 2
        assert refusals["too_many_connections_per_ip"] == 1
        assert refusals["message_too_big"] == 1
        assert server.stats.auth_failures == 2
        snapshot = json.dumps(server.stats.snapshot())
        for secret in (good, expired, wrong_salt, JWT_SECRET, SKB, "carol-static-token"):
            assert secret not in snapshot


async def test_a_flooding_connection_is_closed_with_1008_and_others_carry_on() -> None:
    async with serve(CONFIG) as (server, port):
        async with (
            open_websocket_url(url(port, a_jwt("flooder"))) as flooder,
            open_websocket_url(url(port, a_jwt("calm"))) as calm,
        ):
            await call(calm, "1", "room:a", "phx_join", {})
            for n in range(10):
                await flooder.send_message(json.dumps([None, str(n), "phoenix", "heartbeat", {}]))
            replies = []
            with pytest.raises(ConnectionClosed) as closed, trio.fail_after(TIMEOUT):
                while True:
                    replies.append(json.loads(await flooder.get_message()))
            assert closed.value.reason.code == 1008
            statuses = [r[4]["status"] for r in replies]
            # Four allowed (the burst), three refused with an error reply, then the close.
            assert statuses == ["ok"] * 4 + ["error"] * 3
            assert (await call(calm, "2", "room:a", "ping", {"n": 1}))[4]["response"] == {"n": 1}
        assert server.stats.refusals["rate_limit_close"] == 1


async def test_a_reload_that_rotates_the_jwt_secret_closes_only_sockets_it_admitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "jwt.secret"
    secret_file.write_text(JWT_SECRET)
    config_file = tmp_path / "phxbroker.toml"
    config_file.write_text(
        CONFIG.replace('secret_env = "PHX_JWT_SECRET"', 'secret_file = "jwt.secret"')
    )
    async with (
        serve(load_config(config_file)) as (server, port),
        open_websocket_url(url(port, a_jwt())) as by_jwt,
        open_websocket_url(url(port, "carol-static-token")) as by_static,
    ):
        secret_file.write_text("a-brand-new-jwt-secret-0123456789abcdef\n")
        assert await server.reload()
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(TIMEOUT):
            await by_jwt.get_message()
        assert closed.value.reason.code == 1001
        assert (await call(by_static, "1", "room:a", "phx_join", {}))[4]["status"] == "ok"
        assert await rejected(port, a_jwt()) == 403
        new_key = "a-brand-new-jwt-secret-0123456789abcdef"
        async with open_websocket_url(url(port, a_jwt(key=new_key))) as fresh:
            assert (await call(fresh, "1", "room:a", "phx_join", {}))[4]["status"] == "ok"
