#!/usr/bin/env python3
"""A hostile client: one websocket connection that floods the server, and comes back.

    python bench/flooder.py --port PORT --kind ping --duration 20

Kinds of flood:

- `ping`: ping frames as fast as the socket takes them; the pongs are read and counted.
- `cont`: a text frame opened non-final (`01 80 <mask>`), then empty non-final
  continuation frames (`00 80 <mask>`) for ever: a message that never ends.
- `msg`: valid Phoenix messages: a join to a topic of its own, then pushes of a relayed
  event on it (each goes through the broker and comes back as a broadcast).

It behaves like an attacker: whenever the server closes it (a close frame, EOF or a
reset) it reconnects at once and floods again; a connect or handshake that fails is
retried after 10 ms. After a close frame it ends its side with a FIN and waits up to
0.5 s for the server's, so that every frame it counts as sent reached the server.
Every wait has a timeout and the whole run is bounded by `--duration`; SIGTERM or
SIGINT ends it early. On exit it prints one JSON line: what it sent (counted in whole
frames the kernel took), what came back, and every close.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import json
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wsframes import (
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ClientHandshake,
    FrameParser,
    HandshakeError,
)

KINDS = ("ping", "cont", "msg")
FLOOD_TOPIC = "bench:flood"
RETRY_AFTER_FAILURE_S = 0.010
CLOSE_WAIT_S = 0.5
MAX_LISTED = 200  # connections whose frame counts the result lists
# Frames per prepared chunk: one send() hands the kernel up to this many at once.
CHUNK_FRAMES = 4096
_LINGER_ABORT = b"\x01\x00\x00\x00\x00\x00\x00\x00"


def masked_frame(payload: bytes, opcode: int, final: bool = True) -> bytes:
    """One masked client frame (payload under 126 bytes), final or not."""
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(((0x80 if final else 0) | opcode, 0x80 | len(payload))) + mask + masked


def flood_plan(kind: str) -> tuple[bytes, bytes]:
    """(bytes sent once after the handshake, one flood frame) for a kind of flood.

    Every flood frame of a kind has the same length, so whole frames sent is
    bytes sent // frame length.
    """
    if kind == "ping":
        return b"", masked_frame(b"ping", OP_PING)
    if kind == "cont":
        return masked_frame(b"", OP_TEXT, final=False), masked_frame(b"", OP_CONT, final=False)
    if kind == "msg":
        join = json.dumps(["1", "1", FLOOD_TOPIC, "phx_join", {}], separators=(",", ":"))
        push = json.dumps(["1", "2", FLOOD_TOPIC, "bench", {"x": 1}], separators=(",", ":"))
        return masked_frame(join.encode(), OP_TEXT), masked_frame(push.encode(), OP_TEXT)
    raise ValueError(f"unknown flood kind {kind!r}; expected one of {', '.join(KINDS)}")


class Flooder:
    """Floods one connection at a time until a deadline; counts all it does."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.o = opts
        self.opener, self.frame = flood_plan(opts.kind)
        self.chunk = self.frame * CHUNK_FRAMES
        self.target = opts.path + "?" + urlencode([("vsn", "2.0.0")])
        self.stop_requested = False
        self.connections = 0
        self.handshake_failures: collections.Counter[str] = collections.Counter()
        self.closes: collections.Counter[str] = collections.Counter()
        self.frames_sent = 0
        self.bytes_sent = 0
        self.replies = 0
        self.reply_kinds: collections.Counter[str] = collections.Counter()
        self.write_blocked_s = 0.0
        self.first_close_after_s: float | None = None
        self.frames_per_connection: list[int] = []
        self.t0 = 0.0
        self._rest = b""

    def run(self) -> dict:
        o = self.o
        t0 = self.t0 = time.monotonic()
        deadline = t0 + o.duration
        while not self.stop_requested and time.monotonic() < deadline:
            sock = self.open(deadline)
            if sock is None:
                time.sleep(RETRY_AFTER_FAILURE_S)
                continue
            self.connections += 1
            sent_frames = self.flood(sock, deadline)
            self.frames_per_connection.append(sent_frames)
        frames = self.frames_per_connection
        return {
            "kind": o.kind,
            "duration_s": round(time.monotonic() - t0, 3),
            "connections": self.connections,
            "handshake_failures": dict(self.handshake_failures),
            "closes": dict(self.closes),
            "first_close_after_s": self.first_close_after_s,
            "frames_sent": self.frames_sent,
            "frame_bytes": len(self.frame),
            "bytes_sent": self.bytes_sent,
            "max_frames_per_connection": max(frames, default=0),
            "frames_per_connection": frames[:MAX_LISTED],
            "replies": self.replies,
            "reply_kinds": dict(self.reply_kinds),
            "write_blocked_s": round(self.write_blocked_s, 3),
        }

    def open(self, deadline: float) -> socket.socket | None:
        """Connect and upgrade within --handshake-timeout; None (counted) on failure."""
        o = self.o
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(max(0.01, min(o.handshake_timeout, deadline - time.monotonic())))
        try:
            sock.connect((o.host, o.port))
            handshake = ClientHandshake(f"{o.host}:{o.port}", self.target)
            sock.sendall(handshake.request)
            rest = None
            while rest is None:
                data = sock.recv(65536)
                if not data:
                    raise HandshakeError("connection closed during the handshake")
                rest = handshake.receive(data)
        except (OSError, HandshakeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if isinstance(exc, socket.timeout):
                reason = "timed out"
            self.handshake_failures[reason or type(exc).__name__] += 1
            _abort(sock)
            return None
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._rest = rest
        return sock

    def flood(self, sock: socket.socket, deadline: float) -> int:
        """Send flood frames until the server closes the connection or the run ends;
        return the whole flood frames the kernel took on this connection."""
        frame_len = len(self.frame)
        pending = memoryview(self.opener + self.chunk)
        head = len(self.opener)  # bytes of `pending` that are not flood frames
        flood_bytes = 0
        parser = FrameParser()
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLOUT)
        why = ""
        if self._rest:
            why = self.on_frames(parser.feed(self._rest))
        refill_below = len(self.chunk) // 2
        while not why:
            now = time.monotonic()
            if self.stop_requested or now >= deadline:
                break
            events = poller.poll(max(0, min(100, (deadline - now) * 1000)))
            ev = events[0][1] if events else 0
            if not ev & select.POLLOUT:
                # The server is not taking more: its reads fell behind or stopped.
                self.write_blocked_s += time.monotonic() - now
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    data = None
                except OSError as exc:
                    why = _error_name(exc)
                    break
                if data == b"":
                    why = "eof"
                    break
                if data:
                    why = self.on_frames(parser.feed(data))
                    if why:
                        break
            if ev & select.POLLOUT:
                try:
                    n = sock.send(pending)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    why = _error_name(exc)
                    break
                pending = pending[n:]
                if head:
                    used = min(head, n)
                    head -= used
                    n -= used
                flood_bytes += n
                if len(pending) < refill_below:
                    # The chunk holds whole frames, so the stream stays frame-aligned.
                    pending = memoryview(bytes(pending) + self.chunk)
        frames = flood_bytes // frame_len
        self.frames_sent += frames
        self.bytes_sent += flood_bytes
        if why:
            self.closes[why] += 1
            if self.first_close_after_s is None:
                self.first_close_after_s = round(time.monotonic() - self.t0, 3)
        if why.startswith("close"):
            _close_after(sock, CLOSE_WAIT_S)
        else:
            _abort(sock)
        return frames

    def on_frames(self, frames: list[tuple[int, bytes]]) -> str:
        """Count what the server sent; return why the connection ended, or ""."""
        for opcode, payload in frames:
            if opcode == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                return f"close {code}"
            self.replies += 1
            if opcode == OP_PONG:
                self.reply_kinds["pong"] += 1
            elif opcode == OP_TEXT:
                self.reply_kinds["text"] += 1
            else:
                self.reply_kinds[f"opcode {opcode}"] += 1
        return ""


def _error_name(exc: OSError) -> str:
    if exc.errno is not None and exc.errno in errno.errorcode:
        return errno.errorcode[exc.errno]
    return type(exc).__name__


def _close_after(sock: socket.socket, bound: float) -> None:
    """After the server's close frame: end our side (FIN, after all we sent) and wait
    briefly for the server's, so that everything sent reaches it and none is reset."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(bound)
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline and sock.recv(65536):
            pass
    sock.close()


def _abort(sock: socket.socket) -> None:
    # Nothing to wait for on the way out; no TIME_WAIT left behind either.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    sock.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--port", type=int, required=True, help="server port on 127.0.0.1")
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--duration", type=float, default=20.0, help="seconds to flood")
    p.add_argument("--path", default="/socket/websocket")
    p.add_argument("--handshake-timeout", type=float, default=5.0)
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="raise own niceness by this much, so that a generator sharing the core "
        "is scheduled first",
    )
    p.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    o = p.parse_args(argv)
    if o.host != "127.0.0.1":
        p.error("the flooder only talks to 127.0.0.1")
    return o


def main(argv: list[str] | None = None) -> int:
    o = parse_args(argv)
    if o.nice:
        os.nice(o.nice)
    flooder = Flooder(o)

    def stop(_signum, _frame) -> None:
        flooder.stop_requested = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    result = flooder.run()
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
