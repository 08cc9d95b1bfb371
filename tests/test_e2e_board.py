"""The seed board app for real: its phoenix.js front end's calls, phxbroker with the
example's config, and the example back end (Starlette and SQLite) answering the hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.board_backend import BOARD, SECRET, BoardBackend, example_config
from support.broker import BrokerProcess
from support.node_client import NodeClient

Start = Callable[..., BrokerProcess]
Client = Callable[..., NodeClient]


@pytest.fixture
def board(tmp_path: Path) -> Iterator[BoardBackend]:
    backend = BoardBackend(tmp_path)
    yield backend
    assert backend.stop() == 0


def signed_in(
    node_client_factory: Client, broker: BrokerProcess, board: BoardBackend, email: str
) -> NodeClient:
    client = node_client_factory(email.split("@")[0])
    client.connect(broker.socket_url(), {"token": board.login(email)})
    client.expect_open()
    return client


def test_two_members_see_each_others_lists_and_a_stranger_is_kept_out(
    broker_factory: Start, node_client_factory: Client, board: BoardBackend
) -> None:
    broker = broker_factory(example_config(board), env={"BOARD_HOOK_SECRET": SECRET})
    john = signed_in(node_client_factory, broker, board, "john@phoenix-trello.com")
    jane = signed_in(node_client_factory, broker, board, "jane@phoenix-trello.com")
    joined = john.join(BOARD)
    assert joined["status"] == "ok"
    assert joined["response"]["board"]["name"] == "Welcome board"
    assert jane.join(BOARD)["status"] == "ok"
    jane.on(BOARD, "list:created")

    created = john.call(BOARD, "lists:create", {"list": {"name": "Doing"}})
    assert created["status"] == "ok"
    seen = jane.expect({"type": "channel_event", "event": "list:created"})
    assert seen["payload"]["list"]["name"] == "Doing"

    bob = signed_in(node_client_factory, broker, board, "bob@phoenix-trello.com")
    refused = bob.join(BOARD)
    assert refused["status"] == "error" and refused["response"] == {"reason": "unauthorized"}


def test_adding_a_member_tells_that_user_on_their_own_topic(
    broker_factory: Start, node_client_factory: Client, board: BoardBackend
) -> None:
    broker = broker_factory(example_config(board), env={"BOARD_HOOK_SECRET": SECRET})
    john = signed_in(node_client_factory, broker, board, "john@phoenix-trello.com")
    bob = signed_in(node_client_factory, broker, board, "bob@phoenix-trello.com")
    bob_id = board.http.get(
        "/api/v1/current_user", headers={"Authorization": board.login("bob@phoenix-trello.com")}
    ).json()["id"]
    assert bob.join(f"users:{bob_id}")["status"] == "ok"
    bob.on(f"users:{bob_id}", "boards:add")
    assert john.join(BOARD)["status"] == "ok"
    added = john.call(BOARD, "members:add", {"email": "bob@phoenix-trello.com"})
    assert added["status"] == "ok"
    told = bob.expect({"type": "channel_event", "event": "boards:add"})
    assert told["payload"]["board"]["name"] == "Welcome board"
    # ... and now bob is a member.
    assert bob.join(BOARD)["status"] == "ok"
