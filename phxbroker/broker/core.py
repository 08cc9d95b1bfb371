"""The broker: the one owner of topics, subscriptions, presence, counters and users.

Sans-io. Connections (any transport) implement `Peer`; the broker calls their `send`,
`deliver` and `close` and never awaits. In the daemon a single task (`BrokerTask` in
daemon/runtime.py) feeds it commands from a memory channel, so nothing else mutates its
state; tests drive it directly with fake peers.

A broadcast is encoded once per serializer (`Broadcast`) and the same bytes go to every
subscriber. Anything sent to every subscriber because one changed (presence diffs, the
status map) is coalesced per topic per `coalesce_ms`, so N joins cost O(N) messages.

Two seams reach beyond this process:

* every message broadcast (a relayed push, the API, the CLI), every disconnect of a user
  and every presence change takes one path each (`publish`, `disconnect_user`,
  `_presence_changed`), which also tells the broker's `Fanout`: nobody by default, the
  other nodes of a cluster when there are some;
* a channel may wait for an answer from outside (the app's back end): `defer` holds its
  later messages, in order, while the broker serves everyone else, and `resume` hands
  them on once the answer has been applied.

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
from dataclasses import dataclass
from typing import Any, Protocol

from phxbroker.broker.activity import ActivityLog
from phxbroker.broker.outside import UNAVAILABLE, EventAnswer, JoinAnswer, Publish
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
TOO_MANY_WAITING = {"reason": "too many messages waiting for the app"}
NO_BINARY = {"reason": "binary payloads are not sent to the app"}
# Messages one channel may have waiting behind an answer from the app's back end.
MAX_HELD = 100


class Broadcast:
    """One message for every subscriber of a topic, encoded at most once per serializer."""

    __slots__ = ("_encoded", "event", "frames", "payload", "relayed", "topic")

    def __init__(self, topic: str, event: str, payload: Any) -> None:
        self.topic = topic
        self.event = event
        self.payload = payload
        self.relayed = False  # a client's push relayed to the topic (it joins the history)
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
    assigns: dict[str, Any] | None  # the socket's assigns, from the app's connect hook

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


class Fanout(Protocol):
    """Where broadcasts, disconnects and presence changes go beyond this process."""

    def broadcast(self, broadcast: Broadcast) -> None:
        """A message broadcast this broker has just delivered to its own subscribers."""

    def disconnect_user(self, user: str, code: int, reason: str) -> None:
        """A user's connections were closed here; close them everywhere."""

    def kick(self, user: str, topic: str) -> None:
        """A user was removed from a topic here; remove it everywhere."""

    def presence_changed(
        self,
        topic: str,
        key: str,
        joined: dict[str, Any] | None,
        left: dict[str, Any] | None,
    ) -> None:
        """A presence meta was tracked (`joined`), untracked (`left`) or replaced (both)."""

    def interest(self, peer: Peer, topic: str) -> bool:
        """Whether broadcasts published elsewhere for `topic` reach this process already.
        If not, the broker holds `peer`'s join (`hold`) and the fanout calls `resume`
        once they do, so a client's join reply never comes before that."""

    def users_changed(self, topic: str, user: str, present: bool) -> None:
        """A user's first socket joined a topic that lists its users, or its last one left."""

    def counted(self, topic: str, hits: int) -> None:
        """A topic's `count` events counted here reached `hits`."""


class LocalOnly:
    """The fanout of a broker that is the only one: nothing leaves the process."""

    def broadcast(self, broadcast: Broadcast) -> None:
        pass

    def disconnect_user(self, user: str, code: int, reason: str) -> None:
        pass

    def kick(self, user: str, topic: str) -> None:
        pass

    def presence_changed(
        self,
        topic: str,
        key: str,
        joined: dict[str, Any] | None,
        left: dict[str, Any] | None,
    ) -> None:
        pass

    def interest(self, peer: Peer, topic: str) -> bool:
        return True

    def users_changed(self, topic: str, user: str, present: bool) -> None:
        pass

    def counted(self, topic: str, hits: int) -> None:
        pass


@dataclass(slots=True, eq=False)
class Question:
    """A join (`channel` None) or a client event waiting for the back end's answer."""

    kind: str  # "join" | "event"
    peer: Peer
    msg: Message
    channel: Channel | None = None

    @property
    def topic(self) -> str:
        return str(self.msg.topic)  # a string already: only a string topic can be joined


class Outside(Protocol):
    """Who answers the broker's questions (the back-end hooks). Called in the broker task:
    it must not block; the answer comes back later through `Broker.answer`."""

    def ask(self, question: Question) -> None: ...

    def lifecycle(self, kind: str, topic: str | None, peer: Peer) -> None:
        """A join, leave, disconnect, occupied or vacated event, for the back end to hear."""
        ...


class Channel:
    """One joined topic on one connection, joined by a message with `join_ref` and `ref`."""

    __slots__ = ("assigns", "join_ref", "joined_with", "phx_ref", "topic")

    def __init__(
        self,
        topic: Topic,
        join_ref: Any,
        assigns: dict[str, Any] | None = None,
        *,
        ref: Any = None,
    ) -> None:
        self.topic = topic
        # The join_ref the join message carried, as Phoenix's socket keeps it: later messages
        # must carry it too, and phx_close / phx_error are stamped with it. None (V1 clients
        # send none) lets every message through.
        self.joined_with = join_ref
        # What the channel stamps its replies and pushes with: Phoenix's `join_ref || ref`.
        self.join_ref = ref if join_ref is None or join_ref is False else join_ref
        self.phx_ref: str | None = None  # presence meta tracked for this channel
        self.assigns = assigns  # the channel's assigns, from the app's join and event hooks

    def accepts(self, join_ref: Any) -> bool:
        """Whether a message carrying `join_ref` is for this channel. Phoenix 1.8 drops the
        others unanswered: they were meant for an earlier join of the topic (the client
        raced a close or a rejoin)."""
        mine = self.joined_with
        return mine is None or (join_ref == mine and type(join_ref) is type(mine))


class Topic:
    """A topic with at least one subscriber or some state worth keeping."""

    __slots__ = (
        "captures",
        "due",
        "history",
        "hits",
        "hits_elsewhere",
        "last_flush",
        "name",
        "presence",
        "remote_users",
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
        self.hits = 0  # counted here
        self.hits_elsewhere = 0  # counted by other nodes of a cluster
        self.remote_users: dict[str, int] = {}  # user -> other nodes where it is subscribed
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
            and not self.hits_elsewhere
            and not self.remote_users
            and not self.history
            and not self.due
            and not (self.presence is not None and (self.presence or self.presence.dirty))
        )

    def status(self) -> dict[str, Any]:
        users = list(self.user_sockets)
        users.extend(u for u in self.remote_users if u not in self.user_sockets)
        values = {
            "users": users,
            "user_count": len(users),
            "hits": self.hits + self.hits_elsewhere,
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
        self.fanout: Fanout = LocalOnly()
        self.outside: Outside | None = None  # the app's back end, when hooks are configured
        # Messages held, per connection and topic, while a channel waits for an answer.
        self._held: dict[Peer, dict[str, deque[Message]]] = {}
        # Connect, join and leave lines; transports report their connects here too.
        self.activity = ActivityLog(clock)
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
        self._held.pop(peer, None)
        self.activity.disconnected(peer, len(peer.channels))
        for channel in list(peer.channels.values()):
            self._unsubscribe(peer, channel)
        if self.outside is not None:
            self.outside.lifecycle("disconnect", None, peer)
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
        held = self._held.get(peer)
        if held is not None and isinstance(msg.topic, str) and msg.topic in held:
            queue = held[msg.topic]
            if len(queue) >= MAX_HELD:
                self.stats.count_refusal("too_many_waiting")
                self._send(
                    peer,
                    peer.serializer.encode_reply,
                    msg.join_ref,
                    msg.ref,
                    msg.topic,
                    "error",
                    TOO_MANY_WAITING,
                )
                return
            queue.append(msg)  # its channel waits for an answer: keep the order
            return
        self._dispatch(peer, msg)

    def _dispatch(self, peer: Peer, msg: Message) -> None:
        try:
            if msg.event == messages.PHX_JOIN:
                self._join(peer, msg)
            elif msg.event == messages.PHX_LEAVE:
                self._leave(peer, msg)
            else:
                self._push(peer, msg)
        except Exception:
            self._internal_error(f"handling {_shown(msg.event)}", msg.topic, peer)

    # -- channels waiting for an answer from outside ------------------------------------

    def defer(self, peer: Peer, topic: str) -> None:
        """Hold `peer`'s next messages for `topic` until `resume`: its channel (or its join)
        waits for an answer from outside while the broker goes on with everyone else."""
        self._held.setdefault(peer, {}).setdefault(topic, deque())

    def hold(self, peer: Peer, msg: Message) -> None:
        """Hold `msg` itself, and `peer`'s later messages for its topic, until `resume`
        (which handles `msg` first)."""
        self._held.setdefault(peer, {}).setdefault(msg.topic, deque()).appendleft(msg)

    def waiting(self, peer: Peer, topic: str) -> bool:
        """Whether `peer`'s channel for `topic` waits for an answer."""
        return topic in self._held.get(peer, ())

    def resume(self, peer: Peer, topic: str) -> None:
        """The answer came and was applied: handle the held messages in order, until one
        of them makes the channel wait again (the rest stay held behind it)."""
        held_by_peer = self._held.get(peer)
        if held_by_peer is None or topic not in held_by_peer:
            return
        queue = held_by_peer.pop(topic)
        while queue:
            self._dispatch(peer, queue.popleft())
            if self.waiting(peer, topic):
                self._held[peer][topic].extend(queue)
                return
        if not held_by_peer:
            self._held.pop(peer, None)

    # -- answers from the app's back end -----------------------------------------------

    def answer(self, question: Question, answer: JoinAnswer | EventAnswer | None) -> None:
        """Apply the back end's answer to a join or an event (None: no usable answer came),
        then hand on what the channel's wait held back."""
        peer = question.peer
        try:
            if peer in self.peers:
                if question.kind == "join":
                    assert answer is None or isinstance(answer, JoinAnswer)
                    self._answer_join(question, answer)
                else:
                    assert answer is None or isinstance(answer, EventAnswer)
                    self._answer_event(question, answer)
            elif isinstance(answer, EventAnswer):
                # The client has gone, but the back end acted: the others still hear of it.
                for publish in answer.broadcasts:
                    self._publish_answered(question.topic, publish, None)
        finally:
            self.resume(peer, question.topic)

    def _answer_join(self, question: Question, answer: JoinAnswer | None) -> None:
        peer, msg = question.peer, question.msg
        name = msg.topic
        s = peer.serializer
        started = time.perf_counter()
        found = find_rule(self.rules, name)  # a reload may have come in between
        if answer is None or not answer.ok or found is None:
            self.stats.join_errors += 1
            if found is None:
                response, why = UNMATCHED, "no [[topics]] pattern matches it any more"
            elif answer is None:
                self.stats.count_refusal("app_unavailable")
                response, why = UNAVAILABLE, "the app's back end did not answer"
            else:
                self.stats.count_refusal("join_refused_by_app")
                response, why = answer.response, "the app's back end refused it"
            self._send(peer, s.encode_reply, msg.join_ref, msg.ref, name, "error", response)
            self.activity.join_refused(peer, name, why, started)
            return
        rule, captures = found
        if name not in peer.channels and len(peer.channels) >= self.max_channels:
            self.stats.join_errors += 1
            self.stats.count_refusal("too_many_channels")
            self._send(peer, s.encode_reply, msg.join_ref, msg.ref, name, "error", TOO_MANY)
            return
        channel = self._subscribe(
            peer,
            msg,
            rule,
            captures,
            answer.response,
            started=started,
            assigns=answer.assigns,
            presence_meta=answer.presence_meta,
        )
        for push in answer.pushes:
            self._send(peer, s.encode_push, channel.join_ref, name, push.event, push.payload)
        for publish in answer.broadcasts:
            self._publish_answered(name, publish, peer)

    def _answer_event(self, question: Question, answer: EventAnswer | None) -> None:
        peer, msg, channel = question.peer, question.msg, question.channel
        assert channel is not None
        name = msg.topic
        s = peer.serializer
        live = peer.channels.get(name) is channel  # not left, kicked or rejoined meanwhile
        if answer is None:
            self.stats.count_refusal("app_unavailable")
            if live:
                reply = s.encode_reply
                self._send(peer, reply, channel.join_ref, msg.ref, name, "error", UNAVAILABLE)
            return
        if live:
            if answer.assigns is not None:
                channel.assigns = answer.assigns
            for push in answer.pushes:
                self._send(peer, s.encode_push, channel.join_ref, name, push.event, push.payload)
        # Phoenix's broadcast! leaves before handle_in's reply, from the same process.
        for publish in answer.broadcasts:
            self._publish_answered(name, publish, peer)
        if live and answer.reply is not None:
            status, response = answer.reply
            self._send(peer, s.encode_reply, channel.join_ref, msg.ref, name, status, response)
        if live and answer.stop is not None:
            ended = messages.PHX_CLOSE if answer.stop == "close" else messages.PHX_ERROR
            self._end_channel(peer, channel, ended)
        if answer.disconnect:
            self.disconnect(peer)
            peer.close(close_codes.GOING_AWAY, "disconnected by the app")

    def _publish_answered(self, topic: str, publish: Publish, sender: Peer | None) -> None:
        """A broadcast an answer asked for: to the channel's topic or another one, from
        everyone (`broadcast!`) or but the sender (`broadcast_from!`)."""
        broadcast = Broadcast(publish.topic or topic, publish.event, publish.payload)
        self._publish(broadcast, except_peer=sender if publish.except_self else None)

    # -- operations for the API and the CLI ----------------------------------------------

    def publish(self, topic: str, event: str, payload: Any) -> int:
        """Broadcast to a topic's subscribers, here and (through the fanout) on every other
        node; returns how many it reached here (connections already closing are not
        counted: nothing more reaches them)."""
        self._publish(Broadcast(topic, event, payload))
        t = self.topics.get(topic)
        return 0 if t is None else sum(1 for peer in t.subscribers if peer.open)

    def _publish(self, broadcast: Broadcast, except_peer: Peer | None = None) -> int:
        t = self.topics.get(broadcast.topic)
        if t is None or not t.subscribers:
            self.stats.broadcasts += 1
            reached = 0
        else:
            reached = self._broadcast(t, broadcast, except_peer)
        self.fanout.broadcast(broadcast)
        return reached

    def disconnect_user(
        self, user: str, code: int = close_codes.GOING_AWAY, reason: str = "disconnected"
    ) -> int:
        """Close every connection of a user, as Phoenix's "disconnect" broadcast does, here
        and on every other node; returns how many were open here (not closing already)."""
        closed = self.disconnect_user_here(user, code, reason)
        self.fanout.disconnect_user(user, code, reason)
        return closed

    def disconnect_user_here(self, user: str, code: int, reason: str) -> int:
        """Close a user's connections on this node only; how many were open."""
        peers = list(self.users.get(user, ()))
        closed = 0
        for peer in peers:
            closed += peer.open
            self.disconnect(peer)
            peer.close(code, reason)
        return closed

    def kick(self, user: str, topic: str) -> int:
        """Remove a user from one topic, here and on every other node; each of its channels
        gets phx_close. Returns how many channels were closed here."""
        self.fanout.kick(user, topic)
        return self.kick_here(user, topic)

    def kick_here(self, user: str, topic: str) -> int:
        """Remove a user from one topic on this node only; how many channels were closed."""
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
        """When tick() next has coalesced work to flush (or a log summary to write), on the
        broker's clock."""
        due = self._schedule[0][0] if self._schedule else None
        summary = self.activity.next_deadline()
        if summary is None:
            return due
        return summary if due is None else min(due, summary)

    def tick(self) -> None:
        """Flush every topic whose coalescing interval has passed."""
        now = self.clock()
        self.activity.tick(now)
        while self._schedule and self._schedule[0][0] <= now:
            _, _, topic = heapq.heappop(self._schedule)
            if topic.due:
                topic.due = False
                self._flush_safely(topic, now)

    # -- protocol ------------------------------------------------------------------------

    def _join(self, peer: Peer, msg: Message) -> None:
        started = time.perf_counter()
        s = peer.serializer
        name = msg.topic
        joinable = isinstance(name, str) and name != messages.HEARTBEAT_TOPIC
        found = find_rule(self.rules, name) if joinable else None
        if found is None:
            self.stats.join_errors += 1
            self._send(peer, s.encode_reply, None, msg.ref, name, "error", UNMATCHED)
            self.activity.join_refused(peer, name, "no [[topics]] pattern matches it", started)
            return
        rule, captures = found
        old = peer.channels.get(name)
        if old is None and len(peer.channels) >= self.max_channels:
            self.stats.join_errors += 1
            self.stats.count_refusal("too_many_channels")
            self._send(peer, s.encode_reply, msg.join_ref, msg.ref, name, "error", TOO_MANY)
            self.activity.join_refused(
                peer,
                name,
                f"{len(peer.channels)} channels joined already ([server] max_channels)",
                started,
            )
            return
        if not rule.join.allows(peer.user, captures):
            self.stats.join_errors += 1
            self.stats.count_refusal("join_unauthorized")
            self._send(peer, s.encode_reply, msg.join_ref, msg.ref, name, "error", UNAUTHORIZED)
            self.activity.join_refused(
                peer,
                name,
                f'[[topics]] pattern "{rule.pattern.text}" has {rule.join.describe()}: '
                + rule.join.refusal(peer.user, captures),
                started,
            )
            return
        if old is None and not self.fanout.interest(peer, name):
            self.hold(peer, msg)  # until broadcasts from other nodes reach this one
            return
        if rule.join.kind == "hook" and self.outside is not None:
            # The app's back end decides (join/3); this topic's later messages wait.
            self.defer(peer, name)
            self.outside.ask(Question("join", peer, msg))
            return
        response: Any = {}
        if rule.join_reply:
            variables = {
                "topic": name,
                "suffix": captures.get("suffix", ""),
                "user": peer.user or "",
                **captures,
            }
            response = render_template(rule.join_reply, variables)
        self._subscribe(peer, msg, rule, captures, response, started=started)

    def _subscribe(
        self,
        peer: Peer,
        msg: Message,
        rule: TopicRule,
        captures: dict[str, str],
        response: Any,
        *,
        started: float,
        assigns: dict[str, Any] | None = None,
        presence_meta: dict[str, Any] | None = None,
    ) -> Channel:
        """Join `peer` to `msg.topic`: subscribe, reply ok with `response`, then what a
        joiner gets (presence state, the status map)."""
        s = peer.serializer
        name = msg.topic
        old = peer.channels.get(name)
        if old is not None:
            # Duplicate join: Phoenix stops the old channel, joins anew, and only then
            # tells the client the old one closed.
            self._unsubscribe(peer, old)
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = Topic(name, rule, captures)
        elif not topic.subscribers:
            self.kept.pop(name, None)
        occupied = not topic.subscribers
        channel = Channel(topic, msg.join_ref, assigns, ref=msg.ref)
        peer.channels[name] = channel
        topic.subscribers[peer] = channel
        self.stats.joins += 1
        self._send(peer, s.encode_reply, msg.join_ref, msg.ref, name, "ok", response)
        if old is not None:
            self._tell_ended(peer, old, messages.PHX_CLOSE)

        status_follows = False
        if peer.user is not None and rule.tracks_users:
            first = peer.user not in topic.user_sockets
            topic.user_sockets[peer.user] = topic.user_sockets.get(peer.user, 0) + 1
            if first:
                status_follows = self._status_changed(topic, "users")
                if rule.status_event:
                    self.fanout.users_changed(name, peer.user, True)
        if topic.presence is not None:
            self._track(peer, channel, msg.payload, presence_meta)
            self._push_raw(peer, channel, "presence_state", topic.presence.snapshot_json())
        # A joiner is a subscriber already: when its join changed the status map (or a change
        # is pending), the broadcast that follows reaches it, so it gets the map once, as
        # from a Phoenix channel that broadcasts on join.
        if rule.status_event and rule.status_on_join and not (status_follows or topic.status_dirty):
            self._push_raw(peer, channel, rule.status_event, self._status_json(topic))
        self.activity.joined(peer, name, msg.payload, started)
        if self.outside is not None:
            if occupied:
                self.outside.lifecycle("occupied", name, peer)
            self.outside.lifecycle("join", name, peer)
        return channel

    def _leave(self, peer: Peer, msg: Message) -> None:
        s = peer.serializer
        channel = _channel_of(peer, msg.topic)
        if channel is None:
            self._send(peer, s.encode_reply, msg.join_ref, msg.ref, msg.topic, "ok", {})
            return
        if not channel.accepts(msg.join_ref):
            # Phoenix: "the client has raced a server close"; the channel stays, unanswered.
            return
        self._unsubscribe(peer, channel)
        self._send(peer, s.encode_reply, channel.join_ref, msg.ref, msg.topic, "ok", {})
        self._tell_ended(peer, channel, messages.PHX_CLOSE)
        self.activity.left(peer, msg.topic)

    def _push(self, peer: Peer, msg: Message) -> None:
        s = peer.serializer
        reply = s.encode_reply
        channel = _channel_of(peer, msg.topic)
        if channel is None:
            self._send(peer, s.encode_reply, None, msg.ref, msg.topic, "error", UNMATCHED)
            return
        if not channel.accepts(msg.join_ref):
            return  # for an earlier join of the topic: dropped, as Phoenix 1.8 does
        topic = channel.topic
        rule = topic.rule
        event = msg.event
        payload = msg.payload
        if not isinstance(event, str):
            # No event a topic names, nor one for the app, is anything but a string.
            self._unhandled(peer, channel, msg)
        elif rule.hook_events and self.outside is not None and rule.hooks(event):
            if isinstance(payload, bytes):
                self._send(peer, reply, channel.join_ref, msg.ref, msg.topic, "error", NO_BINARY)
                return
            # The app's back end handles it (handle_in/3); the channel's later messages wait.
            self.defer(peer, msg.topic)
            self.outside.ask(Question("event", peer, msg, channel))
        elif event in rule.echo:
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
            relayed = Broadcast(msg.topic, event, payload)
            relayed.relayed = True
            self._publish(relayed)
            if rule.ack:
                self._send(peer, s.encode_reply, channel.join_ref, msg.ref, msg.topic, "ok", {})
        elif event in rule.count:
            topic.hits += 1
            self._status_changed(topic, "hits")
            self.fanout.counted(topic.name, topic.hits)
            if rule.ack:
                self._send(peer, s.encode_reply, channel.join_ref, msg.ref, msg.topic, "ok", {})
        elif event in rule.presence_update:
            self._update_presence(peer, channel, payload)
            if rule.ack:
                self._send(peer, s.encode_reply, channel.join_ref, msg.ref, msg.topic, "ok", {})
        else:
            self._unhandled(peer, channel, msg)

    def _unhandled(self, peer: Peer, channel: Channel, msg: Message) -> None:
        """An event the topic has no rule for: what its `unhandled` setting says."""
        rule = channel.topic.rule
        if rule.unhandled == "error":
            self._send(
                peer,
                peer.serializer.encode_reply,
                channel.join_ref,
                msg.ref,
                msg.topic,
                "error",
                {"reason": f"unhandled event {msg.event!r}"},
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
        if self.outside is not None:
            self.outside.lifecycle("leave", topic.name, peer)
            if not topic.subscribers:
                self.outside.lifecycle("vacated", topic.name, peer)
        if channel.phx_ref is not None and topic.presence is not None:
            key = self._presence_key(peer)
            untracked = topic.presence.untrack(key, channel.phx_ref)
            self._presence_changed(topic, key, None, untracked)
        user = peer.user
        if user is not None and user in topic.user_sockets:
            left = topic.user_sockets[user] - 1
            if left:
                topic.user_sockets[user] = left
            else:
                del topic.user_sockets[user]
                self._status_changed(topic, "users")
                if topic.rule.status_event:
                    self.fanout.users_changed(topic.name, user, False)
        self._forget_if_idle(topic)

    def _end_channel(self, peer: Peer, channel: Channel, event: str) -> None:
        """Remove a channel and tell its client: phx_close (final) or phx_error (rejoin)."""
        self._unsubscribe(peer, channel)
        self._tell_ended(peer, channel, event)

    def _tell_ended(self, peer: Peer, channel: Channel, event: str) -> None:
        self._send(
            peer, peer.serializer.encode_control, channel.joined_with, channel.topic.name, event, {}
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

    def _track(
        self, peer: Peer, channel: Channel, params: Any, given: dict[str, Any] | None = None
    ) -> None:
        """Track the channel's presence: `online_at` plus the configured `presence_meta`
        keys of the join params, or the meta the app's join hook gave."""
        topic = channel.topic
        assert topic.presence is not None
        meta: dict[str, Any] = {"online_at": str(int(self.wall_clock()))}
        if given is not None:
            meta.update(given)
        elif isinstance(params, dict):
            for key in topic.rule.presence_meta:
                if key in params:
                    meta[key] = RawJSON(messages.dumps(params[key]))  # see the module doc
        key = self._presence_key(peer)
        joined = topic.presence.track(key, meta)
        channel.phx_ref = joined["phx_ref"]
        self._presence_changed(topic, key, joined, None)

    def _update_presence(self, peer: Peer, channel: Channel, payload: Any) -> None:
        topic = channel.topic
        if topic.presence is None or channel.phx_ref is None or not isinstance(payload, dict):
            return
        changes = {
            k: RawJSON(messages.dumps(payload[k])) for k in topic.rule.presence_meta if k in payload
        }
        key = self._presence_key(peer)
        old = topic.presence.metas.get(key, {}).get(channel.phx_ref)
        meta = topic.presence.update(key, channel.phx_ref, changes)
        if meta is not None:
            channel.phx_ref = meta["phx_ref"]
            self._presence_changed(topic, key, meta, old)

    def _presence_changed(
        self,
        topic: Topic,
        key: str,
        joined: dict[str, Any] | None,
        left: dict[str, Any] | None,
    ) -> None:
        """The one path of every presence change: a diff for this node's subscribers soon,
        and word to the other nodes now."""
        self._schedule_flush(topic)
        self.fanout.presence_changed(topic.name, key, joined, left)

    def _status_changed(self, topic: Topic, field: str) -> bool:
        """Mark the status map changed; True when that means a status broadcast (sent now,
        or due within coalesce_ms)."""
        # "users" also stands for user_count, which changes with it.
        fields = topic.rule.status_fields
        if topic.rule.status_event and (
            field in fields or (field == "users" and "user_count" in fields)
        ):
            topic.status_dirty = True
            self._schedule_flush(topic)
            return True
        return False

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

    def _internal_error(self, what: str, topic: Any, peer: Peer | None = None) -> None:
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

    def _broadcast(
        self, topic: Topic, broadcast: Broadcast, except_peer: Peer | None = None
    ) -> int:
        subscribers = topic.subscribers
        if except_peer is not None and except_peer in subscribers:
            reached = 0
            for peer in subscribers:
                if peer is not except_peer:
                    peer.deliver(broadcast)
                    reached += 1
        else:
            for peer in subscribers:
                peer.deliver(broadcast)
            reached = len(subscribers)
        self.stats.broadcasts += 1
        self.stats.deliveries += reached
        return reached

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

    # -- what other nodes of a cluster tell this one --------------------------------------

    def deliver(self, broadcast: Broadcast) -> int:
        """A broadcast published on another node, for this node's subscribers only (a
        client's relayed push also joins the topic's history); how many it reached."""
        topic = self.topics.get(broadcast.topic)
        if topic is None:
            return 0
        if broadcast.relayed and topic.rule.history and not isinstance(broadcast.payload, bytes):
            topic.history.append(broadcast.payload)
            self._status_changed(topic, "msgs")
        if not topic.subscribers:
            return 0
        return self._broadcast(topic, broadcast)

    def merge_presence(
        self,
        changes: Sequence[tuple[str, str, dict[str, Any] | None, dict[str, Any] | None]],
    ) -> None:
        """Presence metas other nodes own, as (topic, key, joined, left): they join this
        node's view of each topic, so joiners here get them in presence_state and
        subscribers here get their joins and leaves in the coalesced presence_diff."""
        for name, key, joined, left in changes:
            topic = self._topic_for_others(name)
            if topic is None or topic.presence is None:
                continue
            if left is not None:
                topic.presence.untrack(key, left["phx_ref"])
            if joined is not None:
                topic.presence.insert(key, joined)
            self._schedule_flush(topic)

    def merge_users(self, name: str, user: str, delta: int) -> None:
        """One more (+1) or one fewer (-1) other node where `user` is on topic `name`."""
        topic = self._topic_for_others(name)
        if topic is None:
            return
        listed = user in topic.user_sockets or user in topic.remote_users
        count = topic.remote_users.get(user, 0) + delta
        if count > 0:
            topic.remote_users[user] = count
        else:
            topic.remote_users.pop(user, None)
        if listed != (user in topic.user_sockets or user in topic.remote_users):
            self._status_changed(topic, "users")
        self._forget_if_idle(topic)

    def merge_hits(self, name: str, hits_elsewhere: int) -> None:
        """The hits other nodes counted on topic `name`, all together."""
        topic = self._topic_for_others(name)
        if topic is None or topic.hits_elsewhere == hits_elsewhere:
            return
        topic.hits_elsewhere = hits_elsewhere
        self._status_changed(topic, "hits")
        self._forget_if_idle(topic)

    def _topic_for_others(self, name: str) -> Topic | None:
        topic = self.topics.get(name)
        if topic is None:
            found = find_rule(self.rules, name)
            if found is None:
                return None
            topic = self.topics[name] = Topic(name, *found)
        return topic

    # -- inspection ----------------------------------------------------------------------

    def topic_summary(self) -> list[dict[str, Any]]:
        return [
            {
                "topic": t.name,
                "subscribers": len(t.subscribers),
                "users": _user_count(t),
                "presences": len(t.presence) if t.presence is not None else None,
                "hits": t.hits + t.hits_elsewhere,
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


def _channel_of(peer: Peer, topic: Any) -> Channel | None:
    """The peer's channel for `topic`; None when not joined (or not a string: never joined)."""
    return peer.channels.get(topic) if isinstance(topic, str) else None


def _user_count(topic: Topic) -> int:
    """Distinct users subscribed to a topic. Topics with presence or a status map keep that
    list on every join; for the others it is counted here, when someone asks."""
    if topic.rule.tracks_users:
        return len(topic.user_sockets)
    return len({peer.user for peer in topic.subscribers if peer.user is not None})


def _shown(value: Any, limit: int = 100) -> str:
    """A client-chosen name (a topic or event, whatever JSON value it is) for a log line:
    quoted, and cut if it is long."""
    text = value if isinstance(value, str) else messages.dumps(value).decode()
    return repr(text if len(text) <= limit else text[:limit] + "...")
