"""A broker without sockets: fake peers that record what the broker sends (decoded), a fake
clock, and a topic config that exercises every rule."""

from __future__ import annotations

import itertools
import json
from typing import Any

from phxbroker.broker.core import Broadcast, Broker
from phxbroker.protocol.messages import Message
from phxbroker.protocol.serializers import V2, Serializer

_ids = itertools.count(1)


class FakePeer:
    """Records what the broker sends, decoded back into lists for easy assertions."""

    transport = "fake"

    def __init__(self, user: str | None, serializer: Serializer = V2) -> None:
        self.id = next(_ids)
        self.user = user
        self.serializer = serializer
        self.remote = "test"
        self.channels: dict = {}
        self.assigns: dict[str, Any] | None = None
        self.frames: list[Any] = []
        self.closed: tuple[int, str] | None = None

    def send(self, encoded: tuple[bool, bytes]) -> None:
        if self.closed is None:
            self.frames.append(_decode(encoded))

    def deliver(self, broadcast: Broadcast) -> None:
        encoded = broadcast.encoded(self.serializer)
        if encoded is not None and self.closed is None:
            self.frames.append(_decode(encoded))

    def close(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = (code, reason)

    def take(self) -> list[Any]:
        frames, self.frames = self.frames, []
        return frames

    def events(self) -> list[str]:
        return [f[3] if isinstance(f, list) else f["event"] for f in self.take()]


def _decode(encoded: tuple[bool, bytes]) -> Any:
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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def connect(broker: Broker, user: str | None, serializer: Serializer = V2) -> FakePeer:
    peer = FakePeer(user, serializer)
    broker.connect(peer)
    return peer


def join(broker: Broker, peer: FakePeer, topic: str, ref: str = "1", payload: Any = None):
    broker.handle(peer, Message(ref, ref, topic, "phx_join", payload or {}))
