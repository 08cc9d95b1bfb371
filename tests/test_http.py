"""The HTTP front door under malformed, huge, slow and idle clients, over real sockets.

Each bad client gets a status (or is dropped) within the handshake timeout, and never
disturbs anybody else: after each case a well-behaved request is still answered.
"""

from __future__ import annotations

import json
import logging
import re
import socket

import pytest
import trio
from support.daemon import serve
from support.http_client import HttpClient, fetch

CONFIG = """
[server]
listen = "127.0.0.1:0"
handshake_timeout = 1
max_header_size = 4096
max_frame_size = 1_048_576
outbox_limit = 16_777_216

[longpoll]
window_ms = 30_000
max_post_size = 2_097_152

[[auth.tokens]]
user = "alice"
token = "alice-token"

[[topics]]
pattern = "room:*"
echo = ["ping"]
"""

TIMEOUT = 5
LP = "/socket/longpoll?token=alice-token&vsn=2.0.0"


async def raw_exchange(port: int, data: bytes, *, shut: bool = False) -> bytes:
    """Send `data` and return everything the server sends until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        if shut:
            await stream.send_eof()
        received = b""
        with trio.fail_after(TIMEOUT):
            while chunk := await stream.receive_some():
                received += chunk
    return received


async def still_serving(port: int) -> None:
    response = await fetch(port, "GET", "/healthz")
    assert (response.status, response.body) == (200, b"ok\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"z" * 8000 + b"\r\n\r\n", 431),
        (b"GET " + LP.encode() + b"&pad=" + b"p" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 431),
        (b"POST " + LP.encode() + b" HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
    ],
)
async def test_malformed_requests_get_a_status_and_a_closed_connection(
    request_bytes: bytes, status: int
) -> None:
    async with serve(CONFIG) as (server, port):
        answer = await raw_exchange(port, request_bytes)
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:80]
        assert b"connection: close" in answer.lower()
        assert server.stats.refusals == {"bad_http": 1}
        await still_serving(port)


async def test_a_client_trickling_its_request_head_gets_408() -> None:
    async with serve(CONFIG) as (_server, port):
        answer = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
        assert answer.startswith(b"HTTP/1.1 408 ")
        await still_serving(port)


async def test_a_client_trickling_its_post_body_gets_408() -> None:
    async with serve(CONFIG) as (_server, port):
        head = f"POST {LP} HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n".encode()
        answer = await raw_exchange(port, head + b"[null,")
        assert answer.startswith(b"HTTP/1.1 408 ")
        await still_serving(port)


async def test_an_idle_keep_alive_connection_is_closed_without_an_answer() -> None:
    async with serve(CONFIG) as (_server, port):
        async with await HttpClient.open(port) as client:
            assert (await client.request("GET", "/healthz")).status == 200
            # Nothing more is sent: the server closes the connection on its own.
            with trio.fail_after(TIMEOUT):
                assert await client.stream.receive_some() == b""
        await still_serving(port)


async def test_a_client_that_does_not_read_its_answer_is_dropped() -> None:
    """A poll answer larger than the socket buffers, to a client that never reads it,
    costs the server one handshake_timeout and no more."""
    async with serve(CONFIG) as (server, port):
        async with await HttpClient.open(port) as client:
            token = (await client.request("GET", LP + "&")).json()["token"]
            poll = f"{LP}&token={token}"
            await client.request("POST", poll, b'["1","1","room:a","phx_join",{}]')
            pad = "x" * 1_000_000
            for n in range(9):  # 9 MB of replies queued for the session
                frame = json.dumps(["1", str(n), "room:a", "ping", {"pad": pad}]).encode()
                assert (await client.request("POST", poll, frame)).json() == {"status": 200}
            (session,) = server.longpoll_sessions.sessions.values()

        stubborn = socket.socket()
        stubborn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stubborn.connect(("127.0.0.1", port))
        try:
            stubborn.sendall(f"GET {poll} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            with trio.fail_after(TIMEOUT):
                while session.polling == 0:
                    await trio.sleep(0.01)
                while session.polling:  # stuck writing until the timeout ends it
                    await trio.sleep(0.01)
        finally:
            stubborn.close()
        await still_serving(port)


async def test_one_connection_carries_several_requests() -> None:
    """Keep-alive: requests (with and without a body the handler ignores) share a socket."""
    async with serve(CONFIG) as (_server, port):
        requests = (
            b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        received = await raw_exchange(port, requests)
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", received)
        assert statuses == [b"200", b"405", b"200"]


async def test_long_polls_reuse_their_connection() -> None:
    # HttpClient is a single connection: every request below travels on it.
    async with serve(CONFIG) as (_server, port), await HttpClient.open(port) as client:
        first = await client.request("GET", LP)
        token = json.loads(first.body)["token"]
        post = await client.request(
            "POST", f"{LP}&token={token}", body=b'[null,"1","phoenix","heartbeat",{}]'
        )
        poll = await client.request("GET", f"{LP}&token={token}")
        assert json.loads(post.body) == {"status": 200}
        assert json.loads(poll.body)["status"] == 200


async def test_a_malformed_request_is_logged_without_its_bytes(caplog) -> None:
    caplog.set_level(logging.INFO, logger="phxbroker")
    async with serve(CONFIG) as (_server, port):
        received = await raw_exchange(
            port,
            b"GET /socket/websocket?token=s3cret-token HTTP/1.1\r\nHost: a\r\n"
            b"broken header s3cret-token\r\n\r\n",
        )
        assert received.startswith(b"HTTP/1.1 400")
    logged = [r.getMessage() for r in caplog.records if "bad HTTP request" in r.getMessage()]
    assert logged and all("s3cret" not in line for line in logged), logged
    assert "illegal header line" in logged[0]
