"""The broker: the one owner of topics, subscriptions, presence, counters and users.

Sans-io. Connections (any transport) implement `Peer`; the broker calls their `send`,
`deliver` and `close` and never awaits. In the daemon a single task (`run_broker` in
server.py) feeds it commands from a memory channel, so nothing else mutates its state;
tests drive it directly with fake peers.

A broadcast is encoded once per serializer (`Broadcast`) and the same bytes go to every
subscriber. Anything sent to every subscriber because one changed (presence diffs, the
status map) is coalesced per topic per `coalesce_ms`, so N joins cost O(N) messages.

No exception leaves the broker: a client command, one topic's coalesced flush or one
topic's re-check on reload that fails is logged once (with the topic and connection),
counted in `Stats.internal_errors`, and only that unit of work is skipped.

Client values the broker keeps beyond one command (presence meta values, history
entries) are kept as their JSON encoding (RawJSON), so each costs at most the size of the
frame it came in, never a multiple of it in Python objects.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from phxbroker.broker.presence import Presence
from phxbroker.broker.stats import Stats
from phxbroker.broker.topics import TopicRule, find_rule, render_template
from phxbroker.protocol import close_codes, messages
from phxbroker.protocol.messages import EncodeError, Message, RawJSON
from phxbroker.protocol.serializers import Serializer

log = logging.getLogger("phxbroker.broker")

# Topics nobody is subscribed to are kept for their counters and history (the status
# map's hits and msgs), at most this many: a client that joins, counts and leaves topic
# after topic cannot make the broker keep them all; the least recently left go first.
MAX_KEPT_TOPICS = 10_000

UNMATCHED = {"reason": "unmatched topic"}
UNAUTHORIZED = {"reason": "unauthorized"}
TOO_MANY = {"reason": "too many channels joined"}

# Close codes. 1001 makes phoenix.js reconnect (and authenticate anew), as Phoenix 1.8.8+
# does for a "disconnect" broadcast to the socket id.


class Broadcast:
    """One message for every subscriber of a topic, encoded at most once per serializer."""

    __slots__ = ("_encoded", "event", "frames", "payload", "topic")

    def __init__(self, topic: str, event: str, payload: Any) -> None:
        self.topic = topic
        self.event = event
        self.payload = payload
        self._encoded: dict[Serializer, tuple[bool, bytes] | None] = {}
        # Transports memoize their own framing of the encoded message here.
        self.frames: dict[Any, bytes] = {}

    def encoded(self, serializer: Serializer) -> tuple[bool, bytes] | None:
        """(is_binary, data) for this serializer, or None if it cannot carry the message."""
        try:
            return self._encoded[serializer]
        except KeyError:
            pass
        try:
            result: tuple[bool, bytes] | None = serializer.encode_broadcast(
                self.topic, self.event, self.payload
            )
        except EncodeError:
            result = None
        self._encoded[serializer] = result
        return result


class Peer(Protocol):
    """What the broker needs from a connection, whatever its transport."""

    id: int
    user: str | None
    serializer: Serializer
    transport: str
    remote: str
    channels: dict[str, Channel]  # owned by the broker

    def send(self, encoded: tuple[bool, bytes]) -> None:
        """Queue one encoded message for this connection only."""

    def deliver(self, broadcast: Broadcast) -> None:
        """Queue a broadcast, encoded for this connection's serializer."""

    def close(self, code: int, reason: str) -> None:
        """End the connection (the transport decides how)."""

    @property
    def open(self) -> bool:
        """False once the connection is closing: it still counts as joined until the
        transport disconnects it, but nothing sent to it arrives."""


class Channel:
    """One joined topic on one connection."""

    __slots__ = ("join_ref", "phx_ref", "topic")

    def __init__(self, topic: Topic, join_ref: Any) -> None:
        self.topic = topic
        self.join_ref = join_ref
        self.phx_ref: str | None = None  # presence meta tracked for this channel


class Topic:
    """A topic with at least one subscriber or some state worth keeping."""

    __slots__ = (
        "captures",
        "due",
        "history",
        "hits",
        "last_flush",
        "name",
        "presence",
        "rule",
        "status_dirty",
        "status_json",
        "subscribers",
        "user_sockets",
    )

    def __init__(self, name: str, rule: TopicRule, captures: dict[str, str]) -> None:
        self.name = name
        self.rule = rule
        self.captures = captures
        self.subscribers: dict[Peer, Channel] = {}
        self.presence: Presence | None = Presence() if rule.presence else None
        self.user_sockets: dict[str, int] = {}  # user -> subscribed sockets, in join order
        self.hits = 0
        self.history: deque[Any] = deque(maxlen=rule.history or None)
        self.status_dirty = False
        self.status_json: bytes | None = None  # the status map as last broadcast
        self.due = False  # a coalesced flush is scheduled
        self.last_flush = float("-inf")

    @property
    def idle(self) -> bool:
        """Nothing left worth keeping: no subscribers, counters, history or pending flush."""
        return (
            not self.subscribers
            and not self.hits
            and not self.history
            and not self.due
            and not (self.presence is not None and (self.presence or self.presence.dirty))
        )

    def status(self) -> dict[str, Any]:
        users = list(self.user_sockets)
        values = {
            "users": users,
            "user_count": len(users),
            "hits": self.hits,
            "msgs": list(self.history),
        }
        return {name: values[name] for name in self.rule.status_fields}


class Broker:
    """All shared state and every transition on it. Never awaits; never blocks."""

    def __init__(
        self,
        rules: Sequence[TopicRule] = (),
        stats: Stats | None = None,
        *,
        max_channels: int = 100,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.stats = stats or Stats()
        self.clock = clock
        self.wall_clock = wall_clock
        self.topics: dict[str, Topic] = {}
        # Topics without subscribers kept for their state, least recently left first.
        self.kept: dict[str, Topic] = {}
        self.peers: set[Peer] = set()
        self.users: dict[str, set[Peer]] = {}
        self._schedule: list[tuple[float, int, Topic]] = []
        self._seq = itertools.count()
        self.configure(rules, max_channels)

    # -- configuration -------------------------------------------------------------------

    def configure(self, rules: Sequence[TopicRule], max_channels: int) -> None:
        """Apply (new) topic rules and a channel limit without dropping connections.

        Joined channels are re-checked against the new rules: a topic no longer declared,
        or a user no longer allowed there, gets phx_close (phoenix.js does not rejoin); a
        topic whose presence setting changed gets phx_error, so clients rejoin under the
        new rule.
        """
        self.rules = tuple(rules)
        self.max_channels = max_channels
        for topic in list(self.topics.values()):
            try:
                self._reconfigure_topic(topic)
            except Exception:
                self._internal_error("re-checking a topic on reload", topic.name)

    def _reconfigure_topic(self, topic: Topic) -> None:
        found = find_rule(self.rules, topic.name)
        if found is None or found[0].presence != topic.rule.presence:
            event = messages.PHX_CLOSE if found is None else messages.PHX_ERROR
            for peer, channel in list(topic.subscribers.items()):
                self._end_channel(peer, channel, event)
            self._drop_topic(topic)
            return
        topic.rule, topic.captures = found
        topic.status_json = None
        if topic.history.maxlen != (topic.rule.history or None):
            topic.history = deque(topic.history, maxlen=topic.rule.history or None)
        for peer, channel in list(topic.subscribers.items()):
            if not topic.rule.join.allows(peer.user, topic.captures):
                self._end_channel(peer, channel, messages.PHX_CLOSE)

    # -- connections ---------------------------------------------------------------------

    def connect(self, peer: Peer) -> None:
        """Register a connection that passed authentication."""
        peer.channels = {}
        self.peers.add(peer)
        if peer.user is not None:
            self.users.setdefault(peer.user, set()).add(peer)

    def disconnect(self, peer: Peer) -> None:
        """Forget a connection and everything it joined (idempotent)."""
        if peer not in self.peers:
            return
        self.peers.discard(peer)
        for channel in list(peer.channels.values()):
            self._unsubscribe(peer, channel)
        if peer.user is not None:
            sockets = self.users.get(peer.user)
            if sockets is not None:
                sockets.discard(peer)
                if not sockets:
                    del self.users[peer.user]

    def handle(self, peer: Peer, msg: Message) -> None:
        """One client message, in the order the connection received it."""
        if peer not in self.peers:
            return  # closed while this message was queued
        self.stats.messages_in += 1
        try:
            if msg.event == messages.PHX_JOIN:
                self._join(peer, msg)
            elif msg.event == messages.PHX_LEAVE:
                self._leave(peer, msg)
            else:
                self._push(peer, msg)
        except Exception:
            self._internal_error(f"handling {_shown(msg.event)}", msg.topic, peer)

    # -- operations for the API and the CLI ----------------------------------------------

    def publish(self, topic: str, event: str, payload: Any) -> int:
        """Broadcast to a topic's subscribers; returns how many it reached (connections
        already closing are not counted: nothing more reaches them)."""
        t = self.topics.get(topic)
        if t is None or not t.subscribers:
            self.stats.broadcasts += 1
            return 0
        self._broadcast(t, Broadcast(topic, event, payload))
        return sum(1 for peer in t.subscribers if peer.open)

    def disconnect_user(
        self, user: str, code: int = close_codes.GOING_AWAY, reason: str = "disconnected"
    ) -> int:
        """Close every connection of a user, as Phoenix's "disconnect" broadcast does;
        returns how many were open (not closing already)."""
        peers = list(self.users.get(user, ()))
        closed = 0
        for peer in peers:
            closed += peer.open
            self.disconnect(peer)
            peer.close(code, reason)
        return closed

    def kick(self, user: str, topic: str) -> int:
        """Remove a user from one topic; each of its channels there gets phx_close."""
        t = self.topics.get(topic)
        if t is None:
            return 0
        kicked = [(p, c) for p, c in t.subscribers.items() if p.user == user]
        removed = 0
        for peer, channel in kicked:
            removed += peer.open
            self._end_channel(peer, channel, messages.PHX_CLOSE)
        return removed

    # -- time ----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When tick() next has coalesced work to flush, on the broker's clock."""
        return self._schedule[0][0] if self._schedule else None

    def tick(self) -> None:
        """Flush every topic whose coalescing interval has passed."""
        now = self.clock()
        while self._schedule and self._schedule[0][0] <= now:
            _, _, topic = heapq.heappop(self._schedule)
            if topic.due:
                topic.due = False
                self._flush_safely(topic, now)

    # -- protocol ------------------------------------------------------------------------

    def _join(self, peer: Peer, msg: Message) -> None:
        s = peer.serializer
        name = msg.topic
        found = None if name == messages.HEARTBEAT_TOPIC else find_rule(self.rules, name)
        if found is None:
            self.stats.join_errors += 1
            self._send(peer, s.encode_reply, None, msg.ref, name, "error", UNMATCHED)
            return
        rule, captures = found
        old = peer.channels.get(name)
        if old is None and len(peer.channels) >= self.max_channels:
            self.stats.join_errors += 1
            self.stats.count_refusal("too_many_channels")
            log.info(
                "refused join of %r by %s: %d channels joined already",
                name,
                peer,
                len(peer.channels),
            )
            self._send(peer, s.encode_reply, msg.join_ref, msg.ref, name, "error", TOO_MANY)
            return
        if not rule.join.allows(peer.user, captures):
            self.stats.join_errors += 1
            self.stats.count_refusal("join_unauthorized")
            self._send(peer, s.encode_reply, msg.join_ref, msg.ref, name, "error", UNAUTHORIZED)
            return
        if old is not None:
            # Duplicate join: Phoenix stops the old channel, joins anew, and only then
            # tells the client the old one closed.
            self._unsubscribe(peer, old)
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = Topic(name, rule, captures)
        elif not topic.subscribers:
            self.kept.pop(name, None)
        channel = Channel(topic, msg.join_ref)
        peer.channels[name] = channel
        topic.subscribers[peer] = channel
        self.stats.joins += 1

        variables = {
            "topic": name,
            "suffix": captures.get("suffix", ""),
            "user": peer.user or "",
            **captures,
        }
        response = render_template(rule.join_reply, variables) if rule.join_reply else {}
        self._send(peer, s.encode_reply, msg.join_ref, msg.ref, name, "ok", response)
        if old is not None:
            self._tell_ended(peer, old, messages.PHX_CLOSE)

        if peer.user is not None and rule.tracks_users:
            first = peer.user not in topic.user_sockets
            topic.user_sockets[peer.user] = topic.user_sockets.get(peer.user, 0) + 1
            if first:
                self._status_changed(topic, "users")
        if topic.presence is not None:
            self._track(peer, channel, msg.payload)
            self._push_raw(peer, channel, "presence_state", topic.presence.snapshot_json())
        if rule.status_event and rule.status_on_join:
            self._push_raw(peer, channel, rule.status_event, self._status_json(topic))

    def _leave(self, peer: Peer, msg: Message) -> None:
        s = peer.serializer
        channel = peer.channels.get(msg.topic)
        if channel is None:
            self._send(peer, s.encode_reply, msg.join_ref, msg.ref, msg.topic, "ok", {})
            return
        self._unsubscribe(peer, channel)
        self._send(peer, s.encode_reply, channel.join_ref, msg.ref, msg.topic, "ok", {})
        self._tell_ended(peer, channel, messages.PHX_CLOSE)

    def _push(self, peer: Peer, msg: Message) -> None:
        s = peer.serializer
        channel = peer.channels.get(msg.topic)
        if channel is None:
            self._send(peer, s.encode_reply, None, msg.ref, msg.topic, "error", UNMATCHED)
            return
        topic = channel.topic
        rule = topic.rule
        event = msg.event
        payload = msg.payload
        if event in rule.echo:
            self._send(peer, s.encode_reply, channel.join_ref, msg.ref, msg.topic, "ok", payload)
        elif event in rule.relay and self._relayable(rule, payload):
            if rule.relay_user_key and isinstance(payload, dict):
                payload = {**payload, rule.relay_user_key: peer.user}
            if rule.history and not isinstance(payload, bytes):
                # Kept encoded: a stored entry costs what its frame did (binary payloads
                # cannot be part of the JSON status map).
                payload = RawJSON(messages.dumps(payload))
                topic.history.append(payload)
                self._status_changed(topic, "msgs")
            self._broadcast(topic, Broadcast(msg.topic, event, payload))
            if rule.ack:
                self._send(peer, s.encode_reply, channel.join_ref, msg.ref, msg.topic, "ok", {})
        elif event in rule.count:
            topic.hits += 1
            self._status_changed(topic, "hits")
            if rule.ack:
                self._send(peer, s.encode_reply, channel.join_ref, msg.ref, msg.topic, "ok", {})
        elif event in rule.presence_update:
            self._update_presence(peer, channel, payload)
            if rule.ack:
                self._send(peer, s.encode_reply, channel.join_ref, msg.ref, msg.topic, "ok", {})
        elif rule.unhandled == "error":
            self._send(
                peer,
                s.encode_reply,
                channel.join_ref,
                msg.ref,
                msg.topic,
                "error",
                {"reason": f"unhandled event {event!r}"},
            )
        elif rule.unhandled == "crash":
            # What a Phoenix channel does when handle_in has no clause for the message.
            self._end_channel(peer, channel, messages.PHX_ERROR)

    @staticmethod
    def _relayable(rule: TopicRule, payload: Any) -> bool:
        # Subscribers only accept object payloads (phoenix.js reads payload fields), or
        # binary ones where the topic allows them.
        if isinstance(payload, bytes):
            return rule.relay_binary
        return isinstance(payload, dict)

    # -- subscriptions, presence and status ----------------------------------------------

    def _unsubscribe(self, peer: Peer, channel: Channel) -> None:
        topic = channel.topic
        if peer.channels.get(topic.name) is channel:
            del peer.channels[topic.name]
        if topic.subscribers.get(peer) is not channel:
            return
        del topic.subscribers[peer]
        self.stats.leaves += 1
        if channel.phx_ref is not None and topic.presence is not None:
            topic.presence.untrack(self._presence_key(peer), channel.phx_ref)
            self._presence_changed(topic)
        user = peer.user
        if user is not None and user in topic.user_sockets:
            left = topic.user_sockets[user] - 1
            if left:
                topic.user_sockets[user] = left
            else:
                del topic.user_sockets[user]
                self._status_changed(topic, "users")
        self._forget_if_idle(topic)

    def _end_channel(self, peer: Peer, channel: Channel, event: str) -> None:
        """Remove a channel and tell its client: phx_close (final) or phx_error (rejoin)."""
        self._unsubscribe(peer, channel)
        self._tell_ended(peer, channel, event)

    def _tell_ended(self, peer: Peer, channel: Channel, event: str) -> None:
        self._send(
            peer, peer.serializer.encode_control, channel.join_ref, channel.topic.name, event, {}
        )

    def _forget_if_idle(self, topic: Topic) -> None:
        if self.topics.get(topic.name) is not topic or topic.subscribers:
            return
        if topic.idle:
            self._drop_topic(topic)
            return
        self.kept.pop(topic.name, None)  # now the most recently left
        self.kept[topic.name] = topic
        while len(self.kept) > MAX_KEPT_TOPICS:
            self._drop_topic(next(iter(self.kept.values())))

    def _drop_topic(self, topic: Topic) -> None:
        """Forget a topic (its subscribers, if any, are already gone)."""
        if self.topics.get(topic.name) is topic:
            del self.topics[topic.name]
        if self.kept.get(topic.name) is topic:
            del self.kept[topic.name]
        topic.due = False  # a flush still scheduled for it finds nothing to do

    @staticmethod
    def _presence_key(peer: Peer) -> str:
        return peer.user if peer.user is not None else f"anonymous:{peer.id}"

    def _track(self, peer: Peer, channel: Channel, params: Any) -> None:
        topic = channel.topic
        assert topic.presence is not None
        meta: dict[str, Any] = {"online_at": str(int(self.wall_clock()))}
        if isinstance(params, dict):
            for key in topic.rule.presence_meta:
                if key in params:
                    meta[key] = RawJSON(messages.dumps(params[key]))  # see the module doc
        channel.phx_ref = topic.presence.track(self._presence_key(peer), meta)["phx_ref"]
        self._presence_changed(topic)

    def _update_presence(self, peer: Peer, channel: Channel, payload: Any) -> None:
        topic = channel.topic
        if topic.presence is None or channel.phx_ref is None or not isinstance(payload, dict):
            return
        changes = {
            k: RawJSON(messages.dumps(payload[k])) for k in topic.rule.presence_meta if k in payload
        }
        meta = topic.presence.update(self._presence_key(peer), channel.phx_ref, changes)
        if meta is not None:
            channel.phx_ref = meta["phx_ref"]
            self._presence_changed(topic)

    def _presence_changed(self, topic: Topic) -> None:
        self._schedule_flush(topic)

    def _status_changed(self, topic: Topic, field: str) -> None:
        # "users" also stands for user_count, which changes with it.
        fields = topic.rule.status_fields
        if topic.rule.status_event and (
            field in fields or (field == "users" and "user_count" in fields)
        ):
            topic.status_dirty = True
            self._schedule_flush(topic)

    def _schedule_flush(self, topic: Topic) -> None:
        if topic.due:
            return
        interval = topic.rule.coalesce_ms / 1000
        now = self.clock()
        if interval == 0:
            self._flush_safely(topic, now)
            return
        # Leading edge: a change after a quiet interval goes out with the current batch.
        due = max(now, topic.last_flush + interval)
        topic.due = True
        heapq.heappush(self._schedule, (due, next(self._seq), topic))

    def _flush_safely(self, topic: Topic, now: float) -> None:
        """Flush one topic; if that fails, its pending diff and status change are dropped
        (its subscribers miss one update) and the broker carries on."""
        try:
            self._flush_topic(topic, now)
        except Exception:
            self._internal_error("flushing presence and status", topic.name)
            topic.last_flush = now
            topic.status_dirty = False
            topic.status_json = None
            if topic.presence is not None:
                topic.presence.take_diff()
            self._forget_if_idle(topic)

    def _internal_error(self, what: str, topic: str, peer: Peer | None = None) -> None:
        """Log (once, with the traceback) and count a failure the broker survived."""
        self.stats.internal_errors += 1
        log.exception(
            "internal error %s on topic %s%s; skipped",
            what,
            _shown(topic),
            "" if peer is None else f" for connection {peer.id}",
        )

    def _flush_topic(self, topic: Topic, now: float) -> None:
        topic.last_flush = now
        if topic.presence is not None and topic.presence.dirty:
            diff = topic.presence.take_diff()
            if topic.subscribers:
                self._broadcast(topic, Broadcast(topic.name, "presence_diff", diff))
        if topic.status_dirty:
            topic.status_dirty = False
            topic.status_json = None
            if topic.subscribers:
                self._broadcast_raw(topic, topic.rule.status_event, self._status_json(topic))
        self._forget_if_idle(topic)

    def _status_json(self, topic: Topic) -> bytes:
        if topic.status_json is None:
            topic.status_json = messages.dumps(topic.status())
        return topic.status_json

    # -- sending -------------------------------------------------------------------------

    def _broadcast(self, topic: Topic, broadcast: Broadcast) -> int:
        subscribers = topic.subscribers
        for peer in subscribers:
            peer.deliver(broadcast)
        self.stats.broadcasts += 1
        self.stats.deliveries += len(subscribers)
        return len(subscribers)

    def _broadcast_raw(self, topic: Topic, event: str, payload_json: bytes) -> int:
        return self._broadcast(topic, Broadcast(topic.name, event, RawJSON(payload_json)))

    def _push_raw(self, peer: Peer, channel: Channel, event: str, payload_json: bytes) -> None:
        self._send(
            peer,
            peer.serializer.encode_push,
            channel.join_ref,
            channel.topic.name,
            event,
            RawJSON(payload_json),
        )

    def _send(self, peer: Peer, encode: Callable[..., tuple[bool, bytes]], *args: Any) -> None:
        try:
            encoded = encode(*args)
        except EncodeError as exc:
            log.warning("cannot send to connection %s: %s", peer.id, exc)
            return
        peer.send(encoded)

    # -- inspection ----------------------------------------------------------------------

    def topic_summary(self) -> list[dict[str, Any]]:
        return [
            {
                "topic": t.name,
                "subscribers": len(t.subscribers),
                "users": len(t.user_sockets),
                "presences": len(t.presence) if t.presence is not None else None,
                "hits": t.hits,
            }
            for t in self.topics.values()
        ]

    def user_summary(self) -> list[dict[str, Any]]:
        return [
            {
                "user": user,
                "connections": len(peers),
                "topics": sorted({name for p in peers for name in p.channels}),
            }
            for user, peers in self.users.items()
        ]


def _shown(text: str, limit: int = 100) -> str:
    """A client-chosen name for a log line: quoted, and cut if it is long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
