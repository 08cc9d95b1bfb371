"""Long-poll sessions: each one a broker peer whose messages wait for the client's next GET.

A session joins, relays, gets presence and can be kicked like a websocket client. Its
outbound messages wait in a bounded queue of ready-made JSON string literals (a
broadcast's literal is built once and cached on the Broadcast) until a GET collects them.

The session token is `phxlp.<random id>.<HMAC>` with a per-process key: unguessable, and
recognisable by its prefix. A session no GET has visited for 1.5 x window_ms is ended
(phoenix.js never says goodbye), and a session the server ended answers its next poll
with 410 before its token is forgotten.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import logging
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson
import trio

from phxbroker.auth.authenticator import Identity
from phxbroker.broker.gateway import BrokerGateway
from phxbroker.protocol import close_codes
from phxbroker.protocol.messages import HEARTBEAT_TOPIC
from phxbroker.protocol.serializers import Serializer
from phxbroker.transport.admission import TokenBucket
from phxbroker.transport.http import Request
from phxbroker.transport.inbound import ClientHandler
from phxbroker.transport.sockets import SocketHub

if TYPE_CHECKING:
    from phxbroker.broker.core import Broadcast, Channel

log = logging.getLogger("phxbroker.longpoll")

SUBPATH = "/longpoll"
TOKEN_PREFIX = "phxlp."
EXPIRY_FACTOR = 1.5  # a session without a GET for this many windows is ended
MAX_SWEEP_INTERVAL = 1.0
SHUTDOWN_GRACE = 5.0


class LongPollSession:
    """One long-polling client as the broker sees it (implements broker.Peer)."""

    transport = "longpoll"
    answers_in_order = True  # answers go through the broker, behind earlier replies

    __slots__ = (
        "_frame_key",
        "_owner",
        "_wake",
        "assigns",
        "bucket",
        "channels",
        "close_code",
        "closed",
        "credential",
        "id",
        "last_seen",
        "pending",
        "pending_size",
        "poll_seq",
        "polling",
        "remote",
        "serializer",
        "session_id",
        "token",
        "user",
    )

    def __init__(
        self,
        owner: LongPollSessions,
        *,
        session_id: str,
        token: str,
        peer_id: int,
        remote: str,
        serializer: Serializer,
        identity: Identity,
    ) -> None:
        self._owner = owner
        self.session_id = session_id
        self.token = token
        self.id = peer_id
        self.remote = remote
        self.serializer = serializer
        self.user = identity.user
        self.credential = identity.credential
        self.assigns = identity.assigns
        self.channels: dict[str, Channel] = {}
        self.pending: list[bytes] = []  # JSON string literals, ready to join into a response
        self.pending_size = 0
        self.closed = False
        self.close_code: int | None = None  # why it ended (a websocket close code)
        self.last_seen = trio.current_time()
        self.polling = 0  # GETs being held for this session right now
        self.poll_seq = 0  # a newer GET supersedes an older one still held
        self._wake: trio.Event | None = None
        self._frame_key = (SUBPATH, serializer)
        hub = owner.hub
        rate = hub.message_rate
        self.bucket = TokenBucket(rate, hub.message_burst, hub.now) if rate else None

    def __repr__(self) -> str:
        return f"<longpoll {self.id} {self.user or 'anonymous'}@{self.remote}>"

    # -- the broker's side ---------------------------------------------------------------

    def send(self, encoded: tuple[bool, bytes]) -> None:
        if self.closed:
            return
        is_binary, data = encoded
        if is_binary:
            self._owner.stats.longpoll_binary_dropped += 1
            return
        self._owner.stats.messages_out += 1
        self._enqueue(orjson.dumps(data.decode()))

    def deliver(self, broadcast: Broadcast) -> None:
        if self.closed:
            return
        frames = broadcast.frames
        item = frames.get(self._frame_key)
        if item is None:
            encoded = broadcast.encoded(self.serializer)
            item = b"" if encoded is None or encoded[0] else orjson.dumps(encoded[1].decode())
            frames[self._frame_key] = item
        if item:
            self._enqueue(item)
        else:
            self._owner.stats.longpoll_binary_dropped += 1

    @property
    def open(self) -> bool:
        return not self.closed

    def close(self, code: int = close_codes.GOING_AWAY, reason: str = "") -> None:
        """End the session: the broker forgets it, a held GET is answered with what is
        still queued, or with 410 (session gone) when nothing is."""
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self.last_seen = trio.current_time()  # kept a while to answer the next poll
        self._owner.ended(self, reason)
        self._notify()

    def answer_heartbeat(self, ref: Any) -> None:
        """Reply to a heartbeat (in the broker task, so it is queued after earlier replies)."""
        self._owner.stats.messages_in += 1
        self.send(self.serializer.encode_reply(None, ref, HEARTBEAT_TOPIC, "ok", {}))

    # -- the transport's side ------------------------------------------------------------

    def take(self) -> list[bytes]:
        """Everything queued, oldest first; the queue is left empty."""
        items = self.pending
        self.pending = []
        self.pending_size = 0
        return items

    async def wait_for_news(self) -> None:
        """Return once messages are queued, the session closed or a newer GET arrived."""
        if self.pending or self.closed:
            return
        self._wake = trio.Event()
        await self._wake.wait()

    def supersede(self) -> int:
        """Wake a GET still held (it answers 204) and return the new poll's number."""
        self._notify()
        self.poll_seq += 1
        return self.poll_seq

    def _enqueue(self, item: bytes) -> None:
        self.pending.append(item)
        self.pending_size += len(item)
        limit = self._owner.hub.outbox_limit
        if self.pending_size > limit:
            self._owner.stats.slow_client_drops += 1
            log.warning("dropping slow client %s: more than %d bytes queued", self, limit)
            self.take()
            self.close(close_codes.GOING_AWAY, "too slow")
            return
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()


class LongPollSessions:
    """The daemon's long-poll sessions: their tokens, their expiry, and their end."""

    def __init__(
        self,
        gateway: BrokerGateway,
        broker: ClientHandler,
        hub: SocketHub,
        peer_ids: itertools.count[int],
        window_ms: int,
    ) -> None:
        self.gateway = gateway
        self.broker = broker
        self.hub = hub
        self.stats = hub.stats
        self.peer_ids = peer_ids
        self.window_ms = window_ms
        self.sessions: dict[str, LongPollSession] = {}
        self.draining = False  # set once shutdown began: no new sessions
        self._secret = secrets.token_bytes(32)
        self._sweeping = False
        self._holding = 0  # GETs held or being answered
        self._released: trio.Event | None = None

    def split_token(self, request: Request) -> tuple[str | None, dict[str, str]]:
        """(session token or None, the connect params without it). The client appends the
        session token as the last `token` param, which may also be the app's param name;
        Phoenix 1.8.10+ also accepts it in a header."""
        pairs = parse_qsl(request.query, keep_blank_values=True)
        token = request.header("x-phoenix-longpoll-token") or None
        for index in range(len(pairs) - 1, -1, -1):
            if pairs[index][0] == "token":
                if pairs[index][1].startswith(TOKEN_PREFIX):
                    token = token or pairs.pop(index)[1]
                break
        return token, dict(pairs)

    def _sign(self, session_id: str) -> str:
        mac = hmac.new(self._secret, session_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def lookup(self, token: str | None) -> LongPollSession | None:
        """The session a token names, if the token is ours and the session is known."""
        if not token or not token.startswith(TOKEN_PREFIX):
            return None
        session_id, _, signature = token[len(TOKEN_PREFIX) :].partition(".")
        if not hmac.compare_digest(signature.encode(), self._sign(session_id).encode()):
            return None
        return self.sessions.get(session_id)

    async def open(
        self, remote: str, serializer: Serializer, identity: Identity
    ) -> LongPollSession:
        """A new session for an admitted client, registered with the broker."""
        session_id = secrets.token_urlsafe(16)
        session = LongPollSession(
            self,
            session_id=session_id,
            token=f"{TOKEN_PREFIX}{session_id}.{self._sign(session_id)}",
            peer_id=next(self.peer_ids),
            remote=remote,
            serializer=serializer,
            identity=identity,
        )
        self.sessions[session_id] = session
        stats = self.stats
        stats.connections_total += 1
        stats.connections_open += 1
        stats.longpoll_total += 1
        stats.longpoll_open += 1
        log.debug("connected %s", session)
        if not self._sweeping:
            self._sweeping = True
            self.hub.spawn(self._sweep)
        await self.gateway.tell(self.broker.connect, session)
        return session

    def ended(self, session: LongPollSession, reason: str) -> None:
        """A session closed: uncount it and have the broker forget it (never synchronously,
        since the broker may be iterating over its subscribers right now)."""
        self.stats.connections_open -= 1
        self.stats.longpoll_open -= 1
        log.debug("disconnected %s%s", session, f" ({reason})" if reason else "")
        self.gateway.tell_soon(self.broker.disconnect, session)

    def forget(self, session: LongPollSession) -> None:
        """Make the session's token unknown."""
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]

    def holding(self) -> None:
        """A GET is being held or answered (drain waits for it)."""
        self._holding += 1

    def released(self) -> None:
        self._holding -= 1
        if self._holding == 0 and self._released is not None:
            self._released.set()

    async def _sweep(self) -> None:
        """End sessions no GET has visited for EXPIRY_FACTOR windows, and forget sessions
        ended that long ago."""
        while True:
            window = self.window_ms / 1000
            await trio.sleep(min(MAX_SWEEP_INTERVAL, window / 4))
            now = trio.current_time()
            for session in list(self.sessions.values()):
                if session.polling:
                    continue
                if now - session.last_seen > window * EXPIRY_FACTOR:
                    if not session.closed:
                        log.info("ending %s: no poll for %g s", session, window * EXPIRY_FACTOR)
                        session.close(close_codes.GOING_AWAY, "expired")
                    self.forget(session)

    async def drain(self) -> None:
        """On shutdown: end every session and give held GETs a moment to be answered."""
        self.draining = True
        for session in list(self.sessions.values()):
            session.close(close_codes.GOING_AWAY, "server shutting down")
        if self._holding:
            self._released = trio.Event()
            with trio.move_on_after(SHUTDOWN_GRACE):
                await self._released.wait()
