"""The WebSocket transport after the upgrade: one task per connection reads, the hub writes.

Inbound frames are parsed by wsproto. Outbound frames are built here: a server frame is
unmasked, so a broadcast's frame bytes are identical for every subscriber with the same
serializer and are built once per broadcast (cached on the Broadcast).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from phxbroker.protocol import close_codes, messages
from phxbroker.protocol.frames import OP_BINARY, OP_PONG, OP_TEXT, close_frame, encode_frame
from phxbroker.protocol.messages import ProtocolError
from phxbroker.protocol.serializers import Serializer
from phxbroker.transport.admission import RATE_LIMITED, TokenBucket, over_rate
from phxbroker.transport.sockets import RECV_SIZE, SocketHub, close_socket, shutdown

if TYPE_CHECKING:
    from phxbroker.broker.core import Broadcast, Channel

log = logging.getLogger("phxbroker.websocket")

OPEN, CLOSING, CLOSED = 0, 1, 2


class WebSocketPeer:
    """A connected websocket client as the broker sees it, with its outbox."""

    transport = "websocket"

    __slots__ = (
        "blocked",
        "bucket",
        "channels",
        "closing_since",
        "credential",
        "dirty",
        "hub",
        "id",
        "last_rx",
        "pending",
        "pending_size",
        "remote",
        "serializer",
        "sock",
        "state",
        "user",
    )

    def __init__(
        self,
        sock: socket.socket,
        hub: SocketHub,
        *,
        peer_id: int,
        remote: str,
        serializer: Serializer,
        user: str | None,
        credential: object = None,
    ) -> None:
        self.sock = sock
        self.hub = hub
        self.id = peer_id
        self.remote = remote
        self.serializer = serializer
        self.user = user
        self.credential = credential
        self.channels: dict[str, Channel] = {}
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.dirty = False
        self.blocked = False
        self.state = OPEN
        self.last_rx = hub.now
        self.closing_since = 0.0
        rate = hub.message_rate
        self.bucket = TokenBucket(rate, hub.message_burst, hub.now) if rate else None

    def __repr__(self) -> str:
        return f"<websocket {self.id} {self.user or 'anonymous'}@{self.remote}>"

    # -- the broker's side ---------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self.state == OPEN

    def send(self, encoded: tuple[bool, bytes]) -> None:
        is_binary, data = encoded
        self.hub.stats.messages_out += 1
        self._write(encode_frame(OP_BINARY if is_binary else OP_TEXT, data))

    def deliver(self, broadcast: Broadcast) -> None:
        frames = broadcast.frames
        frame = frames.get(self.serializer)
        if frame is None:
            encoded = broadcast.encoded(self.serializer)
            frame = (
                b""
                if encoded is None
                else encode_frame(OP_BINARY if encoded[0] else OP_TEXT, encoded[1])
            )
            frames[self.serializer] = frame
        if frame:
            self._write(frame)

    def close(self, code: int, reason: str = "") -> None:
        """Queue a close frame after what is already queued; the client's answer ends it."""
        if self.state != OPEN:
            return
        self._write(close_frame(code, reason))
        self.state = CLOSING
        self.closing_since = self.hub.now

    # -- writing -------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.state != OPEN:
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > self.hub.outbox_limit:
            self._drop_slow()
            return
        if not self.dirty:
            self.dirty = True
            self.hub.dirty.append(self)

    def flush(self) -> None:
        """Write what is queued without blocking; a full socket gets a drain task."""
        self.dirty = False
        if self.blocked or not self.pending or self.state == CLOSED:
            return
        pending = self.pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.abort()
            return
        self.hub.stats.bytes_out += sent
        if sent == len(data):
            pending.clear()
            self.pending_size = 0
            if self.state == CLOSING:
                shutdown(self.sock, socket.SHUT_WR)
            return
        self.pending = [data[sent:]]
        self.pending_size = len(data) - sent
        self.blocked = True
        self.hub.spawn(self._drain)

    async def _drain(self) -> None:
        try:
            while self.pending and self.state != CLOSED:
                await trio.lowlevel.wait_writable(self.sock)
                pending = self.pending
                data = pending[0] if len(pending) == 1 else b"".join(pending)
                try:
                    sent = self.sock.send(data)
                except BlockingIOError:
                    continue
                self.hub.stats.bytes_out += sent
                self.pending = [data[sent:]] if sent < len(data) else []
                self.pending_size = len(data) - sent
        except (OSError, trio.ClosedResourceError):
            self.abort()
            return
        finally:
            self.blocked = False
        if self.state == CLOSING:
            shutdown(self.sock, socket.SHUT_WR)

    def _drop_slow(self) -> None:
        self.hub.stats.slow_client_drops += 1
        log.warning(
            "dropping slow client %s: more than %d bytes queued", self, self.hub.outbox_limit
        )
        self.abort()

    def abort(self) -> None:
        """Drop the connection now; the read loop wakes up and cleans up."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.pending = []
        self.pending_size = 0
        shutdown(self.sock, socket.SHUT_RDWR)

    # -- reading -------------------------------------------------------------------------

    async def run(
        self, commands: trio.MemorySendChannel[Any], handle: Any, trailing_data: bytes = b""
    ) -> None:
        """Read until the connection ends; client messages go to the broker in order."""
        ws = Connection(ConnectionType.SERVER)
        hub = self.hub
        stats = hub.stats
        sock = self.sock
        parts: list[Any] = []
        size = 0
        data = trailing_data
        while True:
            if data:
                self.last_rx = hub.now
                stats.bytes_in += len(data)
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, TextMessage | BytesMessage):
                        if self.state != OPEN:
                            continue
                        size += len(event.data)
                        if size > hub.max_frame_size:
                            stats.count_refusal("message_too_big")
                            log.info(
                                "closing %s: message larger than %d bytes", self, hub.max_frame_size
                            )
                            self.close(close_codes.MESSAGE_TOO_BIG, "message too big")
                            parts.clear()
                            continue
                        parts.append(event.data)
                        if not event.message_finished:
                            continue
                        payload = parts[0] if len(parts) == 1 else type(parts[0])().join(parts)
                        parts.clear()
                        size = 0
                        await self._on_message(payload, commands, handle)
                    elif isinstance(event, Ping):
                        self._write(encode_frame(OP_PONG, event.payload))
                    elif isinstance(event, CloseConnection) and self.state == OPEN:
                        self.close(
                            event.code if event.code in close_codes.SENDABLE else close_codes.NORMAL
                        )
                if self.dirty:
                    self.flush()
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    return
                data = None
                continue
            except OSError:
                return
            if not data:
                return

    async def _on_message(
        self, payload: str | bytes, commands: trio.MemorySendChannel[Any], handle: Any
    ) -> None:
        stats = self.hub.stats
        try:
            if isinstance(payload, str):
                msg = self.serializer.decode_text(payload)
            else:
                msg = self.serializer.decode_binary(payload)
        except ProtocolError as exc:
            stats.protocol_errors += 1
            log.info("closing %s: %s", self, exc)
            self.close(close_codes.INTERNAL_ERROR)
            return
        bucket = self.bucket
        if bucket is not None and not bucket.take(self.hub.now):
            stats.messages_in += 1  # it never reaches the broker
            self._rate_limited(msg, bucket)
            return
        if msg.event == messages.HEARTBEAT and msg.topic == messages.HEARTBEAT_TOPIC:
            stats.messages_in += 1  # the broker counts the messages it handles itself
            self.send(self.serializer.encode_reply(None, msg.ref, msg.topic, "ok", {}))
            return
        await commands.send((handle, (self, msg)))

    def _rate_limited(self, msg: messages.Message, bucket: TokenBucket) -> None:
        """Answer a message over the rate limit with an error reply, or close the
        connection when too many in a row were refused."""
        hub = self.hub
        if over_rate(self, bucket, hub.stats, hub.rate_limit_close_after):
            self.close(close_codes.POLICY_VIOLATION, "rate limited")
            return
        self.send(
            self.serializer.encode_reply(msg.join_ref, msg.ref, msg.topic, "error", RATE_LIMITED)
        )

    def finish(self) -> None:
        """Release the socket once the read loop has ended."""
        self.state = CLOSED
        self.pending = []
        close_socket(self.sock)
