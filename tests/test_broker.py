"""Broker state transitions, driven without sockets through fake peers and a fake clock."""

from __future__ import annotations

import json
import tomllib
from typing import Any

import pytest
from support.fake_peer import CONFIG, Clock, FakePeer, apply_frames, connect, join, strip

from phxbroker.broker import core
from phxbroker.broker.core import Broadcast, Broker
from phxbroker.broker.presence import Presence
from phxbroker.config.settings import parse_config
from phxbroker.protocol.messages import Message, dumps
from phxbroker.protocol.serializers import V1, V2


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def broker(clock: Clock) -> Broker:
    config = parse_config(tomllib.loads(CONFIG))
    return Broker(
        config.topics,
        max_channels=config.server.max_channels,
        clock=clock,
        wall_clock=lambda: 1.7e9,
    )


def test_join_ok_renders_the_reply(broker: Broker) -> None:
    alice = connect(broker, "alice")
    join(broker, alice, "room:lobby", "3")
    reply, state = alice.take()
    assert reply == [
        "3",
        "3",
        "room:lobby",
        "phx_reply",
        {"status": "ok", "response": {"joined": "lobby", "by": "alice"}},
    ]
    assert state[3] == "presence_state" and state[0] == "3" and state[1] is None


def test_unmatched_topic_has_a_null_join_ref(broker: Broker) -> None:
    alice = connect(broker, "alice")
    join(broker, alice, "nope:1", "5")
    assert alice.take() == [
        [
            None,
            "5",
            "nope:1",
            "phx_reply",
            {"status": "error", "response": {"reason": "unmatched topic"}},
        ]
    ]
    join(broker, alice, "phoenix", "6")
    assert alice.take()[0][4]["response"] == {"reason": "unmatched topic"}


def test_self_topics_and_anonymous_users(broker: Broker) -> None:
    alice = connect(broker, "alice")
    join(broker, alice, "users:bob", "1")
    join(broker, alice, "users:alice", "2")
    refused, accepted = alice.take()
    assert refused == [
        "1",
        "1",
        "users:bob",
        "phx_reply",
        {"status": "error", "response": {"reason": "unauthorized"}},
    ]
    assert accepted[4]["status"] == "ok"
    anonymous = connect(broker, None)
    join(broker, anonymous, "room:x", "1")
    join(broker, anonymous, "public", "2")
    assert [f[4]["status"] for f in anonymous.take()] == ["error", "ok"]
    assert broker.stats.refusals["join_unauthorized"] == 2


def test_channel_limit_per_connection(broker: Broker) -> None:
    alice = connect(broker, "alice")
    for n, topic in enumerate(["public", "users:alice", "crashy", "quiet"]):
        join(broker, alice, topic, str(n))
    frames = alice.take()
    assert frames[-1][4] == {"status": "error", "response": {"reason": "too many channels joined"}}
    join(broker, alice, "public", "9")  # rejoining a joined topic is not a new channel
    assert alice.take()[0][4]["status"] == "ok"


def test_duplicate_join_replies_then_closes_the_old_channel(broker: Broker, clock: Clock):
    alice = connect(broker, "alice")
    join(broker, alice, "room:lobby", "1")
    alice.take()
    join(broker, alice, "room:lobby", "3")
    frames = alice.take()
    assert frames[0][:4] == ["3", "3", "room:lobby", "phx_reply"]
    assert frames[1] == ["1", "1", "room:lobby", "phx_close", {}]
    assert frames[2][3] == "presence_state"
    # A push with the old join_ref was meant for the old channel: dropped, as in Phoenix 1.8.
    broker.handle(alice, Message("1", "4", "room:lobby", "ping", {"old": True}))
    assert alice.take() == []
    broker.handle(alice, Message("3", "5", "room:lobby", "ping", {"new": True}))
    assert alice.take() == [
        ["3", "5", "room:lobby", "phx_reply", {"status": "ok", "response": {"new": True}}]
    ]


def test_messages_for_an_earlier_join_of_the_topic_are_dropped(
    broker: Broker, clock: Clock
) -> None:
    alice = connect(broker, "alice")
    bob = connect(broker, "bob")
    join(broker, alice, "room:lobby", "1")
    join(broker, bob, "room:lobby", "1")
    for stale in ("99", None):
        broker.handle(alice, Message(stale, "2", "room:lobby", "ping", {}))
        broker.handle(alice, Message(stale, "3", "room:lobby", "phx_leave", {}))
    clock.now += 1
    broker.tick()
    alice.take()
    bob.take()
    # Phoenix 1.8: no reply, no phx_close, still subscribed; nobody sees a presence leave.
    broker.handle(alice, Message("1", "4", "room:lobby", "ping", {}))
    assert [f[:4] for f in alice.take()] == [["1", "4", "room:lobby", "phx_reply"]]
    assert bob.take() == []


def test_a_channel_joined_without_a_join_ref_stamps_its_ref_and_takes_every_message(
    broker: Broker,
) -> None:
    alice = connect(broker, "alice")
    broker.handle(alice, Message(None, "abc", "room:lobby", "phx_join", {}))
    reply, state = alice.take()
    assert (reply[:2], state[:2]) == ([None, "abc"], ["abc", None])  # join_ref || ref
    broker.handle(alice, Message("77", "2", "room:lobby", "ping", {}))
    assert [f[:4] for f in alice.take()] == [["abc", "2", "room:lobby", "phx_reply"]]
    broker.handle(alice, Message("x", "3", "room:lobby", "phx_leave", {}))
    assert alice.take() == [
        ["abc", "3", "room:lobby", "phx_reply", {"status": "ok", "response": {}}],
        [None, None, "room:lobby", "phx_close", {}],  # the join message's own join_ref
    ]


def test_held_messages_meet_the_join_ref_of_the_channel_they_find(broker: Broker) -> None:
    alice = connect(broker, "alice")
    join(broker, alice, "room:lobby", "1")
    alice.take()
    broker.defer(alice, "room:lobby")
    join(broker, alice, "room:lobby", "5")  # a rejoin, held with what follows it
    broker.handle(alice, Message("1", "6", "room:lobby", "ping", {}))
    broker.handle(alice, Message("1", "7", "room:lobby", "phx_leave", {}))
    broker.handle(alice, Message("5", "8", "room:lobby", "ping", {}))
    assert alice.take() == []
    broker.resume(alice, "room:lobby")
    answered = [f[:4] for f in alice.take() if f[3] != "presence_state"]
    assert answered == [
        ["5", "5", "room:lobby", "phx_reply"],
        ["1", "1", "room:lobby", "phx_close"],
        ["5", "8", "room:lobby", "phx_reply"],
    ]


def test_a_topic_or_event_that_is_not_a_string(broker: Broker) -> None:
    alice = connect(broker, "alice")
    unmatched = {"status": "error", "response": {"reason": "unmatched topic"}}
    for topic in (5, None, ["room:lobby"], {"a": 1}):
        for event in ("phx_join", "ping"):
            broker.handle(alice, Message("1", "1", topic, event, {}))
            assert alice.take() == [[None, "1", topic, "phx_reply", unmatched]]
        broker.handle(alice, Message("1", "2", topic, "phx_leave", {}))
        assert alice.take() == [["1", "2", topic, "phx_reply", {"status": "ok", "response": {}}]]
    join(broker, alice, "crashy", "3")
    alice.take()
    broker.handle(alice, Message("3", "4", "crashy", ["ping"], {}))
    assert alice.take() == [["3", "3", "crashy", "phx_error", {}]]  # as an unhandled event


def test_leave_then_push(broker: Broker) -> None:
    alice = connect(broker, "alice")
    join(broker, alice, "public", "1")
    alice.take()
    broker.handle(alice, Message("1", "2", "public", "phx_leave", {}))
    assert alice.take() == [
        ["1", "2", "public", "phx_reply", {"status": "ok", "response": {}}],
        ["1", "1", "public", "phx_close", {}],
    ]
    broker.handle(alice, Message("1", "3", "public", "ping", {}))
    assert alice.take()[0][:2] == [None, "3"]
    broker.handle(alice, Message("7", "4", "public", "phx_leave", {}))
    assert alice.take() == [["7", "4", "public", "phx_reply", {"status": "ok", "response": {}}]]
    assert "public" not in broker.topics


def test_relay_reaches_every_subscriber_with_the_sender_stamped(broker: Broker) -> None:
    alice, bob, carol = (connect(broker, u) for u in ("alice", "bob", "carol"))
    join(broker, alice, "room:a")
    join(broker, bob, "room:a")
    join(broker, carol, "room:b")
    for p in (alice, bob, carol):
        p.take()
    broker.handle(alice, Message("1", "2", "room:a", "new_msg", {"body": "hi", "user": "x"}))
    expected = [None, None, "room:a", "new_msg", {"body": "hi", "user": "alice"}]
    assert alice.take() == [expected]  # no reply: Phoenix's {:noreply, socket}
    assert bob.take() == [expected]
    assert carol.take() == []


def test_a_broadcast_is_encoded_once_per_serializer(broker: Broker) -> None:
    calls = []
    v2_peers = [connect(broker, f"u{i}") for i in range(5)]
    v1_peer = connect(broker, "old", V1)
    for p in [*v2_peers, v1_peer]:
        join(broker, p, "public")
    original = Broadcast.encoded

    def counting(self, serializer):
        if serializer not in self._encoded:
            calls.append(serializer.vsn)
        return original(self, serializer)

    Broadcast.encoded = counting
    try:
        broker.publish("public", "news", {"n": 1})
    finally:
        Broadcast.encoded = original
    assert sorted(calls) == ["1.0.0", "2.0.0"]
    assert v1_peer.take()[-1] == {
        "topic": "public",
        "event": "news",
        "payload": {"n": 1},
        "ref": None,
    }


def test_binary_relay_skips_clients_that_cannot_take_binary(broker: Broker) -> None:
    modern, old = connect(broker, "a"), connect(broker, "b", V1)
    join(broker, modern, "room:bin")
    join(broker, old, "room:bin")
    modern.take(), old.take()
    broker.handle(modern, Message("1", "2", "room:bin", "new_msg", b"\x01\x02"))
    assert modern.take() == [("binary", bytes([2, 8, 7]) + b"room:binnew_msg\x01\x02")]
    assert old.take() == []


def test_echo_answers_any_payload_and_binary_with_binary(broker: Broker) -> None:
    alice = connect(broker, "alice")
    join(broker, alice, "room:a")
    alice.take()
    for payload in ["str", [1, 2], None, {"a": 1}]:
        broker.handle(alice, Message("1", "9", "room:a", "ping", payload))
        assert alice.take()[0][4] == {"status": "ok", "response": payload}
    broker.handle(alice, Message("1", "9", "room:a", "ping", b"\xfa"))
    ((kind, data),) = alice.take()
    assert kind == "binary" and data[0] == 1 and data.endswith(b"ok\xfa")


def test_unhandled_events_error_ignore_or_crash(broker: Broker) -> None:
    alice = connect(broker, "alice")
    for topic in ("room:a", "quiet", "crashy"):
        join(broker, alice, topic, "1")
    alice.take()
    broker.handle(alice, Message("1", "2", "room:a", "dance", {}))
    assert alice.take()[0][4] == {
        "status": "error",
        "response": {"reason": "unhandled event 'dance'"},
    }
    broker.handle(alice, Message("1", "3", "quiet", "dance", {}))
    assert alice.take() == []
    broker.handle(alice, Message("1", "4", "crashy", "dance", {}))
    assert alice.take() == [["1", "1", "crashy", "phx_error", {}]]
    assert "crashy" not in alice.channels
    broker.handle(alice, Message("1", "5", "room:a", "new_msg", "not an object"))
    assert alice.take()[0][4]["status"] == "error"


def test_presence_storm_costs_one_diff_per_subscriber_per_interval(broker: Broker, clock: Clock):
    peers = [connect(broker, f"user{i}") for i in range(50)]
    first = peers[0]
    join(broker, first, "room:storm")
    broker.tick()
    first.take()
    clock.now += 1
    for p in peers[1:]:
        join(broker, p, "room:storm")
    broker.tick()  # leading edge: the first change after a quiet interval goes out now
    clock.now += 0.05
    broker.tick()  # within the interval: nothing
    clock.now += 0.05
    broker.tick()
    diffs = [f for f in first.take() if f[3] == "presence_diff"]
    assert len(diffs) <= 2
    joined = set().union(*(d[4]["joins"] for d in diffs))
    assert joined == {f"user{i}" for i in range(1, 50)}


def test_presence_converges_for_joiners_like_phoenix_js(broker: Broker, clock: Clock) -> None:
    """State then diffs, merged by phx_ref as phoenix.js does, give everyone the truth."""
    views: dict[int, dict] = {}
    peers = []
    for i in range(6):
        p = connect(broker, f"u{i % 4}")  # u0 and u1 have two sockets each
        join(broker, p, "room:p", payload={"status": "here"})
        peers.append(p)
        clock.now += 0.03
        broker.tick()
    broker.handle(peers[2], Message("1", "5", "room:p", "set_status", {"status": "away"}))
    broker.disconnect(peers[0])
    broker.handle(peers[3], Message("1", "6", "room:p", "phx_leave", {}))
    clock.now += 1
    broker.tick()
    for p in peers:
        views[p.id] = apply_frames(p.take())
    # Meta values are kept encoded (RawJSON): compare what a client would decode.
    state = json.loads(dumps(broker.topics["room:p"].presence.state()))
    truth = strip({k: v["metas"] for k, v in state.items()})
    for p in peers[1:]:
        if p is peers[3]:
            continue
        assert strip(views[p.id]) == truth
    assert truth["u2"] == [{"online_at": "1700000000", "status": "away"}]
    assert sorted(truth) == ["u0", "u1", "u2"]  # u0 still has its second socket
    updated = broker.topics["room:p"].presence.metas["u2"]
    assert all("phx_ref_prev" in m for m in updated.values())


def test_status_map_lists_a_user_once_and_coalesces(broker: Broker, clock: Clock) -> None:
    a1, a2, bob = connect(broker, "alice"), connect(broker, "alice"), connect(broker, "bob")
    join(broker, a1, "all")
    broker.tick()
    _reply, status = a1.take()
    assert status[:4] == [None, None, "all", "status_users"]  # the broadcast
    assert status[4] == {"users": ["alice"], "user_count": 1, "hits": 0, "msgs": []}
    clock.now += 1
    join(broker, a2, "all")
    join(broker, bob, "all")
    for _ in range(3):
        broker.handle(bob, Message("1", "2", "all", "hit", {}))
    for n in range(3):
        broker.handle(bob, Message("1", "3", "all", "msg", {"n": n}))
    broker.tick()
    clock.now += 0.1
    broker.tick()
    statuses = [f[4] for f in a1.take() if f[3] == "status_users"]
    assert len(statuses) <= 2
    assert statuses[-1] == {
        "users": ["alice", "bob"],
        "user_count": 2,
        "hits": 3,
        "msgs": [{"n": 1}, {"n": 2}],
    }
    assert a2.take()[0][4]["status"] == "ok"


@pytest.mark.parametrize("coalesce_ms", [0, 100])
def test_a_joiner_gets_the_status_map_once(coalesce_ms: int, clock: Clock) -> None:
    config = parse_config(
        tomllib.loads(
            f'[[topics]]\npattern = "all"\njoin = "anyone"\ncount = ["hit"]\n'
            f'status_event = "status_users"\ncoalesce_ms = {coalesce_ms}\n'
        )
    )
    broker = Broker(config.topics, clock=clock)
    alice, bob, alice_again, anonymous = (
        connect(broker, user) for user in ("alice", "bob", "alice", None)
    )

    def statuses(peer: FakePeer) -> list[list[str]]:
        clock.now += 1
        broker.tick()
        return [f[4]["users"] for f in peer.take() if f[3] == "status_users"]

    join(broker, alice, "all")
    # A new user changes the map: the broadcast that follows is the joiner's copy too,
    # as a Phoenix channel that broadcasts its state on join sends it once.
    assert statuses(alice) == [["alice"]]
    join(broker, bob, "all")
    assert statuses(bob) == [["alice", "bob"]]
    assert statuses(alice) == [["alice", "bob"]]
    # A joiner that changes nothing is pushed the current map, once.
    join(broker, alice_again, "all")
    assert statuses(alice_again) == [["alice", "bob"]]
    join(broker, anonymous, "all")
    assert statuses(anonymous) == [["alice", "bob"]]
    assert statuses(alice) == []


def test_disconnect_cleans_up_and_announces_the_leave(broker: Broker, clock: Clock) -> None:
    alice, bob = connect(broker, "alice"), connect(broker, "bob")
    join(broker, alice, "room:x")
    join(broker, bob, "room:x")
    clock.now += 1
    broker.tick()
    bob.take()
    broker.disconnect(alice)
    broker.disconnect(alice)  # idempotent
    clock.now += 1
    broker.tick()
    diff = [f for f in bob.take() if f[3] == "presence_diff"][-1][4]
    assert list(diff["leaves"]) == ["alice"] and diff["joins"] == {}
    assert "alice" not in broker.users
    broker.handle(alice, Message("1", "1", "room:x", "phx_join", {}))  # late message: ignored
    assert alice.take() == [] or alice.frames == []


def test_kick_from_a_topic_and_disconnect_a_user(broker: Broker) -> None:
    alice, alice2, bob = connect(broker, "alice"), connect(broker, "alice"), connect(broker, "bob")
    for p in (alice, alice2, bob):
        join(broker, p, "public", "4")
        p.take()
    assert broker.kick("alice", "public") == 2
    assert alice.take() == [["4", "4", "public", "phx_close", {}]]
    assert bob.take() == []
    assert broker.disconnect_user("bob") == 1
    assert bob.closed == (1001, "disconnected")
    assert broker.disconnect_user("nobody") == 0


def test_reload_closes_channels_no_longer_allowed(broker: Broker) -> None:
    alice, bob = connect(broker, "alice"), connect(broker, "bob")
    join(broker, alice, "public", "1")
    join(broker, bob, "public", "2")
    join(broker, alice, "crashy", "3")
    alice.take(), bob.take()
    stricter = CONFIG.replace(
        'pattern = "public"\njoin = "anyone"', 'pattern = "public"\njoin = ["alice"]'
    )
    stricter = stricter.replace('[[topics]]\npattern = "crashy"\nunhandled = "crash"\n', "")
    stricter_config = parse_config(tomllib.loads(stricter))
    broker.configure(stricter_config.topics, stricter_config.server.max_channels)
    assert bob.take() == [["2", "2", "public", "phx_close", {}]]
    assert alice.take() == [["3", "3", "crashy", "phx_close", {}]]
    assert "public" in alice.channels and "crashy" not in alice.channels


def test_topics_count_their_users_with_or_without_presence(broker: Broker) -> None:
    peers = [connect(broker, user) for user in ("alice", "alice", "bob", None)]
    for peer in peers:
        join(broker, peer, "public")  # no presence, no status map
        join(broker, peer, "room:x")  # presence
    users = {t["topic"]: t["users"] for t in broker.topic_summary()}
    assert users == {"public": 2, "room:x": 2}
    listed = {u["user"] for u in broker.user_summary() if "public" in u["topics"]}
    assert listed == {"alice", "bob"}  # what `phxbroker users` shows


# -- seams: channels waiting for an outside answer, and the fanout ---------------------------


def push(broker: Broker, peer: FakePeer, topic: str, event: str, ref: str, join_ref="1"):
    broker.handle(peer, Message(join_ref, ref, topic, event, {"n": ref}))


def test_a_waiting_channel_holds_its_messages_in_order_while_others_go_on(
    broker: Broker,
) -> None:
    alice = connect(broker, "alice")
    bob = connect(broker, "bob")
    join(broker, alice, "public")
    join(broker, alice, "room:a")
    alice.take()
    broker.defer(alice, "public")
    assert broker.waiting(alice, "public")
    push(broker, alice, "public", "anything", "2")
    push(broker, alice, "public", "more", "3")
    push(broker, alice, "room:a", "ping", "4")  # another channel of the same socket
    join(broker, bob, "public", "9")  # another socket, same topic
    assert [f[1] for f in alice.take()] == ["4"]
    assert [f[1] for f in bob.take()] == ["9"]
    broker.resume(alice, "public")
    assert not broker.waiting(alice, "public")
    assert [(f[1], f[4]["status"]) for f in alice.take()] == [("2", "error"), ("3", "error")]


def test_a_held_message_that_waits_again_keeps_the_rest_behind_it(broker: Broker) -> None:
    alice = connect(broker, "alice")
    join(broker, alice, "public")
    alice.take()
    broker.defer(alice, "public")
    for ref in ("2", "3", "4"):
        push(broker, alice, "public", "again" if ref == "3" else "other", ref)
    original = broker._dispatch

    def dispatch(peer: Any, msg: Message) -> None:
        original(peer, msg)
        if msg.event == "again":
            broker.defer(peer, msg.topic)

    broker._dispatch = dispatch  # type: ignore[method-assign]
    broker.resume(alice, "public")
    assert [f[1] for f in alice.take()] == ["2", "3"]
    assert broker.waiting(alice, "public")
    broker.resume(alice, "public")
    assert [f[1] for f in alice.take()] == ["4"]


def test_a_disconnect_drops_what_a_waiting_channel_held(broker: Broker) -> None:
    alice = connect(broker, "alice")
    broker.defer(alice, "public")
    join(broker, alice, "public")
    broker.disconnect(alice)
    assert not broker.waiting(alice, "public")
    broker.resume(alice, "public")  # an answer arriving late changes nothing
    assert alice.take() == []


class RecordingFanout:
    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def broadcast(self, broadcast: Broadcast) -> None:
        self.seen.append(("broadcast", broadcast.topic, broadcast.event, broadcast.payload))

    def disconnect_user(self, user: str, code: int, reason: str) -> None:
        self.seen.append(("disconnect", user, code, reason))

    def kick(self, user: str, topic: str) -> None:
        self.seen.append(("kick", user, topic))

    def presence_changed(self, topic: str, key: str, joined: Any, left: Any) -> None:
        self.seen.append(
            ("presence", topic, key, joined and joined["phx_ref"], left and left["phx_ref"])
        )

    def interest(self, peer: Any, topic: str) -> bool:
        return True

    def users_changed(self, topic: str, user: str, present: bool) -> None:
        self.seen.append(("users", topic, user, present))

    def counted(self, topic: str, hits: int) -> None:
        self.seen.append(("counted", topic, hits))


def test_every_broadcast_disconnect_kick_and_presence_change_reaches_the_fanout(
    broker: Broker,
) -> None:
    fanout = broker.fanout = RecordingFanout()
    alice = connect(broker, "alice")
    join(broker, alice, "room:a", payload={"status": "in"})
    (_, _, _, first, _) = fanout.seen.pop()
    assert fanout.seen == [] and first
    broker.handle(alice, Message("1", "2", "room:a", "set_status", {"status": "away"}))
    (kind, topic, key, joined, left) = fanout.seen.pop()
    assert (kind, topic, key, left) == ("presence", "room:a", "alice", first) and joined
    broker.handle(alice, Message("1", "3", "room:a", "new_msg", {"body": "hi"}))
    assert fanout.seen.pop() == ("broadcast", "room:a", "new_msg", {"body": "hi", "user": "alice"})
    # A topic without subscribers here may have some on another node.
    assert broker.publish("room:elsewhere", "news", {"a": 1}) == 0
    assert fanout.seen.pop() == ("broadcast", "room:elsewhere", "news", {"a": 1})
    broker.kick("bob", "room:a")
    assert fanout.seen.pop() == ("kick", "bob", "room:a")
    broker.disconnect_user("alice", 1001, "bye")
    assert fanout.seen == [
        ("presence", "room:a", "alice", None, joined),
        ("disconnect", "alice", 1001, "bye"),
    ]


def test_hold_keeps_a_message_and_its_followers_until_resume(broker: Broker) -> None:
    alice = connect(broker, "alice")
    msg = Message("1", "1", "public", "phx_join", {})
    broker.hold(alice, msg)
    push(broker, alice, "public", "anything", "2")
    assert alice.take() == [] and broker.waiting(alice, "public")
    broker.resume(alice, "public")
    replies = alice.take()
    assert [(f[1], f[4]["status"]) for f in replies] == [("1", "ok"), ("2", "error")]


class WaitingFanout(RecordingFanout):
    """A fanout whose interest in a topic is not in place until the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.ready: set[str] = {"public"}
        self.waiting: list[tuple[Any, str]] = []

    def interest(self, peer: Any, topic: str) -> bool:
        if topic in self.ready:
            return True
        self.waiting.append((peer, topic))
        return False


def test_a_join_of_a_topic_new_to_the_node_waits_for_the_fanouts_interest(
    broker: Broker,
) -> None:
    fanout = broker.fanout = WaitingFanout()
    alice, bob = connect(broker, "alice"), connect(broker, "bob")
    join(broker, alice, "room:new", "1")
    push(broker, alice, "room:new", "ping", "2")
    join(broker, alice, "users:bob", "3")  # refused at once: it never needs interest
    assert [(f[1], f[4]["status"]) for f in alice.take()] == [("3", "error")]
    assert fanout.waiting == [(alice, "room:new")]
    join(broker, bob, "public", "4")  # others go on meanwhile
    assert bob.take()[0][4]["status"] == "ok"
    fanout.ready.add("room:new")
    broker.resume(alice, "room:new")
    replies = [f for f in alice.take() if f[3] == "phx_reply"]
    assert [(f[1], f[4]["status"]) for f in replies] == [("1", "ok"), ("2", "ok")]
    assert replies[1][4]["response"] == {"n": "2"}


def test_other_nodes_presence_merges_and_converges_like_phoenix_js(
    broker: Broker, clock: Clock
) -> None:
    """Metas another node owns join the local view: joiners get them in presence_state and
    subscribers in the coalesced diffs, merged exactly as phoenix.js does."""
    early, late = connect(broker, "alice"), connect(broker, "bob")
    join(broker, early, "room:m", payload={"status": "here"})
    clock.now += 1
    broker.tick()
    remote = {"online_at": "1", "status": "far", "phx_ref": "remote-ref-1"}
    also_alice = {"online_at": "1", "status": "there", "phx_ref": "remote-ref-2"}
    broker.merge_presence([("room:m", "carol", remote, None)])
    broker.merge_presence([("room:m", "alice", also_alice, None)])
    join(broker, late, "room:m", payload={"status": "here"})  # state now, pending diff next
    broker.merge_presence([("room:m", "alice", None, also_alice)])
    broker.merge_presence([("room:elsewhere-no-rule", "x", remote, None)])  # no rule: ignored
    clock.now += 1
    broker.tick()
    state = json.loads(broker.topics["room:m"].presence.snapshot_json())
    truth = strip({k: v["metas"] for k, v in state.items()})
    assert sorted(truth) == ["alice", "bob", "carol"]
    assert strip(apply_frames(early.take())) == truth
    assert strip(apply_frames(late.take())) == truth
    broker.merge_presence([("room:m", "carol", None, remote)])
    clock.now += 1
    broker.tick()
    diff = [f[4] for f in early.take() if f[3] == "presence_diff"]
    assert list(diff[-1]["leaves"]) == ["carol"]


def test_the_status_map_counts_hits_and_lists_users_of_every_node(
    broker: Broker, clock: Clock
) -> None:
    fanout = broker.fanout = RecordingFanout()
    alice = connect(broker, "alice")
    join(broker, alice, "all")
    broker.handle(alice, Message("1", "2", "all", "hit", {}))
    assert ("users", "all", "alice", True) in fanout.seen
    assert fanout.seen[-1] == ("counted", "all", 1)
    broker.merge_hits("all", 5)
    broker.merge_users("all", "zoe", +1)
    broker.merge_users("all", "alice", +1)  # on both nodes: listed once
    clock.now += 1
    broker.tick()
    status = [f[4] for f in alice.take() if f[3] == "status_users"][-1]
    assert status["hits"] == 6
    assert status["users"] == ["alice", "zoe"] and status["user_count"] == 2
    broker.merge_users("all", "zoe", -1)
    clock.now += 1
    broker.tick()
    assert [f[4] for f in alice.take() if f[3] == "status_users"][-1]["users"] == ["alice"]


def test_a_broadcast_from_another_node_reaches_local_subscribers_only(broker: Broker) -> None:
    fanout = broker.fanout = RecordingFanout()
    alice = connect(broker, "alice")
    join(broker, alice, "all")
    alice.take()
    relayed = Broadcast("all", "msg", {"n": 1})
    relayed.relayed = True
    assert broker.deliver(relayed) == 1
    assert broker.deliver(Broadcast("nobody-here", "msg", {})) == 0
    assert [f[4] for f in alice.take()] == [{"n": 1}]
    assert list(broker.topics["all"].history) == [{"n": 1}]
    assert [s for s in fanout.seen if s[0] == "broadcast"] == []


# -- one failure never takes the broker down ------------------------------------------------


class BrokenPeer(FakePeer):
    """A peer whose transport fails when the broker hands it a message."""

    def send(self, encoded: tuple[bool, bytes]) -> None:
        raise RuntimeError("transport bug")


def test_a_failing_client_command_is_logged_counted_and_skipped(broker: Broker, caplog) -> None:
    broken = BrokenPeer("mallory")
    broker.connect(broken)
    alice = connect(broker, "alice")
    join(broker, broken, "public", "7")  # the reply cannot be sent
    join(broker, alice, "public", "8")
    assert broker.stats.internal_errors == 1
    errors = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(errors) == 1
    assert "'public'" in errors[0].getMessage()
    assert f"connection {broken.id}" in errors[0].getMessage()
    assert alice.take()[0][4]["status"] == "ok"


def test_a_failing_flush_skips_only_that_topic(broker: Broker, clock: Clock, caplog) -> None:
    alice, bob = connect(broker, "alice"), connect(broker, "bob")
    join(broker, alice, "room:a")
    join(broker, bob, "room:b")
    clock.now += 1
    broker.tick()
    alice.take(), bob.take()
    # A value no serializer can write gets into one topic's pending presence diff.
    broker.topics["room:a"].presence.joins["ghost"] = [{"phx_ref": "x", "bad": {1, 2}}]
    broker.handle(alice, Message("1", "2", "room:a", "set_status", {"status": "away"}))
    broker.handle(bob, Message("1", "2", "room:b", "set_status", {"status": "away"}))
    clock.now += 1
    broker.tick()  # does not raise
    assert broker.stats.internal_errors == 1
    [error] = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert "'room:a'" in error.getMessage()
    assert bob.events() == ["presence_diff"]
    assert alice.events() == []  # skipped: the pending diff was dropped...
    room_a = broker.topics["room:a"]
    assert not room_a.due and not room_a.presence.dirty
    assert broker.next_deadline() is None
    # ...and the topic works on.
    broker.handle(alice, Message("1", "3", "room:a", "set_status", {"status": "back"}))
    clock.now += 1
    broker.tick()
    assert alice.events() == ["presence_diff"]
    assert broker.stats.internal_errors == 1


def test_a_failing_flush_of_a_topic_nobody_is_left_on_forgets_it(
    broker: Broker, clock: Clock, monkeypatch
) -> None:
    alice = connect(broker, "alice")
    join(broker, alice, "room:a")
    clock.now += 1
    broker.tick()
    take_diff = Presence.take_diff
    calls = []

    def failing_once(self: Presence) -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return take_diff(self)

    monkeypatch.setattr(Presence, "take_diff", failing_once)
    broker.disconnect(alice)
    clock.now += 1
    broker.tick()
    assert broker.stats.internal_errors == 1
    assert "room:a" not in broker.topics


def test_a_failing_topic_on_reload_does_not_stop_the_others(broker: Broker) -> None:
    broken = BrokenPeer("bob")
    broker.connect(broken)
    alice = connect(broker, "alice")
    broken.serializer = V2
    broker.handle(broken, Message("1", "1", "crashy", "phx_join", {}))  # reply fails: counted
    join(broker, alice, "quiet", "2")
    assert "crashy" in broker.topics
    alice.take()
    without = CONFIG.replace('[[topics]]\npattern = "crashy"\nunhandled = "crash"\n', "")
    without = without.replace('[[topics]]\npattern = "quiet"\nunhandled = "ignore"\n', "")
    config = parse_config(tomllib.loads(without))
    broker.configure(config.topics, config.server.max_channels)  # does not raise
    assert broker.stats.internal_errors == 2
    assert alice.take() == [["2", "2", "quiet", "phx_close", {}]]
    assert "crashy" not in broker.topics and not broken.channels


# -- counts never include connections that are closing ---------------------------------------


def test_counts_leave_out_connections_that_are_closing(broker: Broker) -> None:
    alice, alice2, bob = connect(broker, "alice"), connect(broker, "alice"), connect(broker, "bob")
    for p in (alice, alice2, bob):
        join(broker, p, "public", "4")
        p.take()
    bob.close(1001, "server shutting down")  # closing: still joined until it disconnects
    assert broker.publish("public", "news", {}) == 2
    alice2.close(1001, "server shutting down")
    assert broker.kick("alice", "public") == 1
    assert broker.disconnect_user("alice") == 1
    assert broker.disconnect_user("bob") == 0


# -- what one connection can make the server keep ---------------------------------------------


def blocks_retained_by(action) -> int:
    """How many Python memory blocks allocated by `action()` are still alive after it.

    Blocks, not bytes: orjson reserves more address space for its output than it fills,
    and tracemalloc counts that reservation although the pages are never touched."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        action()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return sum(stat.count_diff for stat in after.compare_to(before, "filename"))


def test_presence_metas_and_history_are_kept_as_json_not_objects(
    broker: Broker, clock: Clock
) -> None:
    # JSON that expands the most in Python objects: 60,000 empty arrays, ~20x its size.
    value = "[" + ",".join(["[]"] * 60_000) + "]"
    join_frame = f'["1","1","room:big","phx_join",{{"status":{value}}}]'
    relay_frame = f'["1","2","all","msg",{{"v":{value}}}]'
    alice = connect(broker, "alice")
    join(broker, alice, "all", "1")

    def keep() -> None:
        broker.handle(alice, V2.decode_text(join_frame))
        broker.handle(alice, V2.decode_text(relay_frame))
        clock.now += 1
        broker.tick()
        alice.take()
        alice.sent.clear()

    assert blocks_retained_by(keep) < 1000
    status = json.loads(broker._status_json(broker.topics["all"]))
    assert len(status["msgs"][0]["v"]) == 60_000
    state = json.loads(broker.topics["room:big"].presence.snapshot_json())
    assert len(state["alice"]["metas"][0]["status"]) == 60_000


def test_presence_changes_between_flushes_do_not_pile_up(broker: Broker, clock: Clock) -> None:
    alice, bob = connect(broker, "alice"), connect(broker, "bob")
    join(broker, alice, "room:x")
    join(broker, bob, "room:x")
    clock.now += 1
    broker.tick()
    bob.take()
    for n in range(500):
        broker.handle(alice, Message("1", str(n), "room:x", "set_status", {"status": n}))
    presence = broker.topics["room:x"].presence
    assert sum(map(len, presence.joins.values())) + sum(map(len, presence.leaves.values())) == 2
    clock.now += 1
    broker.tick()
    [diff] = [f[4] for f in bob.take() if f[3] == "presence_diff"]
    view = {"alice": [{"status": None, "phx_ref": diff["leaves"]["alice"]["metas"][0]["phx_ref"]}]}
    from support.fake_peer import apply_diff

    apply_diff(view, diff)
    assert [m["status"] for m in view["alice"]] == [499]


def test_binary_relays_stay_out_of_the_json_history(clock: Clock) -> None:
    config = parse_config(
        tomllib.loads(
            '[[topics]]\npattern = "all"\nrelay = ["msg"]\nhistory = 5\n'
            'status_event = "status_users"\nstatus_fields = ["msgs"]\ncoalesce_ms = 100\n'
        )
    )
    broker = Broker(config.topics, clock=clock)
    alice = connect(broker, "alice")
    join(broker, alice, "all")
    broker.handle(alice, Message("1", "2", "all", "msg", b"\x00\x01"))
    broker.handle(alice, Message("1", "3", "all", "msg", {"n": 1}))
    clock.now += 1
    broker.tick()
    assert broker.stats.internal_errors == 0
    statuses = [f[4] for f in alice.take() if isinstance(f, list) and f[3] == "status_users"]
    assert statuses[-1] == {"msgs": [{"n": 1}]}


def test_topics_nobody_is_on_are_kept_for_their_counters_up_to_a_bound(
    broker: Broker, monkeypatch
) -> None:
    monkeypatch.setattr(core, "MAX_KEPT_TOPICS", 3)
    alice = connect(broker, "alice")
    for n in range(5):
        join(broker, alice, f"room:{n}")
        broker.handle(alice, Message("1", "2", f"room:{n}", "hit", {}))
        broker.handle(alice, Message("1", "3", f"room:{n}", "phx_leave", {}))
    assert sorted(broker.topics) == ["room:2", "room:3", "room:4"]
    assert broker.topics["room:4"].hits == 1
    join(broker, alice, "room:2")  # subscribed again: no longer a kept topic
    broker.handle(alice, Message("1", "3", "room:2", "phx_leave", {}))
    assert list(broker.kept) == ["room:3", "room:4", "room:2"]


def test_summaries_list_topics_and_users(broker: Broker) -> None:
    alice, bob = connect(broker, "alice"), connect(broker, "bob")
    join(broker, alice, "public")
    join(broker, bob, "public")
    join(broker, alice, "users:alice")
    assert sorted(t["topic"] for t in broker.topic_summary()) == ["public", "users:alice"]
    assert sorted(broker.user_summary(), key=lambda u: u["user"]) == [
        {"user": "alice", "connections": 1, "topics": ["public", "users:alice"]},
        {"user": "bob", "connections": 1, "topics": ["public"]},
    ]
