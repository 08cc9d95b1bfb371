"""A broker without sockets: fake peers that record what the broker sends (decoded), a fake
clock, a topic config that exercises every rule, and phoenix.js's Presence merge rules as
a model to check what clients end up seeing."""

from __future__ import annotations

import itertools
import json
from typing import Any

from phxbroker.broker.core import Broadcast, Broker
from phxbroker.protocol.messages import Message
from phxbroker.protocol.serializers import V2, Serializer

_ids = itertools.count(1)


class Clock:
    """A clock the test moves by hand (`clock.now += 1`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakePeer:
    """Records what the broker sends, decoded back into lists for easy assertions; the
    encoded messages themselves are kept in `sent`."""

    transport = "fake"

    def __init__(self, user: str | None, serializer: Serializer = V2) -> None:
        self.id = next(_ids)
        self.user = user
        self.serializer = serializer
        self.remote = "test"
        self.channels: dict = {}
        self.assigns: dict[str, Any] | None = None
        self.frames: list[Any] = []
        self.sent: list[tuple[bool, bytes]] = []
        self.closed: tuple[int, str] | None = None

    @property
    def open(self) -> bool:
        return self.closed is None

    def send(self, encoded: tuple[bool, bytes]) -> None:
        if self.closed is None:
            self.sent.append(encoded)
            self.frames.append(decode(encoded))

    def deliver(self, broadcast: Broadcast) -> None:
        encoded = broadcast.encoded(self.serializer)
        if encoded is not None:
            self.send(encoded)

    def close(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = (code, reason)

    def take(self) -> list[Any]:
        frames, self.frames = self.frames, []
        return frames

    def events(self) -> list[str]:
        return [f[3] if isinstance(f, list) else f["event"] for f in self.take()]


def decode(encoded: tuple[bool, bytes]) -> Any:
    is_binary, data = encoded
    return ("binary", data) if is_binary else json.loads(data)


CONFIG = """
[server]
max_channels = 3
[[topics]]
pattern = "room:*"
join_reply = { joined = "{suffix}", by = "{user}" }
relay = ["new_msg"]
relay_user_key = "user"
echo = ["ping"]
count = ["hit"]
presence = true
presence_meta = ["status"]
presence_update = ["set_status"]
coalesce_ms = 100
[[topics]]
pattern = "users:{user}"
join = "self"
[[topics]]
pattern = "crashy"
unhandled = "crash"
[[topics]]
pattern = "quiet"
unhandled = "ignore"
[[topics]]
pattern = "public"
join = "anyone"
[[topics]]
pattern = "all"
count = ["hit"]
relay = ["msg"]
history = 2
status_event = "status_users"
coalesce_ms = 100
"""


def connect(broker: Broker, user: str | None, serializer: Serializer = V2) -> FakePeer:
    peer = FakePeer(user, serializer)
    broker.connect(peer)
    return peer


def join(broker: Broker, peer: FakePeer, topic: str, ref: str = "1", payload: Any = None):
    broker.handle(peer, Message(ref, ref, topic, "phx_join", payload or {}))


def apply_frames(frames: list[Any]) -> dict:
    """phoenix.js Presence: diffs wait for the state; joins then leaves, keyed by phx_ref."""
    state = None
    pending = []
    for f in frames:
        if f[3] == "presence_state":
            state = {k: list(v["metas"]) for k, v in f[4].items()}
            for diff in pending:
                apply_diff(state, diff)
            pending = []
        elif f[3] == "presence_diff":
            if state is None:
                pending.append(f[4])
            else:
                apply_diff(state, f[4])
    return state or {}


def apply_diff(state: dict, diff: dict) -> None:
    for key, value in diff["joins"].items():
        refs = {m["phx_ref"] for m in value["metas"]}
        state[key] = [m for m in state.get(key, []) if m["phx_ref"] not in refs] + value["metas"]
    for key, value in diff["leaves"].items():
        refs = {m["phx_ref"] for m in value["metas"]}
        remaining = [m for m in state.get(key, []) if m["phx_ref"] not in refs]
        if remaining:
            state[key] = remaining
        else:
            state.pop(key, None)


def strip(state: dict) -> dict:
    """Presence state without the refs, in a stable order, to compare views."""
    return {
        k: sorted(
            ({f: v for f, v in m.items() if f not in ("phx_ref", "phx_ref_prev")} for m in metas),
            key=json.dumps,
        )
        for k, metas in sorted(state.items())
    }
