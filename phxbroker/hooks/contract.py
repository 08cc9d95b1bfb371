"""The hook calls' bodies, and the answers checked against the contract (sans-io).

`backend.py` documents the wire contract for the app's side. Here phxbroker builds what
it sends and reads what comes back: an answer that is not a JSON object of the documented
shape raises ContractError, one sentence naming the call and the field, and the caller
treats the call as failed (the client gets "unavailable"). Keys the contract does not
name are ignored, so a back end may answer with more than phxbroker reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from phxbroker.broker.outside import EventAnswer, JoinAnswer, JSONObject, Publish, Push
from phxbroker.protocol.messages import describe_json

MAX_MESSAGES = 100  # pushes or broadcasts in one answer
STOPS = ("close", "error")


class ContractError(ValueError):
    """An answer that is not what the contract says; str() is one sentence."""


@dataclass(frozen=True, slots=True)
class ConnectAnswer:
    """`connect/3`: ok with the socket's user and assigns, or a refusal."""

    ok: bool
    user: str | None = None
    assigns: JSONObject | None = None


def socket_view(socket_id: str, user: str | None, assigns: JSONObject | None) -> JSONObject:
    """How a client's connection is described in join and event calls."""
    return {"id": socket_id, "user": user, "assigns": assigns or {}}


def parse_connect(data: bytes, max_assigns: int) -> ConnectAnswer:
    """The connect answer."""
    answer = _object(data, "connect")
    status = answer.get("status")
    if status == "error":
        return ConnectAnswer(ok=False)
    if status != "ok":
        raise ContractError(
            f'the connect answer\'s "status" must be "ok" or "error", not {_shown(status)}'
        )
    user = answer.get("user")
    if user is not None and (not isinstance(user, str) or not user or len(user) > 200):
        raise ContractError('the connect answer\'s "user" must be a short non-empty string or null')
    return ConnectAnswer(
        ok=True, user=user, assigns=_assigns(answer, "the connect answer", max_assigns)
    )


def parse_join(data: bytes, max_assigns: int) -> JoinAnswer:
    """The join answer."""
    answer = _object(data, "join")
    where = "the join answer"
    status = answer.get("status")
    if status not in ("ok", "error"):
        raise ContractError(f'{where}\'s "status" must be "ok" or "error", not {_shown(status)}')
    response = _optional_object(answer, "response", where) or {}
    if status == "error":
        return JoinAnswer(ok=False, response=response)
    presence = answer.get("presence")
    meta = None
    if presence is not None:
        if not isinstance(presence, dict) or not isinstance(presence.get("meta", {}), dict):
            raise ContractError(f'{where}\'s "presence" must be {{"meta": {{...}}}} or null')
        meta = presence.get("meta", {})
    return JoinAnswer(
        ok=True,
        response=response,
        assigns=_assigns(answer, where, max_assigns),
        pushes=_pushes(answer, where),
        broadcasts=_broadcasts(answer, where),
        presence_meta=meta,
    )


def parse_event(data: bytes, max_assigns: int) -> EventAnswer:
    """The event answer."""
    answer = _object(data, "event")
    where = "the event answer"
    if "reply" not in answer:
        raise ContractError(f'{where} has no "reply" (null for {{:noreply, socket}})')
    raw_reply = answer["reply"]
    reply = None
    if raw_reply is not None:
        if not isinstance(raw_reply, dict):
            raise ContractError(f'{where}\'s "reply" must be an object or null')
        status = raw_reply.get("status")
        if not isinstance(status, str) or not status or len(status) > 255:
            raise ContractError(f'{where}\'s "reply" needs a "status" such as "ok" or "error"')
        reply = (status, _optional_object(raw_reply, "response", f'{where}\'s "reply"') or {})
    stop = answer.get("stop")
    if stop is not None and stop not in STOPS:
        raise ContractError(
            f'{where}\'s "stop" must be null, "close" or "error", not {_shown(stop)}'
        )
    disconnect = answer.get("disconnect", False)
    if not isinstance(disconnect, bool):
        raise ContractError(f'{where}\'s "disconnect" must be true or false')
    return EventAnswer(
        reply=reply,
        assigns=_assigns(answer, where, max_assigns),
        pushes=_pushes(answer, where),
        broadcasts=_broadcasts(answer, where),
        stop=stop,
        disconnect=disconnect,
    )


# -- parts ------------------------------------------------------------------------------


def _object(data: bytes, kind: str) -> JSONObject:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ContractError(f"the {kind} answer is not JSON") from None
    if not isinstance(value, dict):
        raise ContractError(f"the {kind} answer must be a JSON object, not {describe_json(value)}")
    return value


def _optional_object(answer: JSONObject, key: str, where: str) -> JSONObject | None:
    value = answer.get(key)
    if value is not None and not isinstance(value, dict):
        raise ContractError(f'{where}\'s "{key}" must be an object, not {describe_json(value)}')
    return value


def _assigns(answer: JSONObject, where: str, max_size: int) -> JSONObject | None:
    assigns = _optional_object(answer, "assigns", where)
    if assigns is not None and len(orjson.dumps(assigns)) > max_size:
        raise ContractError(
            f'{where}\'s "assigns" are larger than {max_size} bytes ([hooks] max_assigns_size)'
        )
    return assigns


def _messages(answer: JSONObject, key: str, where: str) -> list[JSONObject]:
    value = answer.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ContractError(f'{where}\'s "{key}" must be a list, not {describe_json(value)}')
    if len(value) > MAX_MESSAGES:
        raise ContractError(f'{where}\'s "{key}" holds more than {MAX_MESSAGES} messages')
    for index, item in enumerate(value):
        at = f'{where}\'s "{key}"[{index}]'
        if not isinstance(item, dict):
            raise ContractError(f"{at} must be an object, not {describe_json(item)}")
        event = item.get("event")
        if not isinstance(event, str) or not event or len(event) > 255:
            raise ContractError(f'{at} needs an "event" (a non-empty string)')
        if not isinstance(item.get("payload", {}), dict):
            raise ContractError(f'{at}\'s "payload" must be an object, as Phoenix requires')
    return value


def _pushes(answer: JSONObject, where: str) -> tuple[Push, ...]:
    return tuple(
        Push(item["event"], item.get("payload", {})) for item in _messages(answer, "push", where)
    )


def _broadcasts(answer: JSONObject, where: str) -> tuple[Publish, ...]:
    out = []
    for index, item in enumerate(_messages(answer, "broadcast", where)):
        at = f'{where}\'s "broadcast"[{index}]'
        topic = item.get("topic")
        if topic is not None and (not isinstance(topic, str) or not topic):
            raise ContractError(f'{at}\'s "topic" must be a non-empty string')
        except_self = item.get("except_self", False)
        if not isinstance(except_self, bool):
            raise ContractError(f'{at}\'s "except_self" must be true or false')
        out.append(Publish(item["event"], item.get("payload", {}), topic, except_self))
    return tuple(out)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
