"""phoenix.js's LongPoll transport at `<socket path>/longpoll`, answered as Phoenix does.

* GET without a live session: the connect checks (the connect params and
  `X-Phoenix-AuthToken`) and `{"status":410,"token":...}`, which phoenix.js takes as
  "open";
* GET with a session: answer at once with what is queued (200), or hold the request up to
  `window_ms` for news and answer 204 when none came; a session the server ended (kick,
  revoked token, slow client, shutdown) answers its next poll with 410, which
  phoenix.js 1.8.3+ takes as "session gone" and reconnects;
* POST: the body is one frame, or up to 100 ndjson lines (`[`... text, anything else
  base64 of a binary frame), each taking the same inbound path as a websocket frame, in
  order; answered `{"status":200}`. A frame that is not a Phoenix message (an empty body
  is one) ends the session as it would crash Phoenix's: the POST is answered 408 (Phoenix's
  session never acknowledges it) and the session's next poll 403.

Every answer is HTTP 200 with the protocol status in the JSON body, CORS-open and never
cached. The sessions themselves live in `longpoll_sessions`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import socket
from typing import Any

import orjson
import trio

from phxbroker.broker.activity import ActivityLog
from phxbroker.config.settings import LongPollConfig
from phxbroker.protocol import close_codes
from phxbroker.protocol.messages import ProtocolError
from phxbroker.transport.admission import Admission, Refusal
from phxbroker.transport.http import BadRequest, HttpConnection, Request
from phxbroker.transport.inbound import Inbound
from phxbroker.transport.longpoll_sessions import LongPollSession, LongPollSessions
from phxbroker.transport.sockets import ClientSocket

log = logging.getLogger("phxbroker.longpoll")

MAX_LINES = 100  # lines read from one POST, as Phoenix 1.7.22+/1.8.6+
NDJSON = "application/x-ndjson"
JSON = "application/json; charset=utf-8"
OPEN_HEADERS = [("access-control-allow-origin", "*"), ("cache-control", "no-store")]
# Phoenix's answer to a batched line that is neither a JSON array nor base64 (its
# default error body); the session itself carries on.
PHOENIX_ERROR_BODY = b'{"errors":{"detail":"500.json"}}'


class LongPoll:
    """The HTTP handler serving `<socket path>/longpoll`."""

    def __init__(
        self,
        config: LongPollConfig,
        admission: Admission,
        sessions: LongPollSessions,
        inbound: Inbound,
        activity: ActivityLog,
    ) -> None:
        self.admission = admission
        self.activity = activity
        self.sessions = sessions
        self.inbound = inbound
        self.stats = sessions.stats
        self.configure(config)

    def configure(self, config: LongPollConfig) -> None:
        """Serve requests with a (reloaded) `[longpoll]` config."""
        self.config = config
        self.sessions.window_ms = config.window_ms

    async def __call__(self, conn: HttpConnection, request: Request) -> None:
        """Answer one request on `<socket path>/longpoll`."""
        cfg = self.config
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
        refusal = self.admission.check_origin(request)
        if refusal is not None:
            await self._refuse(conn, request, refusal)
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
        token, params = self.sessions.split_token(request)
        session = self.sessions.lookup(token)
        if session is None:
            await self._new_session(conn, request, params)
        elif not session.closed:
            await self._listen(conn, session)
        elif session.pending:
            # A session the server ended hands over what it still had queued; after that
            # its token is unknown.
            self.sessions.forget(session)
            await self._answer_messages(conn, session, 200)
        else:
            await self._answer_gone(conn, session)

    async def _new_session(
        self, conn: HttpConnection, request: Request, params: dict[str, str]
    ) -> None:
        if self.sessions.draining:
            # An empty body reads as status 0 to phoenix.js: it retries with backoff.
            await conn.respond(503, headers=OPEN_HEADERS, close=True)
            return
        try:
            admitted = await self.admission.admit(
                request, params, request.header("x-phoenix-authtoken") or None, "longpoll"
            )
        except Refusal as refusal:
            await self._refuse(conn, request, refusal)
            return
        session = await self.sessions.open(request.remote, admitted.serializer, admitted.identity)
        self.activity.connected(session, request.path, params, request.received_at)
        await self._answer_messages(conn, session, 410)

    async def _listen(self, conn: HttpConnection, session: LongPollSession) -> None:
        """Answer with the session's queue, waiting up to window_ms for something to come."""
        seq = session.supersede()
        session.polling += 1
        self.sessions.holding()
        try:
            client_gone = False
            if not session.pending:
                with trio.move_on_after(self.config.window_ms / 1000):
                    client_gone = await _wait_unless_client_leaves(conn.sock, session)
            if client_gone:
                return  # what is queued stays for the client's next GET
            if session.poll_seq != seq:
                await self._answer_messages(conn, session, 204, empty=True)
            elif session.pending:
                await self._answer_messages(conn, session, 200)
            elif session.closed:
                await self._answer_gone(conn, session)
            else:
                await self._answer_messages(conn, session, 204)
        finally:
            session.polling -= 1
            session.last_seen = trio.current_time()
            self.sessions.released()

    async def _post(self, conn: HttpConnection, request: Request, body: bytes) -> None:
        token, _ = self.sessions.split_token(request)
        session = self.sessions.lookup(token)
        if session is None or session.closed:
            await self._answer(conn, {"status": 410})
            return
        self.stats.bytes_in += len(body)
        batched = request.header("content-type").split(";")[0].strip().lower() == NDJSON
        if batched:
            lines = [line.removesuffix(b"\r") for line in body.split(b"\n")[:MAX_LINES]]
        else:
            lines = [body]  # one text frame, whatever it looks like
        inbound = self.inbound
        with trio.move_on_after(self.config.window_ms / 1000) as deadline:
            for number, line in enumerate(lines, 1):
                if not line and len(lines) > 1:
                    continue  # a blank line in a batch (an empty body is an empty frame)
                is_text = not batched or line.startswith(b"[")
                try:
                    if is_text:
                        msg = inbound.decode(session, line)
                    else:
                        raw = base64.b64decode(line, validate=True)
                        msg = inbound.decode(session, raw, binary=True)
                except binascii.Error:
                    log.info(
                        "line %d of a POST from %s is neither a JSON array nor base64",
                        number,
                        session,
                    )
                    self.stats.count_refusal("bad_longpoll_post")
                    await conn.respond(500, PHOENIX_ERROR_BODY, content_type=JSON)
                    return
                except ProtocolError:
                    # As a websocket would be closed with 1011: the session ends. Phoenix's
                    # session process crashes here and the POST waits out window_ms for an
                    # acknowledgement that never comes.
                    session.close(close_codes.INTERNAL_ERROR, "protocol error")
                    await self._answer(conn, {"status": 408})
                    return
                if not await inbound.forward(session, msg):
                    break  # closed for its rate: the rest of the POST goes with the session
        if deadline.cancelled_caught:
            # The broker did not take the lines in time (Phoenix: the session did not ack).
            await self._answer(conn, {"status": 408})
            return
        await self._answer(conn, {"status": 200})

    async def _answer_gone(self, conn: HttpConnection, session: LongPollSession) -> None:
        """The poll of a session that has ended, after which its token is unknown: 410
        (phoenix.js 1.8.3+ reconnects: "session gone"), or, for a session that ended on a
        frame that was not a Phoenix message, 403 as Phoenix answers the token of a session
        that crashed (phoenix.js closes with 1008 and reconnects)."""
        self.sessions.forget(session)
        if session.close_code == close_codes.INTERNAL_ERROR:
            await self._answer(conn, {"status": 403})
        else:
            await self._answer_messages(conn, session, 410)

    async def _refuse(self, conn: HttpConnection, request: Request, refusal: Refusal) -> None:
        self.admission.refused(refusal, request, "long-poll connect")
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


async def _wait_unless_client_leaves(sock: ClientSocket, session: LongPollSession) -> bool:
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


async def _client_left(sock: ClientSocket) -> bool:
    """Wait until the client closes its end (True) or sends more (False, e.g. pipelining)."""
    while True:
        try:
            await trio.lowlevel.wait_readable(sock)
            return sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            continue
        except (OSError, trio.ClosedResourceError):
            return True
