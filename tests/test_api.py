"""The HTTP API for app back ends, spoken over real HTTP to a real server.

Every route with good and bad keys and bodies: the answers are JSON with the right status,
errors are one sentence naming what is wrong, and what a good request does is seen by real
websocket clients.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
from support.daemon import serve
from support.websocket_client import expect_close, roundtrip_ok
from trio_websocket import WebSocketConnection, open_websocket_url

KEY = "backend-key"
HASHED_KEY = "ops-key"
MAX_BODY = 512

CONFIG = f"""
[server]
listen = "127.0.0.1:0"
handshake_timeout = 2

[api]
max_body_size = {MAX_BODY}
[[api.keys]]
name = "backend"
key = "{KEY}"
[[api.keys]]
name = "ops"
key_sha256 = "{hashlib.sha256(HASHED_KEY.encode()).hexdigest()}"

[[auth.tokens]]
user = "alice"
token = "alice-token"
[[auth.tokens]]
user = "bob"
token = "bob-token"

[[topics]]
pattern = "room:*"
echo = ["ping"]
"""

NO_KEYS = """
[server]
listen = "127.0.0.1:0"
"""

TIMEOUT = 5


def auth(key: str = KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@asynccontextmanager
async def api(config: str = CONFIG) -> AsyncIterator[tuple[httpx.AsyncClient, int]]:
    async with (
        serve(config) as (_server, port),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client,
    ):
        yield client, port


@asynccontextmanager
async def joined(port: int, token: str, topic: str) -> AsyncIterator[WebSocketConnection]:
    url = f"ws://127.0.0.1:{port}/socket/websocket?token={token}&vsn=2.0.0"
    async with open_websocket_url(url) as ws:
        await ws.send_message(json.dumps(["1", "1", topic, "phx_join", {}]))
        with trio.fail_after(TIMEOUT):
            reply = json.loads(await ws.get_message())
        assert reply[3:] == ["phx_reply", {"status": "ok", "response": {}}]
        yield ws


async def next_frame(ws: WebSocketConnection) -> list:
    with trio.fail_after(TIMEOUT):
        return json.loads(await ws.get_message())


def assert_error(response: httpx.Response, status: int, *words: str) -> str:
    """The status, a JSON body {"error": "<one sentence>"}, and the words it must name."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"], body
    message = body["error"]
    assert message and "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, message
    return message


# -- broadcast -----------------------------------------------------------------------------


async def test_broadcast_reaches_the_topic_and_says_how_many_it_reached() -> None:
    async with (
        api() as (client, port),
        joined(port, "alice-token", "room:lobby") as alice,
        joined(port, "bob-token", "room:lobby") as bob,
    ):
        body = {"topic": "room:lobby", "event": "announce", "payload": {"text": "hi"}}
        response = await client.post("/api/broadcast", json=body, headers=auth())

        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {"ok": True, "subscribers": 2}
        for ws in (alice, bob):
            assert await next_frame(ws) == [None, None, "room:lobby", "announce", {"text": "hi"}]


async def test_broadcast_to_a_topic_nobody_joined_reaches_nobody() -> None:
    async with api() as (client, _port):
        body = {"topic": "room:empty", "event": "announce", "payload": {}}
        response = await client.post("/api/broadcast", json=body, headers=auth())
        assert response.json() == {"ok": True, "subscribers": 0}


async def test_a_key_stored_as_its_sha256_is_accepted() -> None:
    async with api() as (client, port), joined(port, "alice-token", "room:lobby") as alice:
        body = {"topic": "room:lobby", "event": "announce"}  # payload defaults to {}
        response = await client.post("/api/broadcast", json=body, headers=auth(HASHED_KEY))
        assert response.json() == {"ok": True, "subscribers": 1}
        assert await next_frame(alice) == [None, None, "room:lobby", "announce", {}]


@pytest.mark.parametrize(
    ("headers", "challenge"),
    [
        ({}, 'Bearer realm="phxbroker"'),
        ({"authorization": "Basic YWxpY2U6cHc="}, 'Bearer realm="phxbroker"'),
        ({"authorization": "Bearer"}, 'Bearer realm="phxbroker"'),
        (auth("wrong-key"), 'Bearer realm="phxbroker", error="invalid_token"'),
        (auth(hashlib.sha256(HASHED_KEY.encode()).hexdigest()), 'error="invalid_token"'),
    ],
    ids=["missing", "basic", "empty", "wrong", "the-digest-itself"],
)
async def test_requests_without_a_valid_key_get_401(headers, challenge) -> None:
    async with api() as (client, port), joined(port, "alice-token", "room:lobby") as alice:
        body = {"topic": "room:lobby", "event": "announce", "payload": {}}
        for method, path, kwargs in (
            ("POST", "/api/broadcast", {"json": body}),
            ("POST", "/api/disconnect", {"json": {"user": "alice"}}),
            ("GET", "/api/stats", {}),
        ):
            response = await client.request(method, path, headers=headers, **kwargs)
            assert_error(response, 401, "key")
            assert challenge in response.headers["www-authenticate"]
        # Nothing was broadcast and alice is still connected: her heartbeat is answered.
        await alice.send_message('[null,"9","phoenix","heartbeat",{}]')
        assert (await next_frame(alice))[1] == "9"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", ("not valid JSON",)),
        (b"", ("empty",)),
        (b"[1, 2]", ("JSON object", "array")),
        (b'{"event": "e", "payload": {}}', ('"topic"', "required")),
        (b'{"topic": 5, "event": "e"}', ('"topic"', "string", "an integer")),
        (b'{"topic": "", "event": "e"}', ('"topic"', "non-empty")),
        (b'{"topic": "room:a", "event": null}', ('"event"', "required")),
        (b'{"topic": "room:a", "event": "e", "payload": [1]}', ('"payload"', "object")),
        (b'{"topic": "room:a", "event": "e", "payload": "x"}', ('"payload"', "string")),
        (b'{"topic": "room:a", "event": "e", "paylaod": {}}', ('"paylaod"', "unknown")),
    ],
)
async def test_bad_broadcast_bodies_get_400_naming_the_problem(body, words) -> None:
    async with api() as (client, port):
        response = await client.post("/api/broadcast", content=body, headers=auth())
        assert_error(response, 400, *words)
        # The connection is still good for the next request, and other clients unharmed.
        again = await client.get("/api/stats", headers=auth())
        assert again.status_code == 200
        await roundtrip_ok(port)


# -- disconnect ----------------------------------------------------------------------------


async def test_disconnect_closes_every_socket_of_the_user_with_1001() -> None:
    async with (
        api() as (client, port),
        joined(port, "alice-token", "room:a") as alice1,
        joined(port, "alice-token", "room:b") as alice2,
        joined(port, "bob-token", "room:a") as bob,
    ):
        response = await client.post("/api/disconnect", json={"user": "alice"}, headers=auth())

        assert response.status_code == 200
        assert response.json() == {"ok": True, "connections": 2}
        await expect_close(alice1, 1001)
        await expect_close(alice2, 1001)
        await bob.send_message('[null,"7","phoenix","heartbeat",{}]')
        assert (await next_frame(bob))[1] == "7"

        again = await client.post("/api/disconnect", json={"user": "alice"}, headers=auth())
        assert again.json() == {"ok": True, "connections": 0}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{}", ('"user"', "required")),
        (b'{"user": ["alice"]}', ('"user"', "array")),
        (b'{"user": "alice", "reason": "x"}', ('"reason"', "unknown")),
        (b'"alice"', ("JSON object", "a string")),
    ],
)
async def test_bad_disconnect_bodies_get_400(body, words) -> None:
    async with api() as (client, port), joined(port, "alice-token", "room:a") as alice:
        response = await client.post("/api/disconnect", content=body, headers=auth())
        assert_error(response, 400, *words)
        await alice.send_message('[null,"8","phoenix","heartbeat",{}]')
        assert (await next_frame(alice))[1] == "8"


# -- stats ---------------------------------------------------------------------------------


async def test_stats_reports_connections_topics_and_counters() -> None:
    async with (
        api() as (client, port),
        joined(port, "alice-token", "room:lobby"),
        joined(port, "bob-token", "room:lobby"),
    ):
        response = await client.get("/api/stats", headers=auth())

    assert response.status_code == 200
    report = response.json()
    assert report["connections"] == 2
    assert report["channels"] == 2
    assert report["user_count"] == 2
    assert report["topic_count"] == 1
    assert report["topics"] == [
        {"topic": "room:lobby", "subscribers": 2, "users": 2, "presences": None, "hits": 0}
    ]
    assert report["counters"]["joins"] == 2
    assert report["counters"]["messages_in"] == 2  # the two joins, each counted once
    assert report["counters"]["bytes_in"] > 0
    assert report["uptime"] > 0
    assert report["rss_bytes"] > 1_000_000


# -- routing and limits --------------------------------------------------------------------


async def test_unknown_api_paths_get_a_json_404_and_wrong_methods_a_json_405() -> None:
    async with api() as (client, _port):
        assert_error(await client.get("/api/nope", headers=auth()), 404, "/api/nope")
        assert_error(await client.post("/api/stats", headers=auth()), 405, "GET")
        response = await client.get("/api/broadcast", headers=auth())
        assert_error(response, 405, "POST", "GET")
        assert response.headers["allow"] == "POST"
        # Outside /api/ the front door's own answers are unchanged.
        assert (await client.get("/nope")).status_code == 404


async def test_without_keys_the_api_is_off() -> None:
    async with api(NO_KEYS) as (client, _port):
        body = {"topic": "room:a", "event": "e"}
        for response in (
            await client.post("/api/broadcast", json=body),
            await client.post("/api/broadcast", json=body, headers=auth()),
            await client.get("/api/stats"),
        ):
            assert_error(response, 404, "[api] keys")


async def test_a_body_over_max_body_size_is_refused_before_it_is_read() -> None:
    async with api() as (_client, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            # Only the head is sent: the answer must not wait for a body.
            await stream.send_all(
                b"POST /api/broadcast HTTP/1.1\r\nhost: x\r\n"
                b"authorization: Bearer " + KEY.encode() + b"\r\n"
                b"content-length: " + str(MAX_BODY + 1).encode() + b"\r\n\r\n"
            )
            response = await read_response(stream)
        assert response.startswith(b"HTTP/1.1 413 ")
        body = json.loads(response.split(b"\r\n\r\n", 1)[1])
        assert str(MAX_BODY) in body["error"] and "max_body_size" in body["error"]
        await roundtrip_ok(port)


async def test_a_chunked_body_over_max_body_size_gets_413() -> None:
    async with api() as (client, _port):

        async def chunks():
            for _ in range(MAX_BODY // 64 + 2):
                yield b" " * 64

        response = await client.post("/api/broadcast", content=chunks(), headers=auth())
        assert_error(response, 413, str(MAX_BODY))


async def test_a_client_expecting_100_continue_gets_it() -> None:
    async with api() as (_client, port):
        body = json.dumps({"topic": "room:a", "event": "e"}).encode()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                b"POST /api/broadcast HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
                b"connection: close\r\n"
                b"authorization: Bearer " + KEY.encode() + b"\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
            )
            with trio.fail_after(TIMEOUT):
                interim = await stream.receive_some()
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(body)
            response = await read_response(stream)
        assert response.startswith(b"HTTP/1.1 200 ")


async def read_response(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes (the error answers close)."""
    data = b""
    with trio.fail_after(TIMEOUT):
        while chunk := await stream.receive_some():
            data += chunk
    return data
