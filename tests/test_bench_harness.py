"""The benchmark harness runs end to end and its figures add up.

Tiny runs only; nothing here asserts speed. One test drives the quick benchmark
set against a real `phxbroker serve`; the others run the generator against the
bench's blaster, whose behaviour is known, to check that the counting is exact
and that loss is seen when it happens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from run_benchmarks import ABLATIONS, ServerProcess, patched_core  # noqa: E402


def _loadgen(port: int, pid: int, *args: str) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "loadgen.py"),
            "--port",
            str(port),
            "--server-pid",
            str(pid),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, (proc.stdout, proc.stderr)
    return json.loads(lines[0])


def _check_broadcast_run(r: dict, subscribers: int) -> None:
    assert r["error"] is None
    assert r["connected"] == subscribers
    assert r["connect_failures"] == 0
    assert r["dropped"] == 0
    assert r["broadcasts_sent"] > 0
    assert r["deliveries_expected"] == r["broadcasts_sent"] * subscribers
    assert r["deliveries_received"] == r["deliveries_expected"]
    assert r["deliveries_lost"] == 0
    assert r["seq_gaps"] == 0
    assert r["deliveries_per_s"] > 0
    assert r["latency_samples"] > 0
    assert 0 <= r["latency_p50_ms"] <= r["latency_p99_ms"] <= r["latency_max_ms"]
    assert 0 <= r["gen_cpu"] < 2 and 0 <= r["server_cpu"] < 2
    assert r["other_frames"] == 0


def test_quick_benchmarks_against_phxbroker(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run_benchmarks.py"),
            "--quick",
            "--json",
            "--output",
            str(tmp_path / "BENCHMARKS.md"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    runs = {r["scenario"]: r for r in map(json.loads, proc.stdout.strip().splitlines())}
    assert proc.returncode == 0, proc.stderr
    assert set(runs) == {"idle", "sat1k", "lat1k", "api", "storm"}

    idle = runs["idle"]
    assert idle["error"] is None
    assert idle["connected"] == 20 and idle["dropped"] == 0 and idle["held"] == 20
    assert idle["heartbeats_sent"] > 0
    assert idle["heartbeats_acked"] == idle["heartbeats_sent"]
    assert idle["rss_after_kib"] > 0 and idle["rss_per_conn_kib"] is not None
    assert idle["server_cpu_join_s"] >= 0 and idle["join_rate"] > 0

    _check_broadcast_run(runs["sat1k"], 20)
    # The server is pinned to one core: its busy time and the steal within it are known.
    assert 0 <= runs["sat1k"]["server_core_steal"] <= runs["sat1k"]["server_core_busy"]
    _check_broadcast_run(runs["lat1k"], 20)
    _check_broadcast_run(runs["api"], 20)
    assert "publisher_notes" not in runs["api"]
    # 20 broadcasts/s over 0.5 s warm-up + 2 s measured.
    assert 50 <= runs["lat1k"]["broadcasts_sent"] <= 51

    storm = runs["storm"]
    assert storm["error"] is None
    assert storm["connected"] == 30 and storm["dropped"] == 0
    assert storm["presence_settled"] is True
    assert storm["probes_settled"] == 3 and storm["probe_keys_min"] == 30
    assert storm["settle_seconds"] > 0
    # One diff per join: the k-th joiner gets its state and the diffs of its own join
    # and of every later one.
    assert storm["presence_frames"] == sum(1 + (31 - k) for k in range(1, 31))

    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Results against the targets" in report
    assert "gen CPU" in report and "| steal |" in report
    assert "## Presence join storms" in report
    assert "| storm: quick: 30 clients join a presence topic" in report


def test_every_ablation_patch_still_changes_the_code_it_names(tmp_path):
    package = Path(__file__).resolve().parents[1] / "phxbroker"
    for ablation in ABLATIONS:
        core = patched_core(ablation, None, tmp_path / ablation.name)
        patched = core / "phxbroker"
        changed = [
            f.relative_to(patched)
            for f in patched.rglob("*.py")
            if f.read_bytes() != (package / f.relative_to(patched)).read_bytes()
        ]
        assert changed, ablation.name
        for scenario, _, _ in ablation.figures:
            assert scenario in {"idle", "join10k", "sat1k", "sat5k", "lat1k", "lat5k"}


def test_a_quick_run_measures_an_optimisation_taken_out(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run_benchmarks.py"),
            "--quick",
            "--json",
            "--ablations",
            "encode-once",
            "--output",
            str(tmp_path / "BENCHMARKS.md"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    runs = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    without = [r for r in runs if r["ablation"] == "encode-once"]
    assert [r["scenario"] for r in without] == ["sat1k"]
    # Runs with and without alternate, so drift on the box does not read as an effect.
    order = [(r["scenario"], r["ablation"]) for r in runs]
    assert order[order.index(("sat1k", "")) + 1] == ("sat1k", "encode-once")
    _check_broadcast_run(without[0], 20)
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Optimisations, each measured by taking it out" in report
    assert "| sat1k without encode-once | 1 |" in report
    row = next(line for line in report.splitlines() if "(`encode-per-delivery.patch`)" in line)
    assert "deliveries/s, 1,000 subscribers" in row


def test_generator_counts_every_delivery(tmp_path):
    server = ServerProcess([sys.executable, str(BENCH / "blaster.py")], tmp_path / "b.log")
    try:
        r = _loadgen(
            server.port,
            server.proc.pid,
            "--mode",
            "rate",
            "-n",
            "30",
            "--probes",
            "5",
            "--rate",
            "40",
            "--warmup",
            "0",
            "--duration",
            "1",
        )
        _check_broadcast_run(r, 30)
        s = _loadgen(
            server.port,
            server.proc.pid,
            "--mode",
            "saturate",
            "-n",
            "30",
            "--probes",
            "5",
            "--window",
            "8",
            "--warmup",
            "0.2",
            "--duration",
            "1",
        )
        _check_broadcast_run(s, 30)
    finally:
        server.stop()


def test_generator_reports_lost_deliveries(tmp_path):
    server = ServerProcess(
        [sys.executable, str(BENCH / "blaster.py"), "--drop-every", "5"], tmp_path / "b.log"
    )
    try:
        r = _loadgen(
            server.port,
            server.proc.pid,
            "--mode",
            "rate",
            "-n",
            "10",
            "--probes",
            "2",
            "--rate",
            "40",
            "--warmup",
            "0",
            "--duration",
            "1",
            "--drain-timeout",
            "1",
        )
    finally:
        server.stop()
    sent = r["broadcasts_sent"]
    assert sent >= 40
    assert r["deliveries_lost"] == sent // 5
    assert r["deliveries_received"] == r["deliveries_expected"] - sent // 5


def test_generator_publishes_through_the_http_api(tmp_path):
    server = ServerProcess(
        [sys.executable, str(BENCH / "blaster.py"), "--api-key", "k1"], tmp_path / "b.log"
    )
    try:
        ok = _loadgen(
            server.port,
            server.proc.pid,
            "--mode",
            "rate",
            "-n",
            "10",
            "--probes",
            "2",
            "--rate",
            "40",
            "--warmup",
            "0",
            "--duration",
            "1",
            "--publisher",
            "http",
            "--api-key",
            "k1",
        )
        refused = _loadgen(
            server.port,
            server.proc.pid,
            "--mode",
            "rate",
            "-n",
            "10",
            "--probes",
            "2",
            "--rate",
            "40",
            "--warmup",
            "0",
            "--duration",
            "0.5",
            "--publisher",
            "http",
            "--api-key",
            "wrong",
            "--drain-timeout",
            "0.5",
        )
    finally:
        server.stop()
    _check_broadcast_run(ok, 10)
    assert refused["deliveries_received"] == 0
    assert refused["deliveries_lost"] == refused["deliveries_expected"] > 0
    assert refused["publisher_notes"] == {"HTTP 401": refused["broadcasts_sent"]}
