"""The hooks benchmark: hooked client events through phxbroker to a fast trivial back end.

    python bench/hooks_bench.py [--quick] [--runs 3] [--json] [--output FILE]

phxbroker runs pinned to CPU 0; the back end (bench/hook_backend.py) and this generator
share CPU 1. Each run starts both afresh. Three measurements, each the median of --runs:

- `hook-sat`: 100 clients keep 16 hooked events each in flight for 10 s: events answered
  per second, server CPU per event, the broker task's time per event (the sum of its
  batch durations from /metrics, divided by the events), and the rest of the server's CPU
  per event (websockets, the hook calls' HTTP and their tasks);
- `echo-sat`: the same against a topic whose event the broker answers itself (`echo`), so
  that the difference is what a hook costs;
- `hook-lat`: 1,000 hooked events per second (100 clients at 10/s each) for 10 s: the
  latency a client sees (send to reply), beside the latency of the same call made directly
  to the back end over HTTP from this process at the same rate: the difference is what
  phxbroker adds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h11
import trio

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from procstat import process_cpu_seconds  # noqa: E402
from wsframes import ClientHandshake, FrameParser, encode_client_frame  # noqa: E402

CONFIG = """\
[server]
listen = "127.0.0.1:0"
idle_timeout = 600
[auth]
allow_anonymous = true
[limits]
max_connections = 0
max_connections_per_ip = 0
message_rate = 0
frame_rate = 0
[admin]
socket = ""
[hooks]
url = "http://127.0.0.1:{backend_port}/hooks"
secret_env = "BENCH_HOOK_SECRET"
timeout_ms = 5000
lifecycle = false
[[topics]]
pattern = "hook:*"
join = "anyone"
hook_events = ["e"]
[[topics]]
pattern = "echo:*"
join = "anyone"
echo = ["e"]
[log]
level = "info"
connections = false
"""
LISTENING = re.compile(r"listening on (?:https?://[0-9.]+:)?(\d+)")
BATCH_SUM = re.compile(r"^phxbroker_broker_batch_duration_seconds_sum (\S+)$", re.M)


def pinned(cpu: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if shutil.which("taskset") else cmd


class Process:
    """A child that prints its port on a line; stopped with SIGTERM."""

    def __init__(self, cmd: list[str], env: dict[str, str], pattern: re.Pattern[str]) -> None:
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 20
        self.port = 0
        for line in self.proc.stdout:
            found = pattern.search(line)
            if found:
                self.port = int(found.group(1))
                break
            if time.monotonic() > deadline:
                break
        if not self.port:
            self.proc.kill()
            raise RuntimeError(f"{cmd[-3:]} did not start")

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=20)
        return out


class Client:
    """One websocket client: joined to a topic, pushing event `e` and timing replies."""

    def __init__(self, stream: trio.SocketStream, topic: str) -> None:
        self.stream = stream
        self.topic = topic
        self.parser = FrameParser()
        self.frames: list[tuple[int, bytes]] = []
        self.ref = 0
        self.sent_at: dict[str, float] = {}
        self.latencies: list[float] = []
        self.replies = 0

    @classmethod
    async def open(cls, port: int, topic: str) -> Client:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        handshake = ClientHandshake("127.0.0.1", "/socket/websocket?vsn=2.0.0")
        await stream.send_all(handshake.request)
        while True:
            rest = handshake.receive(await stream.receive_some(65536))
            if rest is not None:
                break
        client = cls(stream, topic)
        client.frames = client.parser.feed(rest)
        await client.send(["1", "1", topic, "phx_join", {}])
        await client.next_reply()
        return client

    async def send(self, message: list) -> None:
        await self.stream.send_all(encode_client_frame(json.dumps(message).encode()))

    async def push(self) -> None:
        self.ref += 1
        ref = str(self.ref + 1)
        self.sent_at[ref] = time.perf_counter()
        await self.send(["1", ref, self.topic, "e", {"n": self.ref}])

    async def next_reply(self) -> str:
        while True:
            while self.frames:
                _opcode, payload = self.frames.pop(0)
                message = json.loads(payload)
                if message[3] == "phx_reply":
                    ref = message[1]
                    sent = self.sent_at.pop(ref, None)
                    if sent is not None:
                        self.latencies.append(time.perf_counter() - sent)
                        self.replies += 1
                    return str(ref)
            data = await self.stream.receive_some(65536)
            if not data:
                raise RuntimeError("the server closed a client")
            self.frames = self.parser.feed(data)


async def saturate(port: int, prefix: str, clients: int, window: int, seconds: float) -> dict:
    conns = [await Client.open(port, f"{prefix}:t{i % 10}") for i in range(clients)]
    stop_at = time.perf_counter() + seconds

    async def run(client: Client) -> None:
        for _ in range(window):
            await client.push()
        while time.perf_counter() < stop_at:
            await client.next_reply()
            await client.push()
        while client.sent_at:
            await client.next_reply()

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for client in conns:
            nursery.start_soon(run, client)
    elapsed = time.perf_counter() - started
    for client in conns:
        await client.stream.aclose()
    return {"events": sum(c.replies for c in conns), "seconds": elapsed}


async def rated(port: int, clients: int, rate: float, seconds: float) -> dict:
    conns = [await Client.open(port, f"hook:t{i % 10}") for i in range(clients)]
    per_client = rate / clients

    async def run(client: Client, offset: float) -> None:
        await trio.sleep(offset)
        start = trio.current_time()
        n = 0
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                while True:
                    await client.next_reply()

            nursery.start_soon(read)
            while n < per_client * seconds:
                await trio.sleep_until(start + n / per_client)
                await client.push()
                n += 1
            with trio.move_on_after(5):
                while client.sent_at:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for index, client in enumerate(conns):
            nursery.start_soon(run, client, index / rate)
    latencies = sorted(x for c in conns for x in c.latencies)
    lost = sum(len(c.sent_at) for c in conns)
    for client in conns:
        await client.stream.aclose()
    return {"latencies": latencies, "lost": lost}


async def direct(backend_port: int, rate: float, seconds: float) -> list[float]:
    """The same call straight to the back end over keep-alive HTTP, at the same rate."""
    stream = await trio.open_tcp_stream("127.0.0.1", backend_port)
    conn = h11.Connection(h11.CLIENT)
    body = json.dumps({"socket": {}, "topic": "hook:t0", "event": "e", "payload": {}}).encode()
    out: list[float] = []
    start = trio.current_time()
    for n in range(int(rate * seconds)):
        await trio.sleep_until(start + n / rate)
        sent = time.perf_counter()
        req = h11.Request(
            method="POST",
            target="/hooks/event",
            headers=[("host", "x"), ("content-length", str(len(body)))],
        )
        await stream.send_all(
            conn.send(req) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        )
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.EndOfMessage):
                break
        out.append(time.perf_counter() - sent)
        conn.start_next_cycle()
    await stream.aclose()
    return sorted(out)


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def batch_sum(port: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    found = BATCH_SUM.search(data.decode())
    return float(found.group(1)) if found else 0.0


def one_run(kind: str, quick: bool, core_path: Path | None = None) -> dict:
    """One run of one scenario, against the installed phxbroker or the package copy at
    `core_path` (run_benchmarks.py's --core-commit snapshot)."""
    env = {**os.environ, "BENCH_HOOK_SECRET": "bench-secret-0123456789"}
    if core_path is not None:
        env["PYTHONPATH"] = str(core_path)
    backend_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    backend = Process(
        pinned(1, [sys.executable, str(BENCH / "hook_backend.py")]), backend_env, LISTENING
    )
    workdir = Path(tempfile.mkdtemp(prefix="phxbroker-hooks-bench-"))
    config = workdir / "phxbroker.toml"
    config.write_text(CONFIG.format(backend_port=backend.port))
    server = Process(
        pinned(0, [sys.executable, "-m", "phxbroker", "serve", "--config", str(config)]),
        env,
        LISTENING,
    )
    os.sched_setaffinity(0, {1})
    clients, seconds = (10, 2.0) if quick else (100, 10.0)
    try:
        pid = server.proc.pid
        before_cpu, before_batch = process_cpu_seconds(pid), batch_sum(server.port)
        if kind == "hook-lat":
            rate = 100.0 if quick else 1000.0
            result = trio.run(rated, server.port, clients, rate, seconds)
            baseline = trio.run(direct, backend.port, rate, seconds)
            lat = result["latencies"]
            figures = {
                "events": len(lat),
                "lost": result["lost"],
                "p50_ms": pct(lat, 0.5) * 1000,
                "p99_ms": pct(lat, 0.99) * 1000,
                "direct_p50_ms": pct(baseline, 0.5) * 1000,
                "direct_p99_ms": pct(baseline, 0.99) * 1000,
            }
            figures["added_p99_ms"] = figures["p99_ms"] - figures["direct_p99_ms"]
        else:
            prefix = "hook" if kind == "hook-sat" else "echo"
            result = trio.run(saturate, server.port, prefix, clients, 4 if quick else 16, seconds)
            events = result["events"]
            cpu = process_cpu_seconds(pid) - before_cpu
            broker = batch_sum(server.port) - before_batch
            figures = {
                "events": events,
                "events_per_s": events / result["seconds"],
                "server_cpu_us_per_event": cpu / events * 1e6,
                "broker_task_us_per_event": broker / events * 1e6,
                "rest_us_per_event": (cpu - broker) / events * 1e6,
                "server_cpu_share": cpu / result["seconds"],
            }
    finally:
        server.stop()
        figures["backend"] = json.loads(backend.stop().strip().splitlines()[-1])
        shutil.rmtree(workdir, ignore_errors=True)
    return {"scenario": kind, **figures}


SCENARIOS = ("hook-sat", "echo-sat", "hook-lat")


def run_all(runs: int, quick: bool, core_path: Path | None = None, echo_json: bool = False) -> str:
    """Every scenario `runs` times; the markdown section for BENCHMARKS.md."""
    results: dict[str, list[dict]] = {}
    for kind in SCENARIOS:
        for _ in range(runs):
            run = one_run(kind, quick, core_path)
            results.setdefault(kind, []).append(run)
            if echo_json:
                print(json.dumps(run), flush=True)
    return report(results, runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs to check the harness")
    parser.add_argument("--runs", type=int, default=None, help="runs per scenario (3; quick: 1)")
    parser.add_argument("--json", action="store_true", help="print each run's JSON line")
    parser.add_argument("--output", type=Path, help="write the markdown section here")
    opts = parser.parse_args(argv)
    runs = opts.runs or (1 if opts.quick else 3)
    section = run_all(runs, opts.quick, echo_json=opts.json)
    if opts.output:
        opts.output.write_text(section)
    elif not opts.json:
        print(section)
    return 0


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(results: dict[str, list[dict]], runs: int) -> str:
    sat, echo, lat = results["hook-sat"], results["echo-sat"], results["hook-lat"]
    rows = [
        (
            "hooked events answered per second (100 clients x 16 in flight)",
            f"{med(sat, 'events_per_s'):,.0f}/s",
            "≥ 3,000/s",
        ),
        ("server CPU per hooked event", f"{med(sat, 'server_cpu_us_per_event'):.0f} µs", ""),
        (
            "broker task's time per hooked event",
            f"{med(sat, 'broker_task_us_per_event'):.0f} µs",
            "≤ 100 µs",
        ),
        (
            "the rest per hooked event (websocket, HTTP call, tasks)",
            f"{med(sat, 'rest_us_per_event'):.0f} µs",
            "",
        ),
        (
            "the same events answered by the broker itself (echo)",
            f"{med(echo, 'events_per_s'):,.0f}/s at "
            f"{med(echo, 'server_cpu_us_per_event'):.0f} µs each",
            "",
        ),
        (
            "a hook's cost over echo",
            f"{med(sat, 'server_cpu_us_per_event') - med(echo, 'server_cpu_us_per_event'):.0f} µs",
            "",
        ),
        (
            "latency at 1,000 hooked events/s, p50 / p99",
            f"{med(lat, 'p50_ms'):.2f} / {med(lat, 'p99_ms'):.2f} ms",
            "",
        ),
        (
            "the back end called directly at that rate, p50 / p99",
            f"{med(lat, 'direct_p50_ms'):.2f} / {med(lat, 'direct_p99_ms'):.2f} ms",
            "",
        ),
        ("latency phxbroker adds, p99", f"{med(lat, 'added_p99_ms'):.2f} ms", "≤ 5 ms"),
    ]
    lines = [
        "## Hooks: client events answered by the app's back end",
        "",
        f"`python bench/hooks_bench.py`: phxbroker on CPU 0, a trivial back end "
        f"(bench/hook_backend.py, h11 on Trio) and the generator on CPU 1; medians of {runs} "
        "runs. The broker task's time is the sum of its batch durations (/metrics) over the "
        "events; the rest of the server's CPU is the websockets, the hook calls' HTTP and "
        "their tasks.",
        "",
        "| figure | measured | target |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
