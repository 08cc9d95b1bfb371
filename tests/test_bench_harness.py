"""The benchmark harness runs end to end and its figures add up.

Tiny runs only; nothing here asserts speed. Quick runs of the benchmark scenarios
drive a real `phxbroker serve`; the generator's counting is checked against the
bench's blaster, whose behaviour is known, the flooder's against a small server
here that counts every frame, and the profile classifier on synthetic stacks.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from wsproto.utilities import generate_accept_token

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import profile_connect  # noqa: E402
from run_benchmarks import ABLATIONS, ServerProcess, patched_core  # noqa: E402
from wsframes import (  # noqa: E402
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    encode_server_frame,
)


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
            "--only",
            "idle,sat1k,lat1k,api,storm",
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


def test_the_workers_bench_runs_two_workers_against_redis(tmp_path):
    output = tmp_path / "workers.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "workers_bench.py"),
            "--quick",
            "--servers",
            "workers2",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    table = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in output.read_text().splitlines()
        if line.startswith("| ")
    ]
    rows = [dict(zip(table[0], row, strict=True)) for row in table[1:]]
    assert [(r["scenario"], r["server"], r["lost"]) for r in rows] == [
        ("sat50", "workers2", "0"),
        ("lat50", "workers2", "0"),
    ]
    assert all(float(r["deliveries/s"].replace(",", "")) > 0 for r in rows)
    assert all(float(r["server cores"]) > 0 for r in rows)


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
            "--only",
            "sat1k",
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


# ------------------------------------------------------------------ hostile clients


class FrameCountingServer:
    """A websocket server (a thread per client) that counts every client frame (masked
    frames walked by hand), answers pings, and closes a client with 1008 once it has
    sent `budget` frames, as a server with a per-connection frame budget would. It reads
    on until the client's EOF, so every frame that left the client is counted."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.connections: list[dict] = []
        self.handlers: list[threading.Thread] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop accepting; let every client's frames be read to its EOF (bounded)."""
        self.stopping.set()
        self.thread.join(10)
        for handler in self.handlers:
            handler.join(20)
        self.listener.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn = {"frames": [], "closed_with": None, "text": []}
            self.connections.append(conn)
            handler = threading.Thread(target=self._serve, args=(sock, conn), daemon=True)
            self.handlers.append(handler)
            handler.start()

    def _serve(self, sock: socket.socket, conn: dict) -> None:
        # A flooder may reset its connection while a pong or our close is on the way: that
        # ends the connection as a failed read does, not the thread with a traceback.
        with sock, contextlib.suppress(ConnectionError):
            sock.settimeout(20)
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(4096)
            head, data = data.split(b"\r\n\r\n", 1)
            key = re.search(rb"(?i)sec-websocket-key: *(\S+)", head).group(1)
            sock.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + generate_accept_token(key)
                + b"\r\n\r\n"
            )
            pos = 0
            while True:
                while True:
                    frame = _client_frame_at(data, pos)
                    if frame is None:
                        break
                    fin, opcode, start, end = frame
                    conn["frames"].append((fin, opcode))
                    if opcode in (OP_TEXT, OP_PING):
                        payload = _unmask(data[start - 4 : start], data[start:end])
                        if opcode == OP_TEXT and len(conn["text"]) < 2:
                            conn["text"].append(payload)
                        elif opcode == OP_PING and conn["closed_with"] is None:
                            sock.sendall(encode_server_frame(payload, OP_PONG))
                    if len(conn["frames"]) >= self.budget and conn["closed_with"] is None:
                        conn["closed_with"] = 1008
                        sock.sendall(encode_server_frame(struct.pack("!H", 1008), OP_CLOSE))
                    pos = end
                try:
                    chunk = sock.recv(262144)
                except OSError:
                    return
                if not chunk:
                    return
                data = data[pos:] + chunk
                pos = 0


def _client_frame_at(data: bytes, pos: int) -> tuple[bool, int, int, int] | None:
    """(fin, opcode, payload start, payload end) of the masked frame at `pos`, or None
    when it is not all there."""
    if len(data) - pos < 2:
        return None
    ln = data[pos + 1] & 0x7F
    head = 2
    if ln == 126:
        if len(data) - pos < 4:
            return None
        ln, head = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
    elif ln == 127:
        if len(data) - pos < 10:
            return None
        ln, head = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
    start = pos + head + 4
    if len(data) < start + ln:
        return None
    return bool(data[pos] & 0x80), data[pos] & 0x0F, start, start + ln


def _unmask(mask: bytes, body: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(body))


@pytest.mark.parametrize("kind", ["ping", "cont", "msg"])
def test_the_flooder_sends_what_it_claims_and_comes_back_after_every_close(kind):
    server = FrameCountingServer(budget=3000)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                str(BENCH / "flooder.py"),
                "--port",
                str(server.port),
                "--kind",
                kind,
                "--duration",
                "1.5",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        server.stop()
    r = json.loads(proc.stdout)
    conns = server.connections
    closed = [c for c in conns if c["closed_with"]]
    # Closed with 1008 each time, it came back each time.
    assert len(closed) >= 2
    assert r["connections"] == len(conns)
    assert r["closes"] == {"close 1008": len(closed)}
    assert r["handshake_failures"] == {}
    opener = 0 if kind == "ping" else 1  # the text frame that opens the message / the join
    per_connection = r["frames_per_connection"]
    for claimed, conn in zip(per_connection, conns, strict=True):
        got = len(conn["frames"]) - opener
        if conn["closed_with"]:
            assert claimed == got >= 3000 - opener  # it ended its side: all arrived
        else:
            assert claimed >= got  # cut off at the end of the run
    assert r["frames_sent"] == sum(per_connection)
    for conn in conns:
        frames = conn["frames"]
        if kind == "ping":
            assert set(frames) == {(True, OP_PING)}
        elif kind == "cont":
            assert frames[0] == (False, OP_TEXT)
            assert set(frames[1:]) == {(False, OP_CONT)}
        else:
            assert set(frames) == {(True, OP_TEXT)}
            join, push = (json.loads(t) for t in conn["text"])
            assert join == ["1", "1", "bench:flood", "phx_join", {}]
            assert push[2:4] == ["bench:flood", "bench"]
    if kind == "ping":
        assert 0 < r["reply_kinds"]["pong"] <= r["frames_sent"]


def test_hostile_scenarios_measure_others_latency_under_each_flood(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run_benchmarks.py"),
            "--quick",
            "--only",
            "hostile-ping,hostile-cont,hostile-msg",
            "--json",
            "--output",
            str(tmp_path / "BENCHMARKS.md"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    runs = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    # The quiet baseline is run in the same sitting, first.
    assert [r["scenario"] for r in runs] == [
        "hostile-quiet",
        "hostile-ping",
        "hostile-cont",
        "hostile-msg",
    ], proc.stderr
    quiet, *floods = runs
    assert "flood" not in quiet and quiet["healthz_checks"] > 0
    for r in [quiet, *floods]:
        assert r["error"] is None
        assert r["connected"] == 20 and r["broadcasts_sent"] > 0
        assert r["latency_samples"] + r["latency_missing"] == 4 * r["broadcasts_in_window"]
    for r, kind in zip(floods, ("ping", "cont", "msg"), strict=True):
        assert r["flood"] == kind
        flooder = r["flooder"]
        assert flooder["kind"] == kind and flooder["connections"] >= 1
        assert flooder["frames_sent"] > 0
        listed = flooder["frames_per_connection"]  # the first MAX_LISTED connections
        if flooder["connections"] == len(listed):
            assert flooder["frames_sent"] == sum(listed)
        else:  # closed and back so often that not every connection is listed
            assert flooder["frames_sent"] > sum(listed) and len(listed) == 200
        assert r["healthz_checks"] >= 1
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Hostile clients" in report
    for kind in ("ping", "cont", "msg"):
        assert f"| `{kind}`: " in report


# ------------------------------------------------------------------ reconnect storm


def test_phoenix_js_back_off_schedules():
    from loadgen import reconnect_after_ms, rejoin_after_ms

    assert [reconnect_after_ms(k) for k in range(1, 12)] == [
        10, 50, 100, 150, 200, 250, 500, 1000, 2000, 5000, 5000
    ]  # fmt: skip
    assert [rejoin_after_ms(k) for k in range(1, 6)] == [1000, 2000, 5000, 10000, 10000]


def test_reconnect_storm_counts_every_client_back(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run_benchmarks.py"),
            "--quick",
            "--only",
            "reconnect",
            "--json",
            "--output",
            str(tmp_path / "BENCHMARKS.md"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (r,) = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert r["error"] is None and r["connected"] == 50
    assert r["storm_complete"] is True
    assert r["storm_clients"] == r["rejoined"] == 50
    # The old server closed every client with 1001 and exited cleanly.
    assert r["closes"] == {"close 1001": 50}
    assert r["old_server_exited_s"] is not None
    # Each attempt was refused, failed, or opened the socket that rejoined.
    failed = sum(r["handshake_failures"].values()) + sum(r["connect_errors"].values())
    assert r["reconnect_attempts"] == 50 + r["connect_refused"] + failed
    assert r["join_timeouts"] == 0 and r["join_errors"] == {}
    # Nobody is back before the new server listens, and ranks are in order.
    assert 0 < r["new_server_listening_s"] <= r["rejoin_50_s"]
    assert r["rejoin_50_s"] <= r["rejoin_99_s"] <= r["rejoin_all_s"]
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Reconnect storm after a restart" in report
    assert "| reconnect: quick: 50 joined clients" in report


# ------------------------------------------------------------------ connect profile


def _frame(func: str, path: str) -> str:
    return f"{func} ({path}:1)"


SITE = "/venv/lib/python3.11/site-packages"
PKG = "/repo/phxbroker"
RUN = _frame("unrolled_run", f"{SITE}/trio/_core/_run.py")


@pytest.mark.parametrize(
    ("frames", "category"),
    [
        # h11 internals count where phxbroker called them, wherever http.py now lives.
        (
            [
                _frame("Server._serve_connection", f"{PKG}/server.py"),
                _frame("FrontDoor.serve", f"{PKG}/transport/frontdoor.py"),
                _frame("HttpConnection.read_request", f"{PKG}/transport/http.py"),
                _frame("Connection.next_event", f"{SITE}/h11/_connection.py"),
                _frame("maybe_read_from_IDLE_client", f"{SITE}/h11/_readers.py"),
            ],
            profile_connect.HTTP,
        ),
        # A socket helper is passed over: the 101 response is the handshake.
        (
            [
                _frame("FrontDoor.websocket", f"{PKG}/frontdoor.py"),
                _frame("HttpConnection.switch_protocols", f"{PKG}/http.py"),
                _frame("send_all", f"{PKG}/sockets.py"),
            ],
            profile_connect.HANDSHAKE,
        ),
        (
            [
                _frame("FrontDoor.websocket", f"{PKG}/frontdoor.py"),
                _frame("generate_accept_token", f"{SITE}/wsproto/utilities.py"),
            ],
            profile_connect.HANDSHAKE,
        ),
        (
            [
                _frame("Server._accept", f"{PKG}/server.py"),
                _frame("Nursery.start_soon", f"{SITE}/trio/_core/_run.py"),
                _frame("Runner.spawn_impl", f"{SITE}/trio/_core/_run.py"),
                _frame("__init__", "<attrs generated methods trio._core._run.Task>"),
            ],
            profile_connect.SPAWN,
        ),
        (
            [
                _frame("Server._accept", f"{PKG}/server.py"),
                _frame("socket.accept", "/usr/lib/python3.11/socket.py"),
            ],
            profile_connect.ACCEPT,
        ),
        # broker.py became broker/core.py: the folder still names it.
        (
            [
                _frame("Server._run_broker", f"{PKG}/server.py"),
                _frame("Broker.join", f"{PKG}/broker/core.py"),
            ],
            profile_connect.JOIN,
        ),
        (
            [
                _frame("HttpConnection.read_request", f"{PKG}/http.py"),
                _frame("CancelScope.__enter__", f"{SITE}/trio/_core/_run.py"),
                _frame("helper", "/usr/lib/python3.11/contextlib.py"),
                _frame("__init__", "<attrs generated methods trio._core._run.CancelStatus>"),
            ],
            profile_connect.SCOPES,
        ),
        (
            [
                _frame("FrontDoor.websocket", f"{PKG}/frontdoor.py"),
                _frame("Authenticator.authenticate", f"{PKG}/auth/core.py"),
            ],
            profile_connect.AUTH,
        ),
        (
            [
                _frame("HttpConnection.read_request", f"{PKG}/http.py"),
                _frame("read_request", f"{SITE}/h11/_connection.py"),
                "gc_collect_main (libpython3.11.so.1.0)",
                "0x7f00 (libc.so.6)",
            ],
            profile_connect.GC,
        ),
        ([_frame("run", f"{SITE}/trio/_core/_run.py")], profile_connect.TRIO),
    ],
)
def test_the_profile_classifier_puts_a_stack_in_its_category(frames, category):
    stacks = profile_connect.parse_raw(";".join([RUN, *frames]) + " 7\n")
    per_category, others = profile_connect.summarise(stacks)
    assert per_category == {category: 7}
    assert not others


def test_unknown_phxbroker_frames_fall_into_other_listed_by_name():
    line = ";".join(
        [
            RUN,
            _frame("Server._serve_connection", f"{PKG}/server.py"),
            _frame("brand_new_step", f"{PKG}/transport/gate.py"),
            _frame("helper", f"{SITE}/somelib/mod.py"),
        ]
    )
    per_category, others = profile_connect.summarise(profile_connect.parse_raw(f"{line} 3\n"))
    assert per_category == {profile_connect.OTHER: 3}
    assert others == {"brand_new_step (phxbroker/transport:gate)": 3}


def test_profile_shares_give_garbage_collection_its_measured_part():
    per_category = {profile_connect.HTTP: 60, profile_connect.HANDSHAKE: 40}
    rows = {
        r["category"]: r
        for r in profile_connect.table_rows(per_category, gc_share=0.2, us_per_connect=100.0)
    }
    assert rows[profile_connect.GC]["share"] == 0.2
    assert rows[profile_connect.HTTP]["share"] == pytest.approx(0.48)
    assert rows[profile_connect.HANDSHAKE]["us_per_connect"] == pytest.approx(32.0)
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)


@pytest.mark.skipif(
    profile_connect.find_pyspy() is None, reason="py-spy is not installed (the bench extra)"
)
def test_profile_connect_samples_a_small_storm():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "profile_connect.py"), "-n", "200", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["error"] is None and r["connected"] == 200
    assert r["samples"] > 0 and r["server_cpu_s"] > 0
    assert len(r["gc_collections"]) == 3 and r["gc_cpu_s"] >= 0
    # The cost comes from the storm without the profiler; the sampled one is run too.
    assert r["profiled"]["connected"] == 200 and r["profiled"]["error"] is None
    names = [row["category"] for row in r["categories"]]
    assert names == list(profile_connect.CATEGORIES)
    assert sum(row["share"] for row in r["categories"]) == pytest.approx(1.0, abs=0.01)


def test_the_hooks_benchmark_counts_every_hooked_event_the_back_end_answered():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "hooks_bench.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    runs = {r["scenario"]: r for r in map(json.loads, proc.stdout.strip().splitlines())}
    assert set(runs) == {"hook-sat", "echo-sat", "hook-lat"}
    sat, echo, lat = runs["hook-sat"], runs["echo-sat"], runs["hook-lat"]
    # Every hooked event answered was one call to the back end, and no more.
    assert sat["events"] > 0 and sat["backend"]["calls"] == {"/hooks/event": sat["events"]}
    assert echo["events"] > 0 and echo["backend"]["calls"] == {}
    assert lat["lost"] == 0 and lat["events"] == 200  # 100/s for 2 s in the quick run
    assert lat["backend"]["calls"]["/hooks/event"] == 2 * 200  # through phxbroker and direct
    assert sat["broker_task_us_per_event"] < sat["server_cpu_us_per_event"]
