"""WebSocket frames the server writes (RFC 6455), sans-io.

Server frames are unmasked, so one broadcast's frame bytes are the same for every
subscriber that uses the same serializer: transports build a frame once and reuse it.
Inbound frames are parsed by wsproto.
"""

from __future__ import annotations

import struct

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked server frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to the 123 bytes a control frame can carry."""
    return encode_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()[:123])
