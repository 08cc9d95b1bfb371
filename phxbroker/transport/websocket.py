"""The WebSocket transport after the upgrade: one task per connection reads, the hub writes.

Inbound frames are parsed by wsproto. Outbound frames are built here: a server frame is
unmasked, so a broadcast's frame bytes are identical for every subscriber with the same
serializer and are built once per broadcast (cached on the Broadcast).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from phxbroker.broker.gateway import BrokerGateway
from phxbroker.protocol import close_codes
from phxbroker.protocol.frames import OP_BINARY, OP_PONG, OP_TEXT, close_frame, encode_frame
from phxbroker.protocol.messages import HEARTBEAT_TOPIC, ProtocolError
from phxbroker.protocol.serializers import Serializer
from phxbroker.transport.admission import TokenBucket
from phxbroker.transport.inbound import ClientHandler, Inbound
from phxbroker.transport.sockets import RECV_SIZE, ClientSocket, SocketHub, close_socket, shutdown

if TYPE_CHECKING:
    from phxbroker.broker.core import Broadcast, Channel

log = logging.getLogger("phxbroker.websocket")

OPEN, CLOSING, CLOSED = 0, 1, 2
EVENTS_PER_TURN = 256  # frames parsed before the reader lets other tasks run


class WebSocketPeer:
    """A connected websocket client as the broker sees it, with its outbox."""

    transport = "websocket"
    answers_in_order = False  # heartbeats and refusals are answered by the reader at once

    __slots__ = (
        "assigns",
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
        sock: ClientSocket,
        hub: SocketHub,
        *,
        peer_id: int,
        remote: str,
        serializer: Serializer,
        user: str | None,
        credential: object = None,
        assigns: dict[str, Any] | None = None,
    ) -> None:
        self.sock = sock
        self.assigns = assigns
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

    def answer_heartbeat(self, ref: Any) -> None:
        """Reply to a heartbeat at once, ahead of the broker's queue: phoenix.js's
        long-poll fallback races the first heartbeat reply of a fresh websocket."""
        self.hub.stats.messages_in += 1  # the broker counts the messages it handles itself
        self.send(self.serializer.encode_reply(None, ref, HEARTBEAT_TOPIC, "ok", {}))

    async def run(
        self,
        inbound: Inbound,
        trailing_data: bytes = b"",
        said_goodbye: Callable[[WebSocketPeer], Awaitable[None]] | None = None,
    ) -> None:
        """Read until the connection ends; client messages go to the broker in order, and
        `said_goodbye` hears of the client's Close frame when it comes (the connection ends
        later, when the client closes its TCP connection or the sweep cuts it).

        Every frame (pings and the pieces of a fragmented message included) spends from
        the connection's frame budget, and a message may come in at most max_fragments
        frames: a client over either is closed with 1008 and what it sends after is read
        and dropped unparsed. The reader yields to other tasks after every read that did
        not have to wait, so a client that keeps the socket full cannot hold the loop.
        """
        ws = Connection(ConnectionType.SERVER)
        hub = self.hub
        stats = hub.stats
        sock = self.sock
        frames = TokenBucket(hub.frame_rate, hub.frame_burst, hub.now) if hub.frame_rate else None
        max_fragments = hub.max_fragments
        parts: list[Any] = []
        size = 0
        flooded = False
        waited = True
        goodbye_said = False
        data = trailing_data
        while True:
            if data and not flooded:
                self.last_rx = hub.now
                stats.bytes_in += len(data)
                ws.receive_data(data)
                for handled, event in enumerate(ws.events(), 1):
                    if handled % EVENTS_PER_TURN == 0:
                        await trio.lowlevel.checkpoint()  # a read full of tiny frames
                    if frames is not None and not frames.take(hub.now):
                        flooded = self._flooded(f"more than {hub.frame_rate:g} frames per second")
                        break
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
                            if len(parts) > max_fragments:
                                flooded = self._flooded(
                                    f"a message in more than {max_fragments} frames"
                                )
                                break
                            continue
                        payload = parts[0] if len(parts) == 1 else type(parts[0])().join(parts)
                        parts.clear()
                        size = 0
                        await self._on_message(payload, inbound)
                    elif isinstance(event, Ping):
                        self._write(encode_frame(OP_PONG, event.payload))
                    elif isinstance(event, CloseConnection):
                        if self.state == OPEN:
                            self.close(_answer_to_close(event, ws.state))
                        if said_goodbye is not None and not goodbye_said:
                            goodbye_said = True
                            await said_goodbye(self)
                if self.dirty:
                    self.flush()
            elif data:
                stats.bytes_in += len(data)  # a flooder's bytes, dropped unparsed
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    return
                waited = True
                data = b""
                continue
            except OSError:
                return
            if not data:
                return
            if not waited:
                await trio.lowlevel.checkpoint()  # more was waiting: let the others run first
            waited = False

    def _flooded(self, what: str) -> bool:
        """Close a client that sent `what` (1008), once; True."""
        stats = self.hub.stats
        stats.count_refusal("frame_flood")
        log.info("closing %s: %s", self, what)
        if self.state == OPEN:
            self.close(close_codes.POLICY_VIOLATION, "too many frames")
        return True

    async def _on_message(self, payload: str | bytes, inbound: Inbound) -> None:
        try:
            msg = inbound.decode(self, payload, binary=isinstance(payload, bytes))
        except ProtocolError:
            self.close(close_codes.INTERNAL_ERROR)
            return
        await inbound.forward(self, msg)

    def finish(self) -> None:
        """Release the socket once the read loop has ended."""
        self.state = CLOSED
        self.pending = []
        close_socket(self.sock)


def _answer_to_close(event: CloseConnection, state: ConnectionState) -> int:
    """Our close code for a CloseConnection from wsproto: a client's Close frame gets what
    Bandit answers; a frame wsproto could not parse gets the code it names (1002, 1007)."""
    if state is ConnectionState.REMOTE_CLOSING:  # a Close frame wsproto could read
        return close_codes.answer_to_client_close(event.code)
    reason = event.reason or ""
    if "CLOSE with invalid code" in reason:
        # Bandit answers codes above 4999 with 1000 (and those under 1000 with 1002, which
        # wsproto's report does not tell apart: those get 1000 too).
        return close_codes.NORMAL
    if "CLOSE" in reason:
        # A Close frame Bandit cannot read either (a reserved code, a one-byte payload, a
        # reason that is not UTF-8): a protocol error.
        return close_codes.PROTOCOL_ERROR
    return event.code if event.code in close_codes.SENDABLE else close_codes.PROTOCOL_ERROR


class WebSockets:
    """The daemon's live websocket clients, from upgrade until their socket is released."""

    def __init__(
        self, gateway: BrokerGateway, broker: ClientHandler, inbound: Inbound, hub: SocketHub
    ) -> None:
        self.gateway = gateway
        self.broker = broker
        self.inbound = inbound
        self.hub = hub
        self.live: set[WebSocketPeer] = set()
        self.draining = False  # set once shutdown began: newcomers are sent away at once
        self._all_closed = trio.Event()

    async def run(self, peer: WebSocketPeer, trailing_data: bytes) -> None:
        """Serve an upgraded connection until it ends, registered with the broker."""
        stats = self.hub.stats
        stats.connections_total += 1
        stats.connections_open += 1
        self.live.add(peer)
        log.debug("connected %s", peer)
        if self.draining:  # upgraded after the drain began: send it elsewhere at once
            peer.close(close_codes.GOING_AWAY, "server shutting down")
        try:
            await self.gateway.tell(self.broker.connect, peer)
            await peer.run(self.inbound, trailing_data, self._said_goodbye)
        finally:
            self.live.discard(peer)
            if not self.live:
                self._all_closed.set()
            stats.connections_open -= 1
            self.gateway.tell_soon(self.broker.disconnect, peer)
            peer.finish()
            log.debug("disconnected %s", peer)

    async def _said_goodbye(self, peer: WebSocketPeer) -> None:
        """The client's Close frame came: its channels and presence go now, as in Phoenix,
        not when its TCP connection ends (which a client may hold open for a while)."""
        await self.gateway.tell(self.broker.disconnect, peer)

    def sweep(self, now: float, idle_after: float, closing_grace: float) -> None:
        """Close clients silent for `idle_after` seconds (1002, as Bandit), and cut those
        that have not answered our close frame within `closing_grace`."""
        for peer in list(self.live):
            if peer.state == OPEN and now - peer.last_rx > idle_after:
                log.info("closing %s: nothing received for %g s", peer, idle_after)
                peer.close(close_codes.IDLE_TIMEOUT)
            elif peer.state == CLOSING and now - peer.closing_since > closing_grace:
                peer.abort()

    async def wait_all_closed(self) -> None:
        """Return once no websocket client is left."""
        while self.live:
            self._all_closed = trio.Event()
            await self._all_closed.wait()
