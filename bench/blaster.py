#!/usr/bin/env python3
"""A minimal, fast Phoenix V2 relay used to check the load generator's own ceiling.

It is not a broker: it answers joins and heartbeats on any topic and relays every
other client event as a broadcast to all subscribers of that topic; so does
`POST /api/broadcast {topic, event, payload}`. A broadcast
is encoded once and appended to each subscriber's out buffer; buffers are
flushed once per event-loop pass, so every write carries all frames queued since
the last one (as a server that coalesces writes does). `--frames-per-write 1`
instead writes each frame on its own, like a server that sends per message.

Prints `listening on http://127.0.0.1:PORT` to stderr, stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import collections
import select
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson
from wsframes import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, encode_server_frame
from wsproto.utilities import generate_accept_token


class Client:
    __slots__ = ("buf", "frames_out", "out", "sock", "topics", "upgraded", "want_out")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.out = bytearray()
        self.frames_out: collections.deque[bytes] = collections.deque()
        self.upgraded = False
        self.want_out = False
        self.topics: set[str] = set()


class Blaster:
    def __init__(
        self, port: int, frames_per_write: int, drop_every: int = 0, api_key: str = ""
    ) -> None:
        self.listener = socket.create_server(("127.0.0.1", port), backlog=4096)
        self.listener.setblocking(False)
        self.ep = select.epoll()
        self.ep.register(self.listener.fileno(), select.EPOLLIN)
        self.clients: dict[int, Client] = {}
        self.topics: dict[str, dict[int, Client]] = {}
        self.dirty: dict[int, Client] = {}
        self.one_by_one = frames_per_write == 1
        self.drop_every = drop_every
        self.api_key = api_key
        self.relayed = 0
        self.running = True

    def serve(self) -> None:
        lfd = self.listener.fileno()
        while self.running:
            try:
                events = self.ep.poll(0.5, 4096)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == lfd:
                    self.accept()
                    continue
                c = self.clients.get(fd)
                if c is None:
                    continue
                if ev & select.EPOLLOUT:
                    self.dirty[fd] = c
                if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self.on_readable(fd, c)
            if self.dirty:
                dirty, self.dirty = self.dirty, {}
                for fd, c in dirty.items():
                    self.flush(fd, c)

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.clients[sock.fileno()] = Client(sock)
            self.ep.register(sock.fileno(), select.EPOLLIN)

    def drop(self, fd: int, c: Client) -> None:
        for topic in c.topics:
            self.topics[topic].pop(fd, None)
        self.clients.pop(fd, None)
        self.dirty.pop(fd, None)
        self.ep.unregister(fd)
        c.sock.close()

    def on_readable(self, fd: int, c: Client) -> None:
        try:
            data = c.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop(fd, c)
            return
        c.buf += data
        while not c.upgraded:
            if not self.on_http(fd, c):
                return
        self.on_frames(fd, c)

    def on_http(self, fd: int, c: Client) -> bool:
        """Answer one complete HTTP request (upgrade or API); False if none is complete."""
        end = c.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(c.buf[:end]).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        if not head[0].startswith("POST /api/broadcast "):
            del c.buf[: end + 4]
            accept = generate_accept_token(headers.get("sec-websocket-key", "").encode())
            c.out += (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            c.upgraded = True
            self.dirty[fd] = c
            return True
        length = int(headers.get("content-length", "0"))
        if len(c.buf) < end + 4 + length:
            return False
        body = bytes(c.buf[end + 4 : end + 4 + length])
        del c.buf[: end + 4 + length]
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            status, answer = b"401 Unauthorized", b'{"error":"unauthorized"}'
        else:
            msg = orjson.loads(body)
            self.broadcast(msg["topic"], msg["event"], msg["payload"])
            status, answer = b"200 OK", b'{"ok":true}'
        c.out += (
            b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(answer)).encode() + b"\r\n\r\n" + answer
        )
        self.dirty[fd] = c
        return True

    def on_frames(self, fd: int, c: Client) -> None:
        buf = c.buf
        pos = 0
        while len(buf) - pos >= 6:
            ln = buf[pos + 1] & 0x7F
            hl = 2
            if ln == 126:
                if len(buf) - pos < 8:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hl = 4
            elif ln == 127:
                if len(buf) - pos < 14:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            if len(buf) - pos < hl + 4 + ln:
                break
            opcode = buf[pos] & 0x0F
            mask = buf[pos + hl : pos + hl + 4]
            start = pos + hl + 4
            key = (bytes(mask) * (ln // 4 + 1))[:ln]
            raw = int.from_bytes(buf[start : start + ln], "big") ^ int.from_bytes(key, "big")
            payload = raw.to_bytes(ln, "big")
            pos = start + ln
            if opcode == OP_TEXT:
                self.on_message(fd, c, payload)
            elif opcode == OP_PING:
                self.send(fd, c, encode_server_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                self.send(fd, c, encode_server_frame(payload[:2], OP_CLOSE))
        del buf[:pos]

    def on_message(self, fd: int, c: Client, payload: bytes) -> None:
        join_ref, ref, topic, event, body = orjson.loads(payload)[:5]
        if event == "heartbeat" or event == "phx_join":
            if event == "phx_join":
                c.topics.add(topic)
                self.topics.setdefault(topic, {})[fd] = c
            reply = [join_ref, ref, topic, "phx_reply", {"response": {}, "status": "ok"}]
            self.send(fd, c, encode_server_frame(orjson.dumps(reply)))
            return
        self.broadcast(topic, event, body)

    def broadcast(self, topic: str, event: str, body) -> None:
        frame = encode_server_frame(orjson.dumps([None, None, topic, event, body]))
        dirty = self.dirty
        subscribers = self.topics.get(topic, {})
        self.relayed += 1
        if self.drop_every and self.relayed % self.drop_every == 0:
            # Deliberate loss: the latest subscriber misses this broadcast.
            subscribers = dict(subscribers)
            subscribers.popitem()
        if self.one_by_one:
            for sfd, s in subscribers.items():
                s.frames_out.append(frame)
                dirty[sfd] = s
        else:
            for sfd, s in subscribers.items():
                s.out += frame
                dirty[sfd] = s

    def send(self, fd: int, c: Client, frame: bytes) -> None:
        if self.one_by_one:
            c.frames_out.append(frame)
        else:
            c.out += frame
        self.dirty[fd] = c

    def flush(self, fd: int, c: Client) -> None:
        if not self.one_by_one:
            if c.out:
                self._write(fd, c)
            return
        while c.out or c.frames_out:
            if not c.out:
                c.out += c.frames_out.popleft()
            if not self._write(fd, c):
                return

    def _write(self, fd: int, c: Client) -> bool:
        """Write what the socket takes; False (and wait for EPOLLOUT) if some is left."""
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            n = 0
        except OSError:
            self.drop(fd, c)
            return False
        del c.out[:n]
        if bool(c.out) != c.want_out:
            c.want_out = bool(c.out)
            self.ep.modify(fd, select.EPOLLIN | select.EPOLLOUT if c.out else select.EPOLLIN)
        return not c.out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--frames-per-write", choices=["many", "1"], default="many")
    p.add_argument(
        "--drop-every",
        type=int,
        default=0,
        metavar="K",
        help="withhold every K-th broadcast from the latest subscriber",
    )
    p.add_argument("--api-key", default="", help="bearer key POST /api/broadcast requires")
    o = p.parse_args()
    blaster = Blaster(o.port, 1 if o.frames_per_write == "1" else 0, o.drop_every, o.api_key)

    def stop(*_):
        blaster.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    port = blaster.listener.getsockname()[1]
    print(f"blaster listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    blaster.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
