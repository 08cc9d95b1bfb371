"""Connection counting and the per-connection message bucket, sans-io; [limits] config."""

from __future__ import annotations

import pytest

from phxbroker.config.settings import LOOPBACK, LimitsConfig, parse_config
from phxbroker.config.table import ConfigError
from phxbroker.transport.admission import (
    ConnectionCounter,
    TokenBucket,
    client_address,
    forwarded_client,
)


@pytest.mark.parametrize(
    ("remote", "address"),
    [
        ("203.0.113.7:5123", "203.0.113.7"),
        ("[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"),
        ("[2001:db8:1:2:ffff::1]:443", "2001:db8:1:2::/64"),  # same /64, same client
        ("[::ffff:203.0.113.7]:80", "203.0.113.7"),
        ("[::1]:4000", "::/64"),
        ("203.0.113.7", "203.0.113.7"),  # as named by X-Forwarded-For: no port
        ("[2001:db8:1:2::9]", "2001:db8:1:2::/64"),
    ],
)
def test_client_addresses(remote: str, address: str) -> None:
    assert client_address(remote) == address


def test_the_counter_refuses_only_the_connection_over_a_limit() -> None:
    limits = LimitsConfig(max_connections=3, max_connections_per_ip=2)
    counter = ConnectionCounter()
    counter.opened("a")
    counter.opened("a")
    assert counter.problem("a", limits) is None
    counter.opened("a")
    assert counter.problem("a", limits) == (
        429,
        "too_many_connections_per_ip",
        "3 connections from a (limit 2)",
    )
    assert counter.problem("b", limits) is None  # b has none yet, and 3 in total is fine
    counter.opened("b")
    assert counter.problem("b", limits) == (
        503,
        "too_many_connections",
        "4 connections open (limit 3)",
    )
    for _ in range(3):
        counter.closed("a")
    counter.closed("b")
    assert (counter.total, counter.per_address) == (0, {})


def test_zero_turns_the_connection_limits_off() -> None:
    counter = ConnectionCounter()
    for _ in range(1000):
        counter.opened("a")
    assert counter.problem("a", LimitsConfig(max_connections=0, max_connections_per_ip=0)) is None


def test_the_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2, burst=4, now=100.0)
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 4 + [False] * 2
    assert bucket.refused == 2
    assert bucket.take(100.5)  # half a second buys one message at 2 per second
    assert bucket.refused == 0
    assert not bucket.take(100.5)
    assert [bucket.take(200.0) for _ in range(5)] == [True] * 4 + [False]  # never above burst


def test_limits_config() -> None:
    assert parse_config({}).limits == LimitsConfig()
    config = parse_config(
        {
            "limits": {
                "max_connections": 0,
                "max_connections_per_ip": 5,
                "message_rate": 2.5,
                "message_burst": 10,
                "rate_limit_close_after": 0,
            }
        }
    )
    assert config.limits == LimitsConfig(0, 5, 2.5, 10, 0)
    with pytest.raises(ConfigError, match=r"at limits\.message_burst: must be at least 1"):
        parse_config({"limits": {"message_burst": 0}})
    with pytest.raises(ConfigError, match=r"at limits\.max_connection: unknown key"):
        parse_config({"limits": {"max_connection": 5}})


@pytest.mark.parametrize(
    ("remote", "forwarded_for", "client"),
    [
        ("127.0.0.1:5000", "203.0.113.7", "203.0.113.7"),
        ("[::1]:5000", "2001:db8::9", "[2001:db8::9]"),
        # The client may write anything left of what the proxy appended.
        ("127.0.0.1:5000", "10.9.9.9, 203.0.113.7", "203.0.113.7"),
        # A chain of trusted proxies: the rightmost untrusted hop is the client.
        ("127.0.0.1:5000", "203.0.113.7, 127.0.0.2", "203.0.113.7"),
        # An untrusted peer's header is ignored.
        ("198.51.100.1:5000", "203.0.113.7", None),
        # A garbled or all-trusted chain names nobody.
        ("127.0.0.1:5000", "not-an-ip", None),
        ("127.0.0.1:5000", "127.0.0.5", None),
        ("127.0.0.1:5000", "", None),
    ],
)
def test_a_trusted_proxy_names_the_client(remote, forwarded_for, client) -> None:
    assert forwarded_client(remote, forwarded_for, LOOPBACK) == client


def test_trusted_proxies_config() -> None:
    default = parse_config({}).server.trusted_proxies
    assert default == LOOPBACK
    none = parse_config({"server": {"trusted_proxies": []}}).server.trusted_proxies
    assert none == ()
    custom = parse_config({"server": {"trusted_proxies": ["10.0.0.0/8"]}}).server
    assert forwarded_client("10.1.2.3:9", "203.0.113.7", custom.trusted_proxies) == "203.0.113.7"
    with pytest.raises(ConfigError, match=r"server.trusted_proxies: 'nope' is not an IP"):
        parse_config({"server": {"trusted_proxies": ["nope"]}})
