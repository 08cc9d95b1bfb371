"""Phoenix Channels messages: control events, the decoded `Message`, and exact JSON.

Sans-io. A frame that cannot be decoded raises ProtocolError; the transport then closes
the connection with 1011, as Phoenix does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

HEARTBEAT_TOPIC = "phoenix"

# Control events.
PHX_JOIN = "phx_join"
PHX_LEAVE = "phx_leave"
PHX_REPLY = "phx_reply"
PHX_CLOSE = "phx_close"
PHX_ERROR = "phx_error"
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
    topic: Any  # a string but for clients that send another JSON value (never joinable)
    event: Any  # likewise: a string but for clients that send another JSON value
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
