"""TLS on the listen port without giving up raw non-blocking sockets.

`TlsSocket` wraps an accepted socket with an `ssl.SSLObject` and two memory BIOs and
offers the surface the HTTP and websocket code use on plain sockets (`recv`, `send`,
`shutdown`, `fileno`, `close`) with the same non-blocking semantics: `recv` raises
BlockingIOError when no plaintext can be had without waiting, `send` raises it when the
socket cannot take more, and both report end of stream and errors as a socket would.
Waiting is done by the caller on `fileno()` (trio's wait_readable / wait_writable).

Ciphertext the kernel did not take is kept and written first by the next `send`. When
the last bytes a caller handed over are still in that buffer, `send` reports one byte
fewer than it took, so the caller keeps something pending and comes back once the socket
is writable; that byte, already encrypted, is acknowledged then and not sent twice.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl

import trio

RECV_SIZE = 65536
MAX_PLAINTEXT_PER_SEND = 262_144  # encrypt at most this much per send() call


class TlsHandshakeError(Exception):
    """The client did not complete a TLS handshake; str() says why, in one clause."""


class TlsSocket:
    """A non-blocking socket speaking TLS as the server side; see the module docstring."""

    __slots__ = ("_in", "_out", "_owed", "_pending", "_ssl", "raw")

    def __init__(self, raw: socket.socket, context: ssl.SSLContext) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=True)
        self._pending = b""  # ciphertext the kernel has not taken yet
        self._owed = False  # the caller believes its last byte is unsent; it is in _pending

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()

    # -- handshake -----------------------------------------------------------------------

    async def handshake(self, timeout: float) -> None:
        """Complete the server handshake within `timeout` seconds or raise
        TlsHandshakeError (EOFError when the client left without saying anything)."""
        got_bytes = False
        with trio.move_on_after(timeout) as scope:
            while True:
                try:
                    self._ssl.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    raise TlsHandshakeError(_describe_handshake_error(exc)) from None
                await self._flush_all()
                try:
                    data = self.raw.recv(RECV_SIZE)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.raw)
                    continue
                if not data:
                    if not got_bytes:
                        raise EOFError
                    raise TlsHandshakeError("the client closed the connection mid-handshake")
                got_bytes = True
                self._in.write(data)
            await self._flush_all()
        if scope.cancelled_caught:
            raise TlsHandshakeError(f"no complete TLS handshake within {timeout:g} s")

    async def _flush_all(self) -> None:
        self._pending += self._out.read()
        while self._pending:
            self._flush()
            if self._pending:
                await trio.lowlevel.wait_writable(self.raw)

    # -- the socket surface --------------------------------------------------------------

    def recv(self, size: int, flags: int = 0, /) -> bytes:
        """Up to `size` bytes of plaintext; b"" at end of stream; BlockingIOError when
        none can be had without waiting. With MSG_PEEK it peeks at the raw socket, which
        only tells whether the client has closed (b"") or sent more."""
        if flags & socket.MSG_PEEK:
            return self.raw.recv(size, flags)
        while True:
            try:
                data = self._ssl.read(size)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            else:
                if self._out.pending:
                    self._pending += self._out.read()  # e.g. a key update answer
                    self._flush()
                return data
            ciphertext = self.raw.recv(RECV_SIZE)  # BlockingIOError goes to the caller
            if ciphertext:
                self._in.write(ciphertext)
            else:
                self._in.write_eof()

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt and write; returns how many bytes of `data` were taken."""
        taken = 0
        if self._pending:
            self._flush()
            if self._pending:
                raise BlockingIOError(errno.EAGAIN, "TLS output buffer is full")
            if self._owed:
                self._owed = False
                taken = 1
        view = memoryview(data)[taken : taken + MAX_PLAINTEXT_PER_SEND]
        if not view:
            return taken
        self._ssl.write(view)
        self._pending = self._out.read()
        self._flush()
        taken += len(view)
        if self._pending:
            self._owed = True
            return taken - 1
        return taken

    def shutdown(self, how: int) -> None:
        """SHUT_WR sends close_notify (best effort) and half-closes; others act at once."""
        if how == socket.SHUT_WR and not self._pending:
            try:
                self._ssl.unwrap()
            except ssl.SSLWantReadError:
                pass  # close_notify is written; the client's answer is not awaited
            except ssl.SSLError:
                pass
            self._pending += self._out.read()
            with contextlib.suppress(OSError):
                self._flush()
        self.raw.shutdown(how)

    def _flush(self) -> None:
        """Write buffered ciphertext until done or the socket is full."""
        pending = self._pending
        while pending:
            try:
                sent = self.raw.send(pending)
            except BlockingIOError:
                break
            pending = pending[sent:]
        self._pending = pending


def _describe_handshake_error(exc: ssl.SSLError) -> str:
    reason = exc.reason or ""
    if reason == "HTTP_REQUEST":
        return "it sent plain HTTP to the TLS port"
    if reason in ("WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "UNKNOWN_PROTOCOL"):
        return "it does not speak TLS 1.2 or newer"
    if reason in ("NO_SHARED_CIPHER", "NO_SUITABLE_SIGNATURE_ALGORITHM"):
        return "it shares no cipher with this server"
    return f"TLS handshake failed ({reason.lower().replace('_', ' ') or 'unknown reason'})"
