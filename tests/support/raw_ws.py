"""A blocking websocket client on a plain socket (wsproto), for tests that must see
exactly how the server ends a connection: a close frame with its code, or a dropped TCP
connection."""

from __future__ import annotations

import socket
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    RejectConnection,
    Request,
    TextMessage,
)

DROPPED = "dropped"  # what `close_code()` returns when no close frame came


class RawWebSocket:
    def __init__(self, port: int, target: str, timeout: float = 5) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.messages: list[Any] = []
        self.sock.sendall(self.ws.send(Request(host="127.0.0.1", target=target)))
        for event in self._events():
            if isinstance(event, AcceptConnection):
                return
            if isinstance(event, RejectConnection):
                raise ConnectionRefusedError(f"upgrade refused with {event.status_code}")
        raise ConnectionError("the server closed the connection during the handshake")

    def _events(self):
        while True:
            yield from self.ws.events()
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return
            self.ws.receive_data(data)

    def send_text(self, text: str) -> None:
        self.sock.sendall(self.ws.send(Message(data=text)))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(self.ws.send(Message(data=data)))

    def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the socket (e.g. a hand-made frame)."""
        self.sock.sendall(data)

    def receive(self) -> Any:
        """The next text or binary message; ConnectionError if the connection ends."""
        text: list[Any] = []
        for event in self._events():
            if isinstance(event, TextMessage | BytesMessage):
                text.append(event.data)
                if event.message_finished:
                    return text[0] if len(text) == 1 else type(text[0])().join(text)
            elif isinstance(event, CloseConnection):
                raise ConnectionError(f"closed with {event.code}")
        raise ConnectionError("dropped")

    def close_code(self) -> int | str:
        """Read until the connection ends: the code of the server's close frame, or
        DROPPED if the TCP connection ended without one."""
        for event in self._events():
            if isinstance(event, CloseConnection):
                return event.code
            if isinstance(event, TextMessage | BytesMessage):
                self.messages.append(event.data)
        return DROPPED

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawWebSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
