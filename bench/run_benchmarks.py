#!/usr/bin/env python3
"""Run phxbroker's standard benchmarks and write BENCHMARKS.md.

    python bench/run_benchmarks.py                 # full set, 3 runs each, writes BENCHMARKS.md
    python bench/run_benchmarks.py --quick         # a few clients for a few seconds, no file
    python bench/run_benchmarks.py --only sat1k,lat1k --runs 1 --output /tmp/b.md

Every run starts a fresh `phxbroker serve` (listening on 127.0.0.1:0, pinned to
CPU 0 with taskset) and the load generator (pinned to CPU 1), collects the
generator's JSON line, and stops the server with SIGTERM. Figures are the
median over the runs; every run's raw line is kept in bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procstat import process_cpu_seconds

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import cluster_bench  # noqa: E402 - beside this file
import hooks_bench  # noqa: E402 - beside this file

REPO_DIR = BENCH_DIR.parent
LOADGEN = BENCH_DIR / "loadgen.py"
BLASTER = BENCH_DIR / "blaster.py"
PROFILER = BENCH_DIR / "profile_connect.py"

SERVER_CONFIG = """\
# The benchmark's broker config: one relay topic, anyone may join, no presence
# (a presence diff per join would be measured instead of the fan-out).
[server]
listen = "127.0.0.1:0"
idle_timeout = 60
# Saturating runs keep a window of broadcasts queued per subscriber.
outbox_limit = 67_108_864

[auth]
allow_anonymous = true

[limits]
# All 10,001 connections come from 127.0.0.1: no per-address limits. The
# publishing client pushes far faster than a person, so the per-connection
# budgets are off, except in the hostile-client runs, whose publisher sends
# 20 messages/s: those keep the shipped budgets (they are what they measure).
max_connections = 0
max_connections_per_ip = 0
message_rate = {message_rate}
frame_rate = {frame_rate}

[admin]
# No control socket: runs must not share one with another server on the box.
socket = ""

[[api.keys]]
name = "bench"
key = "{api_key}"

[[topics]]
pattern = "bench:*"
join = "anyone"
relay = ["bench"]
presence = false

# Join storms: presence diffs batched per 50 ms (the default), and sent one per join
# as Phoenix does (coalesce_ms = 0).
[[topics]]
pattern = "presence:*"
join = "anyone"
presence = true

[[topics]]
pattern = "eager:*"
join = "anyone"
presence = true
coalesce_ms = 0

[log]
level = "info"
"""
API_KEY = "bench-api-key"

LISTENING = re.compile(r"listening on https?://([0-9.]+):(\d+)")


@dataclass(frozen=True)
class Scenario:
    """One measurement: `kind` says who runs it. "loadgen": the generator against a
    fresh server; "reconnect": the same, with the server drained and started again
    mid-run; "profile": bench/profile_connect.py, which starts its own server."""

    name: str
    title: str
    loadgen_args: str
    timeout: float
    kind: str = "loadgen"
    shipped_limits: bool = False  # the server keeps the default message_rate and frame_rate

    @property
    def args(self) -> list[str]:
        return shlex.split(self.loadgen_args)


@dataclass(frozen=True)
class Figure:
    """One benchmark target: which scenario and JSON key it comes from, and the bound."""

    label: str
    target: str
    scenario: str
    key: str
    check: object  # callable(value) -> bool
    unit: str = ""


def full_scenarios() -> list[Scenario]:
    return [
        Scenario(
            "idle",
            "10,000 joined connections held 60 s with heartbeats",
            "--mode idle -n 10000 --hold 60 --probes 0",
            240,
        ),
        Scenario(
            "join10k",
            "10,000 clients connect, upgrade and join (the idle scenario's join phase)",
            "--mode idle -n 10000 --hold 1 --probes 0",
            180,
        ),
        Scenario(
            "sat1k",
            "saturated fan-out, 1,000 subscribers, 100-byte payload",
            "--mode saturate -n 1000 --window 128 --warmup 3 --duration 10",
            180,
        ),
        Scenario(
            "sat5k",
            "saturated fan-out, 5,000 subscribers, 100-byte payload",
            "--mode saturate -n 5000 --window 32 --warmup 3 --duration 10",
            240,
        ),
        Scenario(
            "lat1k",
            "latency, 1,000 subscribers x 20 broadcasts/s",
            "--mode rate -n 1000 --rate 20 --probes 100 --warmup 2 --duration 20",
            180,
        ),
        Scenario(
            "lat5k",
            "latency, 5,000 subscribers x 20 broadcasts/s",
            "--mode rate -n 5000 --rate 20 --probes 100 --warmup 2 --duration 20",
            240,
        ),
        *storm_scenarios(),
        *hostile_scenarios(
            "--mode rate -n 1000 --rate 20 --probes 100 --warmup 2 --duration 20 "
            "--healthz-interval 0.5",
            "1,000 subscribers x 20 broadcasts/s",
            180,
        ),
        Scenario(
            "reconnect10k",
            "10,000 joined clients reconnect and rejoin after the server is restarted",
            "--mode reconnect -n 10000 --probes 0 --storm-timeout 120",
            300,
            kind="reconnect",
        ),
        Scenario(
            "profile10k",
            "where the server's CPU goes in a 10,000-client connect + upgrade + join storm",
            "-n 10000",
            300,
            kind="profile",
        ),
    ]


HOSTILE_QUIET = "hostile-quiet"
FLOODS = {
    "ping": "websocket pings as fast as it can, reading the pongs",
    "cont": "a text message opened and continued with empty non-final frames for ever",
    "msg": "valid Phoenix pushes on a topic of its own, as fast as it can",
}


def hostile_scenarios(args: str, load: str, timeout: float) -> list[Scenario]:
    """The latency of well-behaved clients without a flood and under each kind of flood
    from one hostile client (see the report's hostile-clients section)."""
    return [
        Scenario(
            HOSTILE_QUIET,
            f"no flood (baseline): {load}",
            args,
            timeout,
            shipped_limits=True,
        ),
        *(
            Scenario(
                f"hostile-{kind}",
                f"one client floods: {what}; {load}",
                f"{args} --flood {kind}",
                timeout,
                shipped_limits=True,
            )
            for kind, what in FLOODS.items()
        ),
    ]


def storm_scenarios() -> list[Scenario]:
    """Presence join storms, batched and unbatched (see the report's storm section)."""
    storms = []
    for n, label in ((1000, "1k"), (5000, "5k")):
        for topic, name, how in (
            ("presence:storm", "storm", "diffs batched per 50 ms"),
            ("eager:storm", "eager", "one diff per join, as Phoenix sends them"),
        ):
            storms.append(
                Scenario(
                    f"{name}{label}",
                    f"{n:,} clients join one presence topic, {how}",
                    f"--mode presence -n {n} --probes 10 --topic {topic} --settle-timeout 180",
                    300,
                )
            )
    return storms


def quick_scenarios() -> list[Scenario]:
    return [
        Scenario(
            "idle",
            "quick: 20 joined connections held 3 s, heartbeats every 1 s",
            "--mode idle -n 20 --hold 3 --heartbeat-interval 1 --probes 2",
            60,
        ),
        Scenario(
            "sat1k",
            "quick: saturated fan-out, 20 subscribers",
            "--mode saturate -n 20 --probes 4 --window 64 --warmup 0.5 --duration 2",
            60,
        ),
        Scenario(
            "lat1k",
            "quick: 20 subscribers x 20 broadcasts/s",
            "--mode rate -n 20 --probes 4 --rate 20 --warmup 0.5 --duration 2",
            60,
        ),
        Scenario(
            "api",
            "quick: 20 subscribers x 20 broadcasts/s published with POST /api/broadcast",
            "--mode rate -n 20 --probes 4 --rate 20 --warmup 0.5 --duration 2 "
            f"--publisher http --api-key {API_KEY}",
            60,
        ),
        Scenario(
            "storm",
            "quick: 30 clients join a presence topic, one diff per join",
            "--mode presence -n 30 --probes 3 --topic eager:storm --settle-timeout 20",
            60,
        ),
        *hostile_scenarios(
            "--mode rate -n 20 --probes 4 --rate 20 --warmup 0.5 --duration 1.5 "
            "--healthz-interval 0.25",
            "quick: 20 subscribers x 20 broadcasts/s",
            60,
        ),
        Scenario(
            "reconnect",
            "quick: 50 joined clients reconnect and rejoin after the server is restarted",
            "--mode reconnect -n 50 --probes 0 --storm-timeout 30",
            90,
            kind="reconnect",
        ),
        Scenario(
            "profile",
            "quick: where the server's CPU goes while 300 clients connect and join",
            "-n 300",
            120,
            kind="profile",
        ),
    ]


FIGURES = [
    Figure(
        "joined connections held 60 s, none dropped",
        "10,000, 0 dropped",
        "idle",
        "held",
        lambda v: v == 10000,
    ),
    Figure(
        "RSS per joined idle connection",
        "≤ 8 KiB",
        "idle",
        "rss_per_conn_kib",
        lambda v: v <= 8,
        " KiB",
    ),
    Figure(
        "server CPU per connect + upgrade + join",
        "≤ 150 µs",
        "idle",
        "server_cpu_per_join_us",
        lambda v: v <= 150,
        " µs",
    ),
    Figure(
        "saturated fan-out, 1,000 subscribers",
        "≥ 150,000 deliveries/s",
        "sat1k",
        "deliveries_per_s",
        lambda v: v >= 150_000,
        "/s",
    ),
    Figure(
        "saturated fan-out, 5,000 subscribers",
        "≥ 150,000 deliveries/s",
        "sat5k",
        "deliveries_per_s",
        lambda v: v >= 150_000,
        "/s",
    ),
    Figure(
        "latency p99, 1,000 subscribers x 20/s",
        "≤ 10 ms",
        "lat1k",
        "latency_p99_ms",
        lambda v: v <= 10,
        " ms",
    ),
    Figure(
        "latency p99, 5,000 subscribers x 20/s",
        "≤ 50 ms",
        "lat5k",
        "latency_p99_ms",
        lambda v: v <= 50,
        " ms",
    ),
    Figure(
        "deliveries lost, 5,000 subscribers x 20/s",
        "0",
        "lat5k",
        "deliveries_lost",
        lambda v: v == 0,
    ),
]


@dataclass(frozen=True)
class Ablation:
    """One optimisation, measured by running the same scenarios with it taken out.

    `patch` (in bench/ablations/) is applied to a copy of the package that is run; the
    figures compared are (scenario, JSON key, label) triples.
    """

    name: str
    optimisation: str
    without: str
    patch: str
    figures: tuple[tuple[str, str, str], ...]

    @property
    def scenarios(self) -> list[str]:
        return list(dict.fromkeys(scenario for scenario, _, _ in self.figures))


ABLATIONS_DIR = BENCH_DIR / "ablations"
SATURATED = (
    ("sat1k", "deliveries_per_s", "deliveries/s, 1,000 subscribers"),
    ("sat5k", "deliveries_per_s", "deliveries/s, 5,000 subscribers"),
)
# The connect path's optimisations are measured on the idle scenario's join phase alone
# (join10k: the same figures, without the 60 s hold).
CONNECT = (
    ("join10k", "server_cpu_per_join_us", "server µs per connect + upgrade + join"),
    ("join10k", "rss_per_conn_kib", "RSS KiB per joined idle connection"),
)
ABLATIONS = [
    Ablation(
        "coalesced-writes",
        "the frames queued for one connection in a batch leave in one send()",
        "one send() per frame",
        "one-send-per-frame.patch",
        SATURATED,
    ),
    Ablation(
        "encode-once",
        "a broadcast is JSON-encoded and framed once; every subscriber gets the same bytes",
        "encoded and framed again for each subscriber",
        "encode-per-delivery.patch",
        SATURATED,
    ),
    Ablation(
        "gc-tuning",
        "start-up objects frozen, young collections every 5,000 allocations",
        "CPython's default collector thresholds",
        "default-gc.patch",
        (
            ("idle", "server_cpu_per_join_us", "server µs per connect + upgrade + join"),
            ("sat5k", "deliveries_per_s", "deliveries/s, 5,000 subscribers"),
            ("lat5k", "latency_p99_ms", "latency p99 ms, 5,000 subscribers x 20/s"),
        ),
    ),
    Ablation(
        "orjson",
        "JSON parsed and encoded with orjson",
        "the standard library's json",
        "stdlib-json.patch",
        (
            *SATURATED,
            ("sat5k", "server_cpu_per_join_us", "server µs per connect + upgrade + join"),
        ),
    ),
    Ablation(
        "http-released",
        "an upgraded connection's session runs after its HTTP phase has returned",
        "the session runs inside the HTTP loop, its parser and request kept alive",
        "http-kept.patch",
        CONNECT,
    ),
    Ablation(
        "httptools-upgrade",
        "a websocket upgrade request is parsed by httptools, its 101 written directly",
        "h11 parses every request and writes the 101",
        "h11-upgrade.patch",
        CONNECT,
    ),
    Ablation(
        "deadline-on-wait",
        "the first request is read under a deadline only if it has to be waited for",
        "every first request read under a deadline (a trio cancel scope)",
        "deadline-always.patch",
        CONNECT,
    ),
    Ablation(
        "frame-layer",
        "inbound frames parsed by wsproto's FrameProtocol, without its Connection",
        "wsproto's Connection and its event queue per connection",
        "wsproto-connection.patch",
        CONNECT,
    ),
    Ablation(
        "wait-after-short-read",
        "after a short read of a plain socket, wait for it instead of reading to EAGAIN",
        "every socket read until EAGAIN",
        "read-until-eagain.patch",
        CONNECT,
    ),
    Ablation(
        "one-coroutine",
        "a websocket session is one coroutine, handed to the listener unstarted",
        "the session two coroutines deep behind a functools.partial",
        "nested-session.patch",
        CONNECT,
    ),
    Ablation(
        "tell-without-yield",
        "a client's message is queued for the broker without a scheduler turn of its own",
        "a scheduler turn (a memory channel's send) for every message queued",
        "tell-yields.patch",
        (*CONNECT, SATURATED[0]),
    ),
    Ablation(
        "connect-extras",
        "one shared anonymous identity, remembered vsn versions, no unused join "
        "template variables, TCP_NODELAY inherited from the listener",
        "an Identity, a version regex match, a template dict and a setsockopt per connect",
        "connect-extras.patch",
        CONNECT,
    ),
]


def patched_core(ablation: Ablation, base: Path | None, into: Path) -> Path:
    """A copy of the package (from `base`, else the installed one) with the ablation's
    patch applied; returns the directory to put on PYTHONPATH."""
    into.mkdir(parents=True)
    source = (base / "phxbroker") if base else _package_dir()
    shutil.copytree(source, into / "phxbroker", ignore=shutil.ignore_patterns("__pycache__"))
    patch = ABLATIONS_DIR / ablation.patch
    proc = subprocess.run(["git", "apply", str(patch)], cwd=into, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(
            f"bench/ablations/{ablation.patch} does not apply to this phxbroker: "
            f"{proc.stderr.strip()}"
        )
    compile_package(into)
    return into


@dataclass
class RunResult:
    scenario: str
    run: int
    result: dict
    loadgen_cmd: list[str]
    server_log: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ablation: str = ""  # the optimisation taken out for this run, if any


class ServerProcess:
    """A server under test started on 127.0.0.1:0; knows its pid and port."""

    def __init__(
        self,
        cmd: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        poll_interval: float = 0.05,
    ) -> None:
        self.cmd = cmd
        self.log_path = log_path
        self.poll_interval = poll_interval
        self._log = open(log_path, "w+b")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd
        )
        try:
            self.port = self._wait_listening(timeout=20)
            # When its "listening" line was seen (within poll_interval of it).
            self.listening_at = time.monotonic()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            match = LISTENING.search(text)
            if match:
                return int(match.group(2))
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with code {self.proc.returncode} before listening: "
                    f"{text.strip()[-500:]}"
                )
            time.sleep(self.poll_interval)
        raise RuntimeError(f"the server printed no 'listening on' line within {timeout:g} s")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 10 s; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def pinned(cpu: int, cmd: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > cpu:
        return ["taskset", "-c", str(cpu), *cmd]
    return cmd


def server_command(target: str, config_path: Path) -> list[str]:
    if target == "blaster":
        return pinned(0, [sys.executable, str(BLASTER)])
    if target == "blaster-1frame":
        return pinned(0, [sys.executable, str(BLASTER), "--frames-per-write", "1"])
    return pinned(0, [sys.executable, "-m", "phxbroker", "serve", "--config", str(config_path)])


def loadgen_result(cmd: list[str], timeout: float) -> dict:
    """Run the load generator: its result, or an error result if it did not finish
    within `timeout` seconds. Raises RuntimeError if it printed no result."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"the load generator did not finish within {timeout:g} s"}
    return printed_result(done)


def printed_result(done: subprocess.CompletedProcess) -> dict:
    """The result a finished load generator printed: its last JSON line."""
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(
            f"the load generator printed no result (exit {done.returncode}): "
            f"{done.stderr.strip()[-500:]}"
        )
    return json.loads(lines[-1])


def run_one(
    scenario: Scenario,
    run: int,
    opts,
    config_path: Path,
    out_dir: Path,
    ablation: Ablation | None = None,
) -> RunResult:
    stem = f"{scenario.name}-{run}" + (f"-without-{ablation.name}" if ablation else "")
    log_path = out_dir / f"{stem}.server.log"
    core_path = opts.ablation_cores[ablation.name] if ablation else opts.core_path
    env = None
    if core_path:
        env = {**os.environ, "PYTHONPATH": str(core_path)}
    if scenario.kind == "reconnect":
        return run_reconnect(scenario, run, opts, config_path, out_dir, stem, env)
    if scenario.kind == "profile":
        return run_profile(scenario, run, opts, out_dir, stem, core_path)
    # Started from the config's directory: `python -m phxbroker` puts its working
    # directory first on sys.path, where a checkout's own package would shadow
    # the one meant to run.
    server = ServerProcess(
        server_command(opts.target, config_path), log_path, env, cwd=config_path.parent
    )
    cmd = pinned(
        1,
        [
            sys.executable,
            str(LOADGEN),
            "--port",
            str(server.port),
            "--server-pid",
            str(server.proc.pid),
            *scenario.args,
        ],
    )
    problems = []
    try:
        result = loadgen_result(cmd, scenario.timeout)
    finally:
        code = server.stop()
    if code not in (0, None):
        problems.append(f"server exited with code {code}")
    if result.get("error"):
        problems.append(result["error"])
    held = result.get("connected", 0) - result.get("dropped", 0)
    result["held"] = held if result.get("mode") == "idle" else None
    (out_dir / f"{stem}.json").write_text(json.dumps(result) + "\n")
    return RunResult(
        scenario.name,
        run,
        result,
        cmd,
        str(log_path),
        problems,
        ablation=ablation.name if ablation else "",
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# phxbroker's default [limits] message_rate and frame_rate
SHIPPED_MESSAGE_RATE = 100
SHIPPED_FRAME_RATE = 10_000
SHIPPED_LIMITS_CONFIG = "bench-shipped-limits.toml"


def bench_config(message_rate: int = 0, frame_rate: int = 0) -> str:
    """The benchmark config; a rate of 0 turns that per-connection budget off."""
    return SERVER_CONFIG.format(api_key=API_KEY, message_rate=message_rate, frame_rate=frame_rate)


def scenario_config(sc: Scenario, config_path: Path) -> Path:
    """The config a scenario's server runs with (written next to `config_path`)."""
    return config_path.parent / SHIPPED_LIMITS_CONFIG if sc.shipped_limits else config_path


def config_on_port(port: int) -> str:
    """The benchmark config, listening on a fixed port instead of :0."""
    text = bench_config()
    fixed = text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
    assert fixed != text
    return fixed


class LineReader:
    """Lines of a child's stdout, read by a thread, each waited for with a timeout."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout: float) -> str | None:
        """The next line; None at the end of output or after `timeout` seconds."""
        try:
            return self.lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None


def restart_server(
    cmd: list[str], log_path: Path, env, cwd: Path, deadline: float
) -> tuple[ServerProcess, int]:
    """Start the server again on the port the old one is releasing; retry while the
    address is still in use. Return it and how many starts found the port taken."""
    taken = 0
    while True:
        try:
            return ServerProcess(cmd, log_path, env, cwd=cwd, poll_interval=0.005), taken
        except RuntimeError as exc:
            if "already in use" not in str(exc) or time.monotonic() > deadline:
                raise
            taken += 1
            time.sleep(0.02)


def run_reconnect(
    scenario: Scenario, run: int, opts, config_path: Path, out_dir: Path, stem: str, env
) -> RunResult:
    """A reconnect storm: N clients joined; SIGTERM drains the server (every websocket
    closed with 1001); the same command starts a new server on the same port at once;
    the generator times every client's reconnect and rejoin from the signal."""
    if opts.target != "phxbroker":
        raise RuntimeError("the reconnect storm needs phxbroker (--target phxbroker)")
    port = free_port()
    config = config_path.parent / f"bench-port{port}.toml"
    config.write_text(config_on_port(port))
    server_cmd = server_command(opts.target, config)
    old = ServerProcess(server_cmd, out_dir / f"{stem}.server.log", env, cwd=config.parent)
    cmd = pinned(
        1,
        [
            sys.executable,
            str(LOADGEN),
            "--port",
            str(port),
            "--server-pid",
            str(old.proc.pid),
            *scenario.args,
            "--control",
        ],
    )
    deadline = time.monotonic() + scenario.timeout
    stderr_path = out_dir / f"{stem}.loadgen.err"
    problems: list[str] = []
    new = None
    notes: dict = {}
    with open(stderr_path, "w") as err:
        gen = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
        )
        out = LineReader(gen.stdout)
        result: dict | None = None
        try:
            line = out.next(deadline - time.monotonic())
            if line == "ready":
                drain_at = time.monotonic()
                old.proc.send_signal(signal.SIGTERM)
                exited = threading.Thread(target=_note_exit, args=(old, drain_at, notes))
                exited.start()
                gen.stdin.write(f"drain {drain_at!r}\n")
                gen.stdin.flush()
                new, taken = restart_server(
                    server_cmd,
                    out_dir / f"{stem}.restarted.server.log",
                    env,
                    config.parent,
                    drain_at + 20,
                )
                cpu = process_cpu_seconds(new.proc.pid)
                gen.stdin.write(f"server {new.proc.pid} {cpu!r} {new.listening_at!r}\n")
                gen.stdin.flush()
                notes["restart_port_taken"] = taken
                line = out.next(deadline - time.monotonic())
            while line is not None and not line.startswith("{"):
                line = out.next(deadline - time.monotonic())
            if line is None:
                gen.kill()
                err.flush()
                why = stderr_path.read_text(errors="replace").strip()[-500:]
                result = {"error": f"the load generator gave no result: {why or 'timed out'}"}
            else:
                result = json.loads(line)
        finally:
            with contextlib.suppress(OSError):
                gen.stdin.close()
            if gen.poll() is None:
                gen.kill()
            gen.wait()
            old_code = old.stop()
            new_code = new.stop() if new else None
    if old_code not in (0, None):
        problems.append(f"the drained server exited with code {old_code}")
    if new_code not in (0, None):
        problems.append(f"the restarted server exited with code {new_code}")
    result.update(notes)
    if result.get("error"):
        problems.append(result["error"])
    elif not result.get("storm_complete"):
        problems.append(
            f"only {result.get('rejoined')} of {result.get('storm_clients')} clients rejoined"
        )
    result["held"] = None
    (out_dir / f"{stem}.json").write_text(json.dumps(result) + "\n")
    return RunResult(scenario.name, run, result, cmd, str(old.log_path), problems)


def _note_exit(server: ServerProcess, since: float, notes: dict) -> None:
    """Record (in notes) when a drained server's process ended, counted from `since`;
    give up after its drain timeout and then some."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(30)
        notes["old_server_exited_s"] = round(time.monotonic() - since, 3)


def run_profile(
    scenario: Scenario, run: int, opts, out_dir: Path, stem: str, core_path: Path | None
) -> RunResult:
    """The connect-storm profile: bench/profile_connect.py starts its own server under
    the sampling profiler and prints one JSON line."""
    if opts.target != "phxbroker":
        raise RuntimeError("the connect-storm profile needs phxbroker (--target phxbroker)")
    cmd = [
        sys.executable,
        str(PROFILER),
        *scenario.args,
        "--json",
        "--keep",
        str(out_dir / f"{stem}.pyspy.txt"),
    ]
    if core_path:
        cmd += ["--pythonpath", str(core_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=scenario.timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        result = (
            json.loads(lines[-1])
            if lines
            else {
                "error": f"the profiler printed no result (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-500:]}"
            }
        )
    except subprocess.TimeoutExpired:
        result = {"error": f"the profiler did not finish within {scenario.timeout:g} s"}
    problems = [result["error"]] if result.get("error") else []
    result["held"] = None
    (out_dir / f"{stem}.json").write_text(json.dumps(result) + "\n")
    return RunResult(scenario.name, run, result, cmd, "", problems)


# -- cluster scenarios (bench/cluster_bench.py) ---------------------------------------------


def cluster_scenarios_wanted(opts) -> list:
    """The cluster scenarios, with --cluster or when --only names one of them."""
    cluster = cluster_bench.cluster_scenarios(opts.quick)
    named = set(opts.only.split(",")) if opts.only else set()
    if opts.cluster or named & {s.name for s in cluster}:
        return cluster
    return []


def run_cluster(sc, run: int, opts, config_path: Path, out_dir: Path, tmp: Path) -> RunResult:
    env = {**os.environ, "PYTHONPATH": str(opts.core_path)} if opts.core_path else None
    result, cmd, problems, log_path = cluster_bench.run_cluster_one(
        sc,
        run,
        config_path.read_text(),
        out_dir,
        tmp,
        ServerProcess,
        pinned,
        LOADGEN,
        loadgen_result,
        env,
    )
    return RunResult(sc.name, run, result, cmd, log_path, problems)


def busy_box(r: RunResult, opts) -> str:
    """Why other work may have spoiled this run's timing figures ("" if nothing did)."""
    others = r.result.get("others_cpu")
    steal = r.result.get("server_core_steal")
    why = []
    if others is not None and others > opts.max_others:
        why.append(f"other work used {others} cores")
    if steal is not None and steal > opts.max_steal:
        why.append(f"the hypervisor took {steal} of the server's core (steal)")
    return " and ".join(why)


def median(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def machine_info(opts) -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = core_description(opts)
    return {
        "cores": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "phxbroker commit": commit or "unknown",
        "fd limit": str(_fd_limit()),
    }


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"git {' '.join(args)} in {repo}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def core_description(opts) -> str:
    """Which phxbroker code the runs used, as the report should name it."""
    if opts.target != "phxbroker":
        return "not used"
    if opts.core_commit:
        return f"{opts.core_commit} (a snapshot of that commit)"
    try:
        repo = _package_dir().parent
        head = _git(repo, "rev-parse", "--short", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no", "phxbroker")
    except (OSError, RuntimeError):
        return "unknown"
    return f"{head}" + (" plus uncommitted changes" if dirty else "")


def snapshot_core(rev: str, into: Path) -> str:
    """Export the phxbroker package at `rev` into `into`; return the short commit id.

    Runs then use that commit even while the working tree changes under them.
    """
    repo = _package_dir().parent
    commit = _git(repo, "rev-parse", "--short", "--verify", f"{rev}^{{commit}}")
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", commit, "phxbroker"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    compile_package(into)
    return commit


def compile_package(root: Path) -> None:
    """Byte-compile a copied package, as an installed one is, so that the first run
    does not pay for compiling the modules it imports lazily while measured."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(root)], check=True)


def _package_dir() -> Path:
    try:
        import phxbroker

        return Path(phxbroker.__file__).resolve().parent
    except ImportError:
        return REPO_DIR


def _fd_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}{unit}"
        return f"{value:.3g}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def _shown(cmd: list[str]) -> str:
    """A command as a reader would type it from the repository root."""
    words = []
    for word in cmd:
        if word == sys.executable:
            word = "python"
        elif word.startswith(str(REPO_DIR) + "/"):
            word = word[len(str(REPO_DIR)) + 1 :]
        words.append(shlex.quote(word))
    return " ".join(words)


def report(runs: list[RunResult], scenarios: list[Scenario], opts, invocation: str) -> str:
    info = machine_info(opts)
    by_name: dict[str, list[RunResult]] = {}
    for r in runs:
        if not r.ablation:
            by_name.setdefault(r.scenario, []).append(r)
    lines = ["# Benchmarks", ""]
    if opts.note:
        lines += [f"> {opts.note}", ""]
    lines += [
        f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} against "
        f"{'phxbroker' if opts.target == 'phxbroker' else opts.target + ' (generator check)'}, "
        f"{opts.runs} run(s) per scenario, medians shown.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "- server pinned to CPU 0, load generator to CPU 1 (taskset)",
        "",
        "## Results against the targets",
        "",
        "| figure | target | median | runs | met |",
        "|---|---|---|---|---|",
    ]
    for fig in FIGURES:
        rs = by_name.get(fig.scenario)
        if not rs:
            continue
        values = [r.result.get(fig.key) for r in rs]
        med = median(values)
        met = "—" if med is None else ("yes" if fig.check(med) else "**no**")
        lines.append(
            f"| {fig.label} | {fig.target} | {_fmt(med, fig.unit)} | "
            f"{', '.join(_fmt(v) for v in values)} | {met} |"
        )
    lines += [
        "",
        "## Every run",
        "",
        "CPU columns are fractions of one core over the measured window: the server's "
        "utime+stime, the busy time of the server's core (which also counts the kernel's "
        "softirq work for its sends), the generator's own (a value near 1.0 would mean "
        "the generator, not the server, was the limit) and everything else on the box "
        "(other work sharing the machine); steal is the part of the server core's time "
        "the hypervisor gave to another guest. The longest generator loop pass bounds what "
        "the generator can add to a latency sample; in parentheses the CPU it used, the "
        "rest of the pass is preemption.",
        "",
        "| scenario | run | joined | join/s | srv µs/join | RSS KiB/conn | deliveries/s "
        "| lost | p50 ms | p99 ms | max ms | srv CPU | srv core | steal | gen CPU | others CPU "
        "| gen max pass ms (CPU) "
        "| dropped | problems, notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {sc.name: k for k, sc in enumerate(scenarios)}
    for r in sorted(runs, key=lambda r: (r.ablation, order.get(r.scenario, 0), r.run)):
        d = r.result
        lines.append(
            "| "
            + " | ".join(
                [
                    r.scenario + (f" without {r.ablation}" if r.ablation else ""),
                    str(r.run),
                    _fmt(d.get("connected")),
                    _fmt(d.get("join_rate")),
                    _fmt(d.get("server_cpu_per_join_us")),
                    _fmt(d.get("rss_per_conn_kib")),
                    _fmt(d.get("deliveries_per_s")),
                    _fmt(d.get("deliveries_lost")),
                    _fmt(d.get("latency_p50_ms")),
                    _fmt(d.get("latency_p99_ms")),
                    _fmt(d.get("latency_max_ms")),
                    _fmt(d.get("server_cpu")),
                    _fmt(d.get("server_core_busy")),
                    _fmt(d.get("server_core_steal")),
                    _fmt(d.get("gen_cpu")),
                    _fmt(d.get("others_cpu")),
                    f"{_fmt(d.get('gen_max_pass_ms'))} ({_fmt(d.get('gen_max_pass_cpu_ms'))})",
                    _fmt(d.get("dropped")),
                    "; ".join(r.problems + r.notes),
                ]
            )
            + " |"
        )
    gen = [r.result["gen_cpu"] for r in runs if isinstance(r.result.get("gen_cpu"), (int, float))]
    if gen:
        lines += [
            "",
            f"The generator used at most {_fmt(max(gen))} of its core in any run "
            f"({'below' if max(gen) < 1 else '**not** below'} 1.0 in every run), so the "
            "figures are the server's.",
        ]
    lines += latency_bound(by_name)
    lines += storm_report(scenarios, by_name)
    lines += hostile_report(scenarios, by_name)
    lines += reconnect_report(scenarios, by_name)
    lines += profile_report(scenarios, by_name)
    lines += cluster_bench.cluster_report(by_name, median, _fmt)
    lines += ablation_report(runs, by_name, opts)
    lines += ["", "## Scenarios and exact commands", "", f"    {invocation}", ""]
    for sc in scenarios:
        rs = by_name.get(sc.name)
        if not rs:
            continue
        cmd = _shown(rs[0].loadgen_cmd)
        cmd = re.sub(r"--port \d+ --server-pid \d+", "--port PORT --server-pid PID", cmd)
        lines += [f"- **{sc.name}**: {sc.title}", "", f"      {cmd}", ""]
    server_cmd = _shown(server_command(opts.target, Path("bench.toml")))
    if opts.core_commit and opts.target == "phxbroker":
        server_cmd = f"PYTHONPATH=<git archive {opts.core_commit} phxbroker> {server_cmd}"
    lines += [
        "Server, started fresh for every run:",
        "",
        f"    {server_cmd}",
        "",
        "with `bench.toml`:",
        "",
        "```toml",
        bench_config().rstrip(),
        "```",
        "",
        "(The reconnect storm's servers use the same config listening on a fixed free port, "
        "so that the restarted one takes the port of the drained one; the profile's run "
        "under `bench/serve_gc_timed.py`, which times garbage collections. The hostile-client "
        "runs keep the shipped per-connection budgets, "
        f"`message_rate = {SHIPPED_MESSAGE_RATE}` and `frame_rate = {SHIPPED_FRAME_RATE}`.)",
        "",
        "## How the figures are taken",
        "",
        "- connections: websocket clients on 127.0.0.1 speaking the V2 JSON serializer "
        "(`vsn=2.0.0`), all joined to one topic, heartbeat every 30 s.",
        "- join cost: the server's utime+stime (/proc/PID/stat) across the whole "
        "connect + upgrade + join phase, divided by the number joined; join/s is the "
        "same phase's wall rate (256 joins in flight).",
        "- RSS per connection: VmRSS after all joined minus VmRSS before the first "
        "subscriber connected, divided by the number joined.",
        "- broadcasts: one joined client pushes the relayed event; the payload is "
        "~100 bytes and carries a sequence number and the send time.",
        "- saturated fan-out: a closed loop keeps W broadcasts in flight; a broadcast "
        "counts as complete once every subscriber has it. deliveries/s is what "
        "subscribers received during the measured window (after a warm-up).",
        "- deliveries are counted by walking websocket frame headers only; latency comes "
        "from probe subscribers spread evenly over the join order that parse every "
        "frame (receive time minus the send time in the payload).",
        "- lost: broadcasts sent x subscribers minus deliveries received, after waiting "
        "up to 10 s for stragglers.",
        "",
    ]
    return "\n".join(lines)


def latency_bound(main_runs: dict[str, list[RunResult]]) -> list[str]:
    """What a fixed-rate run says about the latency floor on one core."""
    rows = []
    for name in ("lat1k", "lat5k"):
        rs = main_runs.get(name, [])
        busy = median([r.result.get("server_core_busy") for r in rs])
        rate = median([r.result.get("deliveries_per_s") for r in rs])
        joined = median([r.result.get("connected") for r in rs])
        p99 = median([r.result.get("latency_p99_ms") for r in rs])
        if not (busy and rate and joined and p99):
            continue
        per_delivery_us = busy / rate * 1e6
        flush_ms = per_delivery_us * joined / 1000
        rows.append(
            f"| {name} | {_fmt(joined)} | {_fmt(round(per_delivery_us, 2))} | "
            f"{_fmt(round(flush_ms, 1))} | {_fmt(p99)} |"
        )
    if not rows:
        return []
    return [
        "",
        "## What bounds the latency",
        "",
        "At a fixed rate a broadcast is written to its subscribers one non-blocking "
        "send() each, on one core: the last subscriber gets it one whole fan-out after "
        "the first. The time the server's core was busy per delivery (its own CPU plus the "
        "kernel's work for its sends) times the subscribers estimates that fan-out time; "
        "the p99, taken by probes spread over the join order, sits close to it, so it is "
        "the cost of the sends and not waiting in a queue. Going lower takes more "
        "cores: several worker processes sharing the port (SO_REUSEPORT), each owning a "
        "share of the subscribers, with broadcasts forwarded between them.",
        "",
        "| scenario | subscribers | server core µs per delivery | one fan-out, ms | p99 ms |",
        "|---|---|---|---|---|",
        *rows,
    ]


def storm_report(scenarios: list[Scenario], main_runs: dict[str, list[RunResult]]) -> list[str]:
    """The presence join storm section: what N joins to a presence topic cost."""
    storms = [
        sc for sc in scenarios if "--mode presence" in sc.loadgen_args and sc.name in main_runs
    ]
    if not storms:
        return []
    lines = [
        "",
        "## Presence join storms",
        "",
        "N clients join one presence topic (256 joins in flight). Every joiner gets the "
        "presence state after its join reply and every member gets a presence_diff for "
        "the joins. Settled: from the first connect until every probe (10 clients spread "
        "over the join order, which apply the diffs as phoenix.js does) lists all N; the "
        "server CPU is over that same span. Frames per client counts every presence frame "
        "a client received, until the stream went quiet.",
        "",
        "| scenario | joins | settled s | server CPU s | presence frames per client "
        "| probes listing all N |",
        "|---|---|---|---|---|---|",
    ]
    for sc in storms:
        rs = main_runs[sc.name]

        def med(key: str, rs=rs):
            return _fmt(median([r.result.get(key) for r in rs]))

        probes = ", ".join(f"{r.result.get('probes_settled')}/{r.result.get('probes')}" for r in rs)
        lines.append(
            f"| {sc.name}: {sc.title} | {med('connected')} | {med('settle_seconds')} | "
            f"{med('storm_server_cpu_s')} | {med('presence_frames_per_client')} | {probes} |"
        )
    return lines


def _codes(counts: dict) -> str:
    return ", ".join(f"{code}: {n:,}" for code, n in sorted(counts.items())) or "none"


def _summed(dicts: list[dict | None]) -> dict:
    total: dict = {}
    for d in dicts:
        for key, n in (d or {}).items():
            total[key] = total.get(key, 0) + n
    return total


def hostile_report(scenarios: list[Scenario], main_runs: dict[str, list[RunResult]]) -> list[str]:
    """The hostile-clients section: others' latency under each kind of flood."""
    floods = [sc for sc in scenarios if "--flood" in sc.loadgen_args and sc.name in main_runs]
    if not floods:
        return []
    quiet_runs = main_runs.get(HOSTILE_QUIET, [])
    quiet = median([r.result.get("latency_p99_ms") for r in quiet_runs])
    load = floods[0].title.rsplit("; ", 1)[-1]
    lines = [
        "",
        "## Hostile clients",
        "",
        f"A latency run ({load}, probes timing every delivery) with one more client "
        "flooding the server through warm-up and measured window. The flooder "
        "(bench/flooder.py) sends websocket pings as fast as the socket takes them and "
        "reads the pongs (`ping`), or opens a text message and continues it with empty "
        "non-final frames for ever (`cont`), or pushes valid Phoenix messages on a topic "
        "of its own (`msg`); whenever the server closes it, it reconnects at once and "
        "floods again. Others' p50 and p99 come from the probes over the measured window; "
        "the quiet p99 is the run without a flood from the same sitting, and the goal is "
        "a p99 within 2x of it. Undelivered: probe deliveries that never arrived (within "
        "10 s of the last broadcast). Closed: how often the server closed the flooder, by "
        "close code (eof/ECONNRESET: closed without a close frame), per run. Frames got "
        "in: whole flood frames the kernel took from the flooder (median per run). Server "
        "CPU is over the measured window. /healthz: a fresh GET every 0.5 s (quick: "
        "0.25 s), each bounded by 2 s; failed counts those unanswered. The flooder runs "
        "niced on the generator's core; its CPU is kept out of the others' figure.",
        "",
        f"Quiet p99 (`{HOSTILE_QUIET}`): {_fmt(quiet, ' ms')}, p50 "
        f"{_fmt(median([r.result.get('latency_p50_ms') for r in quiet_runs]), ' ms')}, "
        f"/healthz max {_fmt(median([r.result.get('healthz_max_ms') for r in quiet_runs]))} ms.",
        "",
        "| flood | others p50 ms | others p99 ms | p99 / quiet p99 | within 2x "
        "| undelivered | flooder closed (by code) | frames got in | server CPU "
        "| /healthz max ms (failed) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sc in floods:
        rs = main_runs[sc.name]

        def med(key: str, rs=rs):
            return median([r.result.get(key) for r in rs])

        p99 = med("latency_p99_ms")
        ratio = p99 / quiet if p99 is not None and quiet else None
        flooders = [r.result.get("flooder") or {} for r in rs]
        closes = [sum((f.get("closes") or {}).values()) for f in flooders]
        frames = median([f.get("frames_sent") for f in flooders])
        health_failed = sum(sum((r.result.get("healthz_failures") or {}).values()) for r in rs)
        kind = sc.name.removeprefix("hostile-")
        lines.append(
            f"| `{kind}`: {FLOODS.get(kind, sc.title)} | {_fmt(med('latency_p50_ms'))} "
            f"| {_fmt(p99)} | {_fmt(round(ratio, 2) if ratio is not None else None)} "
            f"| {'—' if ratio is None else ('yes' if ratio <= 2 else '**no**')} "
            f"| {_fmt(med('latency_missing'))} "
            f"| {', '.join(str(n) for n in closes)} "
            f"({_codes(_summed([f.get('closes') for f in flooders]))}) "
            f"| {_fmt(frames)} | {_fmt(med('server_cpu'))} "
            f"| {_fmt(med('healthz_max_ms'))} ({health_failed}) |"
        )
    return lines


def reconnect_report(scenarios: list[Scenario], main_runs: dict[str, list[RunResult]]) -> list[str]:
    """The reconnect-storm section: how long N clients take to be back after a restart."""
    storms = [sc for sc in scenarios if sc.kind == "reconnect" and sc.name in main_runs]
    if not storms:
        return []
    lines = [
        "",
        "## Reconnect storm after a restart",
        "",
        "N clients joined to one topic. SIGTERM drains the server (every websocket closed "
        "with 1001) and the same command, with the same config, starts a new server on the "
        "same port at once. Every client reconnects and rejoins as phoenix.js 1.8 does: "
        "reconnect 10, 50, 100, 150, 200, 250, 500, 1000, 2000 ms after each failed try, "
        "then every 5 s (tries reset when the socket opens); join as soon as it opens; "
        "rejoin 1, 2, 5, then every 10 s after a join refused or not answered within 10 s. "
        "Seconds count from the drain signal. Refused: connects refused while nothing "
        "listened (ECONNREFUSED). Handshakes failed: upgrades that failed, were closed or "
        "took over 10 s. New server CPU: its utime+stime from listening until every "
        "client was back, and that per rejoin.",
        "",
        "| scenario | clients | new server listening s | 50% back s | 99% back s "
        "| all back s | connects refused | handshakes failed | join timeouts "
        "| new server CPU s | µs per rejoin |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sc in storms:
        rs = main_runs[sc.name]

        def med(key: str, rs=rs):
            return _fmt(median([r.result.get(key) for r in rs]))

        failed = median(
            [sum((r.result.get("handshake_failures") or {}).values()) for r in rs if r.result]
        )
        lines.append(
            f"| {sc.name}: {sc.title} | {med('storm_clients')} | "
            f"{med('new_server_listening_s')} | {med('rejoin_50_s')} | {med('rejoin_99_s')} "
            f"| {med('rejoin_all_s')} | {med('connect_refused')} | {_fmt(failed)} "
            f"| {med('join_timeouts')} | {med('storm_server_cpu_s')} "
            f"| {med('storm_server_cpu_per_rejoin_us')} |"
        )
    return lines


def profile_report(scenarios: list[Scenario], main_runs: dict[str, list[RunResult]]) -> list[str]:
    """The connect-storm profile section: server CPU per connect, by category."""
    profiles = [sc for sc in scenarios if sc.kind == "profile" and sc.name in main_runs]
    idle = main_runs.get("idle", [])
    unprofiled = median([r.result.get("server_cpu_per_join_us") for r in idle])
    lines: list[str] = []
    for sc in profiles:
        rs = [r for r in main_runs[sc.name] if r.result.get("categories")]
        if not rs:
            continue
        first = rs[0].result

        def med(key: str, rs=rs):
            return median([r.result.get(key) for r in rs])

        cost = med("us_per_connect")
        profiled = median([(r.result.get("profiled") or {}).get("us_per_connect") for r in rs])
        lines += [
            "",
            f"## Where a connect's CPU goes ({sc.name})",
            "",
            f"{sc.title[:1].upper()}{sc.title[1:]}. The storm runs twice on fresh "
            "servers. The first runs as it is: the server's utime+stime over it / clients "
            "joined is the cost per connect, and `gc.callbacks` in the server times the "
            f"garbage collector's part. The second runs under py-spy ({first.get('rate')} "
            "samples/s, Python frames) from before the first connect until the last client "
            "has joined; each sample is put in a category by its stack (the rules in "
            "`bench/profile_connect.py`: library internals count where phxbroker called "
            "them), and the categories share what the collector left in proportion to "
            "their samples (the sampler cannot see the collector; its own stops cost the "
            "server CPU, so the cost comes from the first storm). µs per connect: the "
            "share times the cost. Medians over the runs.",
            "",
            f"Server CPU per connect + upgrade + join: {_fmt(cost, ' µs')} "
            f"({_fmt(med('connected'))} clients, {_fmt(med('gc_cpu_s'), ' s')} in "
            f"collections; under the profiler {_fmt(profiled, ' µs')} per connect, "
            f"{_fmt(med('samples'))} samples)"
            + (f"; the idle scenario measured {_fmt(unprofiled, ' µs')}." if unprofiled else "."),
            "",
            "| category | % of server CPU | µs per connect |",
            "|---|---|---|",
        ]
        for row in first["categories"]:
            name = row["category"]
            cells = [c for r in rs for c in r.result["categories"] if c["category"] == name]
            share = median([c["share"] for c in cells])
            us = median([c["us_per_connect"] for c in cells])
            lines.append(
                f"| {name} | {_fmt(round(share * 100, 1) if share is not None else None)} "
                f"| {_fmt(us)} |"
            )
        top = first.get("other_top") or []
        if top:
            lines += ["", 'The frames most often left in "other" (first run):', ""]
            lines += [f"- {e['samples']} samples: `{e['frame']}`" for e in top]
        lines += [
            "",
            "The changes that took the connect path here, each measured on its own, and "
            "what is left with the design that would go further: bench/CONNECT_COST.md. "
            "The ablation rows below take each of them out of this code again.",
        ]
    return lines


def _change(with_it: float, without: float) -> str:
    if not without:
        return "—"
    return f"{(with_it / without - 1) * 100:+.0f}%"


def ablation_report(
    runs: list[RunResult], main_runs: dict[str, list[RunResult]], opts
) -> list[str]:
    """The optimisations section: each figure with the optimisation and without it."""
    chosen = [a for a in ABLATIONS if a.name in opts.ablation_names]
    if not chosen:
        return []
    lines = [
        "",
        "## Optimisations, each measured by taking it out",
        "",
        "Each optimisation below is taken out by one patch from `bench/ablations/`, "
        "applied to a copy of the same code, and the scenarios it should matter to are "
        'run again the same way (medians over the same number of runs). "with" is the '
        "main set above. The change is with relative to without.",
        "",
        "| optimisation | without it | figure | with | without | change |",
        "|---|---|---|---|---|---|",
    ]
    for a in chosen:
        for scenario, key, label in a.figures:
            with_it = median([r.result.get(key) for r in main_runs.get(scenario, [])])
            without = median(
                [r.result.get(key) for r in runs if r.ablation == a.name and r.scenario == scenario]
            )
            if with_it is None or without is None:
                continue
            lines.append(
                f"| {a.optimisation} (`{a.name}`) | {a.without} (`{a.patch}`) | {label} | "
                f"{_fmt(with_it)} | {_fmt(without)} | {_change(with_it, without)} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny runs to check the harness")
    p.add_argument("--runs", type=int, default=None, help="runs per scenario (3; quick: 1)")
    p.add_argument("--only", default="", help="comma-separated scenario names")
    p.add_argument(
        "--target",
        choices=["phxbroker", "blaster", "blaster-1frame"],
        default="phxbroker",
        help="blaster: measure the generator's ceiling instead of the broker "
        "(blaster-1frame: with one frame per write)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where to write the report (default BENCHMARKS.md; quick: none)",
    )
    p.add_argument("--note", default="", help="a line to put at the top of the report")
    p.add_argument(
        "--core-commit",
        metavar="REV",
        help="run the phxbroker package as of this commit of its repository (e.g. HEAD) "
        "instead of the installed working tree",
    )
    p.add_argument("--json", action="store_true", help="print every run's JSON line")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="also run the cluster scenarios (a redis-server and one or two nodes per run): "
        + ", ".join(s.name for s in cluster_bench.cluster_scenarios(False)),
    )
    p.add_argument(
        "--hooks",
        action="store_true",
        help="also run the hooks scenarios (bench/hooks_bench.py: hooked events against a "
        "trivial back end): " + ", ".join(hooks_bench.SCENARIOS),
    )
    p.add_argument(
        "--ablations",
        default=None,
        help="optimisations to measure by taking each out: 'all', 'none' or names "
        f"({', '.join(a.name for a in ABLATIONS)}); default all for the full set, "
        "none with --quick or --only",
    )
    p.add_argument(
        "--max-others",
        type=float,
        default=0.3,
        help="a run during which other processes used more CPU (in cores) is repeated",
    )
    p.add_argument(
        "--max-steal",
        type=float,
        default=0.05,
        help="a run in which the hypervisor took more of the server's core is repeated",
    )
    p.add_argument(
        "--retries", type=int, default=None, help="repeats of a run on a busy box (2; quick: 0)"
    )
    opts = p.parse_args(argv)
    opts.runs = opts.runs or (1 if opts.quick else 3)
    if opts.retries is None:
        opts.retries = 0 if opts.quick else 2
    scenarios = quick_scenarios() if opts.quick else full_scenarios()
    scenarios += cluster_scenarios_wanted(opts)
    available = {s.name: s for s in scenarios}
    if opts.only:
        wanted = set(opts.only.split(","))
        unknown = wanted - {s.name for s in scenarios}
        if unknown:
            p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
        scenarios = [s for s in scenarios if s.name in wanted]
    if opts.ablations is None:
        opts.ablations = "none" if (opts.quick or opts.only) else "all"
    names = {a.name for a in ABLATIONS}
    if opts.ablations == "all":
        opts.ablation_names = [a.name for a in ABLATIONS]
    elif opts.ablations == "none":
        opts.ablation_names = []
    else:
        opts.ablation_names = opts.ablations.split(",")
        unknown = set(opts.ablation_names) - names
        if unknown:
            p.error(f"unknown ablation(s): {', '.join(sorted(unknown))}")
    if opts.ablation_names and opts.target != "phxbroker":
        p.error("--ablations measure phxbroker; use --ablations none with --target")
    # An ablation is compared with the main set, so its scenarios run there too.
    ablations = [a for a in ABLATIONS if a.name in opts.ablation_names]
    needed = {n for a in ablations for n in a.scenarios if n in available}
    # A flood's latency is read against the quiet run from the same sitting.
    if any("--flood" in sc.loadgen_args for sc in scenarios) and HOSTILE_QUIET in available:
        needed.add(HOSTILE_QUIET)
    scenarios = [sc for n, sc in available.items() if sc in scenarios or n in needed]
    output = opts.output or (None if opts.quick else REPO_DIR / "BENCHMARKS.md")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = BENCH_DIR / "results" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    invocation = "python bench/run_benchmarks.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    runs: list[RunResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        opts.core_path = None
        if opts.core_commit and opts.target == "phxbroker":
            opts.core_path = Path(tmp) / "core"
            opts.core_path.mkdir()
            try:
                opts.core_commit = snapshot_core(opts.core_commit, opts.core_path)
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                print(f"run_benchmarks: cannot take --core-commit: {exc}", file=sys.stderr)
                return 2
        opts.ablation_cores = {}
        try:
            for a in ablations:
                opts.ablation_cores[a.name] = patched_core(
                    a, opts.core_path, Path(tmp) / f"without-{a.name}"
                )
        except (RuntimeError, OSError) as exc:
            print(f"run_benchmarks: {exc}", file=sys.stderr)
            return 2
        config_path = Path(tmp) / "bench.toml"
        config_path.write_text(bench_config())
        (config_path.parent / SHIPPED_LIMITS_CONFIG).write_text(
            bench_config(SHIPPED_MESSAGE_RATE, SHIPPED_FRAME_RATE)
        )
        # A scenario's runs with and without each optimisation alternate, so that a box
        # whose speed drifts over the half hour cannot pass for an optimisation's effect.
        plan: list[tuple[Scenario, int, Ablation | None]] = []
        for sc in scenarios:
            variants = [None, *(a for a in ablations if sc.name in a.scenarios)]
            plan += [(sc, run, v) for run in range(1, opts.runs + 1) for v in variants]
        for sc, run, ablation in plan:
            what = sc.name + (f" without {ablation.name}" if ablation else "")
            print(f"{what} run {run}/{opts.runs} ...", file=sys.stderr, flush=True)
            try:
                if isinstance(sc, cluster_bench.ClusterScenario):
                    r = run_cluster(sc, run, opts, config_path, out_dir, Path(tmp))
                    runs.append(r)
                    for problem in r.problems:
                        print(f"  problem: {problem}", file=sys.stderr)
                    if opts.json:
                        print(json.dumps({"scenario": sc.name, "run": run, **r.result}), flush=True)
                    continue
                r = run_one(sc, run, opts, scenario_config(sc, config_path), out_dir, ablation)
                # The idle hold has no timing figure for other work to spoil.
                retries = 0 if sc.name == "idle" else opts.retries
                repeated = []
                for _ in range(retries):
                    why = busy_box(r, opts)
                    if not why:
                        break
                    print(f"  {why}; again", file=sys.stderr, flush=True)
                    repeated.append(why)
                    time.sleep(5)
                    r = run_one(sc, run, opts, scenario_config(sc, config_path), out_dir, ablation)
                for why in repeated:
                    r.notes.append(f"an earlier attempt was repeated: {why}")
            except RuntimeError as exc:
                print(f"run_benchmarks: {what}: {exc}", file=sys.stderr)
                return 1
            why = busy_box(r, opts)
            if why:
                r.notes.append(f"shared box: {why}")
            runs.append(r)
            if opts.json:
                line = {"scenario": sc.name, "run": run, "ablation": r.ablation, **r.result}
                print(json.dumps(line), flush=True)
            for problem in r.problems:
                print(f"  problem: {problem}", file=sys.stderr)
        hooks_section = ""
        if opts.hooks:
            print("hooks scenarios ...", file=sys.stderr, flush=True)
            hooks_section = hooks_bench.run_all(opts.runs, opts.quick, opts.core_path, opts.json)
    text = report(runs, scenarios, opts, invocation)
    if hooks_section:
        marker = "\n## Scenarios and exact commands"
        text = text.replace(marker, "\n" + hooks_section + marker, 1)
    (out_dir / "BENCHMARKS.md").write_text(text)
    if output:
        output.write_text(text)
        print(f"wrote {output}", file=sys.stderr)
    elif not opts.json:
        print(text)
    return 0 if all(not r.problems for r in runs) else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print(
            "run_benchmarks: interrupted; the server of the current run was stopped.",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
