"""The listen port's front door: routes each HTTP request, performs websocket upgrades.

Every request under a socket path (any transport) is first checked against the
connection limits (429 per client address, 503 in total). Checks on
`GET <socket_path>/websocket` then follow Phoenix's order: the Origin, the auth token
carried as a subprotocol, the serializer version, authentication, and only then the
upgrade headers (so a bad token is 403 even without them, as in Phoenix).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from wsproto.utilities import generate_accept_token

from phxbroker.auth.authenticator import Refused
from phxbroker.protocol.serializers import serializer_for
from phxbroker.transport.admission import client_address, forwarded_client
from phxbroker.transport.http import BadRequest, HttpConnection, Request
from phxbroker.transport.websocket import WebSocketPeer

if TYPE_CHECKING:
    from phxbroker.daemon.server import Server

log = logging.getLogger("phxbroker.http")

AUTH_TOKEN_PREFIX = "base64url.bearer.phx."

Handler = Callable[[HttpConnection, Request], Awaitable[None]]


class FrontDoor:
    """Serves every connection accepted on the listen port."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.routes: dict[str, dict[str, Handler]] = {}
        # Transports other than the websocket, by sub-path under every socket path
        # ("/longpoll"); their handler answers every method itself.
        self.transports: dict[str, Handler] = {}
        self.fallbacks: dict[str, Handler] = {}

    def route(self, method: str, path: str, handler: Handler) -> None:
        """Serve `method path` with handler(conn, request), which reads and responds itself."""
        self.routes.setdefault(path, {})[method] = handler

    def fallback(self, prefix: str, handler: Handler) -> None:
        """Serve requests under `prefix` that no route takes (its own 404 and 405)."""
        self.fallbacks[prefix] = handler

    async def serve(
        self, sock: socket.socket, remote: str, counted: list[str] | None = None
    ) -> None:
        """Answer requests on one connection until it closes or is upgraded. `counted`
        holds the address the connection is counted under for the connection limits."""
        cfg = self.server.config.server
        conn = HttpConnection(
            sock, remote, max_header_size=cfg.max_header_size, timeout=cfg.handshake_timeout
        )
        try:
            while True:
                request = await conn.read_request()
                if request is None:
                    return
                self._attribute(request, counted)
                if await self.dispatch(conn, request) or not await conn.finish_request():
                    return
        except BadRequest as exc:
            self.server.stats.count_refusal("bad_http")
            log.info("bad HTTP request from %s: %s", remote, exc)
            await conn.send_error(exc)

    def _attribute(self, request: Request, counted: list[str] | None) -> None:
        """Behind a trusted proxy the client is the one X-Forwarded-For names: it is what
        logs show and what the per-address limit counts."""
        trusted = self.server.config.server.trusted_proxies
        forwarded = request.header("x-forwarded-for")
        client = forwarded_client(request.remote, forwarded, trusted) if forwarded else None
        if client is None:
            return
        request.remote = client
        if counted is not None:
            address = client_address(client)
            self.server.open_connections.moved(counted[0], address)
            counted[0] = address

    async def dispatch(self, conn: HttpConnection, request: Request) -> bool:
        """Handle one request; True when the connection was taken over (upgraded)."""
        for base in self.server.config.server.socket_paths:
            if request.path.startswith(base + "/"):
                over_limit = self.server.admission_problem(request)
                if over_limit is not None:
                    status, reason, detail = over_limit
                    return await self._refuse(conn, request, reason, detail, status=status)
            if request.path == base + "/websocket":
                return await self.websocket(conn, request)
            transport = self.transports.get(request.path.removeprefix(base))
            if transport is not None and request.path.startswith(base):
                await transport(conn, request)
                return False
        handlers = self.routes.get(request.path)
        if handlers is None or request.method not in handlers:
            for prefix, fallback in self.fallbacks.items():
                if request.path.startswith(prefix):
                    await fallback(conn, request)
                    return False
        if handlers is None:
            await conn.respond(404, b"not found\n", content_type="text/plain")
        elif request.method not in handlers:
            allow = ", ".join(sorted(handlers))
            await conn.respond(
                405, b"method not allowed\n", content_type="text/plain", headers=[("allow", allow)]
            )
        else:
            await handlers[request.method](conn, request)
        return False

    async def websocket(self, conn: HttpConnection, request: Request) -> bool:
        server = self.server
        if request.method != "GET":
            await conn.respond(400, close=True)
            return False

        origin_problem = server.check_origin(request)
        if origin_problem:
            return await self._refuse(conn, request, "origin", origin_problem)

        offered = [
            p.strip() for p in request.header("sec-websocket-protocol").split(",") if p.strip()
        ]
        header_token = None
        subprotocol = None
        if offered:
            try:
                header_token = auth_token_from_subprotocols(offered)
            except ValueError as exc:
                return await self._refuse(conn, request, "bad_auth_token", str(exc))
            if "phoenix" not in offered:
                return await self._refuse(
                    conn, request, "subprotocol", "no acceptable websocket subprotocol offered"
                )
            subprotocol = "phoenix"

        serializer = serializer_for(request.params.get("vsn"))
        if serializer is None:
            return await self._refuse(
                conn, request, "bad_vsn", f"unsupported vsn {request.params.get('vsn')!r}"
            )
        try:
            identity = server.authenticator.authenticate(request.params, header_token)
        except Refused as exc:
            if exc.reason != "banned":
                server.stats.auth_failures += 1
            return await self._refuse(conn, request, exc.reason, str(exc))

        problem = upgrade_problem(request)
        if problem:
            await conn.respond(400, problem.encode(), close=True)
            return False

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
            server.hub,
            peer_id=server.next_peer_id(),
            remote=request.remote,
            serializer=serializer,
            user=identity.user,
            credential=identity.credential,
        )
        trailing = await conn.switch_protocols(headers)
        await server.run_peer(peer, trailing)
        return True

    async def _refuse(
        self, conn: HttpConnection, request: Request, reason: str, detail: str, status: int = 403
    ) -> bool:
        self.server.stats.count_refusal(reason)
        log.info("refused connect from %s on %s: %s", request.remote, request.path, detail)
        await conn.respond(status, close=True)
        return False


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
