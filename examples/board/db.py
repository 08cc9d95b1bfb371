"""The board app's data in SQLite: the seed's tables, its seed data, and its JSON shapes.

Records come out as the seed's encoders render them (a board's id is its slug id
``"1-welcome-board"``; a list carries its cards, a card its comments, tags and members),
so a front end written for the seed reads them unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

JSONObject = dict[str, Any]

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    first_name TEXT NOT NULL,
    last_name TEXT NOT NULL,
    email TEXT NOT NULL UNIQUE,
    encrypted_password TEXT NOT NULL,
    inserted_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS boards (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    slug TEXT NOT NULL,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    inserted_at TEXT NOT NULL
);
-- Board membership (the seed's user_boards): who may join boards:<id>.
CREATE TABLE IF NOT EXISTS user_boards (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    board_id INTEGER NOT NULL REFERENCES boards(id) ON DELETE CASCADE,
    inserted_at TEXT NOT NULL,
    UNIQUE (user_id, board_id)
);
CREATE TABLE IF NOT EXISTS lists (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    position INTEGER NOT NULL DEFAULT 0,
    board_id INTEGER NOT NULL REFERENCES boards(id) ON DELETE CASCADE,
    inserted_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cards (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT,
    position INTEGER NOT NULL DEFAULT 0,
    tags TEXT NOT NULL DEFAULT '[]',
    list_id INTEGER NOT NULL REFERENCES lists(id) ON DELETE CASCADE,
    inserted_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS comments (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    card_id INTEGER NOT NULL REFERENCES cards(id) ON DELETE CASCADE,
    inserted_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS card_members (
    id INTEGER PRIMARY KEY,
    card_id INTEGER NOT NULL REFERENCES cards(id) ON DELETE CASCADE,
    user_board_id INTEGER NOT NULL REFERENCES user_boards(id) ON DELETE CASCADE,
    UNIQUE (card_id, user_board_id)
);
-- Who is on a board's channel now (the seed's BoardChannel.Monitor), per topic.
CREATE TABLE IF NOT EXISTS connected_users (
    topic TEXT NOT NULL,
    socket TEXT NOT NULL,
    user_id INTEGER NOT NULL,
    joined_at REAL NOT NULL,
    PRIMARY KEY (topic, socket)
);
-- Lifecycle events from phxbroker's batches, once each (a retried batch repeats ids).
CREATE TABLE IF NOT EXISTS lifecycle_events (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    topic TEXT,
    user TEXT,
    socket TEXT,
    at INTEGER,
    received_at REAL NOT NULL
);
"""

SEED_PASSWORD = "12345678"
SEED_USERS = (
    ("John", "Doe", "john@phoenix-trello.com"),
    ("Jane", "Roe", "jane@phoenix-trello.com"),
    ("Bob", "Stranger", "bob@phoenix-trello.com"),
)
PASSWORD_ITERATIONS = 100_000
POSITION_STEP = 1024  # the seed spaces list and card positions by 1024


class DataError(ValueError):
    """A write the seed's changesets would refuse (a missing name, a record elsewhere)."""


def now_text() -> str:
    """A timestamp as Ecto renders a naive datetime."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def slugify(name: str) -> str:
    """The seed's board slug: lowercase, runs of non-word characters become "-"."""
    return re.sub(r"[^\w-]+", "-", name.lower())


def permalink_id(text: str) -> int | None:
    """The board id in a topic or URL part such as "1-welcome-board" (the seed's
    Permalink: a leading positive integer), or None."""
    match = re.match(r"[+-]?\d+", text)
    if match is None or int(match.group()) <= 0:
        return None
    return int(match.group())


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, PASSWORD_ITERATIONS)
    return "$".join(("pbkdf2_sha256", str(PASSWORD_ITERATIONS), _b64(salt), _b64(digest)))


def check_password(password: str, encrypted: str | None) -> bool:
    # Without a user, still spend the hashing time, as the seed's dummy_checkpw does.
    if encrypted is None:
        hash_password(password)
        return False
    _scheme, iterations, salt, digest = encrypted.split("$")
    computed = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(salt), int(iterations)
    )
    return hmac.compare_digest(computed, base64.b64decode(digest))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Database:
    """The app's SQLite database. One connection, used from one thread at a time."""

    def __init__(self, path: str | Path) -> None:
        self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def _one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        return self.conn.execute(sql, args).fetchone()

    def _all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        return self.conn.execute(sql, args).fetchall()

    # -- seed -------------------------------------------------------------------------

    def seed_if_empty(self) -> bool:
        """Fill an empty database with the seed data; say whether it did."""
        if self._one("SELECT 1 FROM users LIMIT 1") is not None:
            return False
        with self.transaction():
            john, jane, bob = (
                self.create_user(first, last, email, SEED_PASSWORD)
                for first, last, email in SEED_USERS
            )
            welcome = self.create_board(john, "Welcome board")
            self.add_member(welcome, jane)
            todo = self.create_list(welcome, {"name": "To do"})
            self.create_list(welcome, {"name": "Doing"})
            self.create_card(welcome, {"name": "Try phxbroker", "list_id": todo["id"]})
            self.create_board(bob, "Bob's private board")
        return True

    # -- users --------------------------------------------------------------------------

    def create_user(self, first_name: str, last_name: str, email: str, password: str) -> int:
        cursor = self.conn.execute(
            "INSERT INTO users (first_name, last_name, email, encrypted_password, inserted_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (first_name, last_name, email.lower(), hash_password(password), now_text()),
        )
        return int(cursor.lastrowid or 0)

    def authenticate(self, email: str, password: str) -> JSONObject | None:
        """The user with this email and password (the seed's Session.authenticate)."""
        row = self._one("SELECT * FROM users WHERE email = ?", email.lower())
        if not check_password(password, row["encrypted_password"] if row else None):
            return None
        return user_json(row)

    def user(self, user_id: int) -> JSONObject | None:
        row = self._one("SELECT * FROM users WHERE id = ?", user_id)
        return user_json(row) if row else None

    def user_by_email(self, email: str) -> JSONObject | None:
        row = self._one("SELECT * FROM users WHERE email = ?", email)
        return user_json(row) if row else None

    # -- boards -------------------------------------------------------------------------

    def create_board(self, owner_id: int, name: str) -> int:
        if not isinstance(name, str) or not name.strip():
            raise DataError("name can't be blank")
        cursor = self.conn.execute(
            "INSERT INTO boards (name, slug, user_id, inserted_at) VALUES (?, ?, ?, ?)",
            (name, slugify(name), owner_id, now_text()),
        )
        board_id = int(cursor.lastrowid or 0)
        self.add_member(board_id, owner_id)
        return board_id

    def is_member(self, board_id: int, user_id: Any) -> bool:
        return (
            self._one(
                "SELECT 1 FROM user_boards WHERE board_id = ? AND user_id = ?", board_id, user_id
            )
            is not None
        )

    def add_member(self, board_id: int, user_id: int) -> None:
        """Make the user a member; DataError when already one (the unique index)."""
        try:
            self.conn.execute(
                "INSERT INTO user_boards (user_id, board_id, inserted_at) VALUES (?, ?, ?)",
                (user_id, board_id, now_text()),
            )
        except sqlite3.IntegrityError:
            raise DataError("user is already a member") from None

    def board(self, board_id: int) -> JSONObject:
        """The board with its owner, members, lists, cards and comments (Board.preload_all)."""
        row = self._one("SELECT * FROM boards WHERE id = ?", board_id)
        if row is None:
            raise DataError(f"no board {board_id}")
        lists = [
            self._list_json(list_row)
            for list_row in self._all(
                "SELECT * FROM lists WHERE board_id = ? ORDER BY position, id", board_id
            )
        ]
        return {
            "id": f"{row['id']}-{row['slug']}",
            "name": row["name"],
            "user": self.user(row["user_id"]),
            "members": self._members(board_id),
            "lists": lists,
        }

    def boards_of(self, user_id: int) -> JSONObject:
        """The seed's board index: boards the user owns and boards others shared."""
        owned = self._all("SELECT id FROM boards WHERE user_id = ? ORDER BY id", user_id)
        invited = self._all(
            "SELECT b.id FROM boards b JOIN user_boards ub ON ub.board_id = b.id"
            " WHERE ub.user_id = ? AND b.user_id != ? ORDER BY b.id",
            user_id,
            user_id,
        )
        return {
            "owned_boards": [self.board(row["id"]) for row in owned],
            "invited_boards": [self.board(row["id"]) for row in invited],
        }

    def board_summary(self, board_id: int) -> JSONObject:
        """The seed's BoardView "show.json": id, name and owner id."""
        row = self._one("SELECT * FROM boards WHERE id = ?", board_id)
        if row is None:
            raise DataError(f"no board {board_id}")
        return {"id": f"{row['id']}-{row['slug']}", "name": row["name"], "user_id": row["user_id"]}

    def _members(self, board_id: int) -> list[JSONObject]:
        rows = self._all(
            "SELECT u.* FROM users u JOIN user_boards ub ON ub.user_id = u.id"
            " WHERE ub.board_id = ? ORDER BY ub.id",
            board_id,
        )
        return [user_json(row) for row in rows]

    # -- lists --------------------------------------------------------------------------

    def create_list(self, board_id: int, params: Any) -> JSONObject:
        name = params.get("name") if isinstance(params, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise DataError("name can't be blank")
        last = self._one("SELECT MAX(position) AS p FROM lists WHERE board_id = ?", board_id)
        position = POSITION_STEP if last["p"] is None else last["p"] + POSITION_STEP
        cursor = self.conn.execute(
            "INSERT INTO lists (name, position, board_id, inserted_at) VALUES (?, ?, ?, ?)",
            (name, position, board_id, now_text()),
        )
        return self.get_list(board_id, int(cursor.lastrowid or 0))

    def update_list(self, board_id: int, params: Any) -> JSONObject:
        current = self._list_row(board_id, params)
        name = params.get("name", current["name"])
        position = params.get("position", current["position"])
        if not isinstance(name, str) or not name.strip() or not isinstance(position, int):
            raise DataError("list fields are invalid")
        self.conn.execute(
            "UPDATE lists SET name = ?, position = ? WHERE id = ?", (name, position, current["id"])
        )
        return self.get_list(board_id, current["id"])

    def get_list(self, board_id: int, list_id: int) -> JSONObject:
        row = self._one("SELECT * FROM lists WHERE id = ? AND board_id = ?", list_id, board_id)
        if row is None:
            raise DataError(f"no list {list_id} on board {board_id}")
        return self._list_json(row)

    def _list_row(self, board_id: int, params: Any) -> sqlite3.Row:
        list_id = params.get("id") if isinstance(params, dict) else None
        row = self._one("SELECT * FROM lists WHERE id = ? AND board_id = ?", list_id, board_id)
        if row is None:
            raise DataError(f"no list {list_id!r} on board {board_id}")
        return row

    def _list_json(self, row: sqlite3.Row) -> JSONObject:
        cards = self._all("SELECT id FROM cards WHERE list_id = ? ORDER BY position, id", row["id"])
        return {
            "id": row["id"],
            "board_id": row["board_id"],
            "name": row["name"],
            "position": row["position"],
            "cards": [self._card_json(card["id"]) for card in cards],
        }

    # -- cards --------------------------------------------------------------------------

    def create_card(self, board_id: int, params: Any) -> JSONObject:
        if not isinstance(params, dict):
            raise DataError("card fields are missing")
        list_row = self._list_row(board_id, {"id": params.get("list_id")})
        name = params.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DataError("name can't be blank")
        description = params.get("description")
        tags = params.get("tags", [])
        if description is not None and not isinstance(description, str):
            raise DataError("description must be text")
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            raise DataError("tags must be a list of strings")
        last = self._one("SELECT MAX(position) AS p FROM cards WHERE list_id = ?", list_row["id"])
        position = POSITION_STEP if last["p"] is None else last["p"] + POSITION_STEP
        cursor = self.conn.execute(
            "INSERT INTO cards (name, description, position, tags, list_id, inserted_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (name, description, position, json.dumps(tags), list_row["id"], now_text()),
        )
        return self._card_json(int(cursor.lastrowid or 0))

    def update_card(self, board_id: int, params: Any) -> JSONObject:
        current = self._card_row(board_id, params.get("id") if isinstance(params, dict) else None)
        fields = {
            "name": params.get("name", current["name"]),
            "description": params.get("description", current["description"]),
            "position": params.get("position", current["position"]),
            "tags": params.get("tags", json.loads(current["tags"])),
            "list_id": params.get("list_id", current["list_id"]),
        }
        if not isinstance(fields["name"], str) or not fields["name"].strip():
            raise DataError("name can't be blank")
        if not isinstance(fields["position"], int) or not isinstance(fields["tags"], list):
            raise DataError("card fields are invalid")
        self._list_row(board_id, {"id": fields["list_id"]})
        self.conn.execute(
            "UPDATE cards SET name = ?, description = ?, position = ?, tags = ?, list_id = ?"
            " WHERE id = ?",
            (
                fields["name"],
                fields["description"],
                fields["position"],
                json.dumps(fields["tags"]),
                fields["list_id"],
                current["id"],
            ),
        )
        return self._card_json(current["id"])

    def add_comment(self, board_id: int, card_id: Any, user_id: int, text: Any) -> JSONObject:
        card = self._card_row(board_id, card_id)
        if not isinstance(text, str) or not text.strip():
            raise DataError("text can't be blank")
        self.conn.execute(
            "INSERT INTO comments (text, user_id, card_id, inserted_at) VALUES (?, ?, ?, ?)",
            (text, user_id, card["id"], now_text()),
        )
        return self._card_json(card["id"])

    def add_card_member(self, board_id: int, card_id: Any, user_id: Any) -> JSONObject:
        card = self._card_row(board_id, card_id)
        membership = self._membership(board_id, user_id)
        try:
            self.conn.execute(
                "INSERT INTO card_members (card_id, user_board_id) VALUES (?, ?)",
                (card["id"], membership["id"]),
            )
        except sqlite3.IntegrityError:
            raise DataError("already a member of this card") from None
        return self._card_json(card["id"])

    def remove_card_member(self, board_id: int, card_id: Any, user_id: Any) -> JSONObject:
        card = self._card_row(board_id, card_id)
        membership = self._membership(board_id, user_id)
        deleted = self.conn.execute(
            "DELETE FROM card_members WHERE card_id = ? AND user_board_id = ?",
            (card["id"], membership["id"]),
        )
        if deleted.rowcount == 0:
            raise DataError("not a member of this card")
        return self._card_json(card["id"])

    def _membership(self, board_id: int, user_id: Any) -> sqlite3.Row:
        row = self._one(
            "SELECT * FROM user_boards WHERE board_id = ? AND user_id = ?", board_id, user_id
        )
        if row is None:
            raise DataError(f"user {user_id!r} is not a member of board {board_id}")
        return row

    def _card_row(self, board_id: int, card_id: Any) -> sqlite3.Row:
        row = self._one(
            "SELECT c.* FROM cards c JOIN lists l ON l.id = c.list_id"
            " WHERE c.id = ? AND l.board_id = ?",
            card_id,
            board_id,
        )
        if row is None:
            raise DataError(f"no card {card_id!r} on board {board_id}")
        return row

    def _card_json(self, card_id: int) -> JSONObject:
        row = self._one("SELECT * FROM cards WHERE id = ?", card_id)
        if row is None:
            raise DataError(f"no card {card_id}")
        comments = self._all(
            "SELECT * FROM comments WHERE card_id = ? ORDER BY inserted_at DESC, id DESC", card_id
        )
        members = self._all(
            "SELECT u.* FROM users u JOIN user_boards ub ON ub.user_id = u.id"
            " JOIN card_members cm ON cm.user_board_id = ub.id WHERE cm.card_id = ? ORDER BY cm.id",
            card_id,
        )
        return {
            "id": row["id"],
            "list_id": row["list_id"],
            "name": row["name"],
            "description": row["description"],
            "position": row["position"],
            "tags": json.loads(row["tags"]),
            "members": [user_json(member) for member in members],
            "comments": [
                {
                    "id": comment["id"],
                    "card_id": comment["card_id"],
                    "text": comment["text"],
                    "inserted_at": comment["inserted_at"],
                    "user": self.user(comment["user_id"]),
                }
                for comment in comments
            ],
        }

    # -- who is connected ---------------------------------------------------------------

    def user_joined(self, topic: str, socket: str, user_id: int) -> list[int]:
        """Record a user on a board's channel; the user ids now there, newest first."""
        self.conn.execute(
            "INSERT OR REPLACE INTO connected_users (topic, socket, user_id, joined_at)"
            " VALUES (?, ?, ?, ?)",
            (topic, socket, user_id, time.time()),
        )
        return self.connected_users(topic)

    def user_left(self, topic: str | None, socket: str | None) -> list[str]:
        """Forget a socket on one topic (or, without a topic, on all); the topics it left."""
        if topic is None:
            rows = self._all("SELECT topic FROM connected_users WHERE socket = ?", socket)
            self.conn.execute("DELETE FROM connected_users WHERE socket = ?", (socket,))
        else:
            rows = self._all(
                "SELECT topic FROM connected_users WHERE topic = ? AND socket = ?", topic, socket
            )
            self.conn.execute(
                "DELETE FROM connected_users WHERE topic = ? AND socket = ?", (topic, socket)
            )
        return sorted({row["topic"] for row in rows})

    def topic_vacated(self, topic: str) -> None:
        self.conn.execute("DELETE FROM connected_users WHERE topic = ?", (topic,))

    def connected_users(self, topic: str) -> list[int]:
        rows = self._all(
            "SELECT user_id, MAX(joined_at) AS last FROM connected_users WHERE topic = ?"
            " GROUP BY user_id ORDER BY last DESC",
            topic,
        )
        return [row["user_id"] for row in rows]

    # -- lifecycle ----------------------------------------------------------------------

    def record_event(self, event: JSONObject) -> bool:
        """Store one lifecycle event; False when its id was already stored (a retry)."""
        cursor = self.conn.execute(
            "INSERT OR IGNORE INTO lifecycle_events"
            " (id, type, topic, user, socket, at, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                event["id"],
                event["type"],
                event.get("topic"),
                event.get("user"),
                event.get("socket"),
                event.get("at"),
                time.time(),
            ),
        )
        return cursor.rowcount == 1

    def transaction(self) -> sqlite3.Connection:
        """``with db.transaction(): ...`` makes the writes inside one transaction."""
        self.conn.execute("BEGIN")
        return self.conn


def user_json(row: sqlite3.Row) -> JSONObject:
    """A user as the seed's encoder renders it: never the password."""
    return {
        "id": row["id"],
        "first_name": row["first_name"],
        "last_name": row["last_name"],
        "email": row["email"],
    }
