#!/usr/bin/env python3
"""Per-topic Redis channels or one shared channel? The costs that decide it, measured.

    python bench/cluster_channels.py [--messages 20000] [--churn 2000]

Against a private redis-server, with coredis on Trio as the nodes use it:

- receive: a node's CPU per message it receives and looks at (decode the broadcast
  header, look the topic up). With one shared channel a node pays it for every
  broadcast of the whole cluster, wanted or not; with per-topic channels only for the
  topics it has subscribers for.
- churn: per-topic channels cost a SUBSCRIBE when a topic becomes new to a node and an
  UNSUBSCRIBE when it is left: CPU and round trip per pair, and what it adds to a join.
- redis: the server's CPU per PUBLISH to a channel nobody holds, and to one held by one
  subscriber (what a shared channel costs Redis for each uninterested node).

Prints one JSON line; docs/design.md's Cluster section carries the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trio
from cluster_bench import RedisForBench


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def redis_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def receiver(port: int, messages: int) -> dict[str, float]:
    """Subscribe to the shared channel, receive `messages`, decode and drop each one (no
    topic is wanted here): CPU per message."""
    import coredis

    from phxbroker.cluster import wire

    wanted: dict[str, object] = {}
    client = coredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    async with client, client.connection_pool.acquire() as conn:
        conn.send_command(b"SUBSCRIBE", b"shared")
        pushes = conn.push_messages
        await pushes.__anext__()  # the confirmation
        print("ready", flush=True)
        got = 0
        started = None
        async for push in pushes:
            if started is None:
                started = cpu()
            data = push[2]
            topic_length = data[1]
            topic = data[2 : 2 + topic_length].decode()
            if topic in wanted:
                wire.decode_broadcast(data[2 + topic_length :])
            got += 1
            if got == messages:
                break
        return {"receive_cpu_per_message_us": round((cpu() - started) * 1e6 / (messages - 1), 2)}


async def publisher(port: int, messages: int, channel: bytes) -> None:
    import coredis

    from phxbroker.cluster import wire

    body = wire.encode_broadcast("0" * 16, "bench", {"seq": 1, "pad": "x" * 80}, False)
    client = coredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    async with client, client.connection_pool.acquire() as conn:
        for start in range(0, messages, 256):
            last = None
            for n in range(start, min(messages, start + 256)):
                topic = f"room:{n % 1000}".encode()
                last = conn.create_request(
                    b"PUBLISH", channel, bytes([0x53, len(topic)]) + topic + body
                )
            await last


async def churn(port: int, pairs: int) -> dict[str, float]:
    """SUBSCRIBE then UNSUBSCRIBE of a new topic channel, one pair at a time."""
    import coredis

    client = coredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    async with client, client.connection_pool.acquire() as conn:
        pushes = conn.push_messages
        started_cpu, started = cpu(), time.perf_counter()
        round_trips = []
        for n in range(pairs):
            channel = f"t:room:{n}".encode()
            sent = time.perf_counter()
            conn.send_command(b"SUBSCRIBE", channel)
            await pushes.__anext__()
            round_trips.append(time.perf_counter() - sent)
            conn.send_command(b"UNSUBSCRIBE", channel)
            await pushes.__anext__()
        wall = time.perf_counter() - started
        round_trips.sort()
        return {
            "churn_cpu_per_pair_us": round((cpu() - started_cpu) * 1e6 / pairs, 1),
            "churn_wall_per_pair_us": round(wall * 1e6 / pairs, 1),
            "subscribe_round_trip_p50_us": round(round_trips[len(round_trips) // 2] * 1e6, 1),
            "subscribe_round_trip_p99_us": round(
                round_trips[int(len(round_trips) * 0.99)] * 1e6, 1
            ),
        }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--churn", type=int, default=2_000)
    p.add_argument("--role", choices=["receiver"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    o = p.parse_args()
    if o.role == "receiver":
        print(json.dumps(trio.run(receiver, o.port, o.messages)), flush=True)
        return 0
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisForBench(Path(tmp))
        try:
            # Redis's own cost per PUBLISH, to a channel nobody holds.
            before = redis_cpu(redis.proc.pid)
            trio.run(publisher, redis.port, o.messages, b"nobody")
            result["redis_cpu_per_publish_unheld_us"] = round(
                (redis_cpu(redis.proc.pid) - before) * 1e6 / o.messages, 2
            )
            # A node receiving (and dropping) every message on a shared channel.
            rx = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--role",
                    "receiver",
                    "--port",
                    str(redis.port),
                    "--messages",
                    str(o.messages),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert rx.stdout is not None
            assert rx.stdout.readline().strip() == "ready"
            before = redis_cpu(redis.proc.pid)
            trio.run(publisher, redis.port, o.messages, b"shared")
            result.update(json.loads(rx.stdout.readline()))
            rx.wait(30)
            result["redis_cpu_per_publish_held_us"] = round(
                (redis_cpu(redis.proc.pid) - before) * 1e6 / o.messages, 2
            )
            result.update(trio.run(churn, redis.port, o.churn))
        finally:
            redis.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
