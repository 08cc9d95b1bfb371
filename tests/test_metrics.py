"""GET /metrics after known traffic, parsed as Prometheus parses it; /healthz and /readyz."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from support.daemon import serve
from support.http_client import HttpClient, fetch
from trio_websocket import ConnectionRejected, open_websocket_url

from phxbroker.ops import health

CONFIG = """
[server]
listen = "127.0.0.1:0"

[longpoll]
window_ms = 30_000

[[auth.tokens]]
user = "alice"
token = "alice-token"
[[auth.tokens]]
user = "bob"
token = "bob-token"

[[topics]]
pattern = "room:*"
relay = ["new_msg"]
echo = ["ping"]
"""

# What Prometheus 2.x sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
TIMEOUT = 5

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str, parse: Any = text_string_to_metric_families) -> Samples:
    out: Samples = {}
    for family in parse(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


async def ws_call(ws: Any, frame: list[Any]) -> list[Any]:
    """Send a frame and return the server's frame carrying the same ref."""
    await ws.send_message(json.dumps(frame))
    with trio.fail_after(TIMEOUT):
        while True:
            got = json.loads(await ws.get_message())
            if got[1] == frame[1]:
                return got


async def scrape_after_known_traffic(port: int, client: HttpClient) -> Samples:
    """A refused connect, a long-poll client joining, a websocket client joining, pinging,
    heartbeating and relaying one message to both; then a scrape while both are open."""
    url = f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0&token="
    with pytest.raises(ConnectionRejected):
        async with open_websocket_url(url + "wrong"):
            pass
    opened = await client.request("GET", "/socket/longpoll?token=bob-token&vsn=2.0.0&")
    poll = f"/socket/longpoll?vsn=2.0.0&token={opened.json()['token']}"
    await client.request("POST", poll, b'["1","1","room:a","phx_join",{}]')
    assert len((await client.request("GET", poll)).json()["messages"]) == 1  # the join reply

    async with open_websocket_url(url + "alice-token") as ws:
        await ws_call(ws, ["1", "1", "room:a", "phx_join", {}])
        await ws_call(ws, ["1", "2", "room:a", "ping", {"x": 1}])
        await ws_call(ws, [None, "3", "phoenix", "heartbeat", {}])
        await ws.send_message('["1",null,"room:a","new_msg",{"body":"hi"}]')
        with trio.fail_after(TIMEOUT):
            assert json.loads(await ws.get_message())[3] == "new_msg"  # its own broadcast
        relayed = (await client.request("GET", poll)).json()["messages"]
        assert [json.loads(m)[3] for m in relayed] == ["new_msg"]
        response = await client.request("GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(response.body.decode())


async def test_metrics_count_known_traffic_by_transport() -> None:
    async with serve(CONFIG) as (_server, port), await HttpClient.open(port) as client:
        found = await scrape_after_known_traffic(port, client)

    assert value(found, "phxbroker_open_connections", transport="websocket") == 1
    assert value(found, "phxbroker_open_connections", transport="longpoll") == 1
    assert value(found, "phxbroker_connections_total", transport="websocket") == 1
    assert value(found, "phxbroker_connections_total", transport="longpoll") == 1
    assert value(found, "phxbroker_joins_total") == 2
    # bob's join; alice's join, ping, heartbeat and new_msg
    assert value(found, "phxbroker_messages_received_total") == 5
    # the replies to both joins, the ping and the heartbeat
    assert value(found, "phxbroker_messages_sent_total") == 4
    assert value(found, "phxbroker_broadcasts_total") == 1
    assert value(found, "phxbroker_deliveries_total") == 2
    assert value(found, "phxbroker_refusals_total", reason="bad_token") == 1
    assert value(found, "phxbroker_auth_failures_total") == 1
    assert value(found, "phxbroker_slow_client_drops_total") == 0
    assert value(found, "phxbroker_received_bytes_total") > 100
    assert value(found, "phxbroker_sent_bytes_total") > 100
    assert value(found, "phxbroker_broker_queue_depth") == 0
    assert value(found, "phxbroker_topics") == 1

    commands = value(found, "phxbroker_broker_commands_total")
    assert commands == 6  # 2 connects, 2 joins, the ping and the new_msg
    buckets = sorted(
        (float(dict(labels)["le"]), count)
        for (name, labels), count in found.items()
        if name == "phxbroker_broker_batch_duration_seconds_bucket"
    )
    counts = [count for _, count in buckets]
    assert buckets[-1][0] == float("inf") and counts == sorted(counts)
    batches = value(found, "phxbroker_broker_batch_duration_seconds_count")
    assert counts[-1] == batches and 1 <= batches <= commands
    assert value(found, "phxbroker_broker_batch_duration_seconds_sum") > 0

    assert value(found, "process_resident_memory_bytes") > 1_000_000
    assert value(found, "process_open_fds") >= 3


async def test_a_prometheus_scrape_gets_openmetrics() -> None:
    async with serve(CONFIG) as (_server, port):
        response = await fetch(port, "GET", "/metrics", headers={"accept": PROMETHEUS_ACCEPT})
    assert response.status == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.headers["cache-control"] == "no-store"
    found = samples(response.body.decode(), openmetrics_families)  # strict: needs # EOF
    assert value(found, "phxbroker_joins_total") == 0
    assert value(found, "phxbroker_open_connections", transport="longpoll") == 0


async def test_metrics_can_be_switched_off() -> None:
    async with serve(CONFIG + "\n[metrics]\nenabled = false\n") as (_server, port):
        assert (await fetch(port, "GET", "/metrics")).status == 404


async def test_healthz_and_readyz_until_shutdown_begins() -> None:
    async with serve(CONFIG) as (server, port), await HttpClient.open(port) as client:
        healthz = await client.request("GET", "/healthz")
        assert (healthz.status, healthz.body) == (200, b"ok\n")
        readyz = await client.request("GET", "/readyz")
        assert (readyz.status, readyz.body) == (200, b"ready\n")
        await server.shutdown()
        assert server.draining
        readyz = await client.request("GET", "/readyz")
        assert (readyz.status, readyz.body) == (503, b"not ready: draining for shutdown\n")
        assert (await client.request("GET", "/healthz")).status == 200  # alive all the same


async def test_readyz_fails_while_the_broker_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(health, "BROKER_ANSWER_TIMEOUT", 0.2)
    async with serve(CONFIG) as (server, port), await HttpClient.open(port) as client:
        assert (await client.request("GET", "/readyz")).status == 200
        # A broker task that stopped taking commands: nothing reads this channel.
        server.broker_task._commands, _unread = trio.open_memory_channel(0)
        readyz = await client.request("GET", "/readyz")
        assert (readyz.status, readyz.body) == (
            503,
            b"not ready: the broker did not answer within 0.2 s\n",
        )


PROMETHEUS = shutil.which("prometheus") or os.environ.get("PHXBROKER_PROMETHEUS")


def test_a_real_prometheus_server_scrapes_the_broker(broker_factory, tmp_path: Path) -> None:
    """A real Prometheus server (installed by `make test`) scrapes the broker."""
    if not PROMETHEUS:
        pytest.fail(
            "no prometheus binary: run scripts/install-system-packages.sh (or set "
            "PHXBROKER_PROMETHEUS to one)"
        )
    broker = broker_factory({"auth": {"allow_anonymous": True}})
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: phxbroker\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{broker.port}']}}]\n"
    )
    with socket.socket() as probe:  # a free port for Prometheus's own web server
        probe.bind(("127.0.0.1", 0))
        web = f"127.0.0.1:{probe.getsockname()[1]}"
    proc = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    query = f"http://{web}/api/v1/query?query=phxbroker_open_connections"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(query, timeout=5) as answer:
                    result = json.load(answer)["data"]["result"]
            except OSError:
                result = []  # not listening yet
            if result:
                break
            assert proc.poll() is None, "prometheus exited"
            assert time.monotonic() < deadline, "prometheus never scraped the broker"
            time.sleep(0.5)
        by_transport = {r["metric"]["transport"]: r["value"][1] for r in result}
        assert by_transport == {"websocket": "0", "longpoll": "0"}
        assert {r["metric"]["job"] for r in result} == {"phxbroker"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
