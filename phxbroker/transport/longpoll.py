"""phoenix.js's LongPoll transport at `<socket path>/longpoll`, answered as Phoenix does.

A session is a broker `Peer` like a websocket connection: it joins, relays, gets presence
and can be kicked. Its outbound messages wait in a bounded queue until a GET collects them:

* GET without a live session: authenticate the connect params (and `X-Phoenix-AuthToken`)
  and answer `{"status":410,"token":...}`, which phoenix.js takes as "open";
* GET with a session: answer at once with what is queued (200), or hold the request up to
  `window_ms` for news and answer 204 when none came; a session the server ended (kick,
  revoked token, slow client, shutdown) answers its next poll with 410, which
  phoenix.js 1.8.3+ takes as "session gone" and reconnects;
* POST: the body is one frame, or up to 100 ndjson lines (`[`... text, anything else
  base64 of a binary frame), handed to the broker in order; answered `{"status":200}`.

Every answer is HTTP 200 with the protocol status in the JSON body, CORS-open and never
cached. The session token is an opaque, HMAC-signed random id. As in Phoenix, the client
appends it as a second `token` query param, so the last `token` value that is one of our
session tokens selects the session and the other values stay the app's connect params.
A session no GET has visited for 1.5 x window_ms is ended (phoenix.js never says bye).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson
import trio

from phxbroker.auth.authenticator import Identity, Refused
from phxbroker.protocol import close_codes, messages
from phxbroker.protocol.messages import ProtocolError
from phxbroker.protocol.serializers import Serializer, serializer_for
from phxbroker.transport.admission import RATE_LIMITED, TokenBucket, over_rate
from phxbroker.transport.http import BadRequest, HttpConnection, Request

if TYPE_CHECKING:
    from phxbroker.broker.core import Broadcast, Channel
    from phxbroker.daemon.server import Server

log = logging.getLogger("phxbroker.longpoll")

SUBPATH = "/longpoll"
TOKEN_PREFIX = "phxlp."
MAX_LINES = 100  # lines read from one POST, as Phoenix 1.7.22+/1.8.6+
EXPIRY_FACTOR = 1.5  # a session without a GET for this many windows is ended
MAX_SWEEP_INTERVAL = 1.0
SHUTDOWN_GRACE = 5.0
NDJSON = "application/x-ndjson"
JSON = "application/json; charset=utf-8"
OPEN_HEADERS = [("access-control-allow-origin", "*"), ("cache-control", "no-store")]
# Phoenix's answer to a batched line that is neither a JSON array nor base64 (its
# default error body); the session itself carries on.
PHOENIX_ERROR_BODY = b'{"errors":{"detail":"500.json"}}'


class LongPollSession:
    """One long-polling client as the broker sees it (implements broker.Peer)."""

    transport = "longpoll"

    __slots__ = (
        "_frame_key",
        "_owner",
        "_wake",
        "bucket",
        "channels",
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
        owner: LongPoll,
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
        self.channels: dict[str, Channel] = {}
        self.pending: list[bytes] = []  # JSON string literals, ready to join into a response
        self.pending_size = 0
        self.closed = False
        self.last_seen = trio.current_time()
        self.polling = 0  # GETs being held for this session right now
        self.poll_seq = 0  # a newer GET supersedes an older one still held
        self._wake: trio.Event | None = None
        self._frame_key = (SUBPATH, serializer)
        hub = owner.server.hub
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
        self.last_seen = trio.current_time()  # kept a while to answer the next poll
        self._owner.ended(self, reason)
        self._notify()

    def answer_heartbeat(self, ref: Any) -> None:
        """Reply to a heartbeat in the broker task, so it is queued after earlier replies."""
        self._owner.stats.messages_in += 1
        self.send(self.serializer.encode_reply(None, ref, messages.HEARTBEAT_TOPIC, "ok", {}))

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
        limit = self._owner.server.hub.outbox_limit
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


class LongPoll:
    """The sessions of one server and the HTTP handler serving `<socket path>/longpoll`."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.stats = server.stats
        self.sessions: dict[str, LongPollSession] = {}
        self._secret = secrets.token_bytes(32)
        self._sweeping = False
        self._holding = 0  # GETs held or being answered
        self._released: trio.Event | None = None
        server.frontdoor.transports[SUBPATH] = self.handle
        server.on_shutdown(self.drain)

    # -- HTTP ----------------------------------------------------------------------------

    async def handle(self, conn: HttpConnection, request: Request) -> None:
        """Answer one request on `<socket path>/longpoll`."""
        cfg = self.server.config.longpoll
        if not cfg.enabled:
            await conn.respond(404, b"not found\n", content_type="text/plain")
            return
        limit = cfg.max_post_size if request.method == "POST" else 0
        try:
            body = await conn.read_body(request, limit)
        except BadRequest as exc:
            if exc.status != 413:
                raise
            # As the API does: an answer the client can read, not a reset connection.
            self.stats.count_refusal("longpoll_post_too_big")
            message = f"the request body is larger than {limit} bytes ([longpoll] max_post_size)"
            await conn.refuse_body(
                413, message.encode(), content_type="text/plain", headers=OPEN_HEADERS
            )
            return
        problem = self.server.check_origin(request)
        if problem:
            await self._refuse(conn, request, "origin", problem)
        elif request.method == "GET":
            await self._get(conn, request)
        elif request.method == "POST":
            await self._post(conn, request, body)
        elif request.method == "OPTIONS":
            requested_headers = request.header("access-control-request-headers")
            await conn.respond(
                200,
                headers=[
                    *OPEN_HEADERS,
                    ("access-control-allow-headers", requested_headers),
                    ("access-control-allow-methods", "get, post, options"),
                    ("access-control-max-age", "3600"),
                ],
            )
        else:
            await conn.respond(400, headers=OPEN_HEADERS)

    async def _get(self, conn: HttpConnection, request: Request) -> None:
        token, params = self._split_token(request)
        session = self._lookup(token)
        if session is None:
            await self._new_session(conn, request, params)
        elif not session.closed:
            await self._listen(conn, session)
        else:
            # A session the server ended hands over what it still had queued, or says it is
            # gone (phoenix.js 1.8.3+ then reconnects); after that its token is unknown.
            self._forget(session)
            await self._answer_messages(conn, session, 200 if session.pending else 410)

    async def _new_session(
        self, conn: HttpConnection, request: Request, params: dict[str, str]
    ) -> None:
        server = self.server
        if server.draining:
            # An empty body reads as status 0 to phoenix.js: it retries with backoff.
            await conn.respond(503, headers=OPEN_HEADERS, close=True)
            return
        vsn = params.get("vsn")
        serializer = serializer_for(vsn)
        if serializer is None:
            await self._refuse(conn, request, "bad_vsn", f"unsupported vsn {vsn!r}")
            return
        try:
            identity = server.authenticator.authenticate(
                params, request.header("x-phoenix-authtoken") or None
            )
        except Refused as exc:
            if exc.reason != "banned":
                self.stats.auth_failures += 1
            await self._refuse(conn, request, exc.reason, str(exc))
            return
        session = self._open(request.remote, serializer, identity)
        await server.commands.send((server.broker.connect, (session,)))
        await self._answer_messages(conn, session, 410)

    async def _listen(self, conn: HttpConnection, session: LongPollSession) -> None:
        """Answer with the session's queue, waiting up to window_ms for something to come."""
        seq = session.supersede()
        session.polling += 1
        self._holding += 1
        try:
            client_gone = False
            if not session.pending:
                with trio.move_on_after(self.server.config.longpoll.window_ms / 1000):
                    client_gone = await _wait_unless_client_leaves(conn.sock, session)
            if client_gone:
                return  # what is queued stays for the client's next GET
            if session.poll_seq != seq:
                await self._answer_messages(conn, session, 204, empty=True)
            elif session.pending:
                await self._answer_messages(conn, session, 200)
            elif session.closed:
                self._forget(session)
                await self._answer_messages(conn, session, 410)
            else:
                await self._answer_messages(conn, session, 204)
        finally:
            session.polling -= 1
            session.last_seen = trio.current_time()
            self._holding -= 1
            if self._holding == 0 and self._released is not None:
                self._released.set()

    async def _post(self, conn: HttpConnection, request: Request, body: bytes) -> None:
        token, _ = self._split_token(request)
        session = self._lookup(token)
        if session is None or session.closed:
            await self._answer(conn, {"status": 410})
            return
        self.stats.bytes_in += len(body)
        batched = request.header("content-type").split(";")[0].strip().lower() == NDJSON
        if batched:
            lines = [line.removesuffix(b"\r") for line in body.split(b"\n")[:MAX_LINES]]
        else:
            lines = [body]  # one text frame, whatever it looks like
        server = self.server
        handle = server.broker.handle
        max_size = server.hub.max_frame_size
        with trio.move_on_after(server.config.longpoll.window_ms / 1000) as deadline:
            for number, line in enumerate(lines, 1):
                if not line:
                    continue
                where = f"line {number} of a POST from {session}"
                is_text = not batched or line.startswith(b"[")
                if not is_text:
                    try:
                        line = base64.b64decode(line, validate=True)
                    except binascii.Error:
                        log.info("%s is neither a JSON array nor base64", where)
                        self.stats.count_refusal("bad_longpoll_post")
                        await conn.respond(500, PHOENIX_ERROR_BODY, content_type=JSON)
                        return
                try:
                    if len(line) > max_size:
                        raise ProtocolError(f"message larger than {max_size} bytes")
                    if is_text:
                        msg = session.serializer.decode_text(line)
                    else:
                        msg = session.serializer.decode_binary(line)
                except ProtocolError as exc:
                    # As a websocket would be closed with 1011: the session ends.
                    self.stats.protocol_errors += 1
                    log.info("closing %s: %s: %s", session, where, exc)
                    session.close(close_codes.GOING_AWAY, "protocol error")
                    await self._answer(conn, {"status": 400})
                    return
                bucket = session.bucket
                if bucket is not None and not bucket.take(server.hub.now):
                    self.stats.messages_in += 1
                    if over_rate(session, bucket, self.stats, server.hub.rate_limit_close_after):
                        # In the broker task, after the replies queued before it.
                        await server.commands.send(
                            (session.close, (close_codes.POLICY_VIOLATION, "rate limited"))
                        )
                        break  # the rest of the POST is dropped with the session
                    reply = session.serializer.encode_reply(
                        msg.join_ref, msg.ref, msg.topic, "error", RATE_LIMITED
                    )
                    await server.commands.send((session.send, (reply,)))  # after earlier replies
                elif msg.event == messages.HEARTBEAT and msg.topic == messages.HEARTBEAT_TOPIC:
                    await server.commands.send((session.answer_heartbeat, (msg.ref,)))
                else:
                    await server.commands.send((handle, (session, msg)))
        if deadline.cancelled_caught:
            # The broker did not take the lines in time (Phoenix: the session did not ack).
            await self._answer(conn, {"status": 408})
            return
        await self._answer(conn, {"status": 200})

    async def _refuse(
        self, conn: HttpConnection, request: Request, reason: str, detail: str
    ) -> None:
        self.stats.count_refusal(reason)
        log.info("refused long-poll connect from %s: %s", request.remote, detail)
        await self._answer(conn, {"status": 403})

    async def _answer(self, conn: HttpConnection, data: dict[str, Any]) -> None:
        await conn.respond(200, orjson.dumps(data), content_type=JSON, headers=OPEN_HEADERS)

    async def _answer_messages(
        self, conn: HttpConnection, session: LongPollSession, status: int, *, empty: bool = False
    ) -> None:
        items = [] if empty else session.take()
        body = b'{"status":%d,"token":%s,"messages":[%s]}' % (
            status,
            orjson.dumps(session.token),
            b",".join(items),
        )
        self.stats.bytes_out += len(body)
        await conn.respond(200, body, content_type=JSON, headers=OPEN_HEADERS)

    # -- sessions ------------------------------------------------------------------------

    def _split_token(self, request: Request) -> tuple[str | None, dict[str, str]]:
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

    def _lookup(self, token: str | None) -> LongPollSession | None:
        if not token or not token.startswith(TOKEN_PREFIX):
            return None
        session_id, _, signature = token[len(TOKEN_PREFIX) :].partition(".")
        if not hmac.compare_digest(signature.encode(), self._sign(session_id).encode()):
            return None
        return self.sessions.get(session_id)

    def _open(self, remote: str, serializer: Serializer, identity: Identity) -> LongPollSession:
        session_id = secrets.token_urlsafe(16)
        session = LongPollSession(
            self,
            session_id=session_id,
            token=f"{TOKEN_PREFIX}{session_id}.{self._sign(session_id)}",
            peer_id=self.server.next_peer_id(),
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
            self.server.hub.spawn(self._sweep)
        return session

    def ended(self, session: LongPollSession, reason: str) -> None:
        """A session closed: uncount it and have the broker forget it (never synchronously,
        since the broker may be iterating over its subscribers right now)."""
        self.stats.connections_open -= 1
        self.stats.longpoll_open -= 1
        log.debug("disconnected %s%s", session, f" ({reason})" if reason else "")
        self._tell_broker(self.server.broker.disconnect, session)

    def _forget(self, session: LongPollSession) -> None:
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]

    def _tell_broker(self, fn: Callable[..., None], *args: Any) -> None:
        commands = self.server.commands
        try:
            commands.send_nowait((fn, args))
        except trio.WouldBlock:

            async def send_later() -> None:
                await commands.send((fn, args))

            self.server.hub.spawn(send_later)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _sweep(self) -> None:
        """End sessions no GET has visited for EXPIRY_FACTOR windows, and forget sessions
        ended that long ago."""
        while True:
            window = self.server.config.longpoll.window_ms / 1000
            await trio.sleep(min(MAX_SWEEP_INTERVAL, window / 4))
            now = trio.current_time()
            for session in list(self.sessions.values()):
                if session.polling:
                    continue
                if now - session.last_seen > window * EXPIRY_FACTOR:
                    if not session.closed:
                        log.info("ending %s: no poll for %g s", session, window * EXPIRY_FACTOR)
                        session.close(close_codes.GOING_AWAY, "expired")
                    self._forget(session)

    async def drain(self) -> None:
        """On shutdown: end every session and give held GETs a moment to be answered."""
        for session in list(self.sessions.values()):
            session.close(close_codes.GOING_AWAY, "server shutting down")
        if self._holding:
            self._released = trio.Event()
            with trio.move_on_after(SHUTDOWN_GRACE):
                await self._released.wait()


async def _wait_unless_client_leaves(sock: socket.socket, session: LongPollSession) -> bool:
    """Wait for news for the session; True if the client closed its connection first."""
    gone = False
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            nonlocal gone
            if await _client_left(sock):
                gone = True
                nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await session.wait_for_news()
        nursery.cancel_scope.cancel()
    return gone


async def _client_left(sock: socket.socket) -> bool:
    """Wait until the client closes its end (True) or sends more (False, e.g. pipelining)."""
    while True:
        try:
            await trio.lowlevel.wait_readable(sock)
            return sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            continue
        except (OSError, trio.ClosedResourceError):
            return True
