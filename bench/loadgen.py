#!/usr/bin/env python3
"""Load generator for a Phoenix Channels server (V2 JSON serializer over WebSocket).

Opens N websocket connections to 127.0.0.1, joins them all to one topic, then
either holds them idle (heartbeats only) or publishes broadcasts at a fixed rate
or as fast as the server delivers them (a closed loop with W broadcasts in
flight). In presence mode the joins themselves are the load: N clients join a
presence topic and the run ends once every probe's presence state lists all N.
Prints one JSON line with the results.

Cheap by construction, so the server and not the generator is what is measured:
one epoll loop, 256 KiB reads into one shared buffer, and subscribers that only
walk frame headers (no JSON). A sample of probe subscribers parse every frame to
time each broadcast (payload carries `seq` and `t`, the send time in µs).
Counting subscribers are read at most once per --read-interval so that each read
drains several frames; the probes, which time latency, are read at once.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import gc
import heapq
import json
import math
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import h11
import orjson
from procstat import Meter, process_cpu_seconds, process_rss_kib
from wsframes import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ClientHandshake,
    FrameCounter,
    FrameParser,
    HandshakeError,
    encode_client_frame,
)

CONNECTING, HANDSHAKE, JOINING, JOINED, DEAD, WAITING = range(6)
SUB, PROBE, PUB, HTTP, HEALTH, CONTROL = "sub", "probe", "pub", "http", "health", "control"
# phoenix.js 1.8's schedules: socket reconnect after the k-th failed try (then 5 s), and
# channel rejoin after a join refused or timed out (then 10 s); tries reset on open.
RECONNECT_AFTER_MS = (10, 50, 100, 150, 200, 250, 500, 1000, 2000)
REJOIN_AFTER_MS = (1000, 2000, 5000)


def reconnect_after_ms(tries: int) -> int:
    """phoenix.js 1.8's wait before socket reconnect number `tries` (1, 2, ...)."""
    return RECONNECT_AFTER_MS[tries - 1] if tries <= len(RECONNECT_AFTER_MS) else 5000


def rejoin_after_ms(tries: int) -> int:
    """phoenix.js 1.8's wait before channel rejoin number `tries` (1, 2, ...)."""
    return REJOIN_AFTER_MS[tries - 1] if tries <= len(REJOIN_AFTER_MS) else 10000


FLOODER = Path(__file__).resolve().parent / "flooder.py"
FLOOD_KINDS = ("ping", "cont", "msg")

PRESENCE_EVENTS = ("presence_state", "presence_diff")
READ_SIZE = 256 * 1024
PROBE_READ_SIZE = 16 * 1024  # bounds the JSON parsing one probe event can cost
PASS_BUDGET = 0.0005
# A read costs ~10 µs whether it drains one frame or a hundred, so counting
# subscribers are read at a rate that stays cheap for any N.
READS_PER_S = 20_000
JOIN_REF = "1"
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
ONESHOT = select.EPOLLIN | select.EPOLLONESHOT
_LINGER_ABORT = struct.pack("ii", 1, 0)


def clock() -> float:
    return time.monotonic()


thread_time = time.thread_time


def now_us() -> int:
    return time.monotonic_ns() // 1000


class Conn:
    """One websocket connection and where it is in its life."""

    __slots__ = (
        "count",
        "counter",
        "epoch",
        "fd",
        "handshake",
        "hb_ref",
        "index",
        "join_ref",
        "join_seq",
        "keys",
        "kind",
        "last_seq",
        "out",
        "parser",
        "rejoin_tries",
        "settled_at",
        "sock",
        "started",
        "state",
        "tries",
        "want_out",
    )

    def __init__(self, index: int, kind: str) -> None:
        self.index = index
        self.kind = kind
        self.state = CONNECTING
        self.sock: socket.socket | None = None
        self.fd = -1
        self.handshake: ClientHandshake | None = None
        self.parser: FrameParser | None = FrameParser()
        self.counter: FrameCounter | None = None
        self.out = b""
        self.hb_ref = 1
        self.count = 0
        self.last_seq = -1
        self.started = 0.0
        self.want_out = False
        self.keys: set[str] | None = None  # presence keys a probe has seen, in presence mode
        self.settled_at = 0.0
        self.epoch = 0  # timers set for an earlier state of the connection are ignored
        self.join_ref = JOIN_REF
        self.join_seq = 1
        self.tries = 0
        self.rejoin_tries = 0


class Stop(Exception):
    """The run cannot go on (e.g. the server went away); the results so far stand."""


class LoadGenerator:
    """Runs one bounded load scenario and collects its figures."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.o = opts
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)
        self.hb_queue: collections.deque[tuple[float, Conn]] = collections.deque()
        self.rearm_queue: collections.deque[tuple[float, Conn]] = collections.deque()
        self.ready: collections.deque[Conn] = collections.deque()
        self.pending: set[Conn] = set()
        self.subs: list[Conn] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self.close_codes: collections.Counter[str] = collections.Counter()
        self.joined = 0
        self.dropped = 0
        self.hb_sent = 0
        self.hb_acked_parsed = 0
        self.received = 0
        self.seq_gaps = 0
        self.other_frames = 0
        self.pub_notes: collections.Counter[str] = collections.Counter()
        self.sent = 0
        self.latencies_us: list[int] = []
        self.measure_from_seq = math.inf
        self.count_at = [0]
        self.min_count = 0
        target = opts.path + "?" + urlencode([*opts.param, ("vsn", "2.0.0")])
        self.target = target
        self.host_header = f"{opts.host}:{opts.port}"
        self.pub: Conn | None = None
        self.http = None
        self.pad = b""
        self.read_interval = 0.0
        self.max_pass = 0.0
        self.max_pass_cpu = 0.0
        self.storm = opts.mode == "presence"
        self.control: Control | None = None

    # ---------------------------------------------------------------- event loop

    def loop_until(self, done, deadline: float) -> bool:
        """Run the event loop until `done()` is true (-> True) or `deadline` (-> False)."""
        ep_poll = self.ep.poll
        conns = self.conns
        ready = self.ready
        polled_at = clock()
        polled_cpu = thread_time()
        while True:
            if done():
                return True
            now = clock()
            if now >= deadline:
                return False
            next_t = self.run_timers(now)
            timeout = 0 if ready else max(0.0, min(next_t, deadline) - now)
            # How long one pass kept the loop from polling bounds what the
            # generator itself can add to any latency sample.
            busy = clock() - polled_at
            if busy > self.max_pass:
                self.max_pass = busy
            busy_cpu = thread_time() - polled_cpu
            if busy_cpu > self.max_pass_cpu:
                self.max_pass_cpu = busy_cpu
            events = ep_poll(timeout, 1024)
            polled_at = clock()
            polled_cpu = thread_time()
            for fd, ev in events:
                c = conns.get(fd)
                if c is None:
                    continue
                if c.state == JOINED and c.kind == SUB:
                    ready.append(c)
                else:
                    self.on_event(c, ev)
            # Counting reads get half a millisecond per pass (one 256 KiB read
            # is ~2,000 frames), then the probes are polled again.
            until = polled_at + PASS_BUDGET
            while ready:
                self.read_sub(ready.popleft())
                if clock() > until:
                    break

    def run_timers(self, now: float) -> float:
        """Fire due timers; return when the next one is due."""
        # Bounded batches keep every pass short, so probes are read promptly
        # even when thousands of timers fall due together.
        next_t = now + 0.5
        hbq = self.hb_queue
        budget = 32
        while hbq and hbq[0][0] <= now and budget:
            budget -= 1
            _, c = hbq.popleft()
            if c.state == JOINED:
                self.send_heartbeat(c)
                hbq.append((now + self.o.heartbeat_interval, c))
        if hbq:
            next_t = min(next_t, hbq[0][0])
        rq = self.rearm_queue
        modify = self.ep.modify
        budget = 256
        while rq and rq[0][0] <= now and budget:
            budget -= 1
            _, c = rq.popleft()
            if c.state == JOINED:
                modify(c.fd, ONESHOT)
        if rq:
            next_t = min(next_t, rq[0][0])
        return min(next_t, self.tick(now))

    def tick(self, now: float) -> float:
        """Per-phase periodic work (connecting, publishing); return when next needed."""
        return now + 0.5

    # ---------------------------------------------------------------- connections

    def start_connect(self, c: Conn) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sock = s
        c.fd = s.fileno()
        c.started = clock()
        self.conns[c.fd] = c
        self.pending.add(c)
        port = self.o.publisher_port if c.kind == PUB and self.o.publisher_port else self.o.port
        err = s.connect_ex((self.o.host, port))
        if err not in (0, errno.EINPROGRESS):
            self.fail(c, f"connect: {os.strerror(err)}")
            return
        self.ep.register(c.fd, EPOLLOUT)

    def fail(self, c: Conn, reason: str) -> None:
        self.failures[reason] += 1
        self.kill(c, reason)

    def kill(self, c: Conn, why: str = "") -> None:
        """Forget a connection; a joined one counts as dropped."""
        if c.state == DEAD:
            return
        if c.state == JOINED:
            self.dropped += 1
            if c.kind != PUB:
                self.leave_tracking(c)
        c.state = DEAD
        self.pending.discard(c)
        if c.sock is not None:
            self.conns.pop(c.fd, None)
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(c.fd)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
            c.sock.close()
        if c is self.pub:
            raise Stop(f"the publishing connection was closed: {why}")

    def on_event(self, c: Conn, ev: int) -> None:
        if c.kind == HTTP:
            c.on_readable()
            return
        if c.kind in (HEALTH, CONTROL):
            c.on_event(ev)
            return
        if c.state == CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(c, f"connect: {os.strerror(err)}")
                return
            c.handshake = ClientHandshake(self.host_header, self.target, self.o.subprotocol)
            c.state = HANDSHAKE
            self.ep.modify(c.fd, EPOLLIN)
            self.write(c, c.handshake.request)
            return
        if ev & EPOLLOUT and c.out:
            self.write(c, b"")
        if not ev & (EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return
        n = self.recv(c, PROBE_READ_SIZE if c.state == JOINED else 0)
        if n <= 0:
            return
        data = self.view[:n]
        if c.state == HANDSHAKE:
            try:
                rest = c.handshake.receive(bytes(data))
            except HandshakeError as exc:
                self.fail(c, f"upgrade: {exc}")
                return
            if rest is None:
                return
            c.handshake = None
            c.state = JOINING
            self.on_open(c)
            data = rest
        self.on_frames(c, c.parser.feed(data))

    def on_open(self, c: Conn) -> None:
        """The websocket is open: join."""
        self.send_join(c)

    def send_join(self, c: Conn) -> None:
        self.send_text(c, orjson.dumps([JOIN_REF, JOIN_REF, self.o.topic, "phx_join", {}]))

    def recv(self, c: Conn, size: int = 0) -> int:
        """Read what is there into the shared buffer; 0 or less when there is nothing."""
        try:
            n = c.sock.recv_into(self.buf, size)
        except BlockingIOError:
            return -1
        except OSError as exc:
            self.note_close(c, type(exc).__name__)
            return -1
        if n == 0:
            self.note_close(c, "eof")
        return n

    def note_close(self, c: Conn, why: str) -> None:
        if c.state == JOINED:
            self.close_codes[why] += 1
            self.kill(c, why)
        else:
            self.fail(c, f"closed while {('connecting', 'upgrading', 'joining')[c.state]}: {why}")

    def on_frames(self, c: Conn, frames: list[tuple[int, bytes]]) -> None:
        for opcode, payload in frames:
            if opcode == OP_TEXT and c.kind == SUB and c.state == JOINED and self.storm:
                # A counting subscriber's presence state can follow its join reply in the
                # same read: count it as the counter would, without parsing ~100 KB of JSON.
                if payload.startswith(b'[null,"'):
                    self.hb_acked_parsed += 1
                else:
                    self.account(c, 1)
            elif opcode == OP_TEXT:
                try:
                    msg = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    self.other_frames += 1
                    continue
                if c.state == JOINING:
                    self.on_join_reply(c, msg)
                else:
                    self.on_message(c, msg)
            elif opcode == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.note_close(c, f"close {code}")
                return
            elif opcode == OP_PING:
                self.write(c, encode_client_frame(payload, OP_PONG))
            else:
                self.other_frames += 1
            if c.state == DEAD:
                return
        if c.kind == SUB and c.state == JOINED:
            self.to_counting(c)

    def on_join_reply(self, c: Conn, msg) -> None:
        if not (isinstance(msg, list) and len(msg) == 5 and msg[3] == "phx_reply"):
            self.other_frames += 1
            return
        reply = msg[4] if isinstance(msg[4], dict) else {}
        if reply.get("status") != "ok":
            reason = (reply.get("response") or {}).get("reason", reply.get("status"))
            self.fail(c, f"join refused: {reason}")
            return
        c.state = JOINED
        self.pending.discard(c)
        self.joined += c.kind != PUB
        self.hb_queue.append((clock() + self.o.heartbeat_interval, c))
        if c.kind == PUB:
            return
        self.subs.append(c)
        self.count_at[0] += 1

    def to_counting(self, c: Conn) -> None:
        """From here on only frame headers are walked; hand over what already arrived."""
        rest = c.parser.take_rest()
        c.parser = None
        c.counter = FrameCounter()
        self.ep.modify(c.fd, ONESHOT)
        if rest:
            k = c.counter.feed(rest, len(rest))
            if k:
                self.account(c, k)

    def on_message(self, c: Conn, msg) -> None:
        """A parsed frame on a joined probe or on the publisher."""
        if not (isinstance(msg, list) and len(msg) == 5):
            self.other_frames += 1
            return
        join_ref, ref, _topic, event, payload = msg
        if event in PRESENCE_EVENTS and self.storm:
            self.on_presence(c, event, payload)
            self.account(c, 1)
        elif join_ref is None and ref is None and event == self.o.event:
            if c.kind == PUB:
                self.pub_notes["own broadcast received"] += 1
                return
            if c.kind == PROBE:
                seq = payload.get("seq", -1)
                if seq != c.last_seq + 1:
                    self.seq_gaps += 1
                c.last_seq = seq
                if seq >= self.measure_from_seq:
                    self.latencies_us.append(now_us() - payload["t"])
            self.account(c, 1)
        elif event == "phx_reply" and ref is not None and _topic == "phoenix":
            self.hb_acked_parsed += 1
        elif c.kind == PUB:
            self.pub_notes[f"{event}: {orjson.dumps(payload).decode()[:120]}"] += 1
        else:
            self.other_frames += 1

    def on_presence(self, c: Conn, event: str, payload) -> None:
        """Apply a presence frame to a probe's key set as phoenix.js Presence would."""
        if c.keys is None:
            c.keys = set()
        if event == "presence_state":
            c.keys = set(payload)
        else:
            c.keys.update(payload.get("joins", {}))
            c.keys.difference_update(payload.get("leaves", {}))
        if not c.settled_at and len(c.keys) >= self.o.connections:
            c.settled_at = clock()

    def read_sub(self, c: Conn) -> None:
        """Drain a counting subscriber and re-arm it after the read interval."""
        if c.state != JOINED:
            return
        n = self.recv(c)
        if n > 0:
            counter = c.counter
            k = counter.feed(self.buf, n)
            if k:
                self.account(c, k)
            if counter.pings:
                for body in counter.pings:
                    self.write(c, encode_client_frame(body, OP_PONG))
                counter.pings.clear()
            if counter.closed:
                self.note_close(c, f"close {counter.close_code}")
                return
        elif c.state != JOINED:
            return
        if c.out:
            self.write(c, b"")
        if n == READ_SIZE or self.read_interval <= 0:
            self.ep.modify(c.fd, ONESHOT)
        else:
            self.rearm_queue.append((clock() + self.read_interval, c))

    def account(self, c: Conn, k: int) -> None:
        """Record k more broadcasts delivered to subscriber c; track the slowest one."""
        old = c.count
        new = old + k
        c.count = new
        self.received += k
        count_at = self.count_at
        if new >= len(count_at):
            count_at.extend([0] * (new + 1 - len(count_at)))
        count_at[old] -= 1
        count_at[new] += 1
        if old == self.min_count:
            self.advance_min()

    def leave_tracking(self, c: Conn) -> None:
        self.count_at[c.count] -= 1
        self.advance_min()

    def advance_min(self) -> None:
        m = self.min_count
        count_at = self.count_at
        top = len(count_at) - 1
        while m < top and count_at[m] == 0:
            m += 1
        self.min_count = m

    def write(self, c: Conn, data: bytes) -> None:
        """Send now what the socket takes; keep the rest for when it is writable."""
        data = c.out + data if c.out else data
        try:
            sent = c.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.note_close(c, type(exc).__name__)
            return
        c.out = data[sent:]
        if c.kind == SUB and c.state == JOINED:
            return  # one-shot registration: retried on its next read or heartbeat
        if bool(c.out) != c.want_out:
            c.want_out = bool(c.out)
            self.ep.modify(c.fd, EPOLLIN | EPOLLOUT if c.out else EPOLLIN)

    def send_text(self, c: Conn, payload: bytes) -> None:
        self.write(c, encode_client_frame(payload))

    def heartbeats_acked(self) -> int:
        return self.hb_acked_parsed + sum(
            c.counter.heartbeat_replies for c in self.subs if c.counter
        )

    def send_heartbeat(self, c: Conn) -> None:
        c.hb_ref += 1
        self.hb_sent += 1
        self.send_text(c, b'[null,"%d","phoenix","heartbeat",{}]' % c.hb_ref)

    # ---------------------------------------------------------------- publishing

    def publish(self) -> None:
        """Send broadcast number `self.sent` through the configured path."""
        seq = self.sent
        t = now_us()
        payload = b'{"seq":%d,"t":%d,"pad":"%s"}' % (seq, t, self.pad)
        if self.http is not None:
            self.http.post(payload)
        else:
            self.pub.hb_ref += 1
            self.send_text(
                self.pub,
                b'["%s","%d",%s,%s,%s]'
                % (
                    JOIN_REF.encode(),
                    self.pub.hb_ref,
                    orjson.dumps(self.o.topic),
                    orjson.dumps(self.o.event),
                    payload,
                ),
            )
        self.sent += 1

    # ---------------------------------------------------------------- phases

    def connect_all(self) -> dict:
        """Open, upgrade and join every subscriber; measure the cost of doing so."""
        o = self.o
        n = o.connections
        probes = min(o.probes, n)
        probe_at = {round((j + 1) * n / probes) - 1 for j in range(probes)} if probes else set()
        todo = collections.deque(Conn(i, PROBE if i in probe_at else SUB) for i in range(n))
        typical = b'{"seq":100000,"t":1000000000000,"pad":""}'
        self.pad = b"x" * max(0, o.payload_bytes - len(typical))

        if o.mode in ("presence", "reconnect"):
            pass  # the joins (and the reconnects) are the load; nothing publishes
        elif o.publisher == "relay":
            self.pub = Conn(-1, PUB)
            self.start_connect(self.pub)
            if not self.loop_until(
                lambda: self.pub.state in (JOINED, DEAD), clock() + o.join_timeout
            ):
                raise Stop("the publishing connection did not join in time")
            if self.pub.state != JOINED:
                raise Stop(f"the publishing connection failed: {dict(self.failures)}")
        elif o.publisher == "http":
            self.http = HttpPublisher(self, o.http_connections)

        rss0 = process_rss_kib(o.server_pid) if o.server_pid else None
        meter = Meter(clock, o.server_pid)
        deadline = clock() + o.connect_timeout
        last_sweep = [clock()]

        def tick(now: float) -> float:
            while todo and len(self.pending) < o.connect_concurrency:
                self.start_connect(todo.popleft())
            if now - last_sweep[0] > 0.5:
                last_sweep[0] = now
                for c in [c for c in self.pending if now - c.started > o.join_timeout]:
                    self.fail(c, "join timeout")
            return now + 0.05 if todo else now + 0.5

        self.tick = tick
        self.loop_until(lambda: not todo and not self.pending, deadline)
        m = meter.stop()
        for c in list(self.pending) + list(todo):
            self.fail(c, "connect phase timed out")
        todo.clear()
        del self.tick
        rss1 = process_rss_kib(o.server_pid) if o.server_pid else None
        joined = self.joined
        return {
            "connections": n,
            "probes": probes,
            "connected": joined,
            "connect_failures": sum(self.failures.values()),
            "failure_reasons": dict(self.failures),
            "join_seconds": round(m["wall"], 3),
            "join_rate": round(joined / m["wall"], 1) if m["wall"] > 0 else None,
            "server_cpu_join_s": _round(m["server_cpu_s"], 3),
            # utime+stime tick every 10 ms: below 0.1 s the quotient would be noise.
            "server_cpu_per_join_us": round(m["server_cpu_s"] / joined * 1e6, 1)
            if joined and m["server_cpu_s"] is not None and m["server_cpu_s"] >= 0.1
            else None,
            "gen_cpu_join": round(m["gen_cpu_s"] / m["wall"], 3) if m["wall"] > 0 else None,
            "rss_before_kib": rss0,
            "rss_after_kib": rss1,
            "rss_per_conn_kib": round((rss1 - rss0) / joined, 2) if joined and rss0 else None,
        }

    def hold(self, seconds: float) -> dict:
        """Keep every connection idle but for heartbeats; count what drops. Under
        --control, "go" (or end of input) on stdin ends the hold early."""
        meter = Meter(clock, self.o.server_pid)
        self.max_pass = 0.0
        self.max_pass_cpu = 0.0
        released = self.control.ready() if self.control else (lambda: False)
        self.loop_until(released, clock() + seconds)
        m = meter.stop()
        # Heartbeats sent just before the end are still in flight: stop sending and give
        # their replies a bounded time to arrive, so acked == sent means none went missing.
        self.hb_queue.clear()
        self.loop_until(
            lambda: self.heartbeats_acked() >= self.hb_sent, clock() + self.o.drain_timeout
        )
        return {
            "hold_seconds": round(m["wall"], 3),
            "server_cpu": _ratio(m["server_cpu_s"], m["wall"]),
            **_cpu_shares(m),
            "gen_max_pass_ms": round(self.max_pass * 1000, 3),
            "gen_max_pass_cpu_ms": round(self.max_pass_cpu * 1000, 3),
            "rss_end_kib": process_rss_kib(self.o.server_pid) if self.o.server_pid else None,
        }

    def presence_storm(self, meter: Meter, t0: float) -> dict:
        """Wait until every probe's presence state lists all N clients, then until the
        frames still in flight have arrived; report the storm's cost."""
        o = self.o
        probes = [c for c in self.subs if c.kind == PROBE]
        if not probes:
            raise Stop("presence mode needs at least one probe")
        settled = self.loop_until(
            lambda: all(c.settled_at or c.state != JOINED for c in probes),
            clock() + o.settle_timeout,
        )
        m = meter.stop()
        settled_at = max((c.settled_at for c in probes), default=0.0)
        received_at_settle = self.presence_frames()
        # Frames already sent keep arriving for a while: count them until a quiet spell.
        last = [received_at_settle, clock()]

        def quiet() -> bool:
            total = self.presence_frames()
            if total != last[0]:
                last[0], last[1] = total, clock()
            return clock() - last[1] > 0.5

        self.read_interval = 0.0
        self.loop_until(quiet, clock() + o.drain_timeout)
        frames = self.presence_frames()
        return {
            "presence_settled": settled,
            "probes_settled": sum(1 for c in probes if c.settled_at),
            "probe_keys_min": min(len(c.keys or ()) for c in probes),
            "settle_seconds": round(settled_at - t0, 3) if settled else None,
            "storm_server_cpu_s": _round(m["server_cpu_s"], 3),
            **_cpu_shares(m),
            "presence_frames_at_settle": received_at_settle,
            "presence_frames": frames,
            "presence_frames_per_client": round(frames / max(1, len(self.subs)), 1),
        }

    def presence_frames(self) -> int:
        """Presence frames received so far: the broadcasts counted (the diffs, and all a
        probe parsed) plus the counters' other text frames (their presence states)."""
        return self.received + self.counted_others()

    def counted_others(self) -> int:
        """Text frames the counting subscribers saw that are not broadcasts or heartbeat
        replies (in presence mode: each one's presence_state)."""
        return sum(c.counter.others for c in self.subs if c.counter)

    def broadcast(self) -> dict:
        """Publish for warmup + duration seconds (fixed rate or saturating), then drain."""
        o = self.o
        saturate = o.mode == "saturate"
        nsubs = len(self.subs)
        if nsubs == 0:
            raise Stop("no subscriber joined")
        self.read_interval = o.read_interval
        limit = o.max_broadcasts
        t_start = clock()
        measure_at = t_start + o.warmup
        stop_at = measure_at + o.duration
        state = {"measuring": False, "meter": None, "recv0": 0, "sent0": 0}
        health = HealthMonitor(self, o.healthz_interval, o.healthz_timeout)
        flood = Flood(o, o.warmup + o.duration + 5) if o.flood else None

        def begin_measure(now: float) -> None:
            state["measuring"] = True
            state["meter"] = Meter(clock, o.server_pid, (flood.proc.pid,) if flood else ())
            state["recv0"] = self.received
            state["sent0"] = self.sent
            self.measure_from_seq = self.sent
            self.max_pass = 0.0
            self.max_pass_cpu = 0.0

        def tick(now: float) -> float:
            if not state["measuring"] and now >= measure_at:
                begin_measure(now)
            next_health = health.tick(now)
            if saturate:
                while self.sent < limit and self.sent - self.min_count < o.window:
                    self.publish()
                return min(
                    now + 0.05, next_health, measure_at if not state["measuring"] else stop_at
                )
            due = t_start + self.sent / o.rate
            while due <= now and self.sent < limit:
                self.publish()
                due = t_start + self.sent / o.rate
            return min(due, next_health)

        # tick runs on every loop pass, so the window is topped up as soon as
        # a read completes a broadcast.
        self.tick = tick
        if o.warmup <= 0:
            begin_measure(clock())
        try:
            self.loop_until(lambda: False, stop_at)
            if not state["measuring"]:
                begin_measure(clock())
            m = state["meter"].stop()
        finally:
            flood_result = flood.stop() if flood else None
        max_pass, max_pass_cpu = self.max_pass, self.max_pass_cpu
        recv_window = self.received - state["recv0"]
        sent_window = self.sent - state["sent0"]
        del self.tick
        health.finish()
        # Everything sent must arrive; wait for it (read promptly now) within a bound.
        self.read_interval = 0.0
        expected = self.sent * nsubs
        self.loop_until(lambda: self.received >= expected, clock() + o.drain_timeout)
        lat = sorted(self.latencies_us)
        probes_joined = sum(1 for c in self.subs if c.kind == PROBE and c.state == JOINED)
        measured = max(0, self.sent - min(self.sent, self.measure_from_seq))
        extra = {}
        if o.flood:
            extra["flood"] = o.flood
            extra["flooder"] = flood_result
            # Its own CPU, on the generator's core: apart from "others".
            extra["flooder_cpu"] = _ratio(m["helpers_cpu_s"], m["wall"])
        if o.healthz_interval > 0:
            extra.update(health.figures())
        return {
            "window": o.window if saturate else None,
            "read_interval_s": o.read_interval,
            "rate": None if saturate else o.rate,
            "duration_s": round(m["wall"], 3),
            "broadcasts_sent": self.sent,
            "broadcasts_in_window": sent_window,
            "deliveries_expected": expected,
            "deliveries_received": self.received,
            "deliveries_lost": expected - self.received,
            "deliveries_per_s": round(recv_window / m["wall"], 1),
            "seq_gaps": self.seq_gaps,
            "latency_samples": len(lat),
            "latency_p50_ms": _pct(lat, 0.50),
            "latency_p99_ms": _pct(lat, 0.99),
            "latency_max_ms": round(lat[-1] / 1000, 3) if lat else None,
            # Broadcasts sent after the warm-up that a joined probe never got (within the
            # drain timeout): latencies too long to be measured at all.
            "latency_missing": max(0, measured * probes_joined - len(lat)),
            "server_cpu": _ratio(m["server_cpu_s"], m["wall"]),
            **_cpu_shares(m),
            "gen_max_pass_ms": round(max_pass * 1000, 3),
            "gen_max_pass_cpu_ms": round(max_pass_cpu * 1000, 3),
            **extra,
        }

    def run(self) -> dict:
        o = self.o
        result: dict = {"mode": o.mode, "publisher": o.publisher, "topic": o.topic}
        t0 = clock()
        error = None
        try:
            if o.mode == "presence":
                # Counting subscribers are read at the usual interval during the storm.
                self.read_interval = o.read_interval
                storm_meter = Meter(clock, o.server_pid)
            result.update(self.connect_all())
            # Nothing in the hot path makes reference cycles; a full collection
            # over 10,000 connections would stall the loop for tens of ms.
            gc.collect()
            gc.freeze()
            gc.disable()
            if o.control:
                self.control = Control(self)
            if o.mode == "reconnect":
                result.update(self.reconnect_storm())
            elif o.mode == "idle":
                result.update(self.hold(o.hold))
            elif o.mode == "presence":
                result.update(self.presence_storm(storm_meter, t0))
            else:
                result.update(self.broadcast())
        except Stop as exc:
            error = str(exc)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        result["dropped"] = self.dropped
        result["close_codes"] = dict(self.close_codes)
        result["heartbeats_sent"] = self.hb_sent
        result["heartbeats_acked"] = self.heartbeats_acked()
        result["other_frames"] = self.other_frames + (
            0 if o.mode == "presence" else self.counted_others()
        )
        if self.pub_notes:
            result["publisher_notes"] = dict(self.pub_notes)
        gc.enable()
        result["wall_seconds"] = round(clock() - t0, 3)
        result["error"] = error
        self.close_all()
        return result

    def close_all(self) -> None:
        # An abortive close leaves no TIME_WAIT behind, so back-to-back runs of
        # 10,000 connections do not run out of ephemeral ports.
        for c in list(self.conns.values()):
            if c.sock is None:
                continue  # the control channel: stdin is not ours to close
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
            c.sock.close()
        self.conns.clear()
        self.ep.close()


class Control:
    """Lines from whoever runs the generator, on stdin (with --control): the generator
    prints "ready" once every client has joined, then takes `drain <monotonic time>`,
    `server <pid> <cpu seconds> <monotonic time>` and `go` (as does end of input)."""

    def __init__(self, gen: LoadGenerator) -> None:
        self.gen = gen
        self.kind = CONTROL
        self.state = JOINED
        self.fd = sys.stdin.fileno()
        self.sock = None
        self.partial = b""
        self.lines: collections.deque[list[str]] = collections.deque()
        self.released = False
        os.set_blocking(self.fd, False)
        gen.conns[self.fd] = self
        gen.ep.register(self.fd, EPOLLIN)
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    def ready(self):
        return lambda: self.released

    def on_event(self, ev: int) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        if not data:
            self.released = True
            self.gen.conns.pop(self.fd, None)
            self.gen.ep.unregister(self.fd)
            return
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            words = line.decode().split()
            if words == ["go"]:
                self.released = True
            elif words:
                self.lines.append(words)


class ReconnectStorm(LoadGenerator):
    """N clients joined; the server is drained and a new one started on the same port;
    every client reconnects and rejoins on phoenix.js 1.8's own schedule.

    Run with --control: the runner sends SIGTERM to the server, says `drain T` (its
    monotonic time, the clock every process on the box shares) and, once the new
    server listens, `server PID CPU T`. Times are counted from the drain signal.
    """

    def __init__(self, opts: argparse.Namespace) -> None:
        super().__init__(opts)
        self.storming = False
        self.timers: list[tuple[float, int, Conn, str, int]] = []
        self.timer_seq = 0
        self.storm_target = 0
        self.rejoin_times: list[float] = []
        self.drain_at: float | None = None
        self.server_at: float | None = None
        self.server_pid: int | None = None
        self.server_cpu0 = 0.0
        self.closes: collections.Counter[str] = collections.Counter()
        self.last_close_at = 0.0
        self.refused = 0
        self.connect_errors: collections.Counter[str] = collections.Counter()
        self.handshake_failures: collections.Counter[str] = collections.Counter()
        self.join_timeouts = 0
        self.join_errors: collections.Counter[str] = collections.Counter()
        self.attempts = 0
        self.max_tries = 0
        self.dropped_again = 0

    # --------------------------------------------------------------- the schedule

    def at(self, delay_s: float, c: Conn, what: str) -> None:
        """Run `what` for `c` after `delay_s`, unless c moved on (its epoch changed)."""
        self.timer_seq += 1
        heapq.heappush(self.timers, (clock() + delay_s, self.timer_seq, c, what, c.epoch))

    def tick(self, now: float) -> float:
        timers = self.timers
        budget = 512  # bounded, so that reads go on between batches of due timers
        while timers and timers[0][0] <= now and budget:
            budget -= 1
            _, _, c, what, epoch = heapq.heappop(timers)
            if c.epoch != epoch:
                continue
            if what == "connect":
                self.start_connect(c)
            elif what == "handshake timeout":
                self.handshake_failures["timed out"] += 1
                self.reconnect_later(c)
            elif what == "join timeout":
                # phoenix.js gives up on the join, says phx_leave, and rejoins later.
                self.join_timeouts += 1
                self.send_text(
                    c, orjson.dumps([c.join_ref, str(c.hb_ref), self.o.topic, "phx_leave", {}])
                )
                self.rejoin_later(c)
            elif what == "rejoin":
                self.send_join(c)
        self.poll_control()
        if not budget:
            return now
        return min(timers[0][0] if timers else now + 0.5, now + 0.05)

    def reconnect_later(self, c: Conn) -> None:
        """Drop c's socket; connect again after phoenix.js's back-off for its tries."""
        self.drop_socket(c)
        c.tries += 1
        self.max_tries = max(self.max_tries, c.tries)
        self.at(reconnect_after_ms(c.tries) / 1000, c, "connect")

    def rejoin_later(self, c: Conn) -> None:
        c.epoch += 1
        c.rejoin_tries += 1
        self.at(rejoin_after_ms(c.rejoin_tries) / 1000, c, "rejoin")

    def drop_socket(self, c: Conn) -> None:
        c.epoch += 1
        c.state = WAITING
        if c.sock is not None:
            self.conns.pop(c.fd, None)
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(c.fd)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
            c.sock.close()
            c.sock = None
            c.fd = -1

    # --------------------------------------------------------------- the clients

    def start_connect(self, c: Conn) -> None:
        if not self.storming:
            super().start_connect(c)
            return
        c.epoch += 1
        c.state = CONNECTING
        c.parser = FrameParser()
        c.counter = None
        c.out = b""
        c.want_out = False
        c.handshake = None
        self.attempts += 1
        self.at(self.o.handshake_timeout, c, "handshake timeout")
        super().start_connect(c)
        self.pending.discard(c)

    def on_open(self, c: Conn) -> None:
        if self.storming:
            # phoenix.js resets both back-offs when the socket opens, and joins at once.
            c.tries = 0
            c.rejoin_tries = 0
        self.send_join(c)

    def send_join(self, c: Conn) -> None:
        if not self.storming:
            super().send_join(c)
            return
        c.epoch += 1
        c.join_seq += 1
        c.hb_ref += 1
        c.join_ref = str(c.join_seq)
        self.send_text(c, orjson.dumps([c.join_ref, c.join_ref, self.o.topic, "phx_join", {}]))
        self.at(self.o.storm_join_timeout, c, "join timeout")

    def on_join_reply(self, c: Conn, msg) -> None:
        if not self.storming:
            super().on_join_reply(c, msg)
            return
        if not (isinstance(msg, list) and len(msg) == 5 and msg[3] == "phx_reply"):
            self.other_frames += 1
            return
        if msg[1] != c.join_ref:
            return  # the reply to a join that already timed out
        reply = msg[4] if isinstance(msg[4], dict) else {}
        if reply.get("status") != "ok":
            reason = (reply.get("response") or {}).get("reason", reply.get("status"))
            self.join_errors[str(reason)] += 1
            self.rejoin_later(c)
            return
        c.epoch += 1
        c.state = JOINED
        if not c.settled_at:
            c.settled_at = clock()
            self.rejoin_times.append(c.settled_at)

    def fail(self, c: Conn, reason: str) -> None:
        if not self.storming:
            super().fail(c, reason)
            return
        if reason == f"connect: {os.strerror(errno.ECONNREFUSED)}":
            self.refused += 1
        elif reason.startswith("connect:"):
            self.connect_errors[reason.removeprefix("connect: ")] += 1
        else:
            self.handshake_failures[reason.removeprefix("upgrade: ")] += 1
        self.reconnect_later(c)

    def note_close(self, c: Conn, why: str) -> None:
        if not self.storming:
            super().note_close(c, why)
            return
        if c.state == JOINED:
            self.closes[why] += 1
            self.last_close_at = clock()
            if c.settled_at:
                self.dropped_again += 1
        elif c.state in (CONNECTING, HANDSHAKE):
            self.handshake_failures[f"closed while upgrading: {why}"] += 1
        elif c.state == JOINING:
            self.handshake_failures[f"closed while joining: {why}"] += 1
        else:
            return
        self.reconnect_later(c)

    # --------------------------------------------------------------- the storm

    def poll_control(self) -> None:
        lines = self.control.lines if self.control else ()
        while lines:
            words = lines.popleft()
            if words[0] == "drain" and len(words) == 2:
                self.drain_at = float(words[1])
            elif words[0] == "server" and len(words) == 4:
                self.server_pid = int(words[1])
                self.server_cpu0 = float(words[2])
                self.server_at = float(words[3])

    def reconnect_storm(self) -> dict:
        o = self.o
        if self.control is None:
            raise Stop("reconnect mode needs --control (the runner drains the server)")
        clients = [c for c in self.subs if c.state == JOINED]
        self.storm_target = len(clients)
        for c in clients:
            c.tries = c.rejoin_tries = 0
            c.settled_at = 0.0
        # Closes are seen at once, as a browser sees them.
        self.read_interval = 0.0
        self.storming = True
        if not self.loop_until(lambda: self.drain_at is not None, clock() + o.control_timeout):
            raise Stop(f"no drain signal within {o.control_timeout:g} s")
        deadline = self.drain_at + o.storm_timeout
        meter = Meter(clock, None)
        done = self.loop_until(lambda: len(self.rejoin_times) >= self.storm_target, deadline)
        ended = clock()
        m = meter.stop()
        # The new server's CPU from the moment it listened until all were back.
        srv_cpu = None
        if self.server_pid:
            with contextlib.suppress(OSError):
                srv_cpu = process_cpu_seconds(self.server_pid) - self.server_cpu0
        t0 = self.drain_at
        times = sorted(t - t0 for t in self.rejoin_times)

        def rank(q: float) -> float | None:
            k = math.ceil(q * self.storm_target)
            return round(times[k - 1], 3) if 0 < k <= len(times) else None

        rejoined = len(times)
        return {
            "storm_clients": self.storm_target,
            "rejoined": rejoined,
            "storm_complete": done,
            "rejoin_all_s": rank(1.0),
            "rejoin_50_s": rank(0.5),
            "rejoin_99_s": rank(0.99),
            "old_closed_all_s": round(self.last_close_at - t0, 3) if self.last_close_at else None,
            "new_server_listening_s": round(self.server_at - t0, 3) if self.server_at else None,
            "closes": dict(self.closes),
            "connect_refused": self.refused,
            "connect_errors": dict(self.connect_errors),
            "handshake_failures": dict(self.handshake_failures),
            "join_timeouts": self.join_timeouts,
            "join_errors": dict(self.join_errors),
            "reconnect_attempts": self.attempts,
            "max_tries": self.max_tries,
            "dropped_after_rejoin": self.dropped_again,
            "storm_server_cpu_s": _round(srv_cpu, 3),
            # utime+stime tick every 10 ms: below 0.1 s the quotient would be noise.
            "storm_server_cpu_per_rejoin_us": round(srv_cpu / rejoined * 1e6, 1)
            if srv_cpu is not None and srv_cpu >= 0.1 and rejoined
            else None,
            "storm_wall_s": round(ended - t0, 3),
            # The generator's own CPU over the storm: near 1.0, it was the limit.
            "gen_cpu": _ratio(m["gen_cpu_s"], m["wall"]),
        }


class HttpPublisher:
    """Publishes through `POST /api/broadcast` on a few keep-alive HTTP connections."""

    def __init__(self, gen: LoadGenerator, connections: int) -> None:
        self.gen = gen
        self.idle: list[_HttpConn] = []
        self.queue: collections.deque[bytes] = collections.deque()
        self.errors: collections.Counter[str] = gen.pub_notes
        for _ in range(connections):
            hc = _HttpConn(self)
            self.idle.append(hc)

    def post(self, payload: bytes) -> None:
        o = self.gen.o
        body = b'{"topic":%s,"event":%s,"payload":%s}' % (
            orjson.dumps(o.topic),
            orjson.dumps(o.event),
            payload,
        )
        self.queue.append(body)
        self.pump()

    def pump(self) -> None:
        while self.queue and self.idle:
            self.idle.pop().request(self.queue.popleft())


class _HttpConn:
    """One keep-alive HTTP/1.1 connection with at most one request in flight."""

    def __init__(self, owner: HttpPublisher) -> None:
        self.owner = owner
        gen = owner.gen
        self.sock = socket.create_connection((gen.o.host, gen.o.publisher_port or gen.o.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.h11 = h11.Connection(h11.CLIENT)
        self.fd = self.sock.fileno()
        self.state = JOINED
        self.kind = HTTP
        gen.conns[self.fd] = self
        gen.ep.register(self.fd, EPOLLIN)

    def request(self, body: bytes) -> None:
        o = self.owner.gen.o
        headers = [
            ("Host", self.owner.gen.host_header),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
        ]
        if o.api_key:
            headers.append(("Authorization", f"Bearer {o.api_key}"))
        data = self.h11.send(h11.Request(method="POST", target="/api/broadcast", headers=headers))
        data += self.h11.send(h11.Data(data=body)) + self.h11.send(h11.EndOfMessage())
        self.sock.sendall(data)

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        if not data:
            raise Stop("the HTTP API closed its connection")
        self.h11.receive_data(data)
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Response) and event.status_code >= 300:
                self.owner.errors[f"HTTP {event.status_code}"] += 1
            if isinstance(event, h11.EndOfMessage):
                self.h11.start_next_cycle()
                self.owner.idle.append(self)
                self.owner.pump()
                return


class HealthMonitor:
    """GET /healthz on a fresh connection every `interval` s (one in flight at a time),
    each bounded by `timeout`: does the server still answer while it is loaded?"""

    def __init__(self, gen: LoadGenerator, interval: float, timeout: float) -> None:
        self.gen = gen
        self.interval = interval
        self.timeout = timeout
        self.next_at = clock()
        self.current: _HealthCheck | None = None
        self.times_ms: list[float] = []
        self.failures: collections.Counter[str] = collections.Counter()

    def tick(self, now: float) -> float:
        """Start or time out a check; return when to look again."""
        if self.interval <= 0:
            return math.inf
        c = self.current
        if c is not None and now - c.started > self.timeout:
            c.done(f"no answer within {self.timeout:g} s")
        if self.current is None and now >= self.next_at:
            self.next_at = now + self.interval
            self.current = _HealthCheck(self)
        if self.current is not None:
            # The next check waits for this one: only its timeout is due.
            return self.current.started + self.timeout
        return self.next_at

    def finish(self) -> None:
        """Give up the check in flight: a failure only if it had waited long already."""
        c = self.current
        if c is not None:
            waited = clock() - c.started
            c.done(f"no answer within {waited:.1f} s" if waited > self.timeout / 2 else None)

    def figures(self) -> dict:
        t = sorted(self.times_ms)
        return {
            "healthz_checks": len(t) + sum(self.failures.values()),
            "healthz_failures": dict(self.failures),
            "healthz_p50_ms": round(t[len(t) // 2], 3) if t else None,
            "healthz_max_ms": round(t[-1], 3) if t else None,
        }


class _HealthCheck:
    """One timed `GET /healthz`: connect, request, read the status line."""

    def __init__(self, monitor: HealthMonitor) -> None:
        self.monitor = monitor
        gen = monitor.gen
        self.kind = HEALTH
        self.state = JOINING
        self.started = clock()
        self.sent = False
        self.data = b""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        gen.conns[self.fd] = self
        err = self.sock.connect_ex((gen.o.host, gen.o.port))
        gen.ep.register(self.fd, EPOLLOUT)
        if err not in (0, errno.EINPROGRESS):
            self.done(f"connect: {os.strerror(err)}")

    def on_event(self, ev: int) -> None:
        try:
            if not self.sent:
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.done(f"connect: {os.strerror(err)}")
                    return
                host = self.monitor.gen.host_header
                self.sock.send(
                    f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                )
                self.sent = True
                self.monitor.gen.ep.modify(self.fd, EPOLLIN)
                return
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self.done(type(exc).__name__)
            return
        self.data += data
        if b"\r\n" in self.data:
            status = self.data.split(b"\r\n", 1)[0].split()
            code = status[1].decode(errors="replace") if len(status) > 1 else "?"
            self.done("" if code == "200" else f"HTTP {code}")
        elif not data:
            self.done("closed without an answer")

    def done(self, failure: str | None) -> None:
        """Record the check ("" succeeded, None: not counted) and close its socket."""
        m = self.monitor
        if m.current is not self:
            return
        m.current = None
        if failure:
            m.failures[failure] += 1
        elif failure is not None:
            m.times_ms.append((clock() - self.started) * 1000)
        m.gen.conns.pop(self.fd, None)
        with contextlib.suppress(OSError, ValueError):
            m.gen.ep.unregister(self.fd)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        self.sock.close()


class Flood:
    """The hostile client (bench/flooder.py) in its own process, niced so that the
    generator sharing its core is scheduled first; bounded by `seconds`."""

    def __init__(self, o: argparse.Namespace, seconds: float) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(FLOODER),
                "--port",
                str(o.port),
                "--kind",
                o.flood,
                "--duration",
                str(seconds),
                "--nice",
                str(o.flood_nice),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> dict:
        """End the flood; return the flooder's own account of it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            return {"error": "the flooder did not stop within 15 s of SIGTERM"}
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            return {"error": f"the flooder printed no result: {err.strip()[-300:]}"}
        return json.loads(lines[-1])


def _pct(sorted_us: list[int], q: float) -> float | None:
    if not sorted_us:
        return None
    i = min(len(sorted_us) - 1, max(0, math.ceil(q * len(sorted_us)) - 1))
    return round(sorted_us[i] / 1000, 3)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _cpu_shares(m: dict) -> dict[str, float | None]:
    """A Meter's generator, others', server-core busy and steal seconds, in cores."""
    return {
        "gen_cpu": _ratio(m["gen_cpu_s"], m["wall"]),
        "others_cpu": _ratio(m["others_cpu_s"], m["wall"]),
        "server_core_busy": _ratio(m["server_core_busy_s"], m["wall"]),
        "server_core_steal": _ratio(m["server_core_steal_s"], m["wall"]),
    }


def _ratio(num: float | None, den: float) -> float | None:
    return round(num / den, 3) if num is not None and den > 0 else None


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        new = min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < needed:
            raise SystemExit(
                f"loadgen: {needed} file descriptors needed, the limit is {hard} (ulimit -n)."
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--port", type=int, required=True, help="server port on 127.0.0.1")
    p.add_argument("--server-pid", type=int, help="pid to read CPU and RSS from (/proc)")
    p.add_argument(
        "--mode", choices=["idle", "rate", "saturate", "presence", "reconnect"], default="saturate"
    )
    p.add_argument(
        "--publisher-port",
        type=int,
        default=None,
        help="port of the server the publisher talks to (default --port): another node of "
        "a cluster, to time broadcasts across nodes",
    )
    p.add_argument("-n", "--connections", type=int, default=100, help="subscribers to join")
    p.add_argument(
        "--probes",
        type=int,
        default=50,
        help="subscribers that parse every frame to time it (spread evenly)",
    )
    p.add_argument("--topic", default="bench:fan")
    p.add_argument("--event", default="bench", help="relayed event name")
    p.add_argument("--path", default="/socket/websocket")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        type=_kv,
        metavar="KEY=VALUE",
        help="connect param (repeatable)",
    )
    p.add_argument("--subprotocol", action="append", help="Sec-WebSocket-Protocol to offer")
    p.add_argument(
        "--publisher",
        choices=["relay", "http"],
        default="relay",
        help="relay: a joined client pushes the relayed event; http: POST /api/broadcast",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("PHXBROKER_API_KEY"),
        help="bearer key for --publisher http (env PHXBROKER_API_KEY)",
    )
    p.add_argument(
        "--http-connections",
        type=int,
        default=1,
        help="keep-alive connections for --publisher http; above 1 broadcasts may "
        "arrive out of order, which shows up in seq_gaps",
    )
    p.add_argument("--rate", type=float, default=20.0, help="broadcasts/s in rate mode")
    p.add_argument("--window", type=int, default=64, help="broadcasts in flight in saturate mode")
    p.add_argument("--payload-bytes", type=int, default=100)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--hold", type=float, default=60.0, help="idle mode: seconds to hold")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for in-flight deliveries after the last send",
    )
    p.add_argument("--max-broadcasts", type=int, default=2_000_000)
    p.add_argument(
        "--read-interval",
        type=float,
        default=None,
        help="seconds between reads of one counting subscriber (default: connections / "
        f"{READS_PER_S:,} s, within 2 ms..0.5 s, so counting costs at most ~{READS_PER_S:,} "
        "reads/s whatever the number of subscribers)",
    )
    p.add_argument(
        "--settle-timeout",
        type=float,
        default=120.0,
        help="presence mode: bound on the wait for every probe to list all N clients",
    )
    p.add_argument("--heartbeat-interval", type=float, default=30.0)
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=256,
        help="connections being opened/joined at once",
    )
    p.add_argument("--join-timeout", type=float, default=15.0)
    p.add_argument(
        "--connect-timeout", type=float, default=120.0, help="bound on the whole connect+join phase"
    )
    p.add_argument(
        "--flood",
        choices=FLOOD_KINDS,
        help="rate/saturate: one hostile client (bench/flooder.py) floods the server "
        "through warm-up and the measured window",
    )
    p.add_argument("--flood-nice", type=int, default=19, help="the flooder's niceness")
    p.add_argument(
        "--healthz-interval",
        type=float,
        default=0.0,
        help="rate/saturate: GET /healthz this often during the run (0: never)",
    )
    p.add_argument("--healthz-timeout", type=float, default=2.0)
    p.add_argument(
        "--control",
        action="store_true",
        help='print "ready" once all joined and take lines on stdin (reconnect mode needs '
        'it; in idle mode "go" ends the hold)',
    )
    p.add_argument(
        "--control-timeout",
        type=float,
        default=60.0,
        help="reconnect mode: bound on the wait for the drain signal",
    )
    p.add_argument(
        "--storm-timeout",
        type=float,
        default=120.0,
        help="reconnect mode: bound on the wait, from the drain signal, for every rejoin",
    )
    p.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        help="reconnect mode: a connect + upgrade taking longer is given up and retried",
    )
    p.add_argument(
        "--storm-join-timeout",
        type=float,
        default=10.0,
        help="reconnect mode: phoenix.js's push timeout for a join",
    )
    p.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    o = p.parse_args(argv)
    if o.host != "127.0.0.1":
        p.error("the generator only talks to 127.0.0.1")
    if o.read_interval is None:
        o.read_interval = min(0.5, max(0.002, o.connections / READS_PER_S))
    if o.publisher == "http" and not o.api_key:
        p.error("--publisher http needs --api-key (or PHXBROKER_API_KEY)")
    if o.connections < 1 or o.window < 1 or o.rate <= 0:
        p.error("--connections, --window and --rate must be positive")
    if o.mode == "rate":
        o.max_broadcasts = min(o.max_broadcasts, math.ceil(o.rate * (o.warmup + o.duration)) + 1)
    return o


def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    o = parse_args(argv)
    _raise_fd_limit(o.connections + o.http_connections + 64)
    if o.server_pid:
        try:
            process_cpu_seconds(o.server_pid)
        except OSError:
            print(f"loadgen: no process {o.server_pid} to measure.", file=sys.stderr)
            return 2
    result = (ReconnectStorm if o.mode == "reconnect" else LoadGenerator)(o).run()
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
