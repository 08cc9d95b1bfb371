"""The serializers: V1 (JSON object), V2 (JSON array) and V2 binary frames.

Sans-io: bytes and text in, Message out, and back. Decoding raises ProtocolError for
anything that is not a Phoenix message, including one the server could not write back
unchanged (see `messages.loads`) and refs that are not short scalars (`messages.ref_problem`):
the same rules in the three decoders (a binary frame's format also bounds its topic and
event to 255 bytes). Encoding raises EncodeError for a message the serializer cannot carry.
"""

from __future__ import annotations

import re
from typing import Any

from phxbroker.protocol.messages import (
    MAX_FRAME_DEPTH,
    PHX_REPLY,
    EncodeError,
    Message,
    ProtocolError,
    dumps,
    loads,
    ref_problem,
)


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
        value = _parse(data)
        if not isinstance(value, list) or len(value) < 5:
            raise ProtocolError("expected a JSON array [join_ref, ref, topic, event, payload]")
        # A topic or event that is not a string is not malformed to Phoenix: no channel
        # has such a topic, no handler such an event (the broker answers accordingly).
        join_ref, ref, topic, event, payload = value[:5]
        _check_refs(join_ref, ref)
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

    def encode_reply(
        self, join_ref: Any, ref: Any, topic: str, status: str, response: Any
    ) -> tuple[bool, bytes]:
        if isinstance(response, bytes | bytearray):
            return True, _binary(1, (join_ref, ref, topic, status), response)
        payload = {"status": status, "response": response}
        return False, dumps([join_ref, ref, topic, PHX_REPLY, payload])

    def encode_push(
        self, join_ref: Any, topic: str, event: str, payload: Any
    ) -> tuple[bool, bytes]:
        if isinstance(payload, bytes | bytearray):
            return True, _binary(0, (join_ref, topic, event), payload)
        return False, dumps([join_ref, None, topic, event, payload])

    def encode_broadcast(self, topic: str, event: str, payload: Any) -> tuple[bool, bytes]:
        if isinstance(payload, bytes | bytearray):
            return True, _binary(2, (topic, event), payload)
        return False, dumps([None, None, topic, event, payload])

    def encode_control(
        self, join_ref: Any, topic: str, event: str, payload: Any
    ) -> tuple[bool, bytes]:
        return False, dumps([join_ref, join_ref, topic, event, payload])


def _parse(data: bytes | str) -> Any:
    try:
        return loads(data, MAX_FRAME_DEPTH)
    except ValueError as exc:
        raise ProtocolError(
            f"text frame is not a JSON message the server accepts ({exc})"
        ) from None


def _check_refs(join_ref: Any, ref: Any) -> None:
    for name, value in (("join_ref", join_ref), ("ref", ref)):
        problem = ref_problem(value)
        if problem is not None:
            raise ProtocolError(f"{name} is {problem}")


def _binary(kind: int, fields: tuple[Any, ...], payload: bytes | bytearray) -> bytes:
    encoded = [b"" if f is None else str(f).encode() for f in fields]
    for f in encoded:
        if len(f) > 255:
            raise EncodeError("binary frame fields are limited to 255 bytes")
    return bytes([kind, *map(len, encoded)]) + b"".join(encoded) + bytes(payload)


class V1Serializer(Serializer):
    """The JSON-object protocol of old and third-party clients; no binary payloads, no
    join_ref out."""

    vsn = "1.0.0"
    supports_binary = False

    def decode_text(self, data: bytes | str) -> Message:
        value = _parse(data)
        if not isinstance(value, dict):
            raise ProtocolError("expected a JSON object with topic, event, payload and ref")
        missing = [k for k in ("topic", "event", "payload", "ref") if k not in value]
        if missing:
            raise ProtocolError(f"message is missing {', '.join(missing)}")
        topic, event = value["topic"], value["event"]  # any JSON value, as for V2
        join_ref, ref = value.get("join_ref"), value["ref"]
        _check_refs(join_ref, ref)
        return Message(join_ref, ref, topic, event, value["payload"])

    def decode_binary(self, data: bytes) -> Message:
        """Phoenix's V1 serializer reads a binary frame as it reads a text one."""
        return self.decode_text(data)

    def _encode(self, topic: str, event: str, payload: Any, ref: Any) -> tuple[bool, bytes]:
        if isinstance(payload, bytes | bytearray):
            raise EncodeError("the 1.0.0 protocol cannot carry binary payloads")
        return False, dumps({"topic": topic, "event": event, "payload": payload, "ref": ref})

    def encode_reply(
        self, join_ref: Any, ref: Any, topic: str, status: str, response: Any
    ) -> tuple[bool, bytes]:
        if isinstance(response, bytes | bytearray):
            raise EncodeError("the 1.0.0 protocol cannot carry binary payloads")
        return self._encode(topic, PHX_REPLY, {"status": status, "response": response}, ref)

    def encode_push(
        self, join_ref: Any, topic: str, event: str, payload: Any
    ) -> tuple[bool, bytes]:
        return self._encode(topic, event, payload, None)

    def encode_broadcast(self, topic: str, event: str, payload: Any) -> tuple[bool, bytes]:
        return self._encode(topic, event, payload, None)

    def encode_control(
        self, join_ref: Any, topic: str, event: str, payload: Any
    ) -> tuple[bool, bytes]:
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
