"""A client's messages on their way to the broker: one path for every transport.

A frame (a websocket message, or one line of a long-poll POST) is decoded by the client's
serializer, metered by its rate limit, answered at once if it is a heartbeat, and
otherwise queued for the broker task, in the order received. The transports differ only
in where a refusal's answer goes: a websocket answers straight away, while a long-poll
session answers through the broker task, so that its answers keep their place behind the
replies to the lines before (`Peer.answers_in_order`).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from phxbroker.broker.core import Peer
from phxbroker.broker.gateway import BrokerGateway
from phxbroker.broker.stats import Stats
from phxbroker.protocol import close_codes
from phxbroker.protocol.messages import HEARTBEAT, HEARTBEAT_TOPIC, Message, ProtocolError
from phxbroker.transport.admission import RATE_LIMITED, TokenBucket, over_rate
from phxbroker.transport.sockets import SocketHub

log = logging.getLogger("phxbroker.inbound")


class ClientHandler(Protocol):
    """What the broker does with clients (`Broker` implements it, in the broker task)."""

    def connect(self, peer: Any) -> None: ...

    def disconnect(self, peer: Any) -> None: ...

    def handle(self, peer: Any, msg: Message) -> None: ...


class MeteredPeer(Peer, Protocol):
    """A broker peer as a transport runs it: with its message allowance and heartbeats."""

    bucket: TokenBucket | None
    answers_in_order: bool

    def answer_heartbeat(self, ref: Any) -> None: ...


class Inbound:
    """Decode, meter and forward client messages; shared by all clients of the daemon."""

    def __init__(self, gateway: BrokerGateway, broker: ClientHandler, hub: SocketHub) -> None:
        self.gateway = gateway
        self.broker = broker
        self.hub = hub
        self.stats: Stats = hub.stats

    def decode(self, peer: MeteredPeer, data: str | bytes, *, binary: bool = False) -> Message:
        """The message in one frame: a text frame (str, or bytes from a long-poll line) or a
        `binary` one. Raises ProtocolError, counted and logged, for anything that is not a
        Phoenix message."""
        try:
            if len(data) > self.hub.max_frame_size:
                raise ProtocolError(f"message larger than {self.hub.max_frame_size} bytes")
            if binary:
                assert isinstance(data, bytes)
                return peer.serializer.decode_binary(data)
            return peer.serializer.decode_text(data)
        except ProtocolError as exc:
            self._malformed(peer, exc)
            raise

    def _malformed(self, peer: MeteredPeer, exc: ProtocolError) -> None:
        self.stats.protocol_errors += 1
        log.info("closing %s: %s", peer, exc)

    async def forward(self, peer: MeteredPeer, msg: Message) -> bool:
        """Meter one decoded message, answer it if it is a heartbeat, else queue it for the
        broker. False when the client went over its rate limit for too long and is being
        closed (1008): nothing more of it should be read."""
        bucket = peer.bucket
        if bucket is not None and not bucket.take(self.hub.now):
            self.stats.messages_in += 1  # it never reaches the broker
            if over_rate(peer, bucket, self.stats, self.hub.rate_limit_close_after):
                await self._answer(peer, peer.close, close_codes.POLICY_VIOLATION, "rate limited")
                return False
            reply = peer.serializer.encode_reply(
                msg.join_ref, msg.ref, msg.topic, "error", RATE_LIMITED
            )
            await self._answer(peer, peer.send, reply)
            return True
        if msg.event == HEARTBEAT and msg.topic == HEARTBEAT_TOPIC:
            await self._answer(peer, peer.answer_heartbeat, msg.ref)
            return True
        await self.gateway.tell(self.broker.handle, peer, msg)
        return True

    async def _answer(self, peer: MeteredPeer, fn: Any, *args: Any) -> None:
        if peer.answers_in_order:
            await self.gateway.tell(fn, *args)
        else:
            fn(*args)
