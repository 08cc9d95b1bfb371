"""What the broker needs from a peer, checked the same way against every kind of peer: the
websocket peer, the long-poll session and the fake peer the broker tests use.

Each kind is driven through the `Peer` surface only (send, deliver, close) and read back
from where its client would read: the websocket's socket, the long-poll session's queue,
the fake peer's record.
"""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support.fake_peer import FakePeer
from wsproto.frame_protocol import FrameProtocol, Opcode

from phxbroker.auth.authenticator import Identity
from phxbroker.broker.core import Broadcast, Peer
from phxbroker.broker.stats import Stats
from phxbroker.protocol.serializers import V1, V2, Serializer
from phxbroker.transport.longpoll_sessions import LongPollSession, LongPollSessions
from phxbroker.transport.sockets import SocketHub
from phxbroker.transport.websocket import WebSocketPeer


class Client:
    """One peer and its client's end: `received()` is what the client got since last time,
    decoded (("close", code) for the end)."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def received(self) -> list[Any]:
        raise NotImplementedError


class FakeClient(Client):
    def __init__(self, serializer: Serializer) -> None:
        self.fake = FakePeer("alice", serializer)
        super().__init__(self.fake)

    def received(self) -> list[Any]:
        got = self.fake.take()
        if self.fake.closed is not None and not getattr(self, "_told", False):
            self._told = True
            got.append(("close", self.fake.closed[0]))
        return got


class WebSocketClient(Client):
    def __init__(self, serializer: Serializer) -> None:
        self.hub = SocketHub(Stats())
        self.server_end, self.client_end = socket.socketpair()
        self.server_end.setblocking(False)
        self.frames = FrameProtocol(client=True, extensions=[])
        peer = WebSocketPeer(
            self.server_end, self.hub, peer_id=1, remote="test", serializer=serializer, user="alice"
        )
        super().__init__(peer)

    def received(self) -> list[Any]:
        self.hub.flush()
        self.client_end.setblocking(False)
        try:
            while data := self.client_end.recv(65536):
                self.frames.receive_bytes(data)
        except BlockingIOError:
            pass
        got: list[Any] = []
        for frame in self.frames.received_frames():
            if frame.opcode is Opcode.CLOSE:
                got.append(("close", frame.payload[0]))
            elif frame.opcode is Opcode.TEXT:
                got.append(json.loads(frame.payload))
            elif frame.opcode is Opcode.BINARY:
                got.append(("binary", bytes(frame.payload)))
        return got

    def stop(self) -> None:
        self.server_end.close()
        self.client_end.close()


class NoBroker:
    def tell_soon(self, fn: Any, *args: Any) -> None:
        pass

    def connect(self, peer: Any) -> None:
        pass

    def disconnect(self, peer: Any) -> None:
        pass

    def handle(self, peer: Any, msg: Any) -> None:
        pass


class LongPollClient(Client):
    def __init__(self, serializer: Serializer) -> None:
        hub = SocketHub(Stats())
        self.sessions = LongPollSessions(NoBroker(), NoBroker(), hub, itertools.count(1), 10_000)  # type: ignore[arg-type]
        self.session = LongPollSession(
            self.sessions,
            session_id="s",
            token="phxlp.s.x",
            peer_id=1,
            remote="test",
            serializer=serializer,
            identity=Identity("alice"),
        )
        super().__init__(self.session)

    def received(self) -> list[Any]:
        got: list[Any] = [json.loads(json.loads(item)) for item in self.session.take()]
        if self.session.closed and not getattr(self, "_told", False):
            self._told = True
            got.append(("close", None))  # the next poll is answered 410, "session gone"
        return got


KINDS = {"websocket": WebSocketClient, "longpoll": LongPollClient, "fake": FakeClient}


@pytest.fixture(
    params=[(kind, s) for kind in KINDS for s in (V2, V1)], ids=lambda p: f"{p[0]}-{p[1].vsn}"
)
async def client(request: pytest.FixtureRequest) -> AsyncIterator[Client]:
    kind, serializer = request.param
    made = KINDS[kind](serializer)
    yield made
    if isinstance(made, WebSocketClient):
        made.stop()


def v2(message: list[Any], serializer: Serializer) -> Any:
    """A V2 message as this serializer puts it on the wire."""
    _join_ref, ref, topic, event, payload = message
    if serializer is V2:
        return message
    return {"topic": topic, "event": event, "payload": payload, "ref": ref}


async def test_a_peer_names_itself_and_carries_the_channels_the_broker_gives_it(
    client: Client,
) -> None:
    peer = client.peer
    assert isinstance(peer.id, int)
    assert peer.user == "alice"
    assert peer.serializer in (V1, V2)
    assert isinstance(peer.transport, str) and isinstance(peer.remote, str)
    peer.channels = {}
    assert peer.channels == {}


async def test_send_reaches_that_client_alone_in_order(client: Client) -> None:
    s = client.peer.serializer
    client.peer.send(s.encode_reply("1", "2", "room:a", "ok", {"x": 1}))
    client.peer.send(s.encode_push("1", "room:a", "presence_state", {}))
    assert client.received() == [
        v2(["1", "2", "room:a", "phx_reply", {"status": "ok", "response": {"x": 1}}], s),
        v2(["1", None, "room:a", "presence_state", {}], s),
    ]


async def test_deliver_sends_a_broadcast_encoded_once_per_serializer(client: Client) -> None:
    s = client.peer.serializer
    broadcast = Broadcast("room:a", "new_msg", {"body": "hi"})
    client.peer.deliver(broadcast)
    client.peer.deliver(broadcast)
    assert client.received() == [v2([None, None, "room:a", "new_msg", {"body": "hi"}], s)] * 2
    assert list(broadcast._encoded) == [s]


async def test_a_broadcast_the_client_cannot_receive_is_skipped(client: Client) -> None:
    binary = Broadcast("room:a", "blob", b"\x00\x01")
    client.peer.deliver(binary)
    s = client.peer.serializer
    client.peer.send(s.encode_push("1", "room:a", "after", {}))
    got = client.received()
    if s is V2 and not isinstance(client, LongPollClient):
        assert got[0][0] == "binary"  # V2 websockets carry it as a binary frame
        got = got[1:]
    assert got == [v2(["1", None, "room:a", "after", {}], s)]


async def test_close_ends_the_client_once_and_nothing_follows_it(client: Client) -> None:
    s = client.peer.serializer
    client.peer.send(s.encode_push("1", "room:a", "before", {}))
    client.peer.close(1001, "bye")
    client.peer.close(1001, "again")
    client.peer.send(s.encode_push("1", "room:a", "after", {}))
    client.peer.deliver(Broadcast("room:a", "late", {}))
    got = client.received()
    assert got[0] == v2(["1", None, "room:a", "before", {}], s)
    assert len(got) == 2 and got[1][0] == "close"
    if not isinstance(client, LongPollClient):
        assert got[1] == ("close", 1001)
