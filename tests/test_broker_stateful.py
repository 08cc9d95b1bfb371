"""The sans-io broker under random traffic (a hypothesis state machine).

Fake peers connect (V1 and V2) and send frames built from valid and hostile topics, refs
and payloads; each goes through the peer's serializer first, as a transport does, and a
frame the decoder refuses ends that connection as 1011 would. Between them: leaves,
pushes, presence updates, API publishes, disconnects, kicks, peers that start closing,
reloads to another rule set and clock ticks. After every step:

- nothing raised, and the broker logged no internal error;
- every channel in a topic's subscribers is in its peer's channels, and back;
- presence lists exactly the tracking channels still joined;
- no idle topic is kept;
- every message a peer was sent decodes again (text with its serializer, binary with the
  server-to-client layout) and carries an object payload, as phoenix.js needs;
- publish, kick and disconnect_user count only connections that are open.
"""

from __future__ import annotations

import json
import tomllib

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from support.fake_peer import Clock, FakePeer
from support.fuzz import examples, hostile_scalars, json_scalars, json_values

from phxbroker.broker.core import Broker
from phxbroker.config.settings import parse_config
from phxbroker.protocol.messages import ProtocolError, loads
from phxbroker.protocol.serializers import V1, V2

RULES = [
    """
[[topics]]
pattern = "room:*"
join = "anyone"
relay = ["new_msg"]
relay_user_key = "user"
echo = ["ping"]
count = ["hit"]
presence = true
presence_meta = ["status"]
presence_update = ["set_status"]
history = 3
status_event = "status_users"
join_reply = { joined = "{suffix}", by = "{user}" }
coalesce_ms = 100
[[topics]]
pattern = "users:{user}"
join = "self"
presence = true
coalesce_ms = 0
[[topics]]
pattern = "all"
join = "authenticated"
count = ["hit"]
relay = ["msg"]
history = 2
status_event = "status_users"
coalesce_ms = 50
unhandled = "crash"
[[topics]]
pattern = "quiet"
join = ["alice"]
unhandled = "ignore"
""",
    """
[[topics]]
pattern = "room:*"
join = "authenticated"
relay = ["new_msg"]
echo = ["ping"]
presence = false
coalesce_ms = 0
[[topics]]
pattern = "all"
join = "anyone"
count = ["hit"]
history = 5
status_event = "status_users"
status_fields = ["msgs", "hits"]
""",
    """
[[topics]]
pattern = "users:{user}"
join = "self"
presence = true
presence_meta = ["status"]
presence_update = ["set_status"]
[[topics]]
pattern = "quiet"
join = "anyone"
""",
]
CONFIGS = [parse_config(tomllib.loads(text)).topics for text in RULES]
MAX_CHANNELS = 3

USERS = st.sampled_from(["alice", "alice", "bob", "bob", "mallory", None, "room:[/]", "😀"])
TOPIC_NAMES = st.one_of(
    st.sampled_from(
        ["room:a", "room:b", "room:", "users:alice", "users:bob", "all", "quiet", "phoenix", "x"]
    ),
    st.text(max_size=6).map(lambda t: "room:" + t),
)
EVENTS = st.sampled_from(
    ["new_msg", "ping", "hit", "set_status", "msg", "other", "phx_join", "phx_leave"]
)
SHORT_REFS = st.one_of(
    st.just("null"),
    st.integers(0, 10**6).map(lambda n: json.dumps(str(n))),
    st.integers(-(2**63), 2**64 - 1).map(str),
)
# Mostly what phoenix.js sends, sometimes what an attacker would (st.one_of picks each
# branch equally often, so the honest branches are listed several times).
REFS = st.one_of(SHORT_REFS, SHORT_REFS, SHORT_REFS, SHORT_REFS, hostile_scalars)
OBJECTS = st.dictionaries(
    st.sampled_from(["status", "body", "n"]),
    st.integers(-5, 5) | st.text(max_size=4) | st.just(123456789012345678901234567890),
    max_size=3,
).map(json.dumps)
PAYLOADS = st.one_of(
    st.just("{}"),
    OBJECTS,
    OBJECTS,
    OBJECTS,
    json_values(json_scalars).map(lambda v: '{"status":' + v + "}"),
    json_values(),
)


def text_frame(serializer, join_ref: str, ref: str, topic: str, event: str, payload: str) -> str:
    if serializer is V2:
        return f"[{join_ref},{ref},{topic},{event},{payload}]"
    return (
        f'{{"join_ref":{join_ref},"ref":{ref},"topic":{topic},"event":{event},"payload":{payload}}}'
    )


def decode_server_binary(data: bytes) -> tuple[str, str]:
    """(topic, event or status) of a server-to-client binary frame; ValueError if it is
    not one (kind 0 push: 4-byte header; 1 reply: 5 bytes; 2 broadcast: 3 bytes)."""
    kind = data[0]
    header = {0: 4, 1: 5, 2: 3}[kind]
    lengths = list(data[1:header])
    fields = []
    pos = header
    for n in lengths:
        fields.append(data[pos : pos + n].decode())
        pos += n
    if pos > len(data):
        raise ValueError("frame shorter than its header says")
    return fields[-2], fields[-1]


class BrokerMachine(RuleBasedStateMachine):
    peers = Bundle("peers")

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.broker = Broker(
            CONFIGS[0], max_channels=MAX_CHANNELS, clock=self.clock, wall_clock=lambda: 1.7e9
        )
        self.everyone: list[FakePeer] = []
        self.checked: dict[int, int] = {}

    # -- traffic -------------------------------------------------------------------------

    @rule(target=peers, user=USERS, serializer=st.sampled_from([V1, V2]))
    def connect(self, user, serializer) -> FakePeer:
        peer = FakePeer(user, serializer)
        self.broker.connect(peer)
        self.everyone.append(peer)
        return peer

    def _receive(self, peer: FakePeer, frame: str | bytes, binary: bool = False) -> None:
        """What a transport does with one client frame."""
        if not peer.open or peer not in self.broker.peers:
            return
        try:
            if binary:
                msg = peer.serializer.decode_binary(frame)
            else:
                msg = peer.serializer.decode_text(frame)
        except ProtocolError:
            peer.close(1011, "")
            self.broker.disconnect(peer)
            return
        self.broker.handle(peer, msg)

    @rule(
        peer=peers,
        topic=st.one_of(*[TOPIC_NAMES.map(json.dumps)] * 4, hostile_scalars),
        join_ref=REFS,
        payload=PAYLOADS,
    )
    def join(self, peer, topic, join_ref, payload) -> None:
        frame = text_frame(peer.serializer, join_ref, join_ref, topic, '"phx_join"', payload)
        self._receive(peer, frame)

    @rule(peer=peers, topic=TOPIC_NAMES, ref=SHORT_REFS, payload=OBJECTS)
    def join_as_phoenix_js_does(self, peer, topic, ref, payload) -> None:
        frame = text_frame(peer.serializer, ref, ref, json.dumps(topic), '"phx_join"', payload)
        self._receive(peer, frame)

    @rule(peer=peers, topic=TOPIC_NAMES, event=EVENTS, payload=OBJECTS)
    def push_as_phoenix_js_does(self, peer, topic, event, payload) -> None:
        join_ref = peer.channels[topic].join_ref if topic in peer.channels else None
        frame = text_frame(
            peer.serializer,
            json.dumps(join_ref),
            '"5"',
            json.dumps(topic),
            json.dumps(event),
            payload,
        )
        self._receive(peer, frame)

    @rule(peer=peers, topic=TOPIC_NAMES, ref=SHORT_REFS)
    def leave(self, peer, topic, ref) -> None:
        join_ref = peer.channels[topic].join_ref if topic in peer.channels else None
        frame = text_frame(
            peer.serializer, json.dumps(join_ref), ref, json.dumps(topic), '"phx_leave"', "{}"
        )
        self._receive(peer, frame)

    @rule(
        peer=peers,
        topic=TOPIC_NAMES.map(json.dumps),
        event=st.one_of(*[EVENTS.map(json.dumps)] * 4, hostile_scalars),
        ref=REFS,
        payload=PAYLOADS,
    )
    def push(self, peer, topic, event, ref, payload) -> None:
        self._receive(peer, text_frame(peer.serializer, "null", ref, topic, event, payload))

    @rule(peer=peers, status=st.integers() | st.text(max_size=5), topic=TOPIC_NAMES)
    def update_presence(self, peer, status, topic) -> None:
        payload = json.dumps({"status": status})
        frame = text_frame(
            peer.serializer, "null", '"9"', json.dumps(topic), '"set_status"', payload
        )
        self._receive(peer, frame)

    @rule(
        peer=peers,
        topic=TOPIC_NAMES,
        event=EVENTS,
        payload=st.binary(max_size=8),
        junk=st.binary(max_size=3),
    )
    def push_binary(self, peer, topic, event, payload, junk) -> None:
        fields = [b"", b"7", topic.encode(), event.encode()]
        frame = bytes([0, *map(len, fields)]) + b"".join(fields) + payload
        self._receive(peer, junk + frame if junk else frame, binary=True)

    @rule(topic=TOPIC_NAMES, event=EVENTS, payload=PAYLOADS)
    def publish(self, topic, event, payload) -> None:
        try:
            document = loads(payload)
        except ValueError:
            return  # the API answers 400
        if not isinstance(document, dict):
            return
        t = self.broker.topics.get(topic)
        expected = 0 if t is None else sum(1 for p in t.subscribers if p.open)
        assert self.broker.publish(topic, event, document) == expected

    def _open_peers(self) -> int:
        return sum(1 for p in self.broker.peers if p.open)

    @precondition(lambda self: self._open_peers() > 3)
    @rule(peer=peers)
    def disconnect(self, peer) -> None:
        peer.close(1000, "")
        self.broker.disconnect(peer)

    @precondition(lambda self: self._open_peers() > 3)
    @rule(peer=peers)
    def start_closing(self, peer) -> None:
        """A transport closing the connection: still subscribed until it disconnects."""
        peer.close(1001, "server shutting down")

    @rule(user=USERS, topic=TOPIC_NAMES)
    def kick(self, user, topic) -> None:
        t = self.broker.topics.get(topic)
        expected = 0 if t is None else sum(1 for p in t.subscribers if p.user == user and p.open)
        assert self.broker.kick(user, topic) == expected

    @precondition(lambda self: self._open_peers() > 3)
    @rule(user=USERS)
    def disconnect_user(self, user) -> None:
        expected = sum(1 for p in self.broker.users.get(user, ()) if p.open)
        assert self.broker.disconnect_user(user) == expected

    @rule(index=st.integers(0, len(CONFIGS) - 1))
    def reload(self, index) -> None:
        self.broker.configure(CONFIGS[index], MAX_CHANNELS)

    @rule(seconds=st.sampled_from([0, 0.01, 0.05, 0.1, 1.0]))
    def tick(self, seconds) -> None:
        self.clock.now += seconds
        self.broker.tick()

    @precondition(lambda self: self.broker.next_deadline() is not None)
    @rule()
    def run_until_quiet(self) -> None:
        while (deadline := self.broker.next_deadline()) is not None:
            self.clock.now = max(self.clock.now, deadline)
            self.broker.tick()

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def nothing_failed_inside(self) -> None:
        assert self.broker.stats.internal_errors == 0

    @invariant()
    def channels_and_subscribers_mirror_each_other(self) -> None:
        broker = self.broker
        for name, topic in broker.topics.items():
            assert topic.name == name
            for peer, channel in topic.subscribers.items():
                assert peer in broker.peers
                assert peer.channels.get(name) is channel
                assert channel.topic is topic
        for peer in self.everyone:
            if peer not in broker.peers:
                assert peer.channels == {}
            for name, channel in peer.channels.items():
                assert broker.topics.get(name) is channel.topic
                assert channel.topic.subscribers.get(peer) is channel
            assert len(peer.channels) <= MAX_CHANNELS

    @invariant()
    def presence_is_exactly_the_tracking_channels(self) -> None:
        for topic in self.broker.topics.values():
            if topic.presence is None:
                continue
            tracked = {(key, ref) for key, metas in topic.presence.metas.items() for ref in metas}
            expected = {
                (Broker._presence_key(peer), channel.phx_ref)
                for peer, channel in topic.subscribers.items()
            }
            assert all(ref is not None for _, ref in expected)
            assert tracked == expected

    @invariant()
    def idle_topics_are_gone(self) -> None:
        for topic in self.broker.topics.values():
            assert not topic.idle, topic.name

    @invariant()
    def topics_nobody_is_on_are_the_kept_ones(self) -> None:
        broker = self.broker
        unsubscribed = {name for name, t in broker.topics.items() if not t.subscribers}
        assert set(broker.kept) == unsubscribed
        assert all(broker.topics[name] is topic for name, topic in broker.kept.items())

    @invariant()
    def everything_sent_decodes_again(self) -> None:
        for peer in self.everyone:
            start = self.checked.get(peer.id, 0)
            for is_binary, data in peer.sent[start:]:
                if is_binary:
                    assert peer.serializer is V2
                    decode_server_binary(data)
                    continue
                msg = peer.serializer.decode_text(data)
                assert isinstance(msg.payload, dict), data
            self.checked[peer.id] = len(peer.sent)


# Hypothesis keeps every choice sequence a run explored in memory; a state machine makes
# so many that one run of 100,000 examples grew past 20 GB. So the examples are run in
# rounds of at most ROUND, each a fresh run with its own random seed.
ROUND = 2_000


def test_the_broker_keeps_its_invariants() -> None:
    wanted = examples(150, stateful_step_count=30)
    left = wanted.max_examples
    while left > 0:
        run = min(left, ROUND)
        run_state_machine_as_test(BrokerMachine, settings=settings(wanted, max_examples=run))
        left -= run
