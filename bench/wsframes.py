"""Client side of the WebSocket wire, cut to what the load generator needs.

Sans-io: nothing here touches a socket. The opening handshake goes through h11;
frames are encoded and decoded by hand because the point of the generator is to
count server frames by walking their headers without copying or decoding them.
"""

from __future__ import annotations

import base64
import os

import h11
from wsproto.utilities import generate_accept_token

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# A fastlane broadcast starts `[null,null,`; a heartbeat reply starts `[null,"`.
# Byte 1 and byte 6 of the payload tell them and everything else apart.
_N = ord("n")
_QUOTE = ord('"')
_CLASSIFY_BYTES = 7


class HandshakeError(Exception):
    """The server did not switch to the WebSocket protocol."""


class ClientHandshake:
    """One client opening handshake: a request to send, a 101 response to check."""

    def __init__(self, host: str, target: str, subprotocols: list[str] | None = None) -> None:
        self._key = base64.b64encode(os.urandom(16))
        self._conn = h11.Connection(h11.CLIENT)
        headers = [
            ("Host", host),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", self._key),
            ("Sec-WebSocket-Version", "13"),
        ]
        if subprotocols:
            headers.append(("Sec-WebSocket-Protocol", ", ".join(subprotocols)))
        self.request = self._conn.send(h11.Request(method="GET", target=target, headers=headers))

    def receive(self, data: bytes) -> bytes | None:
        """Feed response bytes; return the bytes that follow the 101 once it is complete.

        Returns None while the response head is incomplete, raises HandshakeError
        when the server answered anything but a valid upgrade.
        """
        self._conn.receive_data(data)
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HandshakeError(f"bad HTTP response: {exc}") from None
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.ConnectionClosed):
            raise HandshakeError("connection closed during the handshake")
        status = getattr(event, "status_code", None)
        if status != 101:
            raise HandshakeError(f"HTTP {status} instead of 101")
        expected = generate_accept_token(self._key)
        accept = dict(event.headers).get(b"sec-websocket-accept")
        if accept != expected:
            raise HandshakeError("wrong Sec-WebSocket-Accept")
        trailing, _closed = self._conn.trailing_data
        return bytes(trailing)


def encode_client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """Return one final, masked client frame carrying `payload`."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    if n == 0:
        return head + mask
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + masked


def _head(data, pos: int, end: int) -> tuple[int, int] | None:
    """Return (header length, payload length) of the unmasked frame at `pos`, or None."""
    if end - pos < 2:
        return None
    ln = data[pos + 1] & 0x7F
    if ln < 126:
        return 2, ln
    if ln == 126:
        if end - pos < 4:
            return None
        return 4, (data[pos + 2] << 8) | data[pos + 3]
    if end - pos < 10:
        return None
    return 10, int.from_bytes(data[pos + 2 : pos + 10], "big")


class FrameCounter:
    """Counts server frames by walking headers only; payloads are skipped, not copied.

    Text frames are sorted by two payload bytes into broadcasts (`[null,null,…`),
    heartbeat replies (`[null,"…`) and others. A close frame ends the stream and
    records its code; pings are collected so the caller can answer them.
    """

    __slots__ = (
        "_partial",
        "_skip",
        "broadcasts",
        "close_code",
        "closed",
        "heartbeat_replies",
        "others",
        "pings",
    )

    def __init__(self) -> None:
        self.broadcasts = 0
        self.heartbeat_replies = 0
        self.others = 0
        self.closed = False
        self.close_code: int | None = None
        self.pings: list[bytes] = []
        self._skip = 0
        self._partial = b""

    def feed(self, data, n: int) -> int:
        """Walk the first `n` bytes of `data`; return how many broadcasts they completed."""
        pos = 0
        skip = self._skip
        if skip:
            if skip >= n:
                self._skip = skip - n
                return 0
            pos = skip
            self._skip = 0
        before = self.broadcasts
        if self._partial:
            # A header (or the bytes needed to classify it) straddled two reads:
            # finish that one frame from a small joined copy, then go on in place.
            joined = self._partial + bytes(data[pos : min(n, pos + 160)])
            used = self._frame(joined, 0, len(joined))
            if used is None:
                self._partial = joined
                return 0
            carried = len(self._partial)
            self._partial = b""
            pos += used - carried
            if pos > n:
                self._skip = pos - n
                return self.broadcasts - before
        bcast = 0
        while pos < n:
            if n - pos < 2:
                self._partial = bytes(data[pos:n])
                break
            if data[pos] == 0x81:
                # Fast path: a final text frame of the usual size with its first bytes here.
                ln = data[pos + 1]
                hl = 2
                if ln == 126 and n - pos >= 4:
                    hl = 4
                    ln = (data[pos + 2] << 8) | data[pos + 3]
                elif ln >= 126:
                    ln = 0
                if ln >= _CLASSIFY_BYTES and n - pos >= hl + _CLASSIFY_BYTES:
                    p = pos + hl
                    if data[p + 1] == _N and data[p + 6] == _N:
                        bcast += 1
                    else:
                        self._classify(data, p, ln)
                    pos = p + ln
                    continue
            used = self._frame(data, pos, n)
            if used is None:
                self._partial = bytes(data[pos:n])
                break
            pos += used
        self.broadcasts += bcast
        if pos > n:
            self._skip = pos - n
        return self.broadcasts - before

    def _classify(self, data, p: int, ln: int) -> None:
        if ln >= _CLASSIFY_BYTES and data[p + 1] == _N:
            c = data[p + 6]
            if c == _N:
                self.broadcasts += 1
                return
            if c == _QUOTE:
                self.heartbeat_replies += 1
                return
        self.others += 1

    def _frame(self, data, pos: int, end: int) -> int | None:
        """Account for the frame at `pos`; return its total length, or None if too short."""
        head = _head(data, pos, end)
        if head is None:
            return None
        hl, ln = head
        opcode = data[pos] & 0x0F
        if opcode >= OP_CLOSE:
            if end - pos < hl + ln:
                return None
            body = bytes(data[pos + hl : pos + hl + ln])
            if opcode == OP_CLOSE:
                self.closed = True
                self.close_code = int.from_bytes(body[:2], "big") if len(body) >= 2 else 1005
            elif opcode == OP_PING:
                self.pings.append(body)
            return hl + ln
        if opcode == OP_TEXT and data[pos] & 0x80:
            if end - pos < hl + min(ln, _CLASSIFY_BYTES):
                return None
            self._classify(data, pos + hl, ln)
        else:
            self.others += 1
        return hl + ln


class FrameParser:
    """Full frame parser: buffers bytes and returns whole (opcode, payload) frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data) -> list[tuple[int, bytes]]:
        """Add bytes; return every frame now complete, in order."""
        buf = self._buf
        buf += data
        frames = []
        pos = 0
        end = len(buf)
        while True:
            head = _head(buf, pos, end)
            if head is None:
                break
            hl, ln = head
            if end - pos < hl + ln:
                break
            frames.append((buf[pos] & 0x0F, bytes(buf[pos + hl : pos + hl + ln])))
            pos += hl + ln
        if pos:
            del buf[:pos]
        return frames

    def take_rest(self) -> bytes:
        """Hand over the bytes not yet part of a complete frame, emptying the buffer."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def encode_server_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """Return one final, unmasked frame as a server sends it."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload
