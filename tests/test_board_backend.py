"""The example board app's back end, as a real process, called exactly as phxbroker calls
it: signed JSON over HTTP to /hooks/connect, /hooks/join, /hooks/event and /hooks/events.

The seed data: John (1) and Jane (2) share board 1 "Welcome board" (lists "To do" and
"Doing", a card "Try phxbroker"); Bob (3) is not a member and owns board 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio
from support.board_backend import BOARD, JWT_SECRET, REPO, SECRET, TIMEOUT
from support.board_backend import BoardBackend as BoardProcess
from trio_websocket import open_websocket_url

from phxbroker.hooks import backend as hooks


class BoardBackend(BoardProcess):
    """The board back end, called as phxbroker calls it."""

    def call(self, kind: str, body: dict[str, Any], secret: str = SECRET) -> httpx.Response:
        data = json.dumps(body).encode()
        return self.http.post(
            f"/hooks/{kind}", content=data, headers=hooks.sign(secret, None, data)
        )

    def answer(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.call(kind, body)
        assert response.status_code == 200, response.text
        return response.json()

    def join(self, user: int, topic: str = BOARD) -> dict[str, Any]:
        return self.answer(
            "join",
            {"socket": socket(user), "topic": topic, "payload": {}, "join_ref": "1"},
        )

    def event(
        self, user: int, event: str, payload: dict[str, Any], assigns: dict | None = None
    ) -> dict[str, Any]:
        return self.answer(
            "event",
            {
                "socket": socket(user),
                "topic": BOARD,
                "event": event,
                "payload": payload,
                "ref": "2",
                "assigns": {"board_id": 1} if assigns is None else assigns,
            },
        )

    def rows(self, sql: str, *args: Any) -> list[tuple]:
        with sqlite3.connect(self.db_path) as conn:
            return conn.execute(sql, args).fetchall()


def socket(user: int) -> dict[str, Any]:
    return {"id": f"conn-{user}", "user": str(user), "assigns": {}}


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[BoardBackend]:
    """A back end with a freshly seeded database, for a test that changes data."""
    started = BoardBackend(tmp_path)
    yield started
    assert started.stop() == 0
    assert "Traceback" not in started.log_text()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BoardBackend]:
    """One back end for the tests that change no data (refusals, connects)."""
    started = BoardBackend(tmp_path_factory.mktemp("shared"))
    yield started
    assert started.stop() == 0
    assert "Traceback" not in started.log_text()


def by_event(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {message["event"]: message for message in answer["broadcast"]}


# -- connect ------------------------------------------------------------------------------


def test_connect_maps_the_seeds_jwt_to_the_user(shared: BoardBackend):
    token = shared.login("jane@phoenix-trello.com")
    answer = shared.answer(
        "connect",
        {
            "params": {"token": token, "vsn": "2.0.0"},
            "headers": {},
            "remote": "127.0.0.1",
            "transport": "websocket",
            "user": None,
        },
    )
    assert answer == {
        "status": "ok",
        "user": "2",
        "assigns": {
            "current_user": {
                "id": 2,
                "first_name": "Jane",
                "last_name": "Roe",
                "email": "jane@phoenix-trello.com",
            }
        },
        "id": "users_socket:2",
    }


def guardian_token(user: str = "User:1", secret: str = JWT_SECRET, **claims: Any) -> str:
    """A token shaped as the seed's Guardian makes it (HS512, sub = aud = "User:<id>")."""
    issued = int(time.time())
    body = {"sub": user, "aud": user, "iss": "PhoenixTrello", "typ": "token"}
    body |= {"iat": issued, "exp": issued + 3 * 24 * 3600, **claims}
    return jwt.encode(body, secret, algorithm="HS512")


def test_connect_accepts_a_token_guardian_made(shared: BoardBackend):
    answer = shared.answer("connect", {"params": {"token": guardian_token()}})
    assert (answer["status"], answer["user"]) == ("ok", "1")


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"token": ""},
        {"token": "not-a-jwt"},
        {"token": guardian_token(secret="another-key-" + "y" * 64)},
        {"token": guardian_token(exp=int(time.time()) - 10)},
        {"token": guardian_token(iss="SomeoneElse")},
        {"token": guardian_token("Board:1")},
        {"token": guardian_token("User:99")},
    ],
    ids=["no-token", "empty", "garbage", "other-key", "expired", "issuer", "not-a-user", "gone"],
)
def test_connect_refuses_a_missing_or_bad_token(shared: BoardBackend, params: dict):
    answer = shared.answer("connect", {"params": params, "transport": "websocket"})
    assert answer == {"status": "error"}


def test_connect_refuses_when_the_brokers_own_check_named_someone_else(shared: BoardBackend):
    answer = shared.answer("connect", {"params": {"token": guardian_token()}, "user": "2"})
    assert answer == {"status": "error"}


def test_sessions_api_refuses_a_wrong_password(shared: BoardBackend):
    response = shared.http.post(
        "/api/v1/sessions",
        json={"session": {"email": "john@phoenix-trello.com", "password": "wrong"}},
    )
    assert response.status_code == 422
    assert response.json() == {"error": "Invalid email or password"}


# -- join ---------------------------------------------------------------------------------


def test_a_member_joins_and_gets_the_board_from_the_database(backend: BoardBackend):
    answer = backend.join(2)
    assert answer["status"] == "ok"
    board = answer["response"]["board"]
    assert board["id"] == "1-welcome-board"
    assert board["name"] == "Welcome board"
    assert board["user"]["email"] == "john@phoenix-trello.com"
    assert [member["id"] for member in board["members"]] == [1, 2]
    assert [(lst["name"], lst["position"]) for lst in board["lists"]] == [
        ("To do", 1024),
        ("Doing", 2048),
    ]
    assert [card["name"] for card in board["lists"][0]["cards"]] == ["Try phxbroker"]
    assert answer["assigns"] == {"board_id": 1}
    assert answer["broadcast"] == [{"event": "user:joined", "payload": {"users": [2]}}]
    # The seed's Monitor: the newest user first, each once.
    assert backend.join(1)["broadcast"][0]["payload"] == {"users": [1, 2]}


def test_a_non_member_is_refused(shared: BoardBackend):
    assert shared.join(3) == {"status": "error", "response": {"reason": "unauthorized"}}
    assert shared.join(1, "boards:2")["status"] == "error"
    assert shared.join(1, "boards:99")["status"] == "error"


def test_user_topics_only_for_their_own_user(shared: BoardBackend):
    assert shared.join(3, "users:3")["status"] == "ok"
    assert shared.join(3, "users:1") == {"status": "error", "response": {"reason": "Invalid user"}}
    assert shared.join(3, "rooms:lobby")["response"] == {"reason": "unmatched topic"}


# -- events -------------------------------------------------------------------------------


def test_lists_create_inserts_replies_and_broadcasts_list_created(backend: BoardBackend):
    answer = backend.event(2, "lists:create", {"list": {"name": "Done"}})
    created = answer["reply"]["response"]["list"]
    assert answer["reply"]["status"] == "ok"
    assert created["name"] == "Done" and created["board_id"] == 1
    assert created["position"] == 3072 and created["cards"] == []
    assert answer["broadcast"] == [{"event": "list:created", "payload": {"list": created}}]
    assert answer["stop"] is None
    assert backend.rows("SELECT name FROM lists WHERE id = ?", created["id"]) == [("Done",)]
    assert "Done" in [lst["name"] for lst in backend.join(1)["response"]["board"]["lists"]]


def test_lists_create_without_a_name_gets_the_seeds_error(backend: BoardBackend):
    for payload in ({"list": {"name": ""}}, {"list": "Done"}, {}):
        answer = backend.event(2, "lists:create", payload)
        assert answer["reply"] == {"status": "error", "response": {"error": "Error creating list"}}
        assert answer["broadcast"] == []
    assert backend.rows("SELECT COUNT(*) FROM lists") == [(2,)]


def test_cards_create_broadcasts_card_created(backend: BoardBackend):
    answer = backend.event(1, "cards:create", {"card": {"name": "Write docs", "list_id": 2}})
    card = answer["reply"]["response"]["card"]
    assert (card["name"], card["list_id"], card["position"]) == ("Write docs", 2, 1024)
    assert card["members"] == [] and card["comments"] == [] and card["tags"] == []
    assert by_event(answer)["card:created"]["payload"] == {"card": card}
    # A list on someone else's board is not this board's.
    refused = backend.event(1, "cards:create", {"card": {"name": "Sneak", "list_id": 3}})
    assert refused["reply"]["response"] == {"error": "Error creating card"}


def test_members_add_notifies_the_new_members_user_topic(backend: BoardBackend):
    answer = backend.event(1, "members:add", {"email": "bob@phoenix-trello.com"})
    bob = {"id": 3, "first_name": "Bob", "last_name": "Stranger", "email": "bob@phoenix-trello.com"}
    assert answer["reply"] == {"status": "ok", "response": {"user": bob}}
    broadcasts = by_event(answer)
    assert broadcasts["member:added"] == {"event": "member:added", "payload": {"user": bob}}
    notice = broadcasts["boards:add"]
    assert notice["topic"] == "users:3"
    assert notice["payload"]["board"]["id"] == "1-welcome-board"
    assert bob in notice["payload"]["board"]["members"]
    assert backend.join(3)["status"] == "ok"

    again = backend.event(1, "members:add", {"email": "bob@phoenix-trello.com"})
    assert again["reply"]["response"] == {"error": "Error adding new member"}
    nobody = backend.event(1, "members:add", {"email": "nobody@example.com"})
    assert nobody["reply"] == {"status": "error", "response": {"error": "User does not exist"}}


def test_card_update_and_comment_broadcast_the_board_and_card(backend: BoardBackend):
    updated = backend.event(1, "card:update", {"card": {"id": 1, "tags": ["urgent"]}})
    assert by_event(updated)["card:updated"]["payload"]["card"]["tags"] == ["urgent"]
    commented = backend.event(2, "card:add_comment", {"card_id": 1, "text": "On it"})
    payload = by_event(commented)["comment:created"]["payload"]
    assert payload["card"]["comments"][0]["text"] == "On it"
    assert payload["card"]["comments"][0]["user"]["id"] == 2
    assert payload["board"]["id"] == "1-welcome-board"


def test_events_from_a_non_member_are_refused(shared: BoardBackend):
    answer = shared.event(3, "lists:create", {"list": {"name": "Mine now"}})
    assert answer["reply"] == {"status": "error", "response": {"reason": "unauthorized"}}
    assert shared.rows("SELECT COUNT(*) FROM lists WHERE name = 'Mine now'") == [(0,)]


def test_the_board_comes_from_the_topic_when_assigns_are_absent(backend: BoardBackend):
    answer = backend.event(2, "lists:create", {"list": {"name": "Later"}}, assigns={})
    assert answer["reply"]["response"]["list"]["board_id"] == 1


# -- signatures ---------------------------------------------------------------------------


def test_an_unsigned_call_is_refused_with_401_and_a_log_line(shared: BoardBackend):
    body = json.dumps({"socket": socket(3), "topic": BOARD, "payload": {}}).encode()
    response = shared.http.post(
        "/hooks/join",
        content=body,
        headers={"Content-Type": "application/json", "X-Phxbroker-Request-Id": "unsigned-1"},
    )
    assert response.status_code == 401
    assert response.json() == {"error": "the X-Phxbroker-Timestamp header is missing"}
    assert re.search(
        r"refused a join hook call from 127\.0\.0\.1 \(request id unsigned-1\):"
        r" the X-Phxbroker-Timestamp header is missing",
        shared.log_text(),
    )


def test_a_call_signed_with_another_secret_is_refused(shared: BoardBackend):
    body = {"events": []}
    response = shared.call("events", body, secret="not-the-shared-secret")
    assert response.status_code == 401
    assert "matches no signing secret" in response.json()["error"]
    assert "not-the-shared-secret" not in shared.log_text()


def test_a_replayed_stale_call_is_refused(shared: BoardBackend):
    data = json.dumps({"params": {}}).encode()
    headers = hooks.sign(SECRET, 1_000_000_000, data)
    response = shared.http.post("/hooks/connect", content=data, headers=headers)
    assert response.status_code == 401
    assert "beyond the 300 s tolerance" in response.json()["error"]


def test_an_unreadable_call_is_a_400(shared: BoardBackend):
    for body in (b"{oops", b"[]"):
        response = shared.http.post(
            "/hooks/event", content=body, headers=hooks.sign(SECRET, None, body)
        )
        assert response.status_code == 400
    response = shared.call("join", {"socket": socket(1), "payload": {}})
    assert response.status_code == 400
    assert response.json() == {"error": "the join call's topic is missing or not a string"}


def test_secret_rotation_accepts_either_secret(tmp_path: Path):
    rotating = BoardBackend(
        tmp_path,
        args=("--secret-env", "BOARD_HOOK_SECRET", "--secret-env", "BOARD_HOOK_SECRET_OLD"),
        env={"BOARD_HOOK_SECRET_OLD": "the-old-secret"},
    )
    try:
        body = {"events": []}
        assert rotating.call("events", body).status_code == 200
        assert rotating.call("events", body, secret="the-old-secret").status_code == 200
        assert rotating.call("events", body, secret="neither").status_code == 401
    finally:
        assert rotating.stop() == 0


def test_a_missing_secret_stops_the_back_end_with_one_sentence(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "BOARD_HOOK_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "examples.board", "--port", "0", "--db", str(tmp_path / "x.db")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "board: the hook signing secret is missing: set BOARD_HOOK_SECRET to the secret"
        " phxbroker's [hooks] secret_env names"
    ]


# -- lifecycle batches --------------------------------------------------------------------


def lifecycle(event_id: str, kind: str, topic: str | None, user: str | None) -> dict[str, Any]:
    return {
        "id": event_id,
        "type": kind,
        "topic": topic,
        "user": user,
        "socket": f"conn-{user}",
        "at": 1_800_000_000_000,
    }


def test_an_events_batch_is_recorded_once(backend: BoardBackend):
    batch = {
        "events": [
            lifecycle("e1", "join", BOARD, "2"),
            lifecycle("e2", "leave", BOARD, "2"),
            lifecycle("e3", "disconnect", None, "2"),
        ]
    }
    assert backend.answer("events", batch) == {"received": 3}
    # phxbroker retries a batch it could not deliver: the same ids are not counted twice.
    assert backend.answer("events", batch) == {"received": 0}
    assert backend.rows("SELECT id, type, topic, user FROM lifecycle_events ORDER BY id") == [
        ("e1", "join", BOARD, "2"),
        ("e2", "leave", BOARD, "2"),
        ("e3", "disconnect", None, "2"),
    ]


def test_a_leave_removes_the_user_from_the_boards_connected_users(backend: BoardBackend):
    backend.join(1)
    assert backend.join(2)["broadcast"][0]["payload"] == {"users": [2, 1]}
    backend.answer("events", {"events": [lifecycle("l1", "leave", BOARD, "2")]})
    assert backend.rows("SELECT user_id FROM connected_users WHERE topic = ?", BOARD) == [(1,)]
    backend.answer("events", {"events": [lifecycle("d1", "disconnect", None, "1")]})
    assert backend.rows("SELECT COUNT(*) FROM connected_users") == [(0,)]


def test_a_malformed_events_batch_is_a_400(shared: BoardBackend):
    for body in ({}, {"events": {}}, {"events": [{"type": "join"}]}):
        assert shared.call("events", body).status_code == 400


async def test_user_left_reaches_the_board_through_phxbrokers_api(
    tmp_path: Path, broker_factory: Callable[..., Any]
):
    """The seed's terminate/2 broadcast "user:left"; here a lifecycle batch makes the back
    end send it through a real phxbroker's HTTP API, and a client on the board gets it."""
    api_key = "board-api-key-for-tests"
    broker = broker_factory(
        {
            "api": {"keys": [{"name": "board", "key": api_key}]},
            "auth": {"tokens": [{"user": "1", "token": "john-token"}]},
            "topics": [{"pattern": "boards:*", "join": "authenticated"}],
        }
    )
    backend = BoardBackend(
        tmp_path, args=("--broker-api", broker.url), env={"PHXBROKER_API_KEY": api_key}
    )
    try:
        url = f"{broker.socket_url()}/websocket?token=john-token&vsn=2.0.0"
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps(["1", "1", BOARD, "phx_join", {}]))
            with trio.fail_after(TIMEOUT):
                assert json.loads(await ws.get_message())[3] == "phx_reply"
            await trio.to_thread.run_sync(backend.join, 1)
            await trio.to_thread.run_sync(backend.join, 2)
            batch = {"events": [lifecycle("left-1", "leave", BOARD, "2")]}
            assert await trio.to_thread.run_sync(backend.answer, "events", batch) == {"received": 1}
            with trio.fail_after(TIMEOUT):
                message = json.loads(await ws.get_message())
            assert message == [None, None, BOARD, "user:left", {"users": [1]}]
    finally:
        assert backend.stop() == 0
    assert f"broadcast user:left to {BOARD}" in backend.log_text()


# -- the page and the README --------------------------------------------------------------


def test_the_page_and_phoenix_js_are_served(tmp_path: Path):
    phoenix_js = tmp_path / "phoenix.mjs"
    phoenix_js.write_text("export class Socket {}\n")
    page = BoardBackend(tmp_path, args=("--phoenix-js", str(phoenix_js)))
    try:
        index = page.http.get("/")
        assert index.status_code == 200 and '<script type="module" src="/app.js">' in index.text
        script = page.http.get("/app.js").text
        assert 'import {Socket} from "/js/phoenix.mjs"' in script
        assert 'channel.push("members:add", {email: email})' in script
        served = page.http.get("/js/phoenix.mjs")
        assert served.text == "export class Socket {}\n"
        assert served.headers["content-type"].startswith("text/javascript")
    finally:
        assert page.stop() == 0


def test_the_readmes_nodejs_check_agrees_with_the_helper(tmp_path: Path):
    node = shutil.which("node")
    assert node, "node is not installed: the README's Node.js check cannot be run"
    readme = (REPO / "examples/board/README.md").read_text()
    snippet = re.search(r"```js\n(import \{createHmac.*?)```", readme, re.S)
    assert snippet, "the README has no Node.js signature check"
    (tmp_path / "verify.mjs").write_text(snippet.group(1))
    (tmp_path / "run.mjs").write_text(
        'import {verifyPhxbroker} from "./verify.mjs"\n'
        "const cases = JSON.parse(process.argv[2])\n"
        "console.log(JSON.stringify(cases.map(([secret, headers, body]) =>\n"
        '  verifyPhxbroker(secret, headers, Buffer.from(body, "utf8")))))\n'
    )
    body = json.dumps({"topic": BOARD, "payload": {"name": "Größe"}}, ensure_ascii=False)

    def headers(secret: str | list[str] = SECRET, stamp: int | None = None) -> dict[str, str]:
        signed = hooks.sign(secret, stamp, body.encode())
        return {name.lower(): value for name, value in signed.items()}

    cases = [
        [SECRET, headers(), body],
        [SECRET, headers(), body.replace("Größe", "Grösse")],
        ["other", headers(), body],
        [SECRET, headers(stamp=int(time.time()) - 3600), body],
        [SECRET, headers(["new", SECRET]), body],
        [SECRET, {}, body],
    ]
    result = subprocess.run(
        [node, str(tmp_path / "run.mjs"), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [True, False, False, False, True, False]
