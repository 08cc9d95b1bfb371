"""HTTP/1.1 on a non-blocking socket, parsed by h11, with a C-parsed websocket upgrade.

Every read has a deadline (a client that trickles its request is cut off) and bodies are
size-limited before they are read; malformed requests get 400 (or h11's more precise
status, such as 431 for oversized headers) and the connection is closed.

Most connections send one request, a websocket upgrade, and h11's pure-Python parsing of
it and of the 101 was the largest part of a connect's CPU. So the first request on a
connection, when it is one complete upgrade head of a shape h11 reads the same way, is
parsed by httptools (llhttp) and answered with a 101 written here; h11 is set up only if
the connection needs it after all (another answer, a second request), fed the same
bytes. Everything else goes through h11 from its first byte, as before.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import h11
import httptools
import trio

from phxbroker.transport.sockets import RECV_SIZE, ClientSocket, recv_some, send_all, shutdown

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
    # time.perf_counter() when its head was parsed: a connect's log line says how long after.
    received_at: float = field(default_factory=time.perf_counter)
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


# Where a request head ends, as h11 finds it (it also takes bare LF line ends).
_HEAD_END = re.compile(rb"\n\r?\n")
# h11's request-target: visible ASCII only (llhttp also lets some other bytes through).
_TARGET = re.compile(rb"[\x21-\x7e]+")
_SWITCHING = b"HTTP/1.1 101 " + REASONS[101] + b"\r\n"


class _UpgradeHead:
    """httptools' callbacks for one request head: its target, and its headers as `Request`
    holds them, with what the fast path must know of them."""

    __slots__ = ("body", "headers", "hosts", "size", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.size = 0  # as h11's path measures a head: target and header lines
        self.hosts = 0
        self.body = False  # a header that announces a body

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # h11 drops the whitespace around a value; llhttp keeps what trails it.
        value = value.strip(b" \t")
        self.size += len(name) + len(value) + 4
        # llhttp takes only token characters in a header name: it is ASCII.
        key = name.decode("ascii").lower()
        if key == "host":
            self.hosts += 1
        elif key == "content-length" or key == "transfer-encoding":
            self.body = True
        _add_header(self.headers, key, value.decode("latin-1"))


def _add_header(headers: dict[str, str], key: str, text: str) -> None:
    headers[key] = f"{headers[key]}, {text}" if key in headers else text


def _request(
    method: str, target: str, headers: dict[str, str], remote: str, http_version: str = "1.1"
) -> Request:
    parts = urlsplit(target)
    return Request(
        method=method,
        target=target,
        path=parts.path,
        query=parts.query,
        headers=headers,
        remote=remote,
        params=parse_query(parts.query),
        http_version=http_version,
    )


class HttpConnection:
    """One client connection in its HTTP phase (before any upgrade)."""

    def __init__(
        self, sock: ClientSocket, remote: str, *, max_header_size: int, timeout: float
    ) -> None:
        self.sock = sock
        self.remote = remote
        self.timeout = timeout
        self.max_header_size = max_header_size
        self._h11: h11.Connection | None = None
        # The first request when httptools parsed it: every byte read, and where the bytes
        # after its head start.
        self._received = b""
        self._head_end = 0

    @property
    def _http(self) -> h11.Connection:
        """h11's state of this connection. After an upgrade request parsed by httptools it
        is set up on first use, fed the same bytes and past that request, as if h11 had
        read it."""
        if self._h11 is None:
            conn = self._h11 = self._new_h11()
            if self._head_end:
                conn.receive_data(self._received)
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    raise BadRequest(
                        exc.error_status_hint or 400, _without_quoted_bytes(exc)
                    ) from None
                assert isinstance(event, h11.Request), event
        return self._h11

    def _new_h11(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_size)

    async def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            try:
                event = self._http.next_event()
            except h11.RemoteProtocolError as exc:
                raise BadRequest(exc.error_status_hint or 400, _without_quoted_bytes(exc)) from None
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await recv_some(self.sock)
            except OSError:
                data = b""
            self._http.receive_data(data)

    async def read_request(self) -> Request | None:
        """The next request's head, or None when the client closed or went quiet.

        A client gets `timeout` seconds to send a complete request head.
        """
        deadline = trio.current_time() + self.timeout
        if self._h11 is None and not self._head_end:  # the connection's first request
            request = await self._read_first_request(deadline)
            if request is not None:
                return request
        conn = self._http
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        with trio.move_on_at(deadline):
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
            headers: dict[str, str] = {}
            for name, value in event.headers:
                _add_header(headers, name.decode("ascii").lower(), value.decode("latin-1"))
            return _request(
                event.method.decode("ascii"),
                event.target.decode("ascii", "replace"),
                headers,
                self.remote,
                event.http_version.decode("ascii"),
            )
        if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
            return None  # an idle keep-alive connection: just close it
        raise BadRequest(408, "request not received in time")

    async def _read_first_request(self, deadline: float) -> Request | None:
        """Read the first request head; if it is a websocket upgrade httptools can take,
        that request. Otherwise None, with h11 set up and fed every byte read (and the end
        of the stream, if it came), to go on from there."""
        # The request is usually there by the time the connection's task runs: a deadline
        # (a cancel scope, costly next to the rest) is set up only if it has to be waited for.
        try:
            data = self.sock.recv(RECV_SIZE)
            closed = not data
        except BlockingIOError:
            data, closed = b"", False
        except OSError:
            data, closed = b"", True
        if not closed and not _HEAD_END.search(data) and len(data) <= self.max_header_size:
            with trio.move_on_at(deadline):
                while not _HEAD_END.search(data) and len(data) <= self.max_header_size:
                    try:
                        chunk = await recv_some(self.sock)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        closed = True
                        break
                    data += chunk
        if not closed:
            request = self._upgrade_request(data)
            if request is not None:
                return request
        conn = self._h11 = self._new_h11()
        if data:
            conn.receive_data(data)
        if closed:
            conn.receive_data(b"")
        return None

    def _upgrade_request(self, data: bytes) -> Request | None:
        """The request in `data` if it is one complete websocket upgrade head that h11 would
        read the same way, parsed by httptools; else None (h11 then reads it)."""
        if not data.startswith(b"GET "):
            return None
        end = data.find(b"\r\n\r\n") + 4
        head = data[:end]
        # CRLF line ends only, no folded header lines: the shapes where llhttp and h11
        # could read the same bytes differently go to h11.
        crlf = head.count(b"\r\n")
        if end < 4 or head.count(b"\n") != crlf or head.count(b"\r") != crlf:
            return None
        if b"\n " in head or b"\n\t" in head:
            return None
        parsed = _UpgradeHead()
        parser = httptools.HttpRequestParser(parsed)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            head_end = upgrade.args[0]
        except httptools.HttpParserError:
            return None
        else:
            return None  # not an upgrade (llhttp also wants "Connection: upgrade")
        if head_end != end or parser.get_http_version() != "1.1":
            return None
        if not _TARGET.fullmatch(parsed.url):
            return None
        if parsed.body:
            return None  # h11 reads the body
        if parsed.hosts != 1:
            return None  # h11 refuses a request with no Host or several
        if len(parsed.url) + parsed.size > self.max_header_size:
            return None  # h11's path refuses it (431)
        self._received = data
        self._head_end = head_end
        return _request("GET", parsed.url.decode("ascii"), parsed.headers, self.remote)

    async def read_body(self, request: Request, limit: int) -> bytes:
        """The request body, refusing more than `limit` bytes (413)."""
        declared = request.header("content-length")
        # h11 has already checked that a Content-Length header is a valid integer.
        if declared and int(declared.split(",")[0]) > limit:
            raise BadRequest(413, f"request body larger than {limit} bytes")
        if self._http.they_are_waiting_for_100_continue:
            # curl sends "Expect: 100-continue" with larger bodies and waits a second for it.
            continue_ = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            await send_all(self.sock, self._http.send(continue_))
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
        data = self._http.send(
            h11.Response(status_code=status, headers=hdrs, reason=REASONS.get(status, b""))
        )
        if body:
            data += self._http.send(h11.Data(data=body))
        data += self._http.send(h11.EndOfMessage())
        with trio.move_on_after(self.timeout):
            await send_all(self.sock, data)
            return
        raise TimeoutError(f"{self.remote} did not read the response in time")

    async def switch_protocols(self, headers: list[tuple[str, str]]) -> bytes:
        """Send 101 and return the bytes the client already sent past the request."""
        if self._h11 is None and self._head_end:
            # The same bytes h11 writes for this 101, without setting h11 up for it.
            lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
            await send_all(self.sock, _SWITCHING + lines.encode("ascii") + b"\r\n")
            return self._received[self._head_end :]
        data = self._http.send(
            h11.InformationalResponse(
                status_code=101,
                headers=[(n.encode(), v.encode()) for n, v in headers],
                reason=REASONS[101],
            )
        )
        await send_all(self.sock, data)
        return self._http.trailing_data[0]

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
        return self._http.our_state is h11.DONE and self._http.their_state is h11.DONE

    async def finish_request(self, limit: int = 65536) -> bool:
        """After a response, read what is left of the request (a body the handler did not
        need) so the connection can carry the next one; False when it cannot."""
        if self._http.our_state is not h11.DONE:
            return False
        if self._http.their_state is h11.SEND_BODY:
            size = 0
            with trio.move_on_after(self.timeout):
                while self._http.their_state is h11.SEND_BODY:
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
        if self._http.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
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
