#!/usr/bin/env python3
"""What `[server] workers = 2` buys: sat and lat against one process, on this box.

    python bench/workers_bench.py                      # sat1k, lat1k; 3 runs each
    python bench/workers_bench.py -n 500 --duration 5 --runs 1     # a trial
    python bench/workers_bench.py --quick              # 50 clients, 2 s: checks the harness

Three servers, each fresh for every run, with run_benchmarks.py's broker config:

- `one`: one process, no cluster (the default);
- `one-cluster`: one process with `[cluster]` on its own redis-server (what every worker
  pays for the cluster, without a second core);
- `workers2`: `workers = 2` with `[cluster]` on its own redis-server: the supervisor and
  two workers on one port (SO_REUSEPORT spreads the subscribers and the publisher over
  them; a broadcast reaches the other worker's subscribers through Redis).

Nothing is pinned: two workers need both cores, so the generator and Redis share them
with the server, in every configuration alike. On a two-core machine this shows what a
second core buys against what the cluster costs, not how workers scale; the server's CPU
(supervisor, workers) and Redis's are read from /proc around the generator's run. The
table goes to stdout (and --output); each run's JSON line and the server's log to
bench/results/workers-<time>/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from cluster_bench import RedisForBench  # noqa: E402 - beside this file
from procstat import process_cpu_seconds  # noqa: E402
from run_benchmarks import LOADGEN, ServerProcess, bench_config, printed_result  # noqa: E402

SERVERS = ("one", "one-cluster", "workers2")
CLUSTER = """
[cluster]
redis_url = "redis://127.0.0.1:{port}/0"
node = "bench"
prefix = "bench"
"""
WORKERS_LISTENING = re.compile(r"(\d+) workers listening on \S+ \(pids ([\d, ]+)\)")


def scenarios(opts: argparse.Namespace) -> dict[str, str]:
    n, warmup, duration = opts.connections, opts.warmup, opts.duration
    probes = min(100, max(4, n // 10))
    return {
        f"sat{n}": f"--mode saturate -n {n} --window 128 --warmup {warmup} --duration {duration}",
        f"lat{n}": f"--mode rate -n {n} --rate 20 --probes {probes} --warmup {warmup} "
        f"--duration {duration}",
    }


def server_config(server: str, redis_port: int | None) -> str:
    text = bench_config()
    if server == "workers2":
        text = text.replace("[server]\n", "[server]\nworkers = 2\n", 1)
        # A long-poll session lives in one worker; the benchmark speaks websocket only.
        text += "\n[longpoll]\nenabled = false\n"
    if redis_port is not None:
        text += CLUSTER.format(port=redis_port)
    return text


def pids_of(server: ServerProcess, log_path: Path, workers: bool) -> list[int]:
    """The server's processes: the supervisor and its workers once all listen."""
    if not workers:
        return [server.proc.pid]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = WORKERS_LISTENING.search(log_path.read_text(errors="replace"))
        if found:
            return [server.proc.pid, *(int(p) for p in found.group(2).split(", "))]
        time.sleep(0.05)
    raise RuntimeError(f"the workers did not all listen within 30 s: see {log_path}")


def wait_connected(log_path: Path, nodes: int) -> None:
    deadline = time.monotonic() + 15
    while log_path.read_text(errors="replace").count("connected to Redis") < nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster did not connect to Redis: see {log_path}")
        time.sleep(0.05)


def cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            total += process_cpu_seconds(pid)
    return total


def run_one(
    server: str, name: str, args: str, run: int, out_dir: Path, tmp: Path, timeout: float
) -> dict[str, Any]:
    stem = f"{name}-{server}-{run}"
    workdir = tmp / stem
    workdir.mkdir()
    redis = RedisForBench(workdir) if server != "one" else None
    config = workdir / "phxbroker.toml"
    config.write_text(server_config(server, redis.port if redis else None))
    log_path = out_dir / f"{stem}.server.log"
    cmd = [sys.executable, "-m", "phxbroker", "serve", "--config", str(config)]
    proc = None
    try:
        proc = ServerProcess(cmd, log_path, cwd=workdir)
        pids = pids_of(proc, log_path, server == "workers2")
        if redis is not None:
            wait_connected(log_path, 2 if server == "workers2" else 1)
        redis_pid = [redis.proc.pid] if redis else []
        loadgen = [sys.executable, str(LOADGEN), "--port", str(proc.port), *shlex.split(args)]
        server_cpu0, redis_cpu0, t0 = cpu(pids), cpu(redis_pid), time.monotonic()
        done = subprocess.run(loadgen, capture_output=True, text=True, timeout=timeout)
        wall = time.monotonic() - t0
        result: dict[str, Any] = printed_result(done)
        # Over the whole generator run, connects and warm-up included.
        server_cpu = cpu(pids) - server_cpu0
        result["server_cores"] = round(server_cpu / wall, 3)
        received = result.get("deliveries_received") or 0
        result["server_cpu_per_delivery_us"] = (
            round(server_cpu * 1e6 / received, 2) if received else None
        )
        result["redis_cores"] = round((cpu(redis_pid) - redis_cpu0) / wall, 3) if redis else None
        result.update(server=server, scenario=name, run=run)
        (out_dir / f"{stem}.json").write_text(json.dumps(result) + "\n")
        return result
    finally:
        if proc is not None:
            code = proc.stop()
            if code not in (0, None):
                print(f"workers_bench: {stem}: the server exited {code}", file=sys.stderr)
        if redis is not None:
            redis.stop()


def median(values: list[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, int | float)]
    return statistics.median(numbers) if numbers else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def table(results: list[dict[str, Any]], names: list[str], opts: argparse.Namespace) -> str:
    def med(server: str, name: str, key: str) -> float | None:
        return median(
            [r.get(key) for r in results if (r["server"], r["scenario"]) == (server, name)]
        )

    lines = [
        f"# workers = 2 against one process ({opts.runs} run(s) each, medians)",
        "",
        f"{os.cpu_count()} cores, nothing pinned: the generator and Redis share them with "
        "the server. Server CPU: supervisor and workers, over the whole generator run "
        "(connects and warm-up included), as cores busy and per delivery received.",
        "",
        "| scenario | server | deliveries/s | p50 ms | p99 ms | lost | server cores "
        "| server µs/delivery | redis cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        for server in opts.servers:
            lines.append(
                f"| {name} | {server} | {fmt(med(server, name, 'deliveries_per_s'), 0)} "
                f"| {fmt(med(server, name, 'latency_p50_ms'), 2)} "
                f"| {fmt(med(server, name, 'latency_p99_ms'), 2)} "
                f"| {fmt(med(server, name, 'deliveries_lost'), 0)} "
                f"| {fmt(med(server, name, 'server_cores'), 2)} "
                f"| {fmt(med(server, name, 'server_cpu_per_delivery_us'), 2)} "
                f"| {fmt(med(server, name, 'redis_cores'), 2)} |"
            )
    sat = next((n for n in names if n.startswith("sat")), None)
    if sat:
        one, two = med("one", sat, "deliveries_per_s"), med("workers2", sat, "deliveries_per_s")
        if one and two:
            lines += ["", f"{sat}: workers = 2 delivers {two / one:.2f}x what one process does."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--connections", type=int, default=1000)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--servers", default=",".join(SERVERS), help=f"some of {', '.join(SERVERS)}")
    p.add_argument("--quick", action="store_true", help="50 clients, 2 s, one run")
    p.add_argument("--output", type=Path, help="also write the table here")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.connections, opts.warmup, opts.duration, opts.runs = 50, 0.5, 2.0, 1
    opts.servers = [s for s in opts.servers.split(",") if s]
    unknown = set(opts.servers) - set(SERVERS)
    if unknown:
        p.error(f"unknown server {sorted(unknown)[0]!r}; known: {', '.join(SERVERS)}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = BENCH_DIR / "results" / f"workers-{stamp}"
    out_dir.mkdir(parents=True)
    timeout = 120 + 3 * (opts.warmup + opts.duration)
    results = []
    wanted = scenarios(opts)
    with tempfile.TemporaryDirectory(prefix="phxbroker-workers-bench-") as tmp:
        for run in range(1, opts.runs + 1):
            for name, args in wanted.items():
                for server in opts.servers:
                    print(f"workers_bench: {name} on {server}, run {run}", file=sys.stderr)
                    results.append(run_one(server, name, args, run, out_dir, Path(tmp), timeout))
    text = table(results, list(wanted), opts)
    (out_dir / "workers.md").write_text(text)
    if opts.output:
        opts.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
