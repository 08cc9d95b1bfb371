#!/usr/bin/env python3
"""Where the server's CPU goes in a connect + upgrade + join storm.

    python bench/profile_connect.py                  # 10,000 clients, prints a markdown table
    python bench/profile_connect.py -n 2000 --json   # one JSON line instead
    python bench/profile_connect.py --classify FILE  # classify a saved py-spy raw file again

Runs the storm twice, each time against a fresh `phxbroker serve` (the benchmark
config, pinned to CPU 0, under bench/serve_gc_timed.py) with the generator connecting,
upgrading and joining N clients (256 at once). The first storm runs as it is: the
server's CPU per connect (utime+stime over the storm / clients joined) and the garbage
collector's part of it come from there. The second runs with py-spy attached (`record
--format raw`, pinned to CPU 1 with the generator), stopped as soon as the last client
has joined, so that the samples cover the storm and nothing after it: each sample goes
to one category by its stack (see RULES below), and the categories share the CPU left
after garbage collection in proportion to their samples. (Each of the sampler's stops
costs the server CPU of its own, up to half again at 1000 samples/s in runs here,
spread over whatever runs at the time: it changes the cost, not the shares, which is
why the cost comes from the plain storm.)

Garbage collection: py-spy cannot see it (a sample taken while the collector runs
shows the Python line whose allocation triggered it; `--gil` and `--idle` do not
change that). Its CPU time is measured apart, in the plain storm, with `gc.callbacks`
in the server's process (serve_gc_timed.py). With `--native`, CPython's collector
shows up as native frames (`gc_collect_main`) and is counted from the samples instead,
but native unwinding slows the server several-fold.

Needs py-spy: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_benchmarks import (
    LOADGEN,
    LineReader,
    ServerProcess,
    bench_config,
    pinned,
)

BENCH_DIR = Path(__file__).resolve().parent
GC_WRAPPER = BENCH_DIR / "serve_gc_timed.py"

# ------------------------------------------------------------------------------------
# The classification. A sample with a garbage-collection frame anywhere is garbage
# collection. Otherwise its stack is walked from the innermost frame outwards to the
# first phxbroker frame (past the ones whose rule says PASS: helpers, "look further
# out"). The library and standard-library frames passed on the way are the library
# call phxbroker made: the outermost of them that a rule knows decides (so trio's
# `start_soon` counts as a task start whatever trio runs inside it). If no rule knows
# any of them, the phxbroker frame's own rule decides; if it has none, the sample is
# "other", listed by that frame so that a rule can be added.
#
# Where a rule looks:
#   "phxbroker:NAME"  a phxbroker module whose file stem is NAME, or any module in a
#                     folder NAME of the package (so "broker" matches broker.py and
#                     broker/core.py alike: the rules survive moving modules around)
#   "lib:PKG"         a module of the installed package PKG (h11, trio, wsproto, ...)
#   "stdlib:NAME"     a standard library module whose file stem is NAME
#   "native"          a native frame (only with --native): a C function's name
# Functions: a set of names; "name" matches a function or method of that name,
# "Class.name" that method only, "Class.*" every method of the class; "*" matches all.
# ------------------------------------------------------------------------------------

PASS = "(look further out)"
GC = "garbage collection"
ACCEPT = "accept (accept4, socket object, connection task set-up)"
SPAWN = "task start (trio spawn)"
HTTP = "HTTP request parsing (httptools for an upgrade, h11 otherwise)"
HANDSHAKE = "websocket handshake (checks, accept token, 101 response)"
AUTH = "authentication and admission (token, origin, limits)"
FRAMES = "websocket frames in and message decoding (wsproto, JSON)"
JOIN = "the broker: connect and join"
REPLY = "encoding and sending the reply"
SCOPES = "trio cancel scopes and deadlines"
TRIO = "trio scheduler and I/O waits"
OTHER = "other"

CATEGORIES = (ACCEPT, SPAWN, HTTP, HANDSHAKE, AUTH, FRAMES, JOIN, REPLY, SCOPES, TRIO, GC, OTHER)

RULES: list[tuple[str, str, set[str] | str]] = [
    # CPython's collector, as native frames (with --native only).
    (
        GC,
        "native",
        {
            "gc_collect_main",
            "gc_collect_with_callback",
            "gc_collect_generations",
            "gc_collect_impl",
            "collect",
            "collect_with_callback",
            "collect_generations",
            "_PyGC_CollectNoFail",
        },
    ),
    # Socket helpers used on every path: what matters is who called them.
    (PASS, "phxbroker:sockets", {"send_all", "recv_some", "close_socket", "shutdown"}),
    (PASS, "stdlib:contextlib", "*"),
    # A connection task is started for every accepted socket.
    (SPAWN, "lib:trio", {"spawn_impl", "start_soon", "coroutine_or_error", "_create"}),
    (
        SCOPES,
        "lib:trio",
        {
            "CancelScope.*",
            "CancelStatus.*",
            "move_on_after",
            "move_on_at",
            "fail_after",
            "fail_at",
            "Deadlines.*",
            "current_effective_deadline",
        },
    ),
    (TRIO, "lib:trio", "*"),
    (TRIO, "lib:outcome", "*"),
    (
        ACCEPT,
        "phxbroker:listener",
        {"accept", "serve_connection", "format_address", "_out_of_descriptors"},
    ),
    (HTTP, "phxbroker:listener", {"_serve_http"}),
    (HTTP, "phxbroker:router", "*"),
    (AUTH, "phxbroker:admission", "*"),
    (AUTH, "phxbroker:upgrade", {"_subprotocol", "auth_token_from_subprotocols"}),
    (HANDSHAKE, "phxbroker:upgrade", "*"),
    (HANDSHAKE, "phxbroker:serializers", {"serializer_for"}),
    (JOIN, "phxbroker:websocket", {"WebSockets.run"}),
    (JOIN, "phxbroker:runtime", "*"),
    (FRAMES, "phxbroker:inbound", "*"),
    (REPLY, "phxbroker:frames", "*"),
    (ACCEPT, "phxbroker:server", {"_accept", "_serve_connection", "_format_addr"}),
    (AUTH, "phxbroker:server", {"check_origin", "admission_problem"}),
    (AUTH, "phxbroker:limits", "*"),
    (AUTH, "phxbroker:auth", "*"),
    (AUTH, "phxbroker:jwt_auth", "*"),
    (AUTH, "phxbroker:phoenix_token", "*"),
    (AUTH, "phxbroker:signed_tokens", "*"),
    (AUTH, "phxbroker:tokens", "*"),
    (AUTH, "phxbroker:origin", "*"),
    (AUTH, "phxbroker:bans", "*"),
    (AUTH, "phxbroker:frontdoor", {"auth_token_from_subprotocols"}),
    (HANDSHAKE, "phxbroker:http", {"switch_protocols"}),
    (HANDSHAKE, "phxbroker:frontdoor", {"websocket", "upgrade_problem"}),
    (HANDSHAKE, "phxbroker:protocol", {"serializer_for"}),
    (HANDSHAKE, "phxbroker:websocket", {"WebSocketPeer.__init__"}),
    (HANDSHAKE, "phxbroker:server", {"next_peer_id"}),
    (HTTP, "phxbroker:http", "*"),
    (HTTP, "phxbroker:frontdoor", {"serve", "dispatch", "_attribute", "FrontDoor.serve"}),
    (REPLY, "phxbroker:protocol", {"encode_reply", "encode_push", "encode_broadcast", "dumps"}),
    (REPLY, "phxbroker:websocket", {"send", "deliver", "_write", "flush", "_drain"}),
    (REPLY, "phxbroker:websocket", {"encode_frame", "close_frame"}),
    (REPLY, "phxbroker:sockets", {"flush"}),
    (FRAMES, "phxbroker:websocket", {"run", "_receive", "_on_message"}),
    (FRAMES, "phxbroker:messages", "*"),
    (HANDSHAKE, "phxbroker:websocket", {"WebSockets.opened"}),
    (FRAMES, "phxbroker:protocol", {"decode_text", "decode_binary", "decode", "loads"}),
    (FRAMES, "phxbroker:serializers", "*"),
    (JOIN, "phxbroker:server", {"run_peer", "_run_broker", "_tell_broker", "_run_command"}),
    (JOIN, "phxbroker:broker", "*"),
    (JOIN, "phxbroker:topics", "*"),
    (JOIN, "phxbroker:presence", "*"),
    (JOIN, "phxbroker:stats", "*"),
]

# ------------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
_SITE = re.compile(r"/(?:site|dist)-packages/")


@dataclass(frozen=True)
class Frame:
    """One stack frame: where its code lives and which function it is."""

    origin: str  # "phxbroker", "lib", "stdlib", "native" or "unknown"
    package: str  # lib: the top-level package; phxbroker: the folders below it
    stem: str  # the file's stem (native: the library's name)
    func: str  # as py-spy names it: "Class.method" or "function"

    def where_matches(self, where: str) -> bool:
        kind, _, name = where.partition(":")
        if kind == "native":
            return self.origin == "native"
        if kind == "phxbroker":
            return self.origin == "phxbroker" and (
                name == self.stem or name in self.package.split("/")
            )
        if kind == "lib":
            return self.origin == "lib" and self.package == name
        if kind == "stdlib":
            return self.origin == "stdlib" and self.stem == name
        raise ValueError(f"a rule looks in {where!r}: expected phxbroker:, lib:, stdlib: or native")

    def label(self) -> str:
        where = {"phxbroker": "phxbroker", "lib": self.package}.get(self.origin, self.origin)
        if self.origin == "phxbroker" and self.package:
            where += "/" + self.package
        return f"{self.func} ({where}:{self.stem})"


def parse_frame(text: str) -> Frame:
    """A py-spy frame, `function (file:line)`, as a Frame."""
    m = _FRAME.match(text)
    if not m:
        return Frame("native", "", "", text)
    func, file = m.group("func"), m.group("file")
    if file.startswith("<attrs generated methods "):
        # e.g. "<attrs generated methods trio._core._run.Task>"
        dotted = file.removeprefix("<attrs generated methods ").rstrip(">").split(".")
        stem = dotted[-2] if len(dotted) > 1 else dotted[0]
        return Frame("lib", dotted[0], stem, f"{dotted[-1]}.{func}")
    if file.startswith("<frozen "):
        return Frame("stdlib", "", file.removeprefix("<frozen ").rstrip(">"), func)
    if file.startswith("<"):
        return Frame("unknown", "", file, func)
    if not file.endswith(".py"):
        return Frame("native", "", file.rsplit("/", 1)[-1], func)
    parts = file.split("/")
    stem = parts[-1][: -len(".py")]
    site = _SITE.search(file)
    if site:
        inside = file[site.end() :].split("/")
        if inside[0] == "phxbroker":
            return Frame("phxbroker", "/".join(inside[1:-1]), stem, func)
        return Frame("lib", inside[0].removesuffix(".py"), stem, func)
    if "phxbroker" in parts[:-1]:
        at = len(parts) - 1 - parts[:-1][::-1].index("phxbroker") - 1
        return Frame("phxbroker", "/".join(parts[at + 1 : -1]), stem, func)
    return Frame("stdlib", "", stem, func)


def _rule_for(frame: Frame) -> str | None:
    # A comprehension or nested function counts as the function it is written in.
    func = frame.func.split(".<locals>.", 1)[0]
    owner, _, short = func.rpartition(".")
    for category, where, functions in RULES:
        if not frame.where_matches(where):
            continue
        if (
            functions == "*"
            or func in functions
            or short in functions
            or (owner and f"{owner.rsplit('.', 1)[-1]}.*" in functions)
        ):
            return category
    return None


def classify(stack: list[Frame]) -> tuple[str, Frame | None]:
    """The category of a sample whose stack is `stack` (outermost first), and, for
    "other", the frame it is listed by (see the comment above RULES)."""
    categories = [_rule_for(frame) for frame in stack]
    if GC in categories:
        return GC, None
    library_call = None  # the category of the outermost known library frame so far
    for frame, category in zip(reversed(stack), reversed(categories), strict=True):
        if frame.origin != "phxbroker":
            if category not in (None, PASS):
                library_call = category
            continue
        if library_call is not None:
            return library_call, None
        if category == PASS:
            continue
        if category is not None:
            return category, None
        return OTHER, frame
    if library_call is not None:
        return library_call, None
    innermost = next((f for f in reversed(stack) if f.origin != "native"), None)
    return OTHER, innermost


def parse_raw(text: str) -> list[tuple[list[Frame], int]]:
    """py-spy's raw format: one `frame;frame;...;frame count` line per distinct stack."""
    stacks = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        frames, _, count = line.rpartition(" ")
        stacks.append(([parse_frame(f) for f in frames.split(";")], int(count)))
    return stacks


def summarise(
    stacks: list[tuple[list[Frame], int]],
) -> tuple[collections.Counter, collections.Counter]:
    """Samples per category, and the "other" samples by the frame they stopped at."""
    per_category: collections.Counter[str] = collections.Counter()
    others: collections.Counter[str] = collections.Counter()
    for stack, count in stacks:
        category, frame = classify(stack)
        per_category[category] += count
        if category == OTHER:
            others[frame.label() if frame else "(no Python frame)"] += count
    return per_category, others


def table_rows(
    per_category: collections.Counter,
    gc_share: float | None,
    us_per_connect: float | None,
) -> list[dict]:
    """Each category's share of the server's CPU and µs per connect.

    With `gc_share` (measured apart) the collector gets that share and the sampled
    categories split the rest in proportion to their samples.
    """
    sampled = {c: n for c, n in per_category.items() if not (gc_share is not None and c == GC)}
    total = sum(sampled.values())
    rows = []
    for category in CATEGORIES:
        if category == GC and gc_share is not None:
            share = gc_share
            samples = per_category.get(GC, 0)
        else:
            samples = sampled.get(category, 0)
            rest = 1.0 - (gc_share or 0.0)
            share = rest * samples / total if total else 0.0
        rows.append(
            {
                "category": category,
                "samples": samples,
                "share": round(share, 4),
                "us_per_connect": round(share * us_per_connect, 1)
                if us_per_connect is not None
                else None,
            }
        )
    return rows


def markdown(result: dict) -> str:
    profiled = result.get("profiled") or {}
    lines = [
        f"Connect + upgrade + join storm: {result['connected']:,} clients, "
        f"{result['server_cpu_s']} s of server CPU ({result['us_per_connect']} µs per "
        f"connect; {profiled.get('us_per_connect')} µs under the profiler), "
        f"{result['samples']:,} samples at {result['rate']}/s; garbage collection "
        f"{'from the samples (--native)' if result['native'] else 'measured with gc.callbacks'}.",
        "",
        "| category | % of server CPU | µs per connect |",
        "|---|---|---|",
    ]
    for row in result["categories"]:
        us = row["us_per_connect"]
        lines.append(
            f"| {row['category']} | {row['share'] * 100:.1f} | {'—' if us is None else us} |"
        )
    if result.get("other_top"):
        lines += [
            "",
            'Top frames in "other" (add a rule to RULES in bench/profile_connect.py):',
            "",
        ]
        for entry in result["other_top"]:
            lines.append(f"- {entry['samples']} samples: `{entry['frame']}`")
    return "\n".join(lines)


def find_pyspy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def gc_snapshot(pid: int, path: Path, seq: int, timeout: float = 5.0) -> dict:
    """Ask the server (SIGUSR1) for its GC totals; wait for report number `seq`."""
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            report = json.loads(path.read_text())
            if report.get("seq") == seq:
                return report
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    raise RuntimeError(f"the server wrote no garbage-collection report within {timeout:g} s")


def profile(opts: argparse.Namespace) -> dict:
    """Run the storm twice on fresh servers: once as it is, for the server's CPU per
    connect and the garbage collector's part of it, then under py-spy, for the shares
    of the rest (the sampler's stops cost the server CPU too); return the figures."""
    pyspy = find_pyspy()
    if pyspy is None:
        raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
    plain, plain_gc, _ = storm(opts, None)
    profiled, profiled_gc, text = storm(opts, pyspy)
    if opts.keep:
        Path(opts.keep).write_text(text)
    result = figures(parse_raw(text), plain, plain_gc, opts)
    result["profiled"] = {
        "connected": profiled.get("connected"),
        "join_seconds": profiled.get("join_seconds"),
        "server_cpu_s": profiled.get("server_cpu_join_s"),
        "us_per_connect": profiled.get("server_cpu_per_join_us"),
        "gc_cpu_s": profiled_gc["gc_cpu_s"],
        "error": profiled.get("error"),
    }
    result["error"] = result["error"] or profiled.get("error")
    return result


def storm(opts: argparse.Namespace, pyspy: str | None) -> tuple[dict, dict, str]:
    """One connect + upgrade + join storm against a fresh server, sampled by py-spy if
    given: the generator's JSON line, the collector's work during the storm
    (`gc_cpu_s`, `collections` per generation) and py-spy's raw samples."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = tmp / "bench.toml"
        config.write_text(bench_config())
        gc_report = tmp / "gc.json"
        raw = tmp / "samples.txt"
        env = {**os.environ, "PHXBROKER_GC_REPORT": str(gc_report)}
        if opts.pythonpath:
            env["PYTHONPATH"] = opts.pythonpath
        server = ServerProcess(
            pinned(0, [sys.executable, str(GC_WRAPPER), "serve", "--config", str(config)]),
            tmp / "server.log",
            env,
            cwd=tmp,
        )
        spy = gen = None
        text = ""
        try:
            if pyspy:
                spy = start_pyspy(pyspy, server.proc.pid, raw, opts)
            gc0 = gc_snapshot(server.proc.pid, gc_report, 1)
            gen = subprocess.Popen(
                pinned(
                    1,
                    [
                        sys.executable,
                        str(LOADGEN),
                        "--port",
                        str(server.port),
                        "--server-pid",
                        str(server.proc.pid),
                        "--mode",
                        "idle",
                        "-n",
                        str(opts.connections),
                        "--probes",
                        "0",
                        "--hold",
                        "120",
                        "--control",
                    ],
                ),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            gen_out = LineReader(gen.stdout)
            line = gen_out.next(opts.timeout)
            # Every client has joined: stop sampling before anything else happens.
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(60)
                except subprocess.TimeoutExpired:
                    raise RuntimeError("py-spy did not stop within 60 s of SIGINT") from None
                text = raw.read_text()
            gc1 = gc_snapshot(server.proc.pid, gc_report, 2)
            if line != "ready":
                raise RuntimeError(f"the generator did not get every client joined: {line}")
            gen.stdin.write("go\n")
            gen.stdin.flush()
            while line is not None and not line.startswith("{"):
                line = gen_out.next(60)
            if line is None:
                raise RuntimeError(f"the generator gave no result: {gen.stderr.read()[-500:]}")
            result = json.loads(line)
        finally:
            for proc in (gen, spy):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            server.stop()
    gc_work = {
        "gc_cpu_s": round(gc1["gc_cpu_s"] - gc0["gc_cpu_s"], 4),
        "collections": [b - a for a, b in zip(gc0["collections"], gc1["collections"], strict=True)],
    }
    return result, gc_work, text


def start_pyspy(pyspy: str, pid: int, raw: Path, opts: argparse.Namespace) -> subprocess.Popen:
    """py-spy recording `pid` into `raw`, on the generator's core; returns once it samples."""
    cmd = [pyspy, "record", "--pid", str(pid), "--rate", str(opts.rate), "--format", "raw"]
    cmd += ["--full-filenames", "--output", str(raw)]
    if opts.native:
        cmd.append("--native")
    spy = subprocess.Popen(
        pinned(1, cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = LineReader(spy.stdout)
    seen: list[str] = []
    while not any("Sampling process" in ln for ln in seen):
        line = out.next(20)
        if line is None:
            spy.kill()
            raise RuntimeError(f"py-spy did not start: {' '.join(seen)[-500:]}")
        seen.append(line)
    return spy


def figures(stacks, storm: dict, gc_work: dict | None, opts) -> dict:
    """The table's figures: shares from the samples, cost from the unprofiled storm."""
    connected = storm.get("connected") or 0
    server_cpu = storm.get("server_cpu_join_s")
    us_per_connect = server_cpu / connected * 1e6 if connected and server_cpu else None
    per_category, others = summarise(stacks)
    gc_cpu = gc_work["gc_cpu_s"] if gc_work else None
    gc_share = None
    if not opts.native and gc_cpu is not None and server_cpu:
        gc_share = min(1.0, gc_cpu / server_cpu)
    return {
        "connected": connected,
        "connect_failures": storm.get("connect_failures"),
        "join_seconds": storm.get("join_seconds"),
        "server_cpu_s": server_cpu,
        "us_per_connect": round(us_per_connect, 1) if us_per_connect else None,
        "samples": sum(per_category.values()),
        "rate": opts.rate,
        # py-spy counts a thread as busy while it runs or waits for a core, so on a box
        # with other work this can exceed the profiled storm's CPU; shares hold either way.
        "sampled_s": round(sum(per_category.values()) / opts.rate, 3),
        "native": opts.native,
        "gc_cpu_s": gc_cpu,
        "gc_collections": gc_work["collections"] if gc_work else None,
        "categories": table_rows(per_category, gc_share, us_per_connect),
        "other_top": [{"frame": f, "samples": n} for f, n in others.most_common(opts.top)],
        "error": storm.get("error"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--connections", type=int, default=10_000, help="clients to join")
    p.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    p.add_argument(
        "--native",
        action="store_true",
        help="sample native frames too (shows the collector, but slows the server a lot)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line, not a table")
    p.add_argument("--keep", metavar="FILE", help="save py-spy's raw samples there")
    p.add_argument("--classify", metavar="FILE", help="only classify a saved raw file")
    p.add_argument("--top", type=int, default=8, help='"other" frames to list')
    p.add_argument("--timeout", type=float, default=240.0, help="bound on the storm")
    p.add_argument(
        "--pythonpath", help="run the phxbroker package found there (PYTHONPATH of the server)"
    )
    opts = p.parse_args(argv)
    try:
        if opts.classify:
            stacks = parse_raw(Path(opts.classify).read_text())
            result = figures(stacks, {}, None, opts)
        else:
            result = profile(opts)
    except (RuntimeError, OSError) as exc:
        if opts.json:
            print(json.dumps({"error": str(exc)}))
        print(f"profile_connect: {exc}", file=sys.stderr)
        return 1
    if opts.json:
        print(json.dumps(result))
    elif opts.classify:
        per_category, _ = summarise(stacks)
        total = sum(per_category.values()) or 1
        for category in CATEGORIES:
            print(f"{per_category.get(category, 0) / total * 100:5.1f}%  {category}")
        for entry in result["other_top"]:
            print(f"  other: {entry['samples']} samples: {entry['frame']}")
    else:
        print(markdown(result))
    return 0 if not result.get("error") else 1


if __name__ == "__main__":
    raise SystemExit(main())
