"""One node of a cluster: the broker's `Fanout` to the other nodes, through Redis.

The broker task never waits on Redis. What it hands over (broadcasts, presence changes,
kicks...) goes into a bounded outbox that a publisher task sends, pipelined, on the
node's one Redis connection; when Redis cannot keep up the outbox drops, counts and logs.
The same connection (RESP3 carries pub/sub pushes beside command replies) receives:

* `<prefix>:t:<topic>`: broadcasts of each topic this node has subscribers for. A join
  of a topic new to the node is held until Redis has confirmed the SUBSCRIBE, so a
  broadcast published anywhere after a join reply reaches that client. Channels of topics
  without subscribers here are dropped after a short linger.
* `<prefix>:ctl`: presence and user deltas, heartbeats, hits, kicks, disconnects, bans.
* `<prefix>:n:<incarnation>`: this run of the node alone: state transfers, sync requests,
  and the probe it sends itself to notice a connection that silently stopped delivering.

Messages arrive in the order each node sent them. A broadcast crosses once, encoded
once; the receiving node builds one `Broadcast` for all its subscribers. Delivery to
other nodes is at most once: what is published while Redis is away is lost to them
(local subscribers always get it).

When Redis goes away the node keeps serving its own clients, reconnects with back-off,
resubscribes, says hello (the others send it their state and ask for its own) and keeps
the other nodes' entries meanwhile (`Replica.heard_everyone_now`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import coredis
import trio
from coredis.retry import NoRetryPolicy

from phxbroker.auth.bans import Bans
from phxbroker.broker.core import Broadcast, Broker, Peer
from phxbroker.broker.gateway import BrokerGateway
from phxbroker.broker.stats import Stats
from phxbroker.cluster import wire
from phxbroker.cluster.replica import Changes, Replica
from phxbroker.config.cluster import ClusterConfig
from phxbroker.protocol import messages

log = logging.getLogger("phxbroker.cluster")

OUTBOX = 10_000  # messages waiting for Redis; beyond that they are dropped and counted
BATCH = 512  # messages the publisher pipelines before it waits for Redis's answer
CONNECT_TIMEOUT = 3.0
REQUEST_TIMEOUT = 5.0  # an answer slower than this means the connection is broken
SUBSCRIBE_TIMEOUT = 2.0  # a join waits at most this long for its topic's SUBSCRIBE
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0
UNSUBSCRIBE_AFTER = 5.0  # seconds a topic has no subscribers here before its channel goes
SWEEP_INTERVAL = 1.0
STATS_INTERVAL = 2.0
STATS_TTL = 10  # seconds a node's published stats live without a refresh
DROP_LOG_INTERVAL = 10.0

# coredis logs its own reconnect noise with tracebacks; this module says what happened.
logging.getLogger("coredis").setLevel(logging.CRITICAL)


def new_incarnation() -> str:
    """A random id for one run of a node (16 hex characters)."""
    return os.urandom(8).hex()


def heartbeat_interval(down_after: float) -> float:
    """How often a node says it is alive: several times per down period."""
    return min(5.0, max(0.1, down_after / 5))


class ProbeFailed(Exception):
    """The node's message to itself did not come back: the connection delivers nothing."""


# What a lost, refused or silent Redis raises; anything else is a bug and is not hidden.
EXPECTED = (
    coredis.exceptions.RedisError,
    OSError,
    TimeoutError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    ProbeFailed,
)


@dataclass
class ClusterStats:
    """Counters for metrics, stats and the log."""

    published: int = 0  # messages sent to Redis
    received: int = 0  # messages received from Redis
    broadcasts_received: int = 0
    dropped: int = 0  # messages not sent: outbox full, or Redis away
    malformed: int = 0  # messages from Redis that did not decode
    connects: int = 0
    disconnects: int = 0
    probe_failures: int = 0
    nodes_down: int = 0  # incarnations that went silent for down_after
    since: float = field(default_factory=time.monotonic)  # when the state last changed


class ClusterNode:
    """The cluster engine of one process: a `Fanout` for its broker, and the tasks that
    talk to Redis (`run`)."""

    def __init__(
        self,
        config: ClusterConfig,
        broker: Broker,
        gateway: BrokerGateway,
        stats: Stats,
        bans: Bans,
        *,
        node: str,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.config = config
        self.node = node
        self.incarnation = new_incarnation()
        self.broker = broker
        self.gateway = gateway
        self.broker_stats = stats
        self.bans = bans
        self.clock = clock
        self.stats = ClusterStats()
        self.heartbeat = heartbeat_interval(config.down_after)
        self.replica = Replica(self.incarnation, config.down_after, clock, resync=self.heartbeat)
        prefix = config.prefix
        self._topic_prefix = f"{prefix}:t:".encode()
        self._control = f"{prefix}:ctl".encode()
        self._own = self._node_channel(self.incarnation)
        self._stats_key_prefix = f"{prefix}:stats:"
        self._nodes_key = f"{prefix}:nodes".encode()
        self._bans_key = f"{prefix}:bans".encode()
        self.connected = False
        self._conn: Any = None  # the coredis connection while connected
        self._outbox_in, self._outbox = trio.open_memory_channel[tuple[bytes, bytes]](OUTBOX)
        self._last_drop_log = float("-inf")
        self._drops_unlogged = 0
        # Topic channels: topic -> "subscribing" | "subscribed" | "unsubscribing".
        self._channels: dict[str, str] = {}
        self._subscribe_sent: dict[str, float] = {}
        self._waiting: dict[str, list[Peer]] = {}  # joins held until a topic's SUBSCRIBE
        self._idle_since: dict[str, float] = {}
        # What this node owns: presence metas, users of status topics, hits; `seq` numbers
        # every change of the first two.
        self.seq = 0
        self.own_presences: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.own_users: set[tuple[str, str]] = set()
        self.own_hits: dict[str, int] = {}
        self._hits_dirty: set[str] = set()
        self._confirming: set[bytes] = set()
        self._confirmed = trio.Event()
        self._probe_token = ""
        self._probe_back = trio.Event()
        self._stopping = False

    def _node_channel(self, incarnation: str) -> bytes:
        return f"{self.config.prefix}:n:{incarnation}".encode()

    # -- the Fanout (called in the broker task; never waits) ------------------------------

    def broadcast(self, broadcast: Broadcast) -> None:
        if not self.connected:
            self._dropped()
            return
        payload = broadcast.payload
        try:
            data = wire.encode_broadcast(
                self.incarnation, broadcast.event, payload, broadcast.relayed
            )
        except (wire.WireError, TypeError, ValueError) as exc:
            log.warning("broadcast on %r not sent to other nodes: %s", broadcast.topic, exc)
            self._dropped()
            return
        self._send(self._topic_prefix + broadcast.topic.encode(), data)

    def disconnect_user(self, user: str, code: int, reason: str) -> None:
        self._control_message("disc", user=user, code=code, reason=reason)

    def kick(self, user: str, topic: str) -> None:
        self._control_message("kick", user=user, t=topic)

    def presence_changed(
        self,
        topic: str,
        key: str,
        joined: dict[str, Any] | None,
        left: dict[str, Any] | None,
    ) -> None:
        if left is not None:
            self.own_presences.pop((topic, key, left["phx_ref"]), None)
        if joined is not None:
            self.own_presences[(topic, key, joined["phx_ref"])] = joined
        self.seq += 1
        self._control_message("p", s=self.seq, t=topic, key=key, j=joined, l=left)

    def users_changed(self, topic: str, user: str, present: bool) -> None:
        if present:
            self.own_users.add((topic, user))
        else:
            self.own_users.discard((topic, user))
        self.seq += 1
        self._control_message("u", s=self.seq, t=topic, user=user, on=present)

    def counted(self, topic: str, hits: int) -> None:
        self.own_hits[topic] = hits
        if topic not in self._hits_dirty and self.connected:
            # One announcement per topic waits in the outbox; it carries the count as it
            # is when sent, so a storm of hits costs one message per publisher batch.
            self._hits_dirty.add(topic)
            self._send(b"", topic.encode())

    def interest(self, peer: Peer, topic: str) -> bool:
        state = self._channels.get(topic)
        if state == "subscribed":
            self._idle_since.pop(topic, None)
            return True
        if not self.connected:
            return True  # local clients are served; the channel comes with the reconnect
        self._waiting.setdefault(topic, []).append(peer)
        if state != "subscribing":
            self._subscribe(topic)
        return False

    # -- other surfaces ---------------------------------------------------------------------

    def ban_changed(self, user: str, seconds: float | None) -> None:
        """A ban set (`seconds`) or lifted (None) here: the same on every node."""
        if seconds is None:
            self._control_message("unban", user=user)
            self._request_soon(b"HDEL", self._bans_key, user.encode())
        else:
            self._control_message("ban", user=user, secs=seconds)
            until = time.time() + seconds
            self._request_soon(b"HSET", self._bans_key, user.encode(), repr(until).encode())

    def credentials_revoked(self, credentials: Iterable[object]) -> None:
        """Credentials a reload here stopped accepting: their sockets close everywhere."""
        creds = sorted({c.hex() for c in credentials if isinstance(c, bytes)})
        if creds:
            self._control_message("revoke", creds=creds)

    @property
    def state(self) -> str:
        return "connected" if self.connected else "disconnected"

    def degraded(self) -> str | None:
        """Why the node is cut off from the others, or None."""
        if self.connected:
            return None
        return f"cluster: Redis at {self.config.redis_address} unreachable, serving local clients"

    # -- sending ------------------------------------------------------------------------

    def _control_message(self, kind: str, **fields: Any) -> None:
        if not self.connected:
            self._dropped()
            return
        self._send(self._control, wire.encode_control(kind, self.node, self.incarnation, **fields))

    def _send(self, channel: bytes, data: bytes) -> None:
        try:
            self._outbox_in.send_nowait((channel, data))
        except trio.WouldBlock:
            self._dropped()

    def _request_soon(self, *command: bytes) -> None:
        """A command whose answer nobody waits for (its failure shows as a disconnect)."""
        if self._conn is not None:
            # On failure the session ends and reconnects; the command is lost.
            with contextlib.suppress(Exception):
                self._conn.create_request(command[0], *command[1:])

    def _dropped(self) -> None:
        self.stats.dropped += 1
        self._drops_unlogged += 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL:
            self._last_drop_log = now
            log.warning(
                "cluster: %d messages for other nodes dropped (%s)",
                self._drops_unlogged,
                "Redis unreachable" if not self.connected else "Redis does not keep up",
            )
            self._drops_unlogged = 0

    # -- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected to Redis until cancelled, reconnecting with back-off."""
        backoff = BACKOFF_FIRST
        failures = 0
        while True:
            started = trio.current_time()
            try:
                await self._session()
            except EXPECTED as exc:
                problem = _describe(exc)
            except BaseExceptionGroup as group:
                cancelled, rest = group.split(trio.Cancelled)
                expected, unexpected = rest.split(EXPECTED) if rest else (None, None)
                if unexpected is not None:
                    raise
                if cancelled is not None:
                    raise cancelled from None  # stopping: Redis's last words do not matter
                assert expected is not None
                problem = _describe(_first(expected))
            else:
                problem = "the connection ended"
            was_connected = self.connected
            self._lost()
            if self._stopping:
                log.info("cluster: left Redis (%s)", problem)
                return
            if was_connected:
                failures = 0
                backoff = BACKOFF_FIRST
                log.warning(
                    "cluster: lost Redis at %s (%s); serving local clients, reconnecting",
                    self.config.redis_address,
                    problem,
                )
            else:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "cluster: cannot reach Redis at %s (%s); retrying",
                        self.config.redis_address,
                        problem,
                    )
            if trio.current_time() - started > 30:
                backoff = BACKOFF_FIRST
            await trio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def stop(self) -> None:
        """Graceful stop: the other nodes drop this one's entries now, not after down_after."""
        self._stopping = True
        conn = self._conn
        if conn is None:
            return
        # After the leaves of the clients just closed, which are still in the outbox.
        self._control_message("bye")
        with trio.move_on_after(1.0):
            try:
                while self._outbox.statistics().current_buffer_used:
                    await trio.sleep(0.01)
                await conn.create_request(b"SREM", self._nodes_key, self.node.encode())
                await conn.create_request(b"DEL", self._stats_key(self.node))
            except Exception as exc:
                log.info("cluster: could not say goodbye to the other nodes (%s)", _describe(exc))

    async def _session(self) -> None:
        options: dict[str, Any] = {
            "connect_timeout": CONNECT_TIMEOUT,
            "stream_timeout": REQUEST_TIMEOUT,
            "retry_policy": NoRetryPolicy(),
            "verify_version": False,
            "client_name": f"phxbroker:{self.node}"[:64].replace(" ", "_"),
        }
        if self.config.tls_context is not None:
            options["ssl_context"] = self.config.tls_context
        client: Any = coredis.Redis.from_url(self.config.redis_url, **options)
        async with client, client.connection_pool.acquire() as conn, trio.open_nursery() as tasks:
            tasks.start_soon(self._read, conn)
            await self._subscribe_now(conn, [self._control, self._own])
            topics = await self.gateway.ask(self._local_topics)
            self._channels = {}
            if topics:
                await self._subscribe_now(conn, [self._topic_prefix + t.encode() for t in topics])
            self._channels = dict.fromkeys(topics, "subscribed")
            bans = await conn.create_request(b"HGETALL", self._bans_key)
            self._conn = conn
            self.connected = True
            self.stats.connects += 1
            self.stats.since = time.monotonic()
            self._apply_bans(bans)
            self.replica.heard_everyone_now()
            for topic, hits in list(self.own_hits.items()):
                self.counted(topic, hits)  # others may have missed some while away
            await conn.create_request(
                b"PUBLISH",
                self._control,
                wire.encode_control("hello", self.node, self.incarnation, s=self.seq),
            )
            log.info(
                "cluster: node %s connected to Redis at %s (prefix %r, %d topic channels)",
                self.node,
                self.config.redis_address,
                self.config.prefix,
                len(topics),
            )
            tasks.start_soon(self._publish, conn)
            tasks.start_soon(self._beat, conn)
            tasks.start_soon(self._probe, conn)
            tasks.start_soon(self._sweep, conn)
            tasks.start_soon(self._publish_stats, conn)

    def _lost(self) -> None:
        if self.connected:
            self.stats.disconnects += 1
            self.stats.since = time.monotonic()
        self.connected = False
        self._conn = None
        self._channels = {}
        self._subscribe_sent.clear()
        # Joins waiting for a channel are answered: local clients are served meanwhile.
        waiting, self._waiting = self._waiting, {}
        for topic, peers in waiting.items():
            for peer in peers:
                self.gateway.tell_soon(self.broker.resume, peer, topic)
        while True:  # what waited for Redis is lost to the other nodes
            try:
                self._outbox.receive_nowait()
            except trio.WouldBlock:
                break
            self.stats.dropped += 1
        self._hits_dirty.clear()

    def _local_topics(self) -> list[str]:
        """Runs in the broker task: the topics with subscribers here."""
        return [name for name, t in self.broker.topics.items() if t.subscribers]

    async def _subscribe_now(self, conn: Any, channels: list[bytes]) -> None:
        """SUBSCRIBE and wait for Redis to confirm every channel."""
        pending = set(channels)
        self._confirming = pending
        self._confirmed = trio.Event()
        conn.send_command(b"SUBSCRIBE", *channels)
        with trio.fail_after(REQUEST_TIMEOUT):
            await self._confirmed.wait()

    def _subscribe(self, topic: str) -> None:
        self._channels[topic] = "subscribing"
        self._subscribe_sent[topic] = self.clock()
        # On failure the session is ending, and _lost() answers the waiting joins.
        with contextlib.suppress(Exception):
            self._conn.send_command(b"SUBSCRIBE", self._topic_prefix + topic.encode())

    # -- receiving ----------------------------------------------------------------------

    async def _read(self, conn: Any) -> None:
        topic_prefix = self._topic_prefix
        async for push in conn.push_messages:
            kind = push[0]
            if kind == b"message":
                channel, data = push[1], push[2]
                self.stats.received += 1
                if channel.startswith(topic_prefix):
                    await self._on_broadcast(channel[len(topic_prefix) :], data)
                else:
                    await self._on_control(data)
            elif kind == b"subscribe":
                self._on_subscribed(push[1])
            elif kind == b"unsubscribe":
                self._on_unsubscribed(push[1])

    async def _on_broadcast(self, raw_topic: bytes, data: bytes) -> None:
        try:
            topic = raw_topic.decode()
            remote = wire.decode_broadcast(data)
        except (UnicodeDecodeError, wire.WireError) as exc:
            self._malformed(exc)
            return
        if remote.origin == self.incarnation:
            return  # local subscribers had it first
        self.stats.broadcasts_received += 1
        broadcast = Broadcast(topic, remote.event, remote.payload)
        broadcast.relayed = remote.relayed
        await self.gateway.tell(self.broker.deliver, broadcast)

    async def _on_control(self, data: bytes) -> None:
        try:
            msg = wire.decode_control(data)
        except wire.WireError as exc:
            self._malformed(exc)
            return
        if msg["i"] == self.incarnation:
            if msg["k"] == "probe" and msg["x"] == self._probe_token:
                self._probe_back.set()
            return
        kind = msg["k"]
        if kind == "kick":
            await self.gateway.tell(self.broker.kick_here, msg["user"], msg["t"])
        elif kind == "disc":
            await self.gateway.tell(
                self.broker.disconnect_user_here, msg["user"], msg["code"], msg["reason"]
            )
        elif kind == "ban":
            Bans.ban(self.bans, msg["user"], msg["secs"])  # not announced again
        elif kind == "unban":
            Bans.lift(self.bans, msg["user"])
        elif kind == "revoke":
            await self.gateway.tell(self._close_revoked, set(msg["creds"]))
        elif kind == "sync":
            self._send_state(msg["i"])
        elif kind != "probe":
            changes = self.replica.receive(msg)
            await self._apply(changes)

    def _malformed(self, exc: Exception) -> None:
        self.stats.malformed += 1
        if self.stats.malformed == 1 or self.stats.malformed % 1000 == 0:
            log.warning(
                "cluster: skipped a message from Redis that no phxbroker node sends (%s); "
                "%d so far",
                exc,
                self.stats.malformed,
            )

    async def _apply(self, changes: Changes) -> None:
        if changes.send_state_to is not None:
            self._send_state(changes.send_state_to)
        if changes.request_sync is not None:
            self._send(
                self._node_channel(changes.request_sync),
                wire.encode_control("sync", self.node, self.incarnation),
            )
        for node in changes.left_nodes:
            log.info("cluster: the entries of node %s left", node)
        if changes:
            await self.gateway.tell(self._merge, changes)

    def _merge(self, changes: Changes) -> None:
        """Runs in the broker task."""
        broker = self.broker
        if changes.presence:
            broker.merge_presence(changes.presence)
        for topic, user, delta in changes.users:
            broker.merge_users(topic, user, delta)
        for topic, hits in changes.hits.items():
            broker.merge_hits(topic, hits)

    def _send_state(self, incarnation: str) -> None:
        presences = [[t, key, meta] for (t, key, _ref), meta in self.own_presences.items()]
        users = [[t, user] for t, user in self.own_users]
        state = wire.encode_control(
            "state",
            self.node,
            self.incarnation,
            s=self.seq,
            p=presences,
            u=users,
            h=self.own_hits,
        )
        self._send(self._node_channel(incarnation), state)

    def _close_revoked(self, credentials: set[str]) -> None:
        """Runs in the broker task."""
        for peer in list(self.broker.peers):
            credential = getattr(peer, "credential", None)
            if isinstance(credential, bytes) and credential.hex() in credentials:
                log.info("closing %s: its credential was revoked on another node", peer)
                self.broker.disconnect(peer)
                peer.close(1001, "credential revoked")

    def _apply_bans(self, bans: Any) -> None:
        """Bans set on any node, as Redis keeps them; ended ones are removed there."""
        now = time.time()
        if not isinstance(bans, dict):
            return
        ended = []
        for user, until in bans.items():
            try:
                left = float(until) - now
                name = user.decode()
            except (ValueError, UnicodeDecodeError):
                ended.append(user)
                continue
            if left > 0:
                Bans.ban(self.bans, name, left)
            else:
                ended.append(user)
        if ended:
            self._request_soon(b"HDEL", self._bans_key, *ended)

    def _on_subscribed(self, channel: bytes) -> None:
        confirming = self._confirming
        if confirming:
            confirming.discard(channel)
            if not confirming:
                self._confirmed.set()
        if not channel.startswith(self._topic_prefix):
            return
        topic = channel[len(self._topic_prefix) :].decode(errors="replace")
        if self._channels.get(topic) == "subscribing":
            self._channels[topic] = "subscribed"
            self._subscribe_sent.pop(topic, None)
            self._release(topic)

    def _on_unsubscribed(self, channel: bytes) -> None:
        if not channel.startswith(self._topic_prefix):
            return
        topic = channel[len(self._topic_prefix) :].decode(errors="replace")
        if self._channels.get(topic) == "unsubscribing":
            del self._channels[topic]

    def _release(self, topic: str) -> None:
        for peer in self._waiting.pop(topic, ()):
            self.gateway.tell_soon(self.broker.resume, peer, topic)

    # -- the session's tasks ------------------------------------------------------------

    async def _publish(self, conn: Any) -> None:
        """Send the outbox, pipelined: everything queued goes before one wait for Redis."""
        outbox = self._outbox
        while True:
            channel, data = await outbox.receive()
            if not channel:
                channel, data = self._hits_message(data)
            last = conn.create_request(b"PUBLISH", channel, data)
            sent = 1
            while sent < BATCH:
                try:
                    channel, data = outbox.receive_nowait()
                except trio.WouldBlock:
                    break
                if not channel:
                    channel, data = self._hits_message(data)
                last = conn.create_request(b"PUBLISH", channel, data)
                sent += 1
            self.stats.published += sent
            with trio.fail_after(REQUEST_TIMEOUT):
                await last

    async def _beat(self, conn: Any) -> None:
        """Heartbeats, hit counts, and the other nodes' down periods."""
        while True:
            await trio.sleep(self.heartbeat)
            self._control_message("hb", s=self.seq)
            changes = self.replica.expire()
            if changes.left_nodes:
                self.stats.nodes_down += len(changes.left_nodes)
                for node in changes.left_nodes:
                    log.warning(
                        "cluster: node %s silent for %g s: its presences leave",
                        node,
                        self.config.down_after,
                    )
                changes.left_nodes = []
            await self._apply(changes)

    def _hits_message(self, raw_topic: bytes) -> tuple[bytes, bytes]:
        topic = raw_topic.decode()
        self._hits_dirty.discard(topic)
        hits = wire.encode_control(
            "hits", self.node, self.incarnation, t=topic, c=self.own_hits[topic]
        )
        return self._control, hits

    async def _probe(self, conn: Any) -> None:
        """Send a message to this node's own channel now and then; no echo means the
        connection stopped delivering even if it looks open."""
        timeout = max(1.0, 2 * self.heartbeat)
        while True:
            await trio.sleep(self.heartbeat)
            self._probe_token = os.urandom(6).hex()
            self._probe_back = trio.Event()
            probe = wire.encode_control("probe", self.node, self.incarnation, x=self._probe_token)
            self._send(self._own, probe)
            with trio.move_on_after(timeout):
                await self._probe_back.wait()
            if not self._probe_back.is_set():
                self.stats.probe_failures += 1
                raise ProbeFailed(f"a probe did not come back within {timeout:g} s")

    async def _sweep(self, conn: Any) -> None:
        """Joins waiting too long are answered; channels of topics nobody here joins go."""
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            now = self.clock()
            for topic, sent in list(self._subscribe_sent.items()):
                if now - sent > SUBSCRIBE_TIMEOUT:
                    log.warning(
                        "cluster: Redis did not confirm the channel of %r within %g s; "
                        "answering its joins",
                        topic,
                        SUBSCRIBE_TIMEOUT,
                    )
                    del self._subscribe_sent[topic]
                    self._release(topic)
            subscribed = [t for t, s in self._channels.items() if s == "subscribed"]
            empty, missing = await self.gateway.ask(self._compare_channels, subscribed)
            for topic in missing:
                if topic not in self._channels:
                    self._subscribe(topic)  # joined while the node was reconnecting
            for topic in subscribed:
                if topic not in empty:
                    self._idle_since.pop(topic, None)
                    continue
                since = self._idle_since.setdefault(topic, now)
                if now - since >= UNSUBSCRIBE_AFTER and self._channels.get(topic) == "subscribed":
                    del self._idle_since[topic]
                    self._channels[topic] = "unsubscribing"
                    conn.send_command(b"UNSUBSCRIBE", self._topic_prefix + topic.encode())

    def _compare_channels(self, subscribed: list[str]) -> tuple[set[str], list[str]]:
        """Runs in the broker task: which subscribed topics have no subscribers here, and
        which topics with subscribers here have no channel."""
        found = self.broker.topics
        empty = {t for t in subscribed if t not in found or not found[t].subscribers}
        missing = [n for n, t in found.items() if t.subscribers and n not in self._channels]
        return empty, missing

    async def _publish_stats(self, conn: Any) -> None:
        while True:
            snapshot = await self.gateway.ask(self.snapshot)
            data = messages.dumps(snapshot)
            with trio.fail_after(REQUEST_TIMEOUT):
                await conn.create_request(
                    b"SET", self._stats_key(self.node), data, b"EX", str(STATS_TTL).encode()
                )
                await conn.create_request(b"SADD", self._nodes_key, self.node.encode())
            await trio.sleep(STATS_INTERVAL)

    def _stats_key(self, node: str) -> bytes:
        return (self._stats_key_prefix + node).encode()

    # -- reports --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Runs in the broker task: this node's figures, as the other nodes see them."""
        broker = self.broker
        stats = self.broker_stats
        return {
            "node": self.node,
            "incarnation": self.incarnation,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "uptime": time.time() - stats.started_at,
            "connections": stats.connections_open,
            "channels": sum(len(peer.channels) for peer in broker.peers),
            "topic_count": sum(1 for t in broker.topics.values() if t.subscribers),
            "user_count": len(broker.users),
            "broadcasts": stats.broadcasts,
            "deliveries": stats.deliveries,
            "messages_in": stats.messages_in,
            "cluster": self.status(),
            "topics": [
                {"topic": name, "subscribers": len(t.subscribers), "users": len(t.user_sockets)}
                for name, t in broker.topics.items()
                if t.subscribers
            ],
            "users": [
                {"user": user, "connections": len(peers)} for user, peers in broker.users.items()
            ],
        }

    def status(self) -> dict[str, Any]:
        """The cluster's state as this node sees it."""
        s = self.stats
        return {
            "node": self.node,
            "state": self.state,
            "for": round(time.monotonic() - s.since, 1),
            "redis": self.config.redis_address,
            "prefix": self.config.prefix,
            "channels": sum(1 for v in self._channels.values() if v == "subscribed"),
            "other_nodes": len(self.replica.views),
            "published": s.published,
            "received": s.received,
            "dropped": s.dropped,
            "malformed": s.malformed,
            "reconnects": max(0, s.connects - 1),
            "probe_failures": s.probe_failures,
        }

    async def report(self) -> dict[str, Any]:
        """The cluster's totals and a row per node, for `stats` and `/api/stats`."""
        rows = await self.node_rows(await self.gateway.ask(self.snapshot))
        totals = {
            name: sum(int(r.get(name) or 0) for r in rows)
            for name in ("connections", "channels", "broadcasts", "deliveries", "messages_in")
        }
        totals["topic_count"] = len({t["topic"] for r in rows for t in _entries(r, "topics")})
        totals["user_count"] = len({u["user"] for r in rows for u in _entries(r, "users")})
        nodes = [{k: v for k, v in r.items() if k not in ("topics", "users")} for r in rows]
        return {**self.status(), "nodes": nodes, "totals": totals}

    async def topics(self, local: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`local` (this node's topic summary) with subscribers counted on every node and
        a `nodes` map of node -> subscribers."""
        rows = await self.node_rows(await self.gateway.ask(self.snapshot))
        merged = {t["topic"]: {**t, "subscribers": 0, "nodes": {}} for t in local}
        for row in rows:
            for entry in _entries(row, "topics"):
                topic = merged.setdefault(
                    entry["topic"],
                    {
                        "topic": entry["topic"],
                        "subscribers": 0,
                        "users": 0,
                        "presences": None,
                        "hits": 0,
                        "nodes": {},
                    },
                )
                count = int(entry.get("subscribers") or 0)
                topic["subscribers"] += count
                topic["nodes"][str(row.get("node"))] = count
        return list(merged.values())

    async def users(self, local: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`local` (this node's users) with connections counted on every node and a
        `nodes` map of node -> connections."""
        rows = await self.node_rows(await self.gateway.ask(self.snapshot))
        merged = {u["user"]: {**u, "connections": 0, "nodes": {}} for u in local}
        for row in rows:
            for entry in _entries(row, "users"):
                user = merged.setdefault(
                    entry["user"],
                    {"user": entry["user"], "connections": 0, "topics": [], "nodes": {}},
                )
                count = int(entry.get("connections") or 0)
                user["connections"] += count
                user["nodes"][str(row.get("node"))] = count
        return list(merged.values())

    async def node_rows(self, own: dict[str, Any]) -> list[dict[str, Any]]:
        """Every node's last published figures, `own` (fresh) first; only this node's own
        when Redis is away."""
        rows = [own]
        conn = self._conn
        if conn is None:
            return rows
        try:
            with trio.fail_after(1.0):
                members = await conn.create_request(b"SMEMBERS", self._nodes_key)
                names = sorted(m.decode(errors="replace") for m in members if m)
                names = [n for n in names if n != self.node]
                if not names:
                    return rows
                blobs = await conn.create_request(b"MGET", *[self._stats_key(n) for n in names])
        except (Exception, trio.TooSlowError) as exc:
            log.info("cluster: could not read the other nodes' stats (%s)", _describe(exc))
            return rows
        gone = []
        for name, blob in zip(names, blobs, strict=False):
            if blob is None:
                gone.append(name.encode())
                continue
            try:
                row = messages.loads(blob)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        if gone:
            self._request_soon(b"SREM", self._nodes_key, *gone)
        return rows


def _entries(row: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """A node row's list of topic or user entries, skipping anything malformed."""
    value = row.get(name)
    if not isinstance(value, list):
        return []
    key = name[:-1]  # "topic" or "user"
    return [e for e in value if isinstance(e, dict) and isinstance(e.get(key), str)]


def _first(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause):
        text = f"{text}: {cause}"
    return text
