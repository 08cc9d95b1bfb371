"""The board app's socket and channels, as phxbroker hook handlers.

Each function here is what one of the seed's Elixir modules did, in the same order and
with the same answers: ``connect`` is ``UserSocket.connect/2`` (a Guardian JWT in the
``token`` param), ``join`` is ``UserChannel.join/3`` and ``BoardChannel.join/3``,
``handle_in`` is ``BoardChannel.handle_in/3``, and ``lifecycle`` is what
``BoardChannel.terminate/2`` did. They take the decoded hook call and return the answer
built with :mod:`phxbroker.hooks.backend`.

Where the seed's channel would crash (a card or list that is not on the board, a payload
of the wrong shape), the pusher gets the clause's error reply instead.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from examples.board.db import Database, DataError, JSONObject, permalink_id
from phxbroker.hooks import backend as hooks

log = logging.getLogger("board")

# Guardian's claims as the seed configures it: issuer "PhoenixTrello", a 3-day TTL,
# `sub` and (Guardian's default) `aud` both "User:<id>", signed with HS512.
ISSUER = "PhoenixTrello"
TOKEN_TTL = 3 * 24 * 3600
ALGORITHM = "HS512"
SUBJECT_PREFIX = "User:"


def mint_token(secret: str, user_id: int, *, now: float | None = None) -> str:
    """The JWT the seed's SessionController gives a user who signs in."""
    issued = int(time.time() if now is None else now)
    subject = f"{SUBJECT_PREFIX}{user_id}"
    claims = {
        "sub": subject,
        "aud": subject,
        "iss": ISSUER,
        "typ": "token",
        "iat": issued,
        "exp": issued + TOKEN_TTL,
        "jti": str(uuid.uuid4()),
        "pem": {},
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def user_id_from_token(secret: str, token: Any) -> int | None:
    """The user id a valid token names (Guardian.decode_and_verify, then the seed's
    GuardianSerializer.from_token), or None."""
    if not isinstance(token, str) or not token:
        return None
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": ["exp", "sub", "iss"], "verify_aud": False},
        )
    except jwt.PyJWTError as exc:
        log.info("connect refused: token %s", exc)
        return None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject.startswith(SUBJECT_PREFIX):
        log.info("connect refused: token subject is not a User")
        return None
    user_id = subject[len(SUBJECT_PREFIX) :]
    return int(user_id) if user_id.isdigit() else None


@dataclass(frozen=True)
class Broadcast:
    """A message the back end sends through phxbroker's HTTP API on its own."""

    topic: str
    event: str
    payload: JSONObject


class BoardHooks:
    """The seed's UserSocket, UserChannel and BoardChannel over one database."""

    def __init__(self, db: Database, jwt_secret: str) -> None:
        self.db = db
        self.jwt_secret = jwt_secret
        self.events: dict[str, Callable[[int, int, Mapping[str, Any]], JSONObject]] = {
            "lists:create": self.create_list,
            "cards:create": self.create_card,
            "members:add": self.add_member,
            "card:update": self.update_card,
            "list:update": self.update_list,
            "card:add_comment": self.add_comment,
            "card:add_member": self.add_card_member,
            "card:remove_member": self.remove_card_member,
        }

    # -- UserSocket ---------------------------------------------------------------------

    def connect(self, call: JSONObject) -> JSONObject:
        params = _mapping(call, "params", "connect")
        user_id = user_id_from_token(self.jwt_secret, params.get("token"))
        user = self.db.user(user_id) if user_id is not None else None
        if user is None:
            return hooks.connect_error()
        named = call.get("user")
        if named is not None and str(named) != str(user_id):
            # phxbroker checked a token of its own that named someone else.
            log.info("connect refused: the broker's token names %r, the JWT %s", named, user_id)
            return hooks.connect_error()
        return hooks.connect_ok(
            user_id, {"current_user": user}, socket_id=f"users_socket:{user_id}"
        )

    # -- UserChannel and BoardChannel joins ---------------------------------------------

    def join(self, call: JSONObject) -> JSONObject:
        topic = _text(call, "topic", "join")
        socket = _mapping(call, "socket", "join")
        user_id = _socket_user(socket)
        if user_id is None:
            return hooks.join_error("unauthorized")
        if topic.startswith("users:"):
            if permalink_id(topic.removeprefix("users:")) == user_id:
                return hooks.join_ok()
            return hooks.join_error("Invalid user")
        if topic.startswith("boards:"):
            return self.join_board(topic, user_id, str(socket.get("id") or ""))
        return hooks.join_error("unmatched topic")

    def join_board(self, topic: str, user_id: int, socket_id: str) -> JSONObject:
        board_id = permalink_id(topic.removeprefix("boards:"))
        # The seed looks the board up among the user's own boards; not one of them, no join.
        if board_id is None or not self.db.is_member(board_id, user_id):
            return hooks.join_error("unauthorized")
        board = self.db.board(board_id)
        users = self.db.user_joined(topic, socket_id, user_id)
        return hooks.join_ok(
            {"board": board},
            assigns={"board_id": board_id},
            broadcasts=[hooks.broadcast("user:joined", {"users": users})],
        )

    # -- BoardChannel.handle_in ---------------------------------------------------------

    def handle_in(self, call: JSONObject) -> JSONObject:
        topic = _text(call, "topic", "event")
        event = _text(call, "event", "event")
        socket = _mapping(call, "socket", "event")
        payload = call.get("payload")
        assigns = call.get("assigns") if isinstance(call.get("assigns"), dict) else {}
        user_id = _socket_user(socket)
        board_id = assigns.get("board_id") or permalink_id(topic.removeprefix("boards:"))
        if not topic.startswith("boards:") or user_id is None or board_id is None:
            return hooks.reply_error({"reason": "unmatched topic"})
        if not self.db.is_member(board_id, user_id):
            return hooks.reply_error("unauthorized")
        handler = self.events.get(event)
        if handler is None:
            return hooks.reply_error({"error": f"Unknown event {event}"})
        return handler(board_id, user_id, payload if isinstance(payload, dict) else {})

    def create_list(self, board_id: int, _user_id: int, payload: Mapping[str, Any]) -> JSONObject:
        try:
            with self.db.transaction():
                created = self.db.create_list(board_id, payload.get("list"))
        except DataError:
            return hooks.reply_error({"error": "Error creating list"})
        return hooks.reply_ok(
            {"list": created}, broadcasts=[hooks.broadcast("list:created", {"list": created})]
        )

    def create_card(self, board_id: int, _user_id: int, payload: Mapping[str, Any]) -> JSONObject:
        try:
            with self.db.transaction():
                created = self.db.create_card(board_id, payload.get("card"))
        except DataError:
            return hooks.reply_error({"error": "Error creating card"})
        return hooks.reply_ok(
            {"card": created}, broadcasts=[hooks.broadcast("card:created", {"card": created})]
        )

    def add_member(self, board_id: int, _user_id: int, payload: Mapping[str, Any]) -> JSONObject:
        email = payload.get("email")
        user = self.db.user_by_email(email) if isinstance(email, str) else None
        if user is None:
            return hooks.reply_error({"error": "User does not exist"})
        try:
            with self.db.transaction():
                self.db.add_member(board_id, user["id"])
        except DataError:
            return hooks.reply_error({"error": "Error adding new member"})
        board = self.db.board(board_id)
        return hooks.reply_ok(
            {"user": user},
            broadcasts=[
                hooks.broadcast("member:added", {"user": user}),
                # The seed's Endpoint.broadcast_from!/4 to the new member's own topic.
                hooks.endpoint_broadcast(f"users:{user['id']}", "boards:add", {"board": board}),
            ],
        )

    def update_card(self, board_id: int, _user_id: int, payload: Mapping[str, Any]) -> JSONObject:
        try:
            with self.db.transaction():
                card = self.db.update_card(board_id, payload.get("card"))
        except DataError:
            return hooks.reply_error({"error": "Error updating card"})
        return self._card_updated("card:updated", board_id, card)

    def update_list(self, board_id: int, _user_id: int, payload: Mapping[str, Any]) -> JSONObject:
        try:
            with self.db.transaction():
                self.db.update_list(board_id, payload.get("list"))
        except DataError:
            return hooks.reply_error({"error": "Error updating list"})
        board = self.db.board(board_id)
        return hooks.reply_ok({}, broadcasts=[hooks.broadcast("list:updated", {"board": board})])

    def add_comment(self, board_id: int, user_id: int, payload: Mapping[str, Any]) -> JSONObject:
        try:
            with self.db.transaction():
                card = self.db.add_comment(
                    board_id, payload.get("card_id"), user_id, payload.get("text")
                )
        except DataError:
            return hooks.reply_error({"error": "Error creating comment"})
        return self._card_updated("comment:created", board_id, card)

    def add_card_member(
        self, board_id: int, _user_id: int, payload: Mapping[str, Any]
    ) -> JSONObject:
        if not self.db.is_member(board_id, payload.get("user_id")):
            return hooks.reply_error({"error": "Member does not exist"})
        try:
            with self.db.transaction():
                card = self.db.add_card_member(
                    board_id, payload.get("card_id"), payload.get("user_id")
                )
        except DataError:
            return hooks.reply_error({"error": "Error adding new member"})
        return self._card_updated("card:updated", board_id, card)

    def remove_card_member(
        self, board_id: int, _user_id: int, payload: Mapping[str, Any]
    ) -> JSONObject:
        try:
            with self.db.transaction():
                card = self.db.remove_card_member(
                    board_id, payload.get("card_id"), payload.get("user_id")
                )
        except DataError:
            # The seed's own words for this clause's error.
            return hooks.reply_error({"error": "Error creating comment"})
        return self._card_updated("card:updated", board_id, card)

    def _card_updated(self, event: str, board_id: int, card: JSONObject) -> JSONObject:
        board = self.db.board(board_id)
        return hooks.reply_ok(
            {"card": card}, broadcasts=[hooks.broadcast(event, {"board": board, "card": card})]
        )

    # -- BoardChannel.terminate ---------------------------------------------------------

    def lifecycle(self, call: JSONObject) -> tuple[int, list[Broadcast]]:
        """Record a batch of lifecycle events; return how many were new and the
        ``user:left`` broadcasts the seed's ``terminate/2`` would send."""
        events = call.get("events")
        if not isinstance(events, list) or not all(
            isinstance(event, dict)
            and isinstance(event.get("id"), str)
            and isinstance(event.get("type"), str)
            for event in events
        ):
            raise hooks.HookRequestError(
                "the events call's events must be a list of objects with an id and a type"
            )
        new = 0
        left: set[str] = set()
        with self.db.transaction():
            for event in events:
                if not self.db.record_event(event):
                    continue  # a retried batch: already handled
                new += 1
                kind, topic, socket = event["type"], event.get("topic"), event.get("socket")
                if kind == "leave" and isinstance(topic, str):
                    left.update(self.db.user_left(topic, socket))
                elif kind == "disconnect":
                    left.update(self.db.user_left(None, socket))
                elif kind == "vacated" and isinstance(topic, str):
                    self.db.topic_vacated(topic)
        broadcasts = [
            Broadcast(topic, "user:left", {"users": self.db.connected_users(topic)})
            for topic in sorted(left)
            if topic.startswith("boards:")
        ]
        return new, broadcasts


def _socket_user(socket: Mapping[str, Any]) -> int | None:
    """The user id phxbroker's connect answer gave this socket."""
    user = socket.get("user")
    if user is None:
        assigns = socket.get("assigns")
        current = assigns.get("current_user") if isinstance(assigns, dict) else None
        user = current.get("id") if isinstance(current, dict) else None
    if isinstance(user, int):
        return user
    return int(user) if isinstance(user, str) and user.isdigit() else None


def _mapping(call: JSONObject, name: str, kind: str) -> JSONObject:
    value = call.get(name)
    if not isinstance(value, dict):
        raise hooks.HookRequestError(f"the {kind} call's {name} is missing or not an object")
    return value


def _text(call: JSONObject, name: str, kind: str) -> str:
    value = call.get(name)
    if not isinstance(value, str) or not value:
        raise hooks.HookRequestError(f"the {kind} call's {name} is missing or not a string")
    return value
