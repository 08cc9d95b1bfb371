"""A TCP proxy that lets plain HTTP through and sabotages websocket upgrades, as some
corporate proxies and middleboxes do. Used to show phoenix.js falling back to LongPoll."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import struct
import threading

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MODES = ("refuse", "reset", "silent")


class HostileProxy:
    """Listens on an ephemeral port and forwards each connection to `upstream`, except that
    a connection whose first request asks for a websocket upgrade is

    * "refuse": answered 403 and closed,
    * "reset": reset (RST) without an answer,
    * "silent": told 101 Switching Protocols, then never forwarded anything (a proxy that
      buffers the stream forever: the websocket opens but no reply ever comes).
    """

    def __init__(self, upstream: tuple[str, int], mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.upstream = upstream
        self.mode = mode
        self.upgrades_sabotaged = 0
        self.connections_forwarded = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> HostileProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def endpoint(self, path: str = "/socket") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self._closed = True
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in [self._listener, *sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
        return sock

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._track(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    client.close()
                    return
                head += chunk
        except OSError:
            return
        request_head = head.split(b"\r\n\r\n", 1)[0]
        if b"\r\nupgrade: websocket" in request_head.lower():
            with self._lock:
                self.upgrades_sabotaged += 1
            self._sabotage(client, request_head)
            return
        with self._lock:
            self.connections_forwarded += 1
        try:
            upstream = self._track(socket.create_connection(self.upstream))
            upstream.sendall(head)
        except OSError:
            client.close()
            return
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)

    def _sabotage(self, client: socket.socket, request_head: bytes) -> None:
        if self.mode == "refuse":
            with contextlib.suppress(OSError):
                client.sendall(
                    b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
            client.close()
        elif self.mode == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        else:
            key = next(
                line.split(b":", 1)[1].strip()
                for line in request_head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())
            with contextlib.suppress(OSError):
                client.sendall(
                    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                    b"connection: Upgrade\r\nsec-websocket-accept: " + accept + b"\r\n\r\n"
                )
            # Hold the connection, swallowing whatever the client sends, until it goes.
            with contextlib.suppress(OSError):
                while client.recv(65536):
                    pass
            client.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy bytes one way until either side closes."""
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
