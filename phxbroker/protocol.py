"""Phoenix Channels messages and their serializers (V1 JSON object, V2 JSON array, V2 binary).

Sans-io: bytes and text in, Message out, and back. A frame that cannot be decoded raises
ProtocolError; the transport then closes the connection with 1011, as Phoenix does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

HEARTBEAT_TOPIC = "phoenix"

# Control events.
JOIN = "phx_join"
LEAVE = "phx_leave"
REPLY = "phx_reply"
CLOSE = "phx_close"
ERROR = "phx_error"
HEARTBEAT = "heartbeat"

# orjson reads integers beyond 64 bits as floats; such numbers go through the stdlib parser
# so that a relayed payload is never altered.
_LONG_NUMBER = re.compile(rb"\d{19,}")


# A payload that is already JSON-encoded (a cached presence snapshot or status map); the
# serializers splice it in without parsing it again.
RawJSON = orjson.Fragment


class ProtocolError(Exception):
    """A frame that is not a Phoenix message; the connection is closed with 1011."""


class EncodeError(Exception):
    """A message this serializer cannot represent (e.g. binary payload on V1)."""


@dataclass(slots=True)
class Message:
    """One decoded client frame. Refs are kept exactly as sent, to be echoed back."""

    join_ref: Any
    ref: Any
    topic: str
    event: str
    payload: Any  # a JSON value, or bytes for a binary push


def loads(data: bytes | str) -> Any:
    """Parse JSON exactly (big integers stay integers); raise ValueError if it is not JSON."""
    raw = data.encode() if isinstance(data, str) else data
    if _LONG_NUMBER.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # lone surrogates and the like: let the stdlib decide
    return json.loads(raw, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def dumps(value: Any) -> bytes:
    """Serialize to compact UTF-8 JSON bytes."""
    try:
        return orjson.dumps(value)
    except TypeError:
        # Integers beyond 64 bits or lone surrogates: the stdlib handles both.
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode()


class Serializer:
    """Encodes server messages and decodes client frames for one protocol version."""

    vsn: str
    supports_binary: bool

    def decode_text(self, data: bytes | str) -> Message:
        raise NotImplementedError

    def decode_binary(self, data: bytes) -> Message:
        raise ProtocolError(f"binary frames are not part of the {self.vsn} protocol")

    def encode_reply(
        self, join_ref: Any, ref: Any, topic: str, status: str, response: Any
    ) -> tuple[bool, bytes]:
        """A phx_reply; returns (is_binary, data)."""
        raise NotImplementedError

    def encode_push(
        self, join_ref: Any, topic: str, event: str, payload: Any
    ) -> tuple[bool, bytes]:
        """A message to one channel (presence_state, phx_close ...); ref is null."""
        raise NotImplementedError

    def encode_broadcast(self, topic: str, event: str, payload: Any) -> tuple[bool, bytes]:
        """A fastlane broadcast: join_ref and ref are null."""
        raise NotImplementedError

    def encode_control(
        self, join_ref: Any, topic: str, event: str, payload: Any
    ) -> tuple[bool, bytes]:
        """phx_close / phx_error: Phoenix puts the channel's join_ref in both ref slots."""
        raise NotImplementedError


class V2Serializer(Serializer):
    vsn = "2.0.0"
    supports_binary = True

    def decode_text(self, data: bytes | str) -> Message:
        try:
            value = loads(data)
        except ValueError:
            raise ProtocolError("text frame is not valid JSON") from None
        if not isinstance(value, list) or len(value) < 5:
            raise ProtocolError("expected a JSON array [join_ref, ref, topic, event, payload]")
        join_ref, ref, topic, event, payload = value[:5]
        if not isinstance(topic, str) or not isinstance(event, str):
            raise ProtocolError("topic and event must be strings")
        return Message(join_ref, ref, topic, event, payload)

    def decode_binary(self, data: bytes) -> Message:
        if len(data) < 5:
            raise ProtocolError("binary frame shorter than its 5-byte header")
        if data[0] != 0:
            raise ProtocolError(f"binary frame of kind {data[0]}; clients may only send kind 0")
        lengths = data[1:5]
        end = 5 + sum(lengths)
        if end > len(data):
            raise ProtocolError("binary frame shorter than the lengths in its header")
        fields = []
        pos = 5
        for n in lengths:
            try:
                fields.append(data[pos : pos + n].decode())
            except UnicodeDecodeError:
                raise ProtocolError("binary frame header field is not UTF-8") from None
            pos += n
        join_ref, ref, topic, event = fields
        return Message(join_ref or None, ref or None, topic, event, bytes(data[end:]))

    def encode_reply(self, join_ref, ref, topic, status, response):
        if isinstance(response, bytes | bytearray):
            return True, _binary(1, (join_ref, ref, topic, status), response)
        payload = {"status": status, "response": response}
        return False, dumps([join_ref, ref, topic, REPLY, payload])

    def encode_push(self, join_ref, topic, event, payload):
        if isinstance(payload, bytes | bytearray):
            return True, _binary(0, (join_ref, topic, event), payload)
        return False, dumps([join_ref, None, topic, event, payload])

    def encode_broadcast(self, topic, event, payload):
        if isinstance(payload, bytes | bytearray):
            return True, _binary(2, (topic, event), payload)
        return False, dumps([None, None, topic, event, payload])

    def encode_control(self, join_ref, topic, event, payload):
        return False, dumps([join_ref, join_ref, topic, event, payload])


def _binary(kind: int, fields: tuple[Any, ...], payload: bytes | bytearray) -> bytes:
    encoded = [b"" if f is None else str(f).encode() for f in fields]
    for f in encoded:
        if len(f) > 255:
            raise EncodeError("binary frame fields are limited to 255 bytes")
    return bytes([kind, *map(len, encoded)]) + b"".join(encoded) + bytes(payload)


class V1Serializer(Serializer):
    """The JSON-object protocol of old and third-party clients; text only, no join_ref out."""

    vsn = "1.0.0"
    supports_binary = False

    def decode_text(self, data: bytes | str) -> Message:
        try:
            value = loads(data)
        except ValueError:
            raise ProtocolError("text frame is not valid JSON") from None
        if not isinstance(value, dict):
            raise ProtocolError("expected a JSON object with topic, event, payload and ref")
        missing = [k for k in ("topic", "event", "payload", "ref") if k not in value]
        if missing:
            raise ProtocolError(f"message is missing {', '.join(missing)}")
        topic, event = value["topic"], value["event"]
        if not isinstance(topic, str) or not isinstance(event, str):
            raise ProtocolError("topic and event must be strings")
        return Message(value.get("join_ref"), value["ref"], topic, event, value["payload"])

    def _encode(self, topic: str, event: str, payload: Any, ref: Any) -> tuple[bool, bytes]:
        if isinstance(payload, bytes | bytearray):
            raise EncodeError("the 1.0.0 protocol cannot carry binary payloads")
        return False, dumps({"topic": topic, "event": event, "payload": payload, "ref": ref})

    def encode_reply(self, join_ref, ref, topic, status, response):
        if isinstance(response, bytes | bytearray):
            raise EncodeError("the 1.0.0 protocol cannot carry binary payloads")
        return self._encode(topic, REPLY, {"status": status, "response": response}, ref)

    def encode_push(self, join_ref, topic, event, payload):
        return self._encode(topic, event, payload, None)

    def encode_broadcast(self, topic, event, payload):
        return self._encode(topic, event, payload, None)

    def encode_control(self, join_ref, topic, event, payload):
        return self._encode(topic, event, payload, join_ref)


V1 = V1Serializer()
V2 = V2Serializer()


def serializer_for(vsn: str | None) -> Serializer | None:
    """Pick the serializer for a connect `vsn` param as Phoenix does (~> 1.0.0 / ~> 2.0.0).

    Absent means 1.0.0. Anything that is not a full semver in one of those ranges is None,
    which refuses the connection.
    """
    if vsn is None:
        return V1
    m = re.fullmatch(
        r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?"
        r"(?:\+[0-9A-Za-z.-]+)?",
        vsn,
    )
    if m is None:
        return None
    major, minor = int(m.group(1)), int(m.group(2))
    prerelease = "-" in vsn.split("+", 1)[0]
    if minor != 0 or prerelease:
        return None
    return {1: V1, 2: V2}.get(major)
