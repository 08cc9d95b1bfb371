"""The websocket transport and HTTP front door under bad input and slow clients.

Each test runs a real server on an ephemeral port and talks to it over real sockets. Bad
input must get the Phoenix-like answer (a close code or an HTTP status), one log line, and
must leave every other client untouched.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from support.daemon import serve
from support.websocket_client import (
    TIMEOUT,
    RawWebSocket,
    expect_close,
    masked_frame,
    roundtrip_ok,
    url,
)
from trio_websocket import open_websocket_url
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

CONFIG = """
[server]
listen = "127.0.0.1:0"
max_frame_size = 2048
outbox_limit = 65536
handshake_timeout = 1
max_header_size = 4096
[admin]
socket = ""
[[auth.tokens]]
user = "alice"
token = "alice-token"
[[auth.tokens]]
user = "bob"
token = "bob-token"
[[topics]]
pattern = "room:*"
relay = ["new_msg"]
echo = ["ping"]
[limits]
message_rate = 0  # some tests here flood on purpose
"""


async def test_an_oversized_message_closes_only_that_connection_with_1009() -> None:
    async with serve(CONFIG) as (_server, port):
        async with open_websocket_url(url(port)) as ws:
            await ws.send_message('["1","1","room:a","phx_join",{}]')
            await ws.get_message()
            await ws.send_message(json.dumps(["1", "2", "room:a", "ping", "x" * 4000]))
            await expect_close(ws, 1009)
        await roundtrip_ok(port)


@pytest.mark.parametrize(
    "frame",
    [b"\x05\x00\x00\x00\x00", b"\x00\x09\x00\x01\x01te", b"", b"not even close"],
)
async def test_binary_garbage_closes_with_1011(frame: bytes) -> None:
    async with serve(CONFIG) as (server, port):
        async with open_websocket_url(url(port)) as ws:
            await ws.send_message(frame)
            await expect_close(ws, 1011)
        assert server.stats.protocol_errors == 1
        await roundtrip_ok(port)


@pytest.mark.parametrize("frame", ["[1,2,3]", "{}", "null", '["1","1","t","e"]'])
async def test_wrong_message_shapes_close_with_1011(frame: str) -> None:
    async with serve(CONFIG) as (_server, port):
        async with open_websocket_url(url(port)) as ws:
            await ws.send_message(frame)
            await expect_close(ws, 1011)
        await roundtrip_ok(port)


async def test_a_topic_that_is_not_a_string_is_an_unmatched_topic() -> None:
    # As Phoenix answers it: no channel has such a topic; the socket stays open.
    async with serve(CONFIG) as (_server, port), open_websocket_url(url(port)) as ws:
        await ws.send_message("[null,null,null,null,null]")
        with trio.fail_after(TIMEOUT):
            reply = json.loads(await ws.get_message())
        unmatched = {"status": "error", "response": {"reason": "unmatched topic"}}
        assert reply == [None, None, None, "phx_reply", unmatched]
        await ws.send_message('[null,"2","phoenix","heartbeat",{}]')
        with trio.fail_after(TIMEOUT):
            assert json.loads(await ws.get_message())[1] == "2"


async def test_invalid_utf8_text_is_a_protocol_error() -> None:
    async with serve(CONFIG) as (_server, port):
        raw = await RawWebSocket.connect(port)
        await raw.send_raw(masked_frame(0x1, b"\xff\xfe"))
        event = await raw.next_event()
        assert isinstance(event, CloseConnection) and event.code == 1007
        await roundtrip_ok(port)


async def test_fragmented_messages_pings_and_client_close() -> None:
    async with serve(CONFIG) as (_server, port):
        raw = await RawWebSocket.connect(port)
        await raw.send(Ping(b"are you there"))
        pong = await raw.next_event()
        assert isinstance(pong, Pong) and pong.payload == b"are you there"
        text = '[null,"7","phoenix","heartbeat",{}]'
        await raw.send(TextMessage(data=text[:10], message_finished=False))
        await raw.send(TextMessage(data=text[10:], message_finished=True))
        reply = await raw.next_event()
        assert isinstance(reply, TextMessage) and json.loads(reply.data)[1] == "7"
        await raw.send(CloseConnection(code=4000, reason="bye"))
        closed = await raw.next_event()
        # Bandit (so Phoenix) answers a client's Close frame with 1000, whatever its code.
        assert isinstance(closed, CloseConnection) and closed.code == 1000


@pytest.mark.parametrize(
    ("payload", "answer"),
    [
        (b"", 1000),  # no code: socket.disconnect() without one
        (b"\x03\xe9", 1000),  # 1001
        (b"\x0f\xa0bye", 1000),  # 4000
        (b"\x13\x88", 1000),  # 5000, beyond the registered range
        (b"\x03\xf4", 1002),  # 1012: reserved for servers
        (b"\x07\xd0", 1002),  # 2000: reserved
        (b"\x03\xe8\xff\xfe", 1002),  # a reason that is not UTF-8
        (b"\x03", 1002),  # a one-byte payload
    ],
)
async def test_a_client_close_frame_gets_what_bandit_answers(payload: bytes, answer: int) -> None:
    async with serve(CONFIG) as (_server, port):
        raw = await RawWebSocket.connect(port)
        await raw.send_raw(masked_frame(0x8, payload))
        closed = await raw.next_event()
        assert isinstance(closed, CloseConnection) and closed.code == answer


async def test_a_slow_subscriber_is_dropped_and_others_lose_nothing() -> None:
    async with serve(CONFIG) as (server, port):
        slow = await RawWebSocket.connect(port, rcvbuf=4096)
        await slow.send(TextMessage(data='["1","1","room:flood","phx_join",{}]'))
        assert isinstance(await slow.next_event(), TextMessage)  # join reply; then stop reading
        async with open_websocket_url(url(port, "bob-token"), message_queue_size=0) as fast:
            await fast.send_message('["1","1","room:flood","phx_join",{}]')
            await fast.get_message()
            body = "y" * 1000
            sent = 0
            with trio.fail_after(30):
                while server.stats.slow_client_drops == 0:
                    sent += 1
                    frame = json.dumps(["1", None, "room:flood", "new_msg", {"n": sent, "b": body}])
                    await fast.send_message(frame)
                    got = json.loads(await fast.get_message())
                    assert got[4]["n"] == sent  # the fast client gets every message, in order
        assert server.stats.slow_client_drops == 1
        assert sent > 60  # it took more than the 64 KiB outbox limit to drop it


async def http(port: int, raw: bytes) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        data = b""
        with trio.fail_after(TIMEOUT):
            while chunk := await stream.receive_some():
                data += chunk
    status = int(data.split(b" ", 2)[1]) if data else 0
    return status, data


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /x HTTP/1.1\r\nHost: a\r\nBig: " + b"z" * 8000 + b"\r\n\r\n", 431),
        (b"GET /nowhere HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 404),
        (
            b"POST /socket/websocket HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n",
            400,
        ),
    ],
)
async def test_bad_http_requests_get_a_status_and_a_closed_connection(request_bytes, status):
    async with serve(CONFIG) as (_server, port):
        got, _ = await http(port, request_bytes)
        assert got == status
        await roundtrip_ok(port)


async def test_a_client_trickling_its_request_is_cut_off() -> None:
    async with serve(CONFIG) as (_server, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /socket/websocket HTTP/1.1\r\nHost: a\r\n")
            with trio.fail_after(TIMEOUT):  # handshake_timeout is 1 s
                data = b""
                while chunk := await stream.receive_some():
                    data += chunk
        assert data.startswith(b"HTTP/1.1 408")
        await roundtrip_ok(port)


def test_sigterm_closes_clients_with_1001_and_exits_zero(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    proc = subprocess.Popen(
        [sys.executable, "-m", "phxbroker", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = next(line for line in proc.stderr if "listening on" in line)
        port = int(line.rsplit(":", 1)[1])

        async def client() -> None:
            async with open_websocket_url(url(port)) as ws:
                await ws.send_message('[null,"1","phoenix","heartbeat",{}]')
                await ws.get_message()
                proc.send_signal(signal.SIGTERM)
                await expect_close(ws, 1001)

        trio.run(client)
        assert proc.wait(timeout=TIMEOUT) == 0
        assert "received SIGTERM: shutting down" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


async def test_binary_push_is_echoed_as_a_binary_reply() -> None:
    async with serve(CONFIG) as (_server, port), open_websocket_url(url(port)) as ws:
        await ws.send_message('["1","1","room:a","phx_join",{}]')
        await ws.get_message()
        await ws.send_message(bytes([0, 1, 1, 6, 4]) + b"12room:aping" + b"\x00\xff")
        with trio.fail_after(TIMEOUT):
            reply = await ws.get_message()
        assert reply == bytes([1, 1, 1, 6, 2]) + b"12room:aok" + b"\x00\xff"


async def test_bytes_messages_are_received_in_order_with_text() -> None:
    async with serve(CONFIG) as (_server, port):
        raw = await RawWebSocket.connect(port)
        await raw.send(TextMessage(data='["1","1","room:a","phx_join",{}]'))
        await raw.next_event()
        await raw.send(BytesMessage(data=bytes([0, 1, 1, 6, 4]) + b"12room:aping" + b"A"))
        await raw.send(TextMessage(data='["1","3","room:a","ping",{"t":1}]'))
        first, second = await raw.next_event(), await raw.next_event()
        assert isinstance(first, BytesMessage) and isinstance(second, TextMessage)


async def test_every_configured_socket_path_serves_websockets() -> None:
    config = CONFIG.replace(
        'listen = "127.0.0.1:0"', 'listen = "127.0.0.1:0"\nsocket_paths = ["/socket", "/live/ws"]'
    )
    async with serve(config) as (_server, port):
        for path in ("/socket", "/live/ws"):
            target = f"ws://127.0.0.1:{port}{path}/websocket?token=alice-token&vsn=2.0.0"
            async with open_websocket_url(target) as ws:
                await ws.send_message('[null,"1","phoenix","heartbeat",{}]')
                with trio.fail_after(TIMEOUT):
                    assert json.loads(await ws.get_message())[3] == "phx_reply"
        status, _ = await http(
            port, b"GET /elsewhere/websocket HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        assert status == 404
