"""HTTP/1.1 on a non-blocking socket, parsed by h11.

Every read has a deadline (a client that trickles its request is cut off) and bodies are
size-limited before they are read; malformed requests get 400 (or h11's more precise
status, such as 431 for oversized headers) and the connection is closed.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

from phxbroker.transport.sockets import recv_some, send_all, shutdown

# After an early answer the unread body is drained for a moment (see refuse_body).
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * 1_048_576

REASONS = {
    101: b"Switching Protocols",
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
}


class BadRequest(Exception):
    """The client broke HTTP; answered with `status` and the connection is closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Request:
    method: str
    target: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    remote: str
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)
    http_version: str = "1.1"

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)


def _without_quoted_bytes(error: Exception) -> str:
    """h11's message minus any request bytes it quotes: those may carry a token."""
    return _QUOTED_BYTES.sub("", str(error)) or "malformed request"


_QUOTED_BYTES = re.compile(r":?\s*(bytearray\()?b['\"].*$", re.DOTALL)


def parse_query(query: str) -> dict[str, str]:
    """Connect params as Plug reads them: a repeated key keeps its last value."""
    return dict(parse_qsl(query, keep_blank_values=True))


class HttpConnection:
    """One client connection in its HTTP phase (before any upgrade)."""

    def __init__(
        self, sock: socket.socket, remote: str, *, max_header_size: int, timeout: float
    ) -> None:
        self.sock = sock
        self.remote = remote
        self.timeout = timeout
        self.max_header_size = max_header_size
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_size)

    async def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise BadRequest(exc.error_status_hint or 400, _without_quoted_bytes(exc)) from None
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await recv_some(self.sock)
            except OSError:
                data = b""
            self.h11.receive_data(data)

    async def read_request(self) -> Request | None:
        """The next request's head, or None when the client closed or went quiet.

        A client gets `timeout` seconds to send a complete request head.
        """
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        with trio.move_on_after(self.timeout):
            event = await self._next_event()
            if isinstance(event, h11.ConnectionClosed):
                return None
            if not isinstance(event, h11.Request):
                raise BadRequest(400, "expected an HTTP request")
            # h11 bounds only a head still arriving; one that came in a single read is
            # measured here.
            head_size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
            if head_size > self.max_header_size:
                raise BadRequest(431, f"request head larger than {self.max_header_size} bytes")
            target = event.target.decode("ascii", "replace")
            parts = urlsplit(target)
            headers: dict[str, str] = {}
            for name, value in event.headers:
                key = name.decode("ascii").lower()
                text = value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            return Request(
                method=event.method.decode("ascii"),
                target=target,
                path=parts.path,
                query=parts.query,
                headers=headers,
                remote=self.remote,
                params=parse_query(parts.query),
                http_version=event.http_version.decode("ascii"),
            )
        if self.h11.their_state is h11.IDLE and not self.h11.trailing_data[0]:
            return None  # an idle keep-alive connection: just close it
        raise BadRequest(408, "request not received in time")

    async def read_body(self, request: Request, limit: int) -> bytes:
        """The request body, refusing more than `limit` bytes (413)."""
        declared = request.header("content-length")
        # h11 has already checked that a Content-Length header is a valid integer.
        if declared and int(declared.split(",")[0]) > limit:
            raise BadRequest(413, f"request body larger than {limit} bytes")
        if self.h11.they_are_waiting_for_100_continue:
            # curl sends "Expect: 100-continue" with larger bodies and waits a second for it.
            continue_ = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            await send_all(self.sock, self.h11.send(continue_))
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(self.timeout):
            while True:
                event = await self._next_event()
                if isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > limit:
                        raise BadRequest(413, f"request body larger than {limit} bytes")
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                    return b"".join(chunks)
                else:
                    raise BadRequest(400, "request body ended early")
        raise BadRequest(408, "request body not received in time")

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        *,
        headers: list[tuple[str, str]] | None = None,
        content_type: str | None = None,
        close: bool = False,
    ) -> None:
        """Send a complete response; `close` ends keep-alive. A client that does not take it
        within `timeout` seconds gets TimeoutError (an OSError), so it cannot hold us."""
        hdrs = [(b"content-length", str(len(body)).encode())]
        if content_type:
            hdrs.append((b"content-type", content_type.encode()))
        for name, value in headers or ():
            hdrs.append((name.encode(), value.encode()))
        if close:
            hdrs.append((b"connection", b"close"))
        data = self.h11.send(
            h11.Response(status_code=status, headers=hdrs, reason=REASONS.get(status, b""))
        )
        if body:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        with trio.move_on_after(self.timeout):
            await send_all(self.sock, data)
            return
        raise TimeoutError(f"{self.remote} did not read the response in time")

    async def switch_protocols(self, headers: list[tuple[str, str]]) -> bytes:
        """Send 101 and return the bytes the client already sent past the request."""
        data = self.h11.send(
            h11.InformationalResponse(
                status_code=101,
                headers=[(n.encode(), v.encode()) for n, v in headers],
                reason=REASONS[101],
            )
        )
        await send_all(self.sock, data)
        return self.h11.trailing_data[0]

    async def refuse_body(
        self, status: int, body: bytes, *, content_type: str, headers: list[tuple[str, str]]
    ) -> None:
        """Answer before reading the request body (e.g. 413), then read and discard what
        the client still sends, for a bounded time and amount, before closing: closing at
        once would reset the connection and the client would never see the answer."""
        await self.respond(status, body, content_type=content_type, headers=headers, close=True)
        shutdown(self.sock, socket.SHUT_WR)
        received = 0
        with trio.move_on_after(LINGER_SECONDS):
            try:
                while received < LINGER_BYTES:
                    data = await recv_some(self.sock)
                    if not data:
                        break
                    received += len(data)
            except OSError:
                pass

    @property
    def keep_alive(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def finish_request(self, limit: int = 65536) -> bool:
        """After a response, read what is left of the request (a body the handler did not
        need) so the connection can carry the next one; False when it cannot."""
        if self.h11.our_state is not h11.DONE:
            return False
        if self.h11.their_state is h11.SEND_BODY:
            size = 0
            with trio.move_on_after(self.timeout):
                while self.h11.their_state is h11.SEND_BODY:
                    event = await self._next_event()
                    if isinstance(event, h11.Data):
                        size += len(event.data)
                        if size > limit:
                            return False
                    elif not isinstance(event, h11.EndOfMessage):
                        return False
        return self.keep_alive

    async def send_error(self, error: BadRequest) -> None:
        """Best-effort error response for a request h11 could not accept."""
        body = (str(error) + "\n").encode()
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            with trio.move_on_after(self.timeout):
                await self.respond(error.status, body, content_type="text/plain", close=True)
        except (OSError, h11.LocalProtocolError):
            # h11 refuses to answer a request it never parsed; write a minimal reply.
            raw = (
                f"HTTP/1.1 {error.status} {REASONS.get(error.status, b'').decode()}\r\n"
                f"content-length: {len(body)}\r\ncontent-type: text/plain\r\n"
                f"connection: close\r\n\r\n"
            ).encode() + body
            try:
                with trio.move_on_after(self.timeout):
                    await send_all(self.sock, raw)
            except OSError:
                pass
