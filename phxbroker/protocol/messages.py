"""Phoenix Channels messages: control events, the decoded `Message`, and exact JSON.

Sans-io. A frame that cannot be decoded raises ProtocolError; the transport then closes
the connection with 1011, as Phoenix does.

The JSON rule: whatever `loads` accepts, `dumps` can write back unchanged. `loads` parses
with orjson, which refuses invalid UTF-8, lone surrogates (`"\\ud800"`), NaN and numbers
that overflow a double, and nesting beyond 1,024 levels; on top of that `loads` refuses
nesting beyond MAX_DEPTH levels (MAX_FRAME_DEPTH for a client frame, so that anything the
server builds around a client's value, a reply, a presence diff or the status map, is
itself at most MAX_DEPTH deep: readable again, and well within what orjson writes). The only
thing orjson reads inexactly is an integer beyond 64 bits (it becomes a float), so a
document with such a number is read again by the standard library, which keeps it exact;
`dumps` writes those integers (and RawJSON fragments next to them) with its own slower
path. Every refusal is a ValueError, never RecursionError or UnicodeError.
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

# Nesting levels a decoded document may have: well within the 254 that orjson writes, and
# the standard library's recursive reader never gets near Python's recursion limit.
# serde_json's default is the same 128.
MAX_DEPTH = 128
# A client frame may nest less: the server puts a client's value at most four levels deeper
# than it was in its frame (a presence meta value inside a presence_diff), and what the
# server writes must be readable again with MAX_DEPTH.
MAX_FRAME_DEPTH = MAX_DEPTH - 8

# Refs are echoed back as sent; phoenix.js sends short decimal strings. A ref must be null,
# a string of at most this many UTF-8 bytes (the V2 binary frame's limit), or an integer
# orjson can write (-2**63 <= n < 2**64).
MAX_REF_BYTES = 255
_INT_MIN, _INT_END = -(2**63), 2**64

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


def loads(data: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON exactly (big integers stay integers); raise ValueError, with a reason,
    for anything that is not JSON `dumps` could write back unchanged, or that nests more
    than `max_depth` levels (see the module docstring)."""
    if isinstance(data, str):
        try:
            raw = data.encode()
        except UnicodeEncodeError:
            raise ValueError("the text contains a lone surrogate") from None
    else:
        raw = bytes(data)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(str(exc)) from None
    # Depth can only exceed MAX_DEPTH if there are that many opening brackets at all.
    if raw.count(b"[") + raw.count(b"{") > max_depth and _depth_exceeds(value, max_depth):
        raise ValueError(f"nested deeper than {max_depth} levels")
    if _LONG_NUMBER.search(raw) is not None:
        value = _loads_exact(raw)
    return value


def _loads_exact(raw: bytes) -> Any:
    """The stdlib's reading of a document orjson accepted: the same value, with integers
    beyond 64 bits kept exact."""
    try:
        return json.loads(raw.decode(), parse_constant=_reject_constant)
    except RecursionError:  # unreachable below MAX_DEPTH; kept as a guarantee
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def ref_problem(ref: Any) -> str | None:
    """Why a join_ref/ref is not a short scalar the server echoes back, or None."""
    if ref is None:
        return None
    if isinstance(ref, str):
        if len(ref) * 4 <= MAX_REF_BYTES or len(ref.encode()) <= MAX_REF_BYTES:
            return None
        return f"longer than {MAX_REF_BYTES} bytes"
    if type(ref) is int:
        if _INT_MIN <= ref < _INT_END:
            return None
        return "an integer beyond 64 bits"
    return f"{describe_json(ref)}, not a string, integer or null"


def describe_json(value: Any) -> str:
    """What kind of JSON value `value` is, for an error sentence: "null", "a boolean",
    "an integer", "a fractional number", "an empty string", "a string", "an array" or
    "an object"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a fractional number"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def dumps(value: Any) -> bytes:
    """Serialize to compact UTF-8 JSON bytes.

    Never raises for a value made of what `loads` returns, RawJSON fragments and plain
    server values (str keys; str, int, float, bool, None, list, tuple, dict)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        # Integers beyond 64 bits (or, defensively, strings orjson cannot take).
        parts: list[bytes] = []
        _write_slowly(value, parts)
        return b"".join(parts)


def _write_slowly(value: Any, out: list[bytes]) -> None:
    if isinstance(value, dict):
        out.append(b"{")
        for index, (key, item) in enumerate(value.items()):
            if index:
                out.append(b",")
            out.append(_scalar(str(key)))
            out.append(b":")
            _write_slowly(item, out)
        out.append(b"}")
    elif isinstance(value, list | tuple):
        out.append(b"[")
        for index, item in enumerate(value):
            if index:
                out.append(b",")
            _write_slowly(item, out)
        out.append(b"]")
    elif type(value) is int:
        out.append(str(value).encode())
    else:
        out.append(_scalar(value))


def _scalar(value: Any) -> bytes:
    try:
        return orjson.dumps(value)  # str, float, bool, None, a RawJSON fragment ...
    except TypeError:
        if isinstance(value, str):  # a lone surrogate: escaped, as JSON allows
            return json.dumps(value, ensure_ascii=True).encode()
        if isinstance(value, int):  # an int subclass beyond 64 bits
            return str(int(value)).encode()
        raise
