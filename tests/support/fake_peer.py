"""A broker peer without a socket: it records what the broker sends, decoded."""

from __future__ import annotations

import itertools
import json
from typing import Any

from phxbroker.broker.core import Broadcast
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
