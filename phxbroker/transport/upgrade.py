"""The websocket handshake at `GET <socket path>/websocket`, checked in Phoenix's order.

The Origin, the auth token carried as a subprotocol, the serializer version and the
credential come first, and only then the upgrade headers, so a bad token is 403 even
without them, as in Phoenix. A client that passes becomes a `WebSocketPeer`, served by
`WebSockets` until it goes.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json

from wsproto.utilities import generate_accept_token

from phxbroker.broker.activity import ActivityLog
from phxbroker.transport.admission import Admission, Refusal
from phxbroker.transport.http import HttpConnection, Request
from phxbroker.transport.router import Takeover
from phxbroker.transport.sockets import SocketHub
from phxbroker.transport.websocket import WebSocketPeer, WebSockets

AUTH_TOKEN_PREFIX = "base64url.bearer.phx."


class WebSocketUpgrade:
    """The route handler that turns an HTTP request into a websocket client."""

    def __init__(
        self,
        admission: Admission,
        websockets: WebSockets,
        hub: SocketHub,
        peer_ids: itertools.count[int],
        activity: ActivityLog,
    ) -> None:
        self.admission = admission
        self.activity = activity
        self.websockets = websockets
        self.hub = hub
        self.peer_ids = peer_ids

    async def __call__(self, conn: HttpConnection, request: Request) -> Takeover | None:
        """Answer the handshake; when the connection became a websocket, the client's
        session for the listener to run once the HTTP phase is over."""
        if request.method != "GET":
            await conn.respond(400, close=True)
            return None
        try:
            refusal = self.admission.check_origin(request)
            if refusal is not None:
                raise refusal
            header_token, subprotocol = _subprotocol(request)
            admitted = await self.admission.admit(
                request, request.params, header_token, "websocket"
            )
        except Refusal as refusal:
            self.admission.refused(refusal, request)
            await conn.respond(refusal.status, close=True)
            return None

        problem = upgrade_problem(request)
        if problem:
            await conn.respond(400, problem.encode(), close=True)
            return None

        headers = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            (
                "sec-websocket-accept",
                generate_accept_token(request.header("sec-websocket-key").encode()).decode(),
            ),
        ]
        if subprotocol:
            headers.append(("sec-websocket-protocol", subprotocol))
        peer = WebSocketPeer(
            conn.sock,
            self.hub,
            peer_id=next(self.peer_ids),
            remote=request.remote,
            serializer=admitted.serializer,
            user=admitted.identity.user,
            credential=admitted.identity.credential,
            assigns=admitted.identity.assigns,
        )
        trailing = await conn.switch_protocols(headers)
        self.activity.connected(peer, request.path, request.params, request.received_at)
        return peer.run(self.websockets, trailing)


def _subprotocol(request: Request) -> tuple[str | None, str | None]:
    """(the auth token phoenix.js 1.8 sent as a subprotocol, the subprotocol to echo)."""
    offered = [p.strip() for p in request.header("sec-websocket-protocol").split(",") if p.strip()]
    if not offered:
        return None, None
    try:
        header_token = auth_token_from_subprotocols(offered)
    except ValueError as exc:
        raise Refusal(403, "bad_auth_token", str(exc)) from None
    if "phoenix" not in offered:
        raise Refusal(403, "subprotocol", "no acceptable websocket subprotocol offered")
    return header_token, "phoenix"


def auth_token_from_subprotocols(offered: list[str]) -> str | None:
    """The token phoenix.js 1.8 sends as `base64url.bearer.phx.<base64>` (standard alphabet,
    padding optional), or None. Raises ValueError if it is not decodable."""
    for proto in offered:
        if proto.startswith(AUTH_TOKEN_PREFIX):
            encoded = proto[len(AUTH_TOKEN_PREFIX) :]
            try:
                raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
                return raw.decode()
            except (binascii.Error, UnicodeDecodeError):
                raise ValueError("auth token subprotocol is not valid base64") from None
    return None


def upgrade_problem(request: Request) -> str | None:
    """Why this is not a valid websocket upgrade request, or None."""
    if request.http_version != "1.1":
        return f"a websocket upgrade needs HTTP/1.1 (RFC 6455), not HTTP/{request.http_version}"
    connection = [t.strip().lower() for t in request.header("connection").split(",")]
    if "upgrade" not in connection:
        got = json.dumps([v for v in [request.header("connection")] if v])
        return f"'connection' header must contain 'upgrade', got {got}"
    if request.header("upgrade").lower() != "websocket":
        return f"'upgrade' header must be 'websocket', got {request.header('upgrade')!r}"
    if request.header("sec-websocket-version") != "13":
        return "'sec-websocket-version' header must be '13'"
    key = request.header("sec-websocket-key")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (binascii.Error, ValueError):
        return "'sec-websocket-key' header must be 16 bytes of base64"
    return None
