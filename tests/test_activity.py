"""Connect, join and leave lines as Phoenix writes them, without a socket: the activity log
alone with a fake clock, and driven by the broker through fake peers."""

from __future__ import annotations

import io
import logging
import re
import tomllib
from collections.abc import Iterator

import pytest
from support.fake_peer import CONFIG, Clock, FakePeer, connect, join

from phxbroker.broker.activity import ACTIVITY_LOGGER, ActivityLog, duration, render_parameters
from phxbroker.broker.core import Broker
from phxbroker.broker.topics import JoinPolicy, TopicRule, parse_pattern
from phxbroker.config.settings import LogConfig, parse_config
from phxbroker.ops import logs
from phxbroker.protocol.messages import Message

JWT = "eyJhbGciOiJIUzUxMiJ9.eyJzdWIiOiJVc2VyOjEifQ.c2lnbmF0dXJlLWJ5dGVz"


class Lines(logging.Handler):
    """Collects the messages of the loggers it is attached to."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def take(self) -> list[str]:
        messages, self.messages = self.messages, []
        return messages


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    loggers = [logging.getLogger(ACTIVITY_LOGGER), logging.getLogger("phxbroker.broker")]
    saved = [(lg, lg.level) for lg in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler
    for logger, level in saved:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def broker(clock: Clock) -> Broker:
    config = parse_config(tomllib.loads(CONFIG))
    return Broker(config.topics, max_channels=config.server.max_channels, clock=clock)


def test_durations_are_written_as_phoenix_writes_them() -> None:
    assert duration(0.000120) == "120µs"
    assert duration(0.001) == "1000µs"
    assert duration(0.0015) == "1ms"
    assert duration(0.25) == "250ms"


def test_parameters_are_filtered_by_name_at_any_depth() -> None:
    rendered = render_parameters(
        {"vsn": "2.0.0", "token": JWT, "user_password": "x", "meta": {"api_key": "k", "n": 1}}
    )
    assert rendered == (
        '{"vsn":"2.0.0","token":"[FILTERED]","user_password":"[FILTERED]",'
        '"meta":{"api_key":"[FILTERED]","n":1}}'
    )
    assert render_parameters({"blob": b"\x00\x01"}) == '{"blob":"<2 bytes>"}'
    assert render_parameters({"long": "x" * 1000}).endswith("...")


def test_a_connect_line_names_path_time_transport_serializer_and_parameters(
    lines: Lines,
) -> None:
    activity = ActivityLog(Clock())
    peer = FakePeer("alice")
    peer.remote = "10.0.0.7:51000"
    activity.connected(peer, "/socket/websocket", {"token": "alice-token", "vsn": "2.0.0"}, 0.0)
    [line] = lines.take()
    assert re.fullmatch(
        rf"CONNECTED TO /socket in \d+ms: fake {peer.id}, user alice from 10.0.0.7:51000, "
        r'serializer V2, parameters \{"token":"\[FILTERED\]","vsn":"2.0.0"\}',
        line,
    ), line
    assert "alice-token" not in line


def test_a_connect_storm_is_summed_up_in_one_line_a_second(lines: Lines, clock: Clock) -> None:
    activity = ActivityLog(clock, lines_per_second=20)
    peer = FakePeer("alice")
    for _ in range(1254):
        activity.connected(peer, "/socket/websocket", {}, 0.0)
    for _ in range(3):
        activity.joined(peer, "room:lobby", {}, 0.0)
    activity.left(peer, "room:lobby")
    written = lines.take()
    assert len(written) == 20
    assert all(line.startswith("CONNECTED TO /socket") for line in written)

    assert activity.next_deadline() == clock.now + 1
    activity.tick(clock.now + 0.5)
    assert lines.take() == []  # the second is not over
    clock.now += 1
    activity.tick()
    assert lines.take() == [
        "... and 1,234 more connects, 3 joins and 1 leave in the last second "
        "(at most 20 lines a second are written about connects and joins)"
    ]
    assert activity.next_deadline() is None  # nothing left to sum up

    # A calm second writes every line again.
    activity.joined(peer, "room:lobby", {}, 0.0)
    assert [line.split(" in ")[0] for line in lines.take()] == ["JOINED room:lobby"]


def test_the_summary_comes_with_the_next_line_when_nobody_ticks(lines: Lines, clock: Clock) -> None:
    activity = ActivityLog(clock, lines_per_second=1)
    peer = FakePeer("alice")
    activity.connected(peer, "/socket/longpoll", {}, 0.0)
    activity.connected(peer, "/socket/longpoll", {}, 0.0)
    clock.now += 2
    activity.connected(peer, "/socket/longpoll", {}, 0.0)
    summary, line = lines.take()[1:]
    assert summary.startswith("... and 1 more connect in the last second")
    assert line.startswith("CONNECTED TO /socket in")


def test_the_switch_silences_connects_and_joins_but_not_refusals(lines: Lines) -> None:
    logging.getLogger(ACTIVITY_LOGGER).setLevel(logging.WARNING)  # [log] connections = false
    activity = ActivityLog(Clock())
    peer = FakePeer(None)
    activity.connected(peer, "/socket/websocket", {}, 0.0)
    activity.joined(peer, "room:lobby", {}, 0.0)
    activity.left(peer, "room:lobby")
    activity.disconnected(peer, 0)
    activity.join_refused(peer, "users:1", "because", 0.0)
    [line] = lines.take()
    assert line.startswith("REFUSED JOIN users:1 in ")
    assert line.endswith(f"fake {peer.id}, user anonymous: because")


# -- from the broker -----------------------------------------------------------------------


def test_the_broker_logs_joins_leaves_and_disconnects(broker: Broker, lines: Lines) -> None:
    alice = connect(broker, "alice")
    join(broker, alice, "room:lobby", payload={"status": "here", "password": "hunter2"})
    broker.handle(alice, Message("1", "2", "room:lobby", "phx_leave", {}))
    join(broker, alice, "all", "3")
    broker.disconnect(alice)
    messages = lines.take()
    assert [m.split(" ")[0] for m in messages] == ["JOINED", "LEFT", "JOINED", "DISCONNECTED"]
    assert messages[0].endswith(
        f'fake {alice.id}, user alice, parameters {{"status":"here","password":"[FILTERED]"}}'
    )
    assert messages[1] == f"LEFT room:lobby: fake {alice.id}, user alice"
    assert messages[3] == f"DISCONNECTED fake {alice.id}, user alice from test, leaving 1 channel"


@pytest.mark.parametrize(
    ("user", "topic", "why"),
    [
        ("1", "users:2", '[[topics]] pattern "users:{user}" has join = "self": only user 2 '
         "may join"),
        (None, "room:x", '[[topics]] pattern "room:*" has join = "authenticated": anonymous '
         "connections may not join"),
        ("alice", "nope:1", "no [[topics]] pattern matches it"),
    ],
)  # fmt: skip
def test_a_refused_join_is_logged_with_the_rule_that_refused_it(
    broker: Broker, lines: Lines, user: str | None, topic: str, why: str
) -> None:
    peer = connect(broker, user)
    join(broker, peer, topic)
    [line] = lines.take()
    assert line.startswith(f"REFUSED JOIN {topic} in ")
    assert line.endswith(f": fake {peer.id}, user {user or 'anonymous'}: {why}")


def test_a_list_policy_and_the_channel_limit_name_themselves(lines: Lines, clock: Clock) -> None:
    rule = TopicRule(parse_pattern("vip:*"), join=JoinPolicy("users", frozenset({"bob", "al"})))
    vip_only = Broker([rule], max_channels=1, clock=clock)
    carol, bob = connect(vip_only, "carol"), connect(vip_only, "bob")
    join(vip_only, carol, "vip:1")
    join(vip_only, bob, "vip:1")
    join(vip_only, bob, "vip:2")
    refused_carol, _joined, refused_bob = lines.take()
    assert refused_carol.endswith(
        '[[topics]] pattern "vip:*" has join = ["al", "bob"]: user carol is not listed'
    )
    assert refused_bob.endswith("user bob: 1 channels joined already ([server] max_channels)")


def test_the_broker_wakes_up_for_a_summary(broker: Broker, clock: Clock, lines: Lines) -> None:
    broker.activity.lines_per_second = 1
    peers = [connect(broker, f"u{n}") for n in range(3)]
    for peer in peers:
        join(broker, peer, f"users:{peer.user}")
    lines.take()
    assert broker.next_deadline() == clock.now + 1
    clock.now += 1
    broker.tick()
    assert lines.take() == [
        "... and 2 more joins in the last second "
        "(at most 1 lines a second are written about connects and joins)"
    ]
    assert broker.next_deadline() is None


def test_the_log_config_switch_and_the_formatters_redaction(
    restore_root_logger: None,
) -> None:
    stream = io.StringIO()
    logs.setup(LogConfig(connections=True), secret_params=["sesame"], stream=stream)
    activity = ActivityLog(Clock())
    peer = FakePeer("alice")
    # "sesame" is the configured token param: the formatter's redaction catches it.
    activity.connected(peer, "/socket/websocket", {"sesame": "open-up", "jwt_like": JWT}, 0.0)
    logs.setup(LogConfig(connections=False), stream=stream)
    activity.connected(peer, "/socket/websocket", {}, 0.0)
    [line] = stream.getvalue().splitlines()
    assert "INFO phxbroker.activity: CONNECTED TO /socket" in line
    assert "open-up" not in line and "eyJzdWIi" not in line
    logs.setup(LogConfig(), stream=stream)
    assert logging.getLogger(ACTIVITY_LOGGER).isEnabledFor(logging.INFO)


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(ACTIVITY_LOGGER).setLevel(logging.NOTSET)
