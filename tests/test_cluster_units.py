"""The cluster's sans-io parts: its config, the wire format between nodes, and the view of
what other nodes own (presence merge, sequence gaps, incarnations, the down period)."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import tomllib
from typing import Any

import orjson
import pytest

from phxbroker.cluster import wire
from phxbroker.cluster.replica import Replica
from phxbroker.config.settings import parse_config
from phxbroker.config.table import ConfigError
from phxbroker.protocol.messages import RawJSON

# -- config -------------------------------------------------------------------------------


def cluster_config(text: str) -> Any:
    return parse_config(tomllib.loads(text), "/etc/phxbroker.toml").cluster


def test_no_cluster_section_means_a_single_process() -> None:
    assert cluster_config("") is None


def test_cluster_section_defaults() -> None:
    config = cluster_config('[cluster]\nredis_url = "redis://10.0.0.5:6380/2"')
    assert (config.node, config.prefix, config.down_after) == ("", "phxbroker", 30.0)
    assert config.redis_address == "redis://10.0.0.5:6380/2"
    assert config.tls_context is None


def test_a_url_with_a_password_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError, match=r"at cluster\.redis_url: carries a password"):
        cluster_config('[cluster]\nredis_url = "redis://:secret@10.0.0.5/0"')
    monkeypatch.setenv("REDIS_URL", "rediss://:secret@redis.example:6380/0")
    config = cluster_config('[cluster]\nredis_url_env = "REDIS_URL"')
    assert config.redis_url == "rediss://:secret@redis.example:6380/0"
    assert "secret" not in config.redis_address and "secret" not in repr(config)
    # rediss:// verifies the server's certificate and host name.
    assert config.tls_context.verify_mode == ssl.CERT_REQUIRED
    assert config.tls_context.check_hostname


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[cluster]", 'give exactly one of "redis_url" or "redis_url_env"'),
        ('[cluster]\nredis_url_env = "NOT_SET_ANYWHERE"', "'NOT_SET_ANYWHERE' is not set"),
        ('[cluster]\nredis_url = "http://x"', "must start with redis:// or rediss://"),
        ('[cluster]\nredis_url = "redis://host/abc"', "must be a database number"),
        ('[cluster]\nredis_url = "redis://h"\nnode = "a b"', "must not contain spaces"),
        ('[cluster]\nredis_url = "redis://h"\nprefix = ""', "must not be empty"),
        ('[cluster]\nredis_url = "redis://h"\ndown_after = 0.1', "must be at least 0.5"),
        ('[cluster]\nredis_url = "redis://h"\ntls_ca = "ca.pem"', "only used with a rediss://"),
        ('[cluster]\nredis_url = "rediss://h"\ntls_ca = "missing.pem"', "does not exist"),
        ('[cluster]\nredis_url = "redis://h"\nworkers = 2', "unknown key"),
    ],
)
def test_cluster_config_mistakes_are_one_sentence(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="at cluster") as caught:
        cluster_config(text)
    assert message in str(caught.value)


def test_without_a_cluster_nothing_of_it_is_imported() -> None:
    """The single-process daemon loads neither the cluster engine nor its Redis client."""
    code = (
        "import sys, tomllib\n"
        "from phxbroker.config.settings import parse_config\n"
        "from phxbroker.daemon.assembly import Daemon\n"
        "daemon = Daemon(parse_config(tomllib.loads('[admin]\\nsocket = \"\"')))\n"
        "assert daemon.cluster is None\n"
        "assert type(daemon.broker.fanout).__name__ == 'LocalOnly'\n"
        "loaded = [m for m in sys.modules if m.startswith(('coredis', 'phxbroker.cluster'))]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- wire ----------------------------------------------------------------------------------

ORIGIN = "0123456789abcdef"


def test_a_broadcast_crosses_encoded_once_and_is_spliced_on_arrival() -> None:
    data = wire.encode_broadcast(ORIGIN, "new_msg", {"body": "hé", "n": 2**70}, relayed=True)
    remote = wire.decode_broadcast(data)
    assert (remote.origin, remote.event, remote.relayed) == (ORIGIN, "new_msg", True)
    assert isinstance(remote.payload, RawJSON)
    assert json.loads(orjson.dumps([remote.payload])) == [{"body": "hé", "n": 2**70}]
    binary = wire.decode_broadcast(wire.encode_broadcast(ORIGIN, "blob", b"\x00\xff", False))
    assert (binary.payload, binary.relayed) == (b"\x00\xff", False)


def test_control_messages_round_trip() -> None:
    meta = {"online_at": "1", "phx_ref": "r1"}
    data = wire.encode_control("p", "node-a", ORIGIN, s=3, t="room:1", key="al", j=meta, l=None)
    assert wire.decode_control(data) == {
        "k": "p",
        "n": "node-a",
        "i": ORIGIN,
        "s": 3,
        "t": "room:1",
        "key": "al",
        "j": meta,
        "l": None,
    }


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not a broadcast"),
        (b"B" + b"x" * 10, "not a broadcast"),
        (b"B" + ORIGIN.encode() + b"\x00\x00\x09abc", "cut short"),
        (b"B" + ORIGIN.encode() + b"\x00\x00\x01e{not json", "not JSON"),
        (b"B" + b"\xff" * 16 + b"\x00\x00\x01e{}", "not ASCII"),
    ],
)
def test_malformed_broadcasts_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_broadcast(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"hello", "wrong type byte"),
        (b"J{not json", "not JSON"),
        (b"J[1,2]", "not a JSON object"),
        (b'J{"k":"nope","n":"a","i":"0123456789abcdef"}', "unknown kind"),
        (b'J{"k":"hb","n":"a","i":"0123456789abcdef"}', "field 's'"),
        (b'J{"k":"hb","n":"a","i":"0123456789abcdef","s":true}', "field 's'"),
        (b'J{"k":"hb","n":"a","i":"short","s":1}', "incarnation"),
        (
            b'J{"k":"p","n":"a","i":"0123456789abcdef","s":1,"t":"x","key":"k","j":{},"l":null}',
            "no phx_ref",
        ),
        (
            b'J{"k":"state","n":"a","i":"0123456789abcdef","s":1,"p":[["t"]],"u":[]}',
            "malformed presence entry",
        ),
    ],
)
def test_malformed_control_messages_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_control(data)


# -- the view of other nodes ---------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def message(kind: str, incarnation: str = "b" * 16, node: str = "b", **fields: Any) -> dict:
    return wire.decode_control(wire.encode_control(kind, node, incarnation, **fields))


def meta(ref: str) -> dict[str, Any]:
    return {"online_at": "1", "phx_ref": ref}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def replica(clock: Clock) -> Replica:
    return Replica("a" * 16, down_after=5, clock=clock, resync=1)


def test_deltas_in_order_are_merged_and_a_gap_asks_for_the_state(
    replica: Replica, clock: Clock
) -> None:
    hello = replica.receive(message("hello", s=0))
    assert hello.send_state_to == "b" * 16 and hello.request_sync is None
    joined = replica.receive(message("p", s=1, t="room:1", key="bob", j=meta("r1"), l=None))
    assert joined.presence == [("room:1", "bob", meta("r1"), None)]
    gap = replica.receive(message("p", s=3, t="room:1", key="eve", j=meta("r3"), l=None))
    assert gap.presence == [] and gap.request_sync == "b" * 16
    state = replica.receive(
        message("state", s=3, p=[["room:1", "eve", meta("r3")]], u=[["all", "bob"]], h={"all": 4})
    )
    assert sorted(state.presence, key=str) == sorted(
        [("room:1", "bob", None, meta("r1")), ("room:1", "eve", meta("r3"), None)], key=str
    )
    assert state.users == [("all", "bob", +1)] and state.hits == {"all": 4}
    # Deltas the state already holds are ignored.
    assert not replica.receive(message("p", s=3, t="room:1", key="eve", j=meta("r3"), l=None))


def test_a_heartbeat_ahead_of_the_view_asks_once_per_resync_period(
    replica: Replica, clock: Clock
) -> None:
    replica.receive(message("hello", s=0))
    assert replica.receive(message("hb", s=2)).request_sync == "b" * 16
    assert replica.receive(message("hb", s=2)).request_sync is None
    clock.now += 1
    assert replica.receive(message("hb", s=2)).request_sync == "b" * 16


def test_a_silent_node_leaves_after_down_after_but_not_after_our_own_outage(
    replica: Replica, clock: Clock
) -> None:
    replica.receive(message("hello", s=0))
    replica.receive(message("p", s=1, t="room:1", key="bob", j=meta("r1"), l=None))
    clock.now += 4.9
    assert not replica.expire()
    clock.now += 10  # this node was cut off meanwhile: nobody is blamed for it
    replica.heard_everyone_now()
    assert not replica.expire()
    clock.now += 5.1
    gone = replica.expire()
    assert gone.presence == [("room:1", "bob", None, meta("r1"))] and gone.left_nodes == ["b"]


def test_a_restarted_node_leaves_no_ghost_and_a_stopping_one_leaves_at_once(
    replica: Replica,
) -> None:
    replica.receive(message("hello", s=0))
    replica.receive(message("p", s=1, t="room:1", key="bob", j=meta("r1"), l=None))
    replica.receive(message("u", s=2, t="all", user="bob", on=True))
    restarted = replica.receive(message("hello", incarnation="c" * 16, s=0))
    assert restarted.presence == [("room:1", "bob", None, meta("r1"))]
    assert restarted.users == [("all", "bob", -1)]
    replica.receive(message("p", incarnation="c" * 16, s=1, t="r", key="k", j=meta("r9"), l=None))
    assert replica.receive(message("bye", incarnation="c" * 16)).presence == [
        ("r", "k", None, meta("r9"))
    ]


def test_hits_of_every_node_add_up_and_stay_counted_when_a_node_goes(
    replica: Replica, clock: Clock
) -> None:
    replica.receive(message("hits", t="all", c=3))
    assert replica.receive(message("hits", incarnation="c" * 16, node="c", t="all", c=2)).hits == {
        "all": 5
    }
    assert not replica.receive(message("hits", t="all", c=3)).hits  # a repeat counts once
    replica.receive(message("bye"))
    assert replica.receive(message("hits", t="all", c=4)).hits == {"all": 6}


def test_our_own_messages_change_nothing(replica: Replica) -> None:
    own = message("p", incarnation="a" * 16, s=1, t="r", key="k", j=meta("x"), l=None)
    assert not replica.receive(own) and replica.views == {}


def test_a_node_taken_for_dead_comes_back_with_its_next_heartbeat(
    replica: Replica, clock: Clock
) -> None:
    replica.receive(message("hello", s=0))
    replica.receive(message("p", s=1, t="room:1", key="bob", j=meta("r1"), l=None))
    clock.now += 6
    assert replica.expire().presence == [("room:1", "bob", None, meta("r1"))]
    back = replica.receive(message("hb", s=1))  # it was only late (a long pause)
    assert back.request_sync == "b" * 16
    state = replica.receive(message("state", s=1, p=[["room:1", "bob", meta("r1")]], u=[]))
    assert state.presence == [("room:1", "bob", meta("r1"), None)]


def test_late_messages_of_a_node_that_said_bye_are_ignored(replica: Replica) -> None:
    replica.receive(message("hello", s=0))
    replica.receive(message("bye"))
    late = replica.receive(message("p", s=1, t="room:1", key="bob", j=meta("r1"), l=None))
    assert not late and late.request_sync is None and replica.views == {}
