"""Websocket clients for tests that speak to a daemon below phoenix.js: trio-websocket for
well-behaved clients, and a raw one that can send frames a browser never would."""

from __future__ import annotations

import json
import os
import socket

import trio
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto.connection import Connection, ConnectionType

TIMEOUT = 5


def url(port: int, token: str = "alice-token") -> str:
    return f"ws://127.0.0.1:{port}/socket/websocket?token={token}&vsn=2.0.0"


async def roundtrip_ok(port: int) -> None:
    """Another client still gets a heartbeat answered."""
    async with open_websocket_url(url(port, "bob-token")) as ws:
        await ws.send_message('[null,"1","phoenix","heartbeat",{}]')
        with trio.fail_after(TIMEOUT):
            reply = json.loads(await ws.get_message())
        assert reply == [None, "1", "phoenix", "phx_reply", {"status": "ok", "response": {}}]


async def expect_close(ws, code: int) -> None:
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                await ws.get_message()
            except ConnectionClosed as exc:
                assert exc.reason.code == code
                return


class RawWebSocket:
    """A websocket client over a plain socket, able to send frames a browser never would."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = Connection(ConnectionType.CLIENT)
        self.events: list = []

    @classmethod
    async def connect(cls, port: int, rcvbuf: int | None = None) -> RawWebSocket:
        sock = trio.socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        await stream.send_all(
            b"GET /socket/websocket?token=alice-token&vsn=2.0.0 HTTP/1.1\r\n"
            b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        with trio.fail_after(TIMEOUT):
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some()
        assert head.startswith(b"HTTP/1.1 101"), head
        raw = cls(stream)
        raw.ws.receive_data(head.split(b"\r\n\r\n", 1)[1])
        return raw

    async def send(self, event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_event(self):
        with trio.fail_after(TIMEOUT):
            while True:
                for event in self.ws.events():
                    return event
                data = await self.stream.receive_some()
                self.ws.receive_data(data or None)


def masked_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body
