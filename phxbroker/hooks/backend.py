"""Verify phxbroker's hook calls and build their answers, in a Python back end of any kind.

phxbroker asks the app's back end, over HTTP, what a Phoenix app's socket and channel
modules used to decide: may this client connect (``UserSocket.connect/3``), may it join
this topic (``join/3``), and what does a client event do (``handle_in/3``). This module
is the back end's half: check that a call really comes from phxbroker, then answer it in
Phoenix's terms. It uses the standard library only, so it fits any framework::

    from phxbroker.hooks import backend as hooks

    try:
        call = hooks.verify(SECRET, request.headers, body)     # body: the raw bytes
    except hooks.HookRequestError as exc:
        return json_response({"error": str(exc)}, status=exc.status)   # 401 or 400
    if not is_member(call["socket"]["user"], call["topic"]):
        return json_response(hooks.join_error("unauthorized"))
    return json_response(hooks.join_ok({"board": board}, assigns={"board_id": board_id}))

The wire contract
=================

Every call is an HTTP ``POST`` of one JSON object to ``<[hooks] url>/<kind>``, for the
kinds ``connect``, ``join``, ``event`` and ``events``. Its headers:

``Content-Type: application/json``
``X-Phxbroker-Timestamp``
    when the request was signed, in Unix seconds (an integer in decimal).
``X-Phxbroker-Signature``
    ``v1=<hex>``, the lowercase hex HMAC-SHA256 keyed with the UTF-8 bytes of the shared
    secret over ``<timestamp> + "." + <body>``, the body being the exact bytes sent.
    While a secret is being replaced the header carries one value per secret, separated
    by commas (``v1=<hex>,v1=<hex>``); one match is enough. Other schemes (``v0=``,
    ``v2=``) are ignored. A back end refuses a timestamp further than a tolerance
    (300 s by default) from its own clock, in either direction, so a captured call cannot
    be replayed later.
``X-Phxbroker-Request-Id``
    an opaque id, the same on every retry of one call (not covered by the signature).

Refusals travel in the answer body with status 200 (``"status": "error"``); a back end
answers 401 to a call whose signature or timestamp it refuses and 400 to one it cannot
read. phxbroker takes any answer that is not 2xx with a body of the shape below as a
failure: the client then gets ``{"reason": "unavailable"}`` (join, event) or 503 (connect).

``socket`` in join and event calls describes the client's connection::

    {"id": "<connection id, unique while it lives>", "user": "1" | null,
     "assigns": {<the socket assigns from the connect answer>}}

**connect** (``UserSocket.connect/3`` and ``id/1``) — request::

    {"params": {"token": "...", "vsn": "2.0.0"},       # the connect params
     "headers": {"user-agent": "..."},                  # [hooks] forward_headers only,
                                                        # lowercase names
     "remote": "203.0.113.7",                           # the client's address
     "transport": "websocket" | "longpoll",
     "user": "1" | null}                                # who phxbroker's own token check
                                                        # named, when tokens are configured

answer (:func:`connect_ok`, :func:`connect_error`)::

    {"status": "ok", "user": "1" | null, "assigns": {...}, "id": "users_socket:1"}
    {"status": "error"}                                 # the upgrade gets 403

``id`` is optional (Phoenix's ``id/1``: the socket id that disconnects all of a user's
sockets); ``user`` is what topic rules such as ``users:{user}`` compare with.

**join** (``join/3``) — request::

    {"socket": {...}, "topic": "boards:1", "payload": {...}, "join_ref": "3"}

answer (:func:`join_ok`, :func:`join_error`)::

    {"status": "ok", "response": {...},                 # {:ok, response, socket}
     "assigns": {...},                                  # optional: the channel's assigns
     "push": [{"event": "...", "payload": {...}}],      # optional: push/3 after the reply
     "broadcast": [<broadcast>],                        # optional: broadcast!/3 and kin
     "presence": {"meta": {...}}}                       # optional: Presence.track/3
    {"status": "error", "response": {"reason": "..."}}  # {:error, %{reason: ...}}

**event** (``handle_in/3``) — request::

    {"socket": {...}, "topic": "boards:1", "event": "lists:create",
     "payload": {...}, "ref": "5", "assigns": {<the channel's assigns>}}

answer (:func:`reply_ok`, :func:`reply_error`, :func:`noreply`)::

    {"reply": {"status": "ok" | "error", "response": {...}} | null,
     "assigns": {...},                                  # optional: replaces the channel's
     "push": [{"event": "...", "payload": {...}}],
     "broadcast": [<broadcast>],
     "stop": null | "close" | "error",
     "disconnect": true}                                # optional: close the whole socket

``"reply": null`` is ``{:noreply, socket}``. ``stop: "close"`` is ``{:stop, :normal, ...}``:
the channel ends with ``phx_close`` and phoenix.js does not rejoin; ``"error"`` is a
crash: ``phx_error``, and phoenix.js rejoins. A ``<broadcast>`` is::

    {"event": "...", "payload": {...},
     "topic": "users:2",                               # optional: another topic
     "except_self": true}                               # optional, default false

Without ``topic`` it goes to the channel's own topic (``broadcast!/3``); with
``except_self`` it skips the sending channel (``broadcast_from!/3``); with ``topic`` it is
``Endpoint.broadcast/3``. Assigns given in a join or event answer replace the channel's
assigns; left out, they are kept. Both kinds of assigns travel with every later call.
Payloads are JSON objects, as Phoenix requires.

**events** (lifecycle, ``terminate/2`` and kin) — batched and asynchronous; request::

    {"events": [{"id": "<unique per event; a retried batch repeats it>",
                 "type": "join" | "leave" | "disconnect" | "occupied" | "vacated",
                 "topic": "boards:1" | null,            # null for "disconnect"
                 "user": "1" | null,                    # null for "occupied", "vacated"
                 "socket": "<connection id>" | null,    # as socket.id in other calls
                 "at": 1718000000123}]}                 # Unix time in milliseconds

Any 2xx answer delivers the batch (its body is ignored); otherwise phxbroker retries it
later, so a back end should treat an ``id`` it has already seen as done.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_TOLERANCE",
    "REQUEST_ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "HookRequestError",
    "HookSignatureError",
    "broadcast",
    "broadcast_from",
    "check_signature",
    "connect_error",
    "connect_ok",
    "endpoint_broadcast",
    "join_error",
    "join_ok",
    "noreply",
    "push",
    "reply_error",
    "reply_ok",
    "sign",
    "signature",
    "verify",
]

TIMESTAMP_HEADER = "X-Phxbroker-Timestamp"
SIGNATURE_HEADER = "X-Phxbroker-Signature"
REQUEST_ID_HEADER = "X-Phxbroker-Request-Id"
DEFAULT_TOLERANCE = 300
SCHEME = "v1"
STOP_REASONS = ("close", "error")

Secret = str | bytes
Secrets = Secret | Sequence[Secret]
JSONObject = dict[str, Any]


class HookRequestError(ValueError):
    """A hook call this back end must not act on; `status` is the HTTP status to answer
    (400: the body cannot be read) and the message is one sentence saying why."""

    status = 400


class HookSignatureError(HookRequestError):
    """A hook call whose signature or timestamp is missing, malformed, stale or wrong."""

    status = 401


# -- signing ----------------------------------------------------------------------------


def signature(secret: Secret, timestamp: int | str, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``<timestamp>.<body>`` keyed with the secret's UTF-8 bytes."""
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    message = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(
    secret: Secrets,
    timestamp: int | None,
    body: bytes,
    *,
    request_id: str | None = None,
) -> dict[str, str]:
    """The headers that sign `body`: timestamp (now when None), one ``v1=`` signature per
    secret (several while a secret is being replaced) and the request id (a fresh one when
    None; pass the first attempt's id again on a retry)."""
    stamp = int(time.time()) if timestamp is None else int(timestamp)
    values = ",".join(f"{SCHEME}={signature(key, stamp, body)}" for key in _secrets(secret))
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(stamp),
        SIGNATURE_HEADER: values,
        REQUEST_ID_HEADER: request_id or uuid.uuid4().hex,
    }


# -- verifying --------------------------------------------------------------------------


def check_signature(
    secret: Secrets,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> str:
    """Check that `body` was signed with `secret` (or one of several secrets) within
    `tolerance` seconds of `now`; return the request id ("" when there is none).

    `headers` is any mapping: a framework's case-insensitive headers, a plain dict in any
    case, or a WSGI environ. Raises :class:`HookSignatureError` with one sentence.
    """
    raw_stamp = _header(headers, TIMESTAMP_HEADER)
    raw_signature = _header(headers, SIGNATURE_HEADER)
    if raw_stamp is None:
        raise HookSignatureError(f"the {TIMESTAMP_HEADER} header is missing")
    if raw_signature is None:
        raise HookSignatureError(f"the {SIGNATURE_HEADER} header is missing")
    stamp_text = raw_stamp.strip()
    if not (stamp_text.isascii() and stamp_text.isdigit()):
        raise HookSignatureError(
            f"the {TIMESTAMP_HEADER} header {stamp_text[:32]!r} is not a Unix time in seconds"
        )
    stamp = int(stamp_text)
    current = time.time() if now is None else now
    if current - stamp > tolerance:
        raise HookSignatureError(
            f"the {TIMESTAMP_HEADER} header is {current - stamp:.0f} s old,"
            f" beyond the {tolerance:g} s tolerance"
        )
    if stamp - current > tolerance:
        raise HookSignatureError(
            f"the {TIMESTAMP_HEADER} header is {stamp - current:.0f} s in the future,"
            f" beyond the {tolerance:g} s tolerance"
        )
    offered = [
        value.strip()[len(SCHEME) + 1 :]
        for value in raw_signature.split(",")
        if value.strip().startswith(SCHEME + "=")
    ]
    if not offered:
        raise HookSignatureError(f"the {SIGNATURE_HEADER} header has no {SCHEME}= signature")
    data = body.encode() if isinstance(body, str) else bytes(body)
    expected = [signature(key, stamp_text, data) for key in _secrets(secret)]
    # Compare every pair, so the time taken says nothing about which part matched.
    matched = False
    for candidate in offered:
        for digest in expected:
            matched |= hmac.compare_digest(candidate.encode(), digest.encode())
    if not matched:
        raise HookSignatureError(f"the {SIGNATURE_HEADER} header matches no signing secret")
    return (_header(headers, REQUEST_ID_HEADER) or "").strip()


def verify(
    secret: Secrets,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> JSONObject:
    """Check the call's signature (see :func:`check_signature`) and return its JSON body,
    which must be an object. Raises :class:`HookSignatureError` (answer 401) or
    :class:`HookRequestError` (answer 400)."""
    check_signature(secret, headers, body, tolerance=tolerance, now=now)
    try:
        call = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HookRequestError(f"the request body is not JSON: {exc}") from None
    if not isinstance(call, dict):
        raise HookRequestError(f"the request body is a JSON {type(call).__name__}, not an object")
    return call


# -- answer parts -----------------------------------------------------------------------


def push(event: str, payload: Mapping[str, Any] | None = None) -> JSONObject:
    """A message to the calling client only, on the channel's topic: ``push(socket, event,
    payload)``."""
    return {"event": _event(event), "payload": _object(payload, "payload")}


def broadcast(
    event: str,
    payload: Mapping[str, Any] | None = None,
    *,
    topic: str | None = None,
    except_self: bool = False,
) -> JSONObject:
    """A message to every subscriber of the channel's topic (``broadcast!(socket, event,
    payload)``), of `topic` when given (``Endpoint.broadcast(topic, event, payload)``),
    skipping the sending channel when `except_self` (``broadcast_from!``)."""
    message: JSONObject = {"event": _event(event), "payload": _object(payload, "payload")}
    if topic is not None:
        if not isinstance(topic, str) or not topic:
            raise ValueError("a broadcast topic must be a non-empty string")
        message["topic"] = topic
    if except_self:
        message["except_self"] = True
    return message


def broadcast_from(event: str, payload: Mapping[str, Any] | None = None) -> JSONObject:
    """``broadcast_from!(socket, event, payload)``: every subscriber but the sender."""
    return broadcast(event, payload, except_self=True)


def endpoint_broadcast(
    topic: str, event: str, payload: Mapping[str, Any] | None = None
) -> JSONObject:
    """``Endpoint.broadcast(topic, event, payload)``: a message to another topic."""
    return broadcast(event, payload, topic=topic)


# -- connect ----------------------------------------------------------------------------


def connect_ok(
    user: str | int | None,
    assigns: Mapping[str, Any] | None = None,
    *,
    socket_id: str | None = None,
) -> JSONObject:
    """``{:ok, assign(socket, ...)}`` from ``connect/3``: the socket belongs to `user`
    (None: anonymous) and carries `assigns`; `socket_id` is what ``id/1`` returns."""
    answer: JSONObject = {
        "status": "ok",
        "user": None if user is None else str(user),
        "assigns": _object(assigns, "assigns"),
    }
    if socket_id is not None:
        answer["id"] = str(socket_id)
    return answer


def connect_error() -> JSONObject:
    """``:error`` from ``connect/3``: the upgrade is refused with 403."""
    return {"status": "error"}


# -- join -------------------------------------------------------------------------------


def join_ok(
    response: Mapping[str, Any] | None = None,
    *,
    assigns: Mapping[str, Any] | None = None,
    pushes: Iterable[Mapping[str, Any]] = (),
    broadcasts: Iterable[Mapping[str, Any]] = (),
    presence_meta: Mapping[str, Any] | None = None,
) -> JSONObject:
    """``{:ok, response, socket}`` from ``join/3``: the client gets `response`, the channel
    keeps `assigns`, then `pushes` and `broadcasts` go out (what an ``:after_join`` message
    would send) and, with `presence_meta`, the user is tracked in the topic's presence."""
    answer: JSONObject = {"status": "ok", "response": _object(response, "response")}
    if assigns is not None:
        answer["assigns"] = _object(assigns, "assigns")
    answer["push"] = _messages(pushes, "push")
    answer["broadcast"] = _messages(broadcasts, "broadcast")
    if presence_meta is not None:
        answer["presence"] = {"meta": _object(presence_meta, "presence meta")}
    return answer


def join_error(reason: str | Mapping[str, Any] = "unauthorized") -> JSONObject:
    """``{:error, %{reason: reason}}`` from ``join/3``; a mapping is sent as the whole
    response instead."""
    return {"status": "error", "response": _reason(reason)}


# -- event ------------------------------------------------------------------------------


def reply_ok(
    response: Mapping[str, Any] | None = None,
    *,
    assigns: Mapping[str, Any] | None = None,
    pushes: Iterable[Mapping[str, Any]] = (),
    broadcasts: Iterable[Mapping[str, Any]] = (),
    stop: str | None = None,
    disconnect: bool = False,
) -> JSONObject:
    """``{:reply, {:ok, response}, socket}`` from ``handle_in/3``, with the other effects
    of the clause (see :func:`noreply`)."""
    reply = {"status": "ok", "response": _object(response, "response")}
    return _event_answer(reply, assigns, pushes, broadcasts, stop, disconnect)


def reply_error(
    response: str | Mapping[str, Any],
    *,
    assigns: Mapping[str, Any] | None = None,
    pushes: Iterable[Mapping[str, Any]] = (),
    broadcasts: Iterable[Mapping[str, Any]] = (),
    stop: str | None = None,
    disconnect: bool = False,
) -> JSONObject:
    """``{:reply, {:error, response}, socket}`` from ``handle_in/3``; a string is sent as
    ``{"reason": response}``."""
    reply = {"status": "error", "response": _reason(response)}
    return _event_answer(reply, assigns, pushes, broadcasts, stop, disconnect)


def noreply(
    *,
    assigns: Mapping[str, Any] | None = None,
    pushes: Iterable[Mapping[str, Any]] = (),
    broadcasts: Iterable[Mapping[str, Any]] = (),
    stop: str | None = None,
    disconnect: bool = False,
) -> JSONObject:
    """``{:noreply, socket}`` from ``handle_in/3``. Every event answer may also replace the
    channel's `assigns`, send `pushes` (``push/3``) and `broadcasts` (:func:`broadcast`),
    `stop` the channel (``"close"``: ``{:stop, :normal, socket}``, phx_close, no rejoin;
    ``"error"``: a crash, phx_error, phoenix.js rejoins) and `disconnect` the socket."""
    return _event_answer(None, assigns, pushes, broadcasts, stop, disconnect)


# -- helpers ----------------------------------------------------------------------------


def _event_answer(
    reply: JSONObject | None,
    assigns: Mapping[str, Any] | None,
    pushes: Iterable[Mapping[str, Any]],
    broadcasts: Iterable[Mapping[str, Any]],
    stop: str | None,
    disconnect: bool,
) -> JSONObject:
    if stop is not None and stop not in STOP_REASONS:
        raise ValueError(f"stop must be None, 'close' or 'error', not {stop!r}")
    answer: JSONObject = {"reply": reply}
    if assigns is not None:
        answer["assigns"] = _object(assigns, "assigns")
    answer["push"] = _messages(pushes, "push")
    answer["broadcast"] = _messages(broadcasts, "broadcast")
    answer["stop"] = stop
    if disconnect:
        answer["disconnect"] = True
    return answer


def _secrets(secret: Secrets) -> list[Secret]:
    keys = [secret] if isinstance(secret, str | bytes | bytearray) else list(secret)
    if not keys or any(not key for key in keys):
        raise ValueError("a hook signing secret must be a non-empty string")
    return keys


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wsgi_name = "HTTP_" + name.upper().replace("-", "_")
    for key in (name, name.lower(), wsgi_name):
        value = headers.get(key)
        if value is not None:
            return value
    lowered = name.lower()
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == lowered:
            return value
    return None


def _event(event: str) -> str:
    if not isinstance(event, str) or not event:
        raise ValueError(f"an event name must be a non-empty string, not {event!r}")
    return event


def _object(value: Mapping[str, Any] | None, what: str) -> JSONObject:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"a {what} must be a mapping (a JSON object), not {type(value).__name__}")
    return dict(value)


def _reason(reason: str | Mapping[str, Any]) -> JSONObject:
    if isinstance(reason, str):
        return {"reason": reason}
    return _object(reason, "response")


def _messages(messages: Iterable[Mapping[str, Any]], what: str) -> list[JSONObject]:
    built = []
    for message in messages:
        if not isinstance(message, Mapping) or "event" not in message:
            raise TypeError(f"each {what} must be built with {what}() or a mapping with an event")
        built.append(dict(message))
    return built
