"""The WebSocket transport after the upgrade: one task per connection reads, the hub writes.

Inbound frames are parsed by wsproto. Outbound frames are built here: a server frame is
unmasked, so a broadcast's frame bytes are identical for every subscriber with the same
serializer and are built once per broadcast (cached on the Broadcast).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any, cast

import trio
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

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
        "fragments",
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
        self.fragments: list[Any] | None = None  # the frames of a message still arriving
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

    def answer_heartbeat(self, ref: Any) -> None:
        """Reply to a heartbeat at once, ahead of the broker's queue: phoenix.js's
        long-poll fallback races the first heartbeat reply of a fresh websocket."""
        self.hub.stats.messages_in += 1  # the broker counts the messages it handles itself
        self.send(self.serializer.encode_reply(None, ref, HEARTBEAT_TOPIC, "ok", {}))

    async def run(self, websockets: WebSockets, trailing_data: bytes = b"") -> None:
        """Serve the connection until it ends: registered with the broker, its messages
        read and handed on in order. One coroutine for the whole session, as a client may
        idle in it for days.

        Every frame (pings and the pieces of a fragmented message included) spends from
        the connection's frame budget, and a message may come in at most max_fragments
        frames: a client over either is closed with 1008. Once we are closing a client
        (a limit, a kick, a drain), what it sends is read and dropped unparsed. The reader
        yields to other tasks before a read that does not wait and every EVENTS_PER_TURN
        frames, so a client that keeps its socket full cannot hold the event loop."""
        websockets.opened(self)
        try:
            await websockets.register(self)
            data = trailing_data
            # wsproto's frame layer, without its Connection wrapper: that adds only a state
            # this loop keeps itself and an event queue (0.8 KiB per idle connection).
            frames: FrameProtocol | None = FrameProtocol(client=False, extensions=[])
            hub = self.hub
            stats = hub.stats
            sock = self.sock
            budget = (
                TokenBucket(hub.frame_rate, hub.frame_burst, hub.now) if hub.frame_rate else None
            )
            # Once a read of a plain socket came back short, nothing is left in it, so the next
            # read waits for the socket first instead of failing with EAGAIN. A TLS socket may
            # hold decrypted bytes its descriptor says nothing of: it is always read first. The
            # first read is tried at once: the client has usually answered the 101 by then.
            plain = isinstance(sock, socket.socket)
            drained = False
            while True:
                if data:
                    self.last_rx = hub.now
                    stats.bytes_in += len(data)
                    if frames is not None and not await self._receive(
                        frames, data, websockets, budget
                    ):
                        frames = None  # closed, broke the protocol or flooded: read no more
                    if self.dirty:
                        self.flush()
                if drained:
                    try:
                        await trio.lowlevel.wait_readable(sock)
                    except trio.ClosedResourceError:
                        return
                elif data:
                    # About to read again without waiting: let the other tasks run first, so
                    # that a client keeping its socket full cannot hold the event loop.
                    await trio.lowlevel.checkpoint()
                try:
                    data = sock.recv(RECV_SIZE)
                except BlockingIOError:
                    data = b""
                    drained = True
                    continue
                except OSError:
                    return
                if not data:
                    return
                drained = plain and len(data) < RECV_SIZE
        finally:
            websockets.closed(self)

    async def _receive(
        self,
        frames: FrameProtocol,
        data: bytes,
        websockets: WebSockets,
        budget: TokenBucket | None,
    ) -> bool:
        """Parse what was read and handle each complete message, in order; False once a
        close frame came, the client broke the protocol or went over a budget, or we
        started closing it (then nothing after is parsed)."""
        frames.receive_bytes(data)
        hub = self.hub
        limit = hub.max_frame_size
        inbound = websockets.inbound
        try:
            for handled, frame in enumerate(frames.received_frames(), 1):
                if self.state != OPEN:
                    # We are closing it (a limit, a kick, a drain): nothing it sends now
                    # is answered, so the rest is read and dropped unparsed, and a client
                    # flooding past its close costs a recv per read, not a parse per frame.
                    return False
                if handled % EVENTS_PER_TURN == 0:
                    await trio.lowlevel.checkpoint()  # a read full of tiny frames
                if budget is not None and not budget.take(hub.now):
                    self._flooded(f"more than {hub.frame_rate:g} frames per second")
                    return False
                opcode = frame.opcode
                if (
                    opcode is Opcode.TEXT
                    or opcode is Opcode.BINARY
                    or (opcode is Opcode.CONTINUATION)
                ):
                    fragments = self.fragments
                    size = len(frame.payload) + (sum(map(len, fragments)) if fragments else 0)
                    if size > limit:
                        hub.stats.count_refusal("message_too_big")
                        log.info("closing %s: message larger than %d bytes", self, limit)
                        self.close(close_codes.MESSAGE_TOO_BIG, "message too big")
                        self.fragments = None
                        continue
                    if not frame.message_finished:
                        if fragments is None:
                            fragments = self.fragments = []
                        fragments.append(frame.payload)
                        if len(fragments) > hub.max_fragments:
                            self._flooded(f"a message in more than {hub.max_fragments} frames")
                            return False
                        continue
                    payload: Any = frame.payload
                    if fragments:
                        fragments.append(payload)
                        payload = type(payload)().join(fragments)
                        self.fragments = None
                    try:
                        msg = inbound.decode(self, payload, binary=isinstance(payload, bytes))
                    except ProtocolError:
                        self.close(close_codes.INTERNAL_ERROR)
                        continue
                    await inbound.forward(self, msg)
                elif opcode is Opcode.PING:
                    self._write(encode_frame(OP_PONG, cast(bytes, frame.payload)))
                elif opcode is Opcode.CLOSE:
                    code, _ = cast(tuple[int, str], frame.payload)
                    await self._closed_by_client(
                        close_codes.answer_to_client_close(code), websockets
                    )
                    return False
        except ParseFailed as exc:
            await self._closed_by_client(_answer_to_unreadable(exc), websockets)
            return False
        return True

    async def _closed_by_client(self, answer: int, websockets: WebSockets) -> None:
        """The client sent a close frame (or broke the protocol): answer with our close
        frame, unless we are closing already, and let its channels and presence go now, as
        in Phoenix, not when its TCP connection ends (which a client may hold open)."""
        if self.state == OPEN:
            self.close(answer)
        await websockets.said_goodbye(self)

    def _flooded(self, what: str) -> None:
        """Close a client that sent `what` (1008)."""
        self.hub.stats.count_refusal("frame_flood")
        log.info("closing %s: %s", self, what)
        if self.state == OPEN:
            self.close(close_codes.POLICY_VIOLATION, "too many frames")

    def finish(self) -> None:
        """Release the socket once the read loop has ended."""
        self.state = CLOSED
        self.pending = []
        close_socket(self.sock)


def _answer_to_unreadable(exc: ParseFailed) -> int:
    """Our close code for frames wsproto could not parse: a Close frame Bandit could not
    read either is a protocol error, except a code above 4999, which Bandit answers with
    1000 (codes under 1000 too, which wsproto's report does not tell apart)."""
    reason = str(exc)
    if "CLOSE with invalid code" in reason:
        return close_codes.NORMAL
    if "CLOSE" in reason:
        # A reserved code, a one-byte payload, a reason that is not UTF-8.
        return close_codes.PROTOCOL_ERROR
    return exc.code if exc.code in close_codes.SENDABLE else close_codes.PROTOCOL_ERROR


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

    def opened(self, peer: WebSocketPeer) -> None:
        """An upgraded connection starts (`closed` follows, whatever happens next)."""
        stats = self.hub.stats
        stats.connections_total += 1
        stats.connections_open += 1
        self.live.add(peer)
        log.debug("connected %s", peer)
        if self.draining:  # upgraded after the drain began: send it elsewhere at once
            peer.close(close_codes.GOING_AWAY, "server shutting down")

    async def register(self, peer: WebSocketPeer) -> None:
        """Make an opened connection a broker peer (before any of its messages)."""
        await self.gateway.tell(self.broker.connect, peer)
        # One turn of the event loop before the first read: the client, which has just
        # got its 101, has usually sent its first message by then, so the read finds it
        # instead of waiting for the socket (a registration with epoll, far dearer).
        await trio.lowlevel.checkpoint()

    def closed(self, peer: WebSocketPeer) -> None:
        """A connection that `opened` has ended: forget it and release its socket."""
        self.live.discard(peer)
        if not self.live:
            self._all_closed.set()
        self.hub.stats.connections_open -= 1
        self.gateway.tell_soon(self.broker.disconnect, peer)
        peer.finish()
        log.debug("disconnected %s", peer)

    async def said_goodbye(self, peer: WebSocketPeer) -> None:
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
