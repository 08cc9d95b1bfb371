"""The end-to-end harness itself: event matching and the phoenix.js driver's reports."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
from support.node_client import NodeClient, NodeClientError, matches

ClientFactory = Callable[..., NodeClient]


def test_matches_treats_dicts_as_recursive_subsets() -> None:
    event = {"type": "message", "payload": {"status": "ok", "response": {"a": 1, "b": 2}}}

    assert matches(event, {"type": "message", "payload": {"response": {"a": 1}}})
    assert not matches(event, {"payload": {"response": {"a": 2}}})
    assert not matches(event, {"missing": None})
    assert not matches({"payload": [1]}, {"payload": {"a": 1}})
    assert matches({"payload": b"\x00"}, {"payload": b"\x00"})


def test_a_command_the_driver_rejects_raises_with_its_reason(
    node_client_factory: ClientFactory,
) -> None:
    client = node_client_factory()

    with pytest.raises(NodeClientError, match="no socket: send a connect command first"):
        client.command({"cmd": "join", "topic": "room:lobby"})


def test_expect_timeout_lists_the_events_seen(node_client_factory: ClientFactory) -> None:
    client = node_client_factory()

    with pytest.raises(NodeClientError, match=r'(?s)no event matching \{"type": "never"\}.*ready'):
        client.expect({"type": "never"}, timeout=0.2)


def test_unreachable_server_is_reported_as_error_then_close(
    node_client_factory: ClientFactory,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = node_client_factory()

    client.connect(f"ws://127.0.0.1:{port}/socket", reconnectAfterMs=[60_000])

    assert "ECONNREFUSED" in client.expect({"type": "error"})["message"]
    assert client.expect({"type": "close"})["code"] == 1006
