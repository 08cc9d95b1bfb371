"""What the nodes of a cluster say to each other through Redis, as bytes. Sans-io.

Two shapes, told apart by their first byte:

* `B` a broadcast, on its topic's channel: the sender's incarnation id, flags, the event
  and the payload exactly as it goes to clients (its JSON, or the bytes of a binary
  push), so a receiving node splices it into its frames without parsing it:

      b"B" <incarnation: 16 ascii> <flags: 1> <event length: 2, big-endian> <event> <payload>

* `J` everything else (presence, users, hits, kicks, bans, heartbeats...): one JSON
  object whose "k" names the kind; `decode` checks every field a kind needs.

Anything that does not decode raises WireError with one sentence; the node logs it and
skips the message (another program, or another version, may share the Redis server).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import orjson

from phxbroker.protocol import messages
from phxbroker.protocol.messages import RawJSON

BROADCAST = 0x42  # "B"
CONTROL = 0x4A  # "J"
INCARNATION_LENGTH = 16
BINARY = 1  # flag: the payload is the bytes of a binary push
RELAYED = 2  # flag: a client's relayed push (it joins the topic's history)
_EVENT_LENGTH = struct.Struct(">H")
_HEADER = 1 + INCARNATION_LENGTH + 1 + _EVENT_LENGTH.size
MAX_EVENT = 0xFFFF


class WireError(ValueError):
    """A message from Redis that is not one a node sends; str() says what is wrong."""


@dataclass(frozen=True, slots=True)
class RemoteBroadcast:
    """A broadcast as it arrives from another node."""

    origin: str  # the sender's incarnation id
    event: str
    payload: Any  # RawJSON, or bytes for a binary push
    relayed: bool


def encode_broadcast(origin: str, event: str, payload: Any, relayed: bool) -> bytes:
    """The broadcast as it crosses to other nodes: the payload is encoded once here."""
    flags = RELAYED if relayed else 0
    if isinstance(payload, bytes | bytearray | memoryview):
        flags |= BINARY
        body = bytes(payload)
    else:
        body = messages.dumps(payload)
    name = event.encode()
    if len(name) > MAX_EVENT:
        raise WireError(f"event name of {len(name)} bytes is too long to cross to other nodes")
    return b"".join(
        (b"B", origin.encode("ascii"), bytes((flags,)), _EVENT_LENGTH.pack(len(name)), name, body)
    )


def decode_broadcast(data: bytes) -> RemoteBroadcast:
    """A broadcast from `encode_broadcast`; WireError if it is not one."""
    if len(data) < _HEADER or data[0] != BROADCAST:
        raise WireError("not a broadcast: too short or wrong type byte")
    try:
        origin = data[1 : 1 + INCARNATION_LENGTH].decode("ascii")
    except UnicodeDecodeError:
        raise WireError("broadcast with a sender id that is not ASCII") from None
    flags = data[1 + INCARNATION_LENGTH]
    (length,) = _EVENT_LENGTH.unpack_from(data, 2 + INCARNATION_LENGTH)
    start = _HEADER + length
    if start > len(data):
        raise WireError("broadcast cut short inside its event name")
    try:
        event = data[_HEADER:start].decode()
    except UnicodeDecodeError:
        raise WireError("broadcast whose event name is not UTF-8") from None
    body = data[start:]
    if flags & BINARY:
        payload: Any = body
    else:
        # Checked once per node (not per subscriber) before it is spliced into frames.
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            raise WireError("broadcast whose payload is not JSON") from None
        payload = RawJSON(body)
    return RemoteBroadcast(origin, event, payload, bool(flags & RELAYED))


# -- control messages -----------------------------------------------------------------------

# Every kind and the fields it carries beyond "k" (kind), "n" (node) and "i" (incarnation),
# each with the JSON types it may have.
_STR = (str,)
_INT = (int,)
_NUM = (int, float)
_OBJ = (dict,)
_OPT_OBJ = (dict, type(None))
_LIST = (list,)
KINDS: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {"s": _INT},  # (re)connected: its owned state is at sequence s
    "hb": {"s": _INT},  # heartbeat
    "bye": {},  # stopping: its entries leave now
    "p": {"s": _INT, "t": _STR, "key": _STR, "j": _OPT_OBJ, "l": _OPT_OBJ},  # presence
    "u": {"s": _INT, "t": _STR, "user": _STR, "on": (bool,)},  # a status map's user
    "sync": {},  # to an incarnation's channel: send your state to mine
    "state": {"s": _INT, "p": _LIST, "u": _LIST},  # everything an incarnation owns
    "hits": {"t": _STR, "c": _INT},  # hits counted by the sender on a topic, absolute
    "kick": {"user": _STR, "t": _STR},
    "disc": {"user": _STR, "code": _INT, "reason": _STR},
    "ban": {"user": _STR, "secs": _NUM},
    "unban": {"user": _STR},
    "revoke": {"creds": _LIST},  # credential digests (hex) whose sockets must close
    "probe": {"x": _STR},  # to the sender's own channel: is delivery still working?
}


def encode_control(kind: str, node: str, incarnation: str, **fields: Any) -> bytes:
    """A control message of `kind` from node `node`, incarnation `incarnation`."""
    return b"J" + messages.dumps({"k": kind, "n": node, "i": incarnation, **fields})


def decode_control(data: bytes) -> dict[str, Any]:
    """A control message as a dict whose fields have the types its kind needs."""
    if not data or data[0] != CONTROL:
        raise WireError("not a control message: wrong type byte")
    try:
        msg = messages.loads(data[1:])
    except ValueError:
        raise WireError("control message that is not JSON") from None
    if not isinstance(msg, dict):
        raise WireError("control message that is not a JSON object")
    kind = msg.get("k")
    fields = KINDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise WireError(f"control message of unknown kind {kind!r}")
    for name, types in (("n", _STR), ("i", _STR), *fields.items()):
        value = msg.get(name)
        if not isinstance(value, types) or (types is _INT and isinstance(value, bool)):
            raise WireError(f"{kind!r} message whose field {name!r} is missing or mistyped")
    if len(msg["i"]) != INCARNATION_LENGTH:
        raise WireError(f"{kind!r} message with a malformed incarnation id")
    for meta_field in ("j", "l"):
        meta = msg.get(meta_field)
        if meta is not None and not isinstance(meta.get("phx_ref"), str):
            raise WireError(f"{kind!r} message whose presence meta has no phx_ref")
    if kind == "state":
        _check_state(msg)
    return msg


def _check_state(msg: dict[str, Any]) -> None:
    for entry in msg["p"]:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
            and isinstance(entry[2], dict)
            and isinstance(entry[2].get("phx_ref"), str)
        ):
            raise WireError("'state' message with a malformed presence entry")
    for entry in msg["u"]:
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
        ):
            raise WireError("'state' message with a malformed user entry")
