"""The header-walking counter must agree with a full parse however reads are split."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from wsframes import (
    OP_CLOSE,
    OP_PING,
    FrameCounter,
    FrameParser,
    encode_client_frame,
    encode_server_frame,
)


def _stream(rng: random.Random) -> tuple[bytes, int, int, int]:
    frames = []
    bcasts = hbs = others = 0
    for i in range(400):
        kind = rng.random()
        if kind < 0.7:
            pad = "x" * (70000 if i == 200 else rng.choice([0, 50, 100, 200]))
            body = f'[null,null,"bench:t","bench",{{"seq":{i},"pad":"{pad}"}}]'
            bcasts += 1
        elif kind < 0.85:
            body = f'[null,"{i}","phoenix","phx_reply",{{"response":{{}},"status":"ok"}}]'
            hbs += 1
        else:
            body = f'["1",null,"bench:t","other",{{"n":{i}}}]'
            others += 1
        frames.append(encode_server_frame(body.encode()))
        if rng.random() < 0.05:
            frames.append(encode_server_frame(b"hi", OP_PING))
    frames.append(encode_server_frame((1001).to_bytes(2, "big"), OP_CLOSE))
    return b"".join(frames), bcasts, hbs, others


def test_counter_matches_frames_for_any_split():
    rng = random.Random(7)
    stream, bcasts, hbs, others = _stream(rng)
    for max_chunk in (2, 3, 7, 64, 1000, 300000):
        counter = FrameCounter()
        pos = 0
        returned = 0
        while pos < len(stream):
            step = rng.randint(1, max_chunk)
            chunk = bytearray(stream[pos : pos + step]) + bytearray(b"\x00" * 5)
            returned += counter.feed(chunk, min(step, len(stream) - pos))
            pos += step
        assert (counter.broadcasts, counter.heartbeat_replies, counter.others) == (
            bcasts,
            hbs,
            others,
        ), max_chunk
        assert returned == bcasts
        assert counter.closed and counter.close_code == 1001
        assert counter.pings and all(p == b"hi" for p in counter.pings)


def test_parser_returns_whole_frames_and_client_frames_unmask():
    payload = b'["1","1","bench:t","phx_join",{}]' * 10
    frame = encode_client_frame(payload)
    assert frame[1] & 0x80
    mask = frame[4:8]
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(frame[8:]))
    assert body == payload
    parser = FrameParser()
    wire = encode_server_frame(b"abc") + encode_server_frame(b"d" * 300)
    assert parser.feed(wire[:3]) == []
    assert parser.feed(wire[3:10]) == [(1, b"abc")]
    assert parser.feed(wire[10:]) == [(1, b"d" * 300)]
    assert parser.take_rest() == b""


def test_handshake_checks_the_accept_token():
    from wsframes import ClientHandshake, HandshakeError

    def response(accept: str) -> bytes:
        return (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        ).encode()

    # The example from RFC 6455 section 1.3.
    hs = ClientHandshake("127.0.0.1:1", "/socket/websocket?vsn=2.0.0")
    hs._key = b"dGhlIHNhbXBsZSBub25jZQ=="
    assert hs.receive(response("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")[:20]) is None
    assert hs.receive(response("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")[20:] + b"\x81\x00") == b"\x81\x00"

    hs = ClientHandshake("127.0.0.1:1", "/socket/websocket?vsn=2.0.0")
    with pytest.raises(HandshakeError, match="Accept"):
        hs.receive(response("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="))

    hs = ClientHandshake("127.0.0.1:1", "/x")
    with pytest.raises(HandshakeError, match="403"):
        hs.receive(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
