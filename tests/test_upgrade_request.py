"""The websocket upgrade request is answered exactly as h11 would answer it, whichever
parser reads it.

The first request on a connection, when it is one complete upgrade head, is parsed by
httptools and its 101 written without h11; any other shape goes to h11. Each case sends
raw bytes to a real server and checks the answer: the byte-exact 101 or refusal h11
renders for that request, or the status h11's reading of an unusual head leads to.
"""

from __future__ import annotations

import json

import h11
import pytest
import trio
from support.daemon import serve
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import TextMessage
from wsproto.utilities import generate_accept_token

CONFIG = """
[server]
listen = "127.0.0.1:0"
handshake_timeout = 2
max_header_size = 4096
[[auth.tokens]]
user = "alice"
token = "alice-token"
[[topics]]
pattern = "room:*"
echo = ["ping"]
"""

TIMEOUT = 5
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
TARGET = b"/socket/websocket?token=alice-token&vsn=2.0.0"


def upgrade_head(
    target: bytes = TARGET, *, extra: bytes = b"", eol: bytes = b"\r\n", host: bytes = b"x"
) -> bytes:
    lines = [
        b"GET " + target + b" HTTP/1.1",
        *([b"Host: " + host] if host else []),
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + KEY,
        b"Sec-WebSocket-Version: 13",
    ]
    return eol.join(lines) + eol + extra + eol


def as_h11_answers(request: bytes, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The bytes h11 writes when it answers `request` with `status` and `headers`."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(request)
    assert isinstance(conn.next_event(), h11.Request)
    if status == 101:
        return conn.send(
            h11.InformationalResponse(
                status_code=101, headers=headers, reason=b"Switching Protocols"
            )
        )
    data = conn.send(h11.Response(status_code=status, headers=headers, reason=b"Forbidden"))
    return data + conn.send(h11.EndOfMessage())


async def exchange(port: int, data: bytes) -> tuple[trio.SocketStream, bytes]:
    """Send `data`; return the stream and the answer's head plus whatever followed it
    (everything until the server closed, unless it switched protocols)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    answer = b""
    with trio.fail_after(TIMEOUT):
        while not (b"\r\n\r\n" in answer and answer.startswith(b"HTTP/1.1 101 ")):
            chunk = await stream.receive_some()
            if not chunk:
                break
            answer += chunk
    return stream, answer


def client_text_frame(text: str) -> bytes:
    return Connection(ConnectionType.CLIENT).send(TextMessage(data=text))


async def read_text_message(stream: trio.SocketStream, received: bytes = b"") -> str:
    """The next text message the server sends (`received`: bytes already read)."""
    ws = Connection(ConnectionType.CLIENT)
    ws.receive_data(received)
    with trio.fail_after(TIMEOUT):
        while True:
            for event in ws.events():
                assert isinstance(event, TextMessage), event
                return event.data
            ws.receive_data(await stream.receive_some())


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer else 0


async def test_the_101_is_the_one_h11_writes_and_the_socket_then_speaks_phoenix() -> None:
    request = upgrade_head(extra=b"Sec-WebSocket-Protocol: phoenix\r\n")
    expected = as_h11_answers(
        request,
        101,
        [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", generate_accept_token(KEY)),
            (b"sec-websocket-protocol", b"phoenix"),
        ],
    )
    async with serve(CONFIG) as (_server, port):
        stream, answer = await exchange(port, request)
        async with stream:
            assert answer == expected
            await stream.send_all(client_text_frame('["1","1","room:a","phx_join",{}]'))
            reply = json.loads(await read_text_message(stream))
            assert reply[3:] == ["phx_reply", {"status": "ok", "response": {}}]


async def test_a_frame_sent_right_behind_the_head_is_read() -> None:
    heartbeat = client_text_frame('[null,"7","phoenix","heartbeat",{}]')
    async with serve(CONFIG) as (_server, port):
        stream, answer = await exchange(port, upgrade_head() + heartbeat)
        async with stream:
            assert answer.startswith(b"HTTP/1.1 101 ")
            rest = answer.split(b"\r\n\r\n", 1)[1]
            reply = json.loads(await read_text_message(stream, rest))
            assert reply == [None, "7", "phoenix", "phx_reply", {"status": "ok", "response": {}}]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # h11 takes these shapes, llhttp reads them otherwise or not at all: h11 reads them.
        (upgrade_head(eol=b"\n"), 101),
        (upgrade_head(extra=b"X-Folded: one\r\n two\r\n"), 101),
        (upgrade_head(extra=b"X-Odd: a\x01b\r\n"), 101),
        (upgrade_head(extra=b"Content-Length: 0\r\n"), 101),
        (upgrade_head(extra=b"X-Padded:    spaces around   \r\n"), 101),
        # ... and these h11 refuses.
        (upgrade_head(host=b""), 400),
        (upgrade_head(extra=b"Host: y\r\n"), 400),
        (upgrade_head(TARGET + b"&x=\xff"), 400),
        (upgrade_head(extra=b"X-Big: " + b"z" * 5000 + b"\r\n"), 431),
        (upgrade_head(TARGET + b"&pad=" + b"p" * 5000), 431),
        # The upgrade checks after the parser's.
        (upgrade_head().replace(b"Version: 13", b"Version: 8"), 400),
        (upgrade_head().replace(b"Connection: Upgrade", b"Connection: keep-alive"), 400),
        (upgrade_head(b"/socket/websocket?token=wrong&vsn=2.0.0"), 403),
        (upgrade_head(b"/socket/websocket?token=alice-token&vsn=9.0.0"), 403),
    ],
)
async def test_every_shape_of_upgrade_request_gets_h11s_answer(
    request_bytes: bytes, status: int
) -> None:
    async with serve(CONFIG) as (_server, port):
        stream, answer = await exchange(port, request_bytes)
        async with stream:
            assert status_of(answer) == status, answer[:200]


async def test_a_refused_upgrade_gets_the_bytes_h11_writes() -> None:
    request = upgrade_head(b"/socket/websocket?token=wrong&vsn=2.0.0")
    expected = as_h11_answers(request, 403, [(b"content-length", b"0"), (b"connection", b"close")])
    async with serve(CONFIG) as (server, port):
        stream, answer = await exchange(port, request)
        async with stream:
            assert answer == expected
        assert server.stats.refusals == {"bad_token": 1}


async def test_an_upgrade_head_to_another_route_is_answered_and_the_connection_kept() -> None:
    healthz = upgrade_head(b"/healthz")
    async with serve(CONFIG) as (_server, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(healthz)
            answer = b""
            with trio.fail_after(TIMEOUT):
                while not answer.endswith(b"ok\n"):
                    answer += await stream.receive_some()
            assert answer.startswith(b"HTTP/1.1 200 ")
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            second = b""
            with trio.fail_after(TIMEOUT):
                while chunk := await stream.receive_some():
                    second += chunk
            assert second.startswith(b"HTTP/1.1 200 ") and second.endswith(b"ok\n")
