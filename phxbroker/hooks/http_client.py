"""HTTP/1.1 POSTs to the app's back end: keep-alive connections parsed by h11, on Trio.

Measured on our machine class (a trivial back end on the other core, one JSON answer per
call): httpx on Trio spent about 540 µs of client CPU per call, httpcore directly about
350 µs (over 1 ms with 32 calls at once), and h11 on Trio streams about 100 µs. A hooked
event must cost well under 300 µs of the broker's one core in all, so the hooks speak h11
themselves: h11 does the parsing, this module only keeps connections open and bounded.
https verifies the back end's certificate against the system's trust store.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

import h11
import trio

RECV_SIZE = 65536


class HttpCallError(Exception):
    """A call that got no usable answer; `refused` says the back end could not be reached
    at all (a refused connection), which is worth a retry."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class _Connection:
    __slots__ = ("h11", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)


class HttpClient:
    """POSTs to one base URL over a pool of at most `max_connections` idle connections."""

    def __init__(self, base_url: str, *, max_connections: int, max_answer_size: int) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or ""
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.base_path = parts.path.rstrip("/")
        self.host_header = parts.netloc.rpartition("@")[2]
        self.max_connections = max_connections
        self.max_answer_size = max_answer_size
        self._idle: list[_Connection] = []
        self._tls_context = ssl.create_default_context() if self.tls else None

    async def post(
        self, path: str, body: bytes, headers: list[tuple[str, str]]
    ) -> tuple[int, bytes]:
        """(status, body) of `POST <base><path>`. Raises HttpCallError."""
        while self._idle:
            conn = self._idle.pop()
            try:
                return await self._exchange(conn, path, body, headers, reused=True)
            except _Stale:
                continue  # the back end closed it while it was idle: the call never left
        return await self._exchange(await self._open(), path, body, headers, reused=False)

    async def aclose(self) -> None:
        """Close the idle connections."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)

    async def _open(self) -> _Connection:
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(self.host, self.port)
        except OSError as exc:
            raise HttpCallError(
                f"cannot connect to {self.host}:{self.port} ({exc.strerror or exc})",
                refused=True,
            ) from None
        if self._tls_context is not None:
            tls = trio.SSLStream(stream, self._tls_context, server_hostname=self.host)
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError) as exc:
                await trio.aclose_forcefully(stream)
                raise HttpCallError(f"TLS with {self.host} failed ({exc})") from None
            stream = tls
        return _Connection(stream)

    async def _exchange(
        self,
        conn: _Connection,
        path: str,
        body: bytes,
        headers: list[tuple[str, str]],
        *,
        reused: bool,
    ) -> tuple[int, bytes]:
        """One request and its answer. On a `reused` connection, a failure before any
        answer byte means the back end had closed it: _Stale, and the caller tries again."""
        request = h11.Request(
            method="POST",
            target=self.base_path + path,
            headers=[
                ("host", self.host_header),
                ("content-length", str(len(body))),
                ("connection", "keep-alive"),
                *headers,
            ],
        )
        received_any = False
        try:
            out = conn.h11.send(request) or b""
            out += conn.h11.send(h11.Data(data=body)) or b""
            out += conn.h11.send(h11.EndOfMessage()) or b""
            await conn.stream.send_all(out)
            status = 0
            chunks: list[bytes] = []
            size = 0
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    data = await conn.stream.receive_some(RECV_SIZE)
                    if not data and not received_any and reused:
                        raise _Stale
                    received_any = True
                    conn.h11.receive_data(bytes(data))
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > self.max_answer_size:
                        raise HttpCallError(
                            f"the answer is larger than {self.max_answer_size} bytes "
                            "([hooks] max_answer_size)"
                        )
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise HttpCallError("the back end closed the connection mid-answer")
        except _Stale:
            await trio.aclose_forcefully(conn.stream)
            raise
        except HttpCallError:
            await trio.aclose_forcefully(conn.stream)
            raise
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await trio.aclose_forcefully(conn.stream)
            if not received_any and reused:
                raise _Stale from None
            raise HttpCallError(f"the connection to the back end failed ({exc})") from None
        except h11.ProtocolError as exc:
            await trio.aclose_forcefully(conn.stream)
            raise HttpCallError(f"the back end's answer is not HTTP/1.1 ({exc})") from None
        except BaseException:
            await trio.aclose_forcefully(conn.stream)  # cancelled mid-call: never reused
            raise
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            if len(self._idle) < self.max_connections:
                self._idle.append(conn)
            else:
                await trio.aclose_forcefully(conn.stream)
        else:
            await trio.aclose_forcefully(conn.stream)
        return status, b"".join(chunks)


class _Stale(Exception):
    """An idle connection the back end had closed: nothing was processed, try another."""
