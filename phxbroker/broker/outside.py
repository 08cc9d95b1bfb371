"""What the broker asks outside itself, and the answers it takes: a join or a client event
that the app's back end decides, in Phoenix's terms (`join/3`, `handle_in/3`).

Sans-io vocabulary. The broker hands a `Question` (broker/core.py) to its `Outside` and
goes on with other work; the channel waits (its later messages are held) until
`Broker.answer(question, answer)` applies a `JoinAnswer` or an `EventAnswer`, or `None`
when no usable answer came (the back end is down, slow or broke its contract), which the
client gets as `{"reason": "unavailable"}`. Answers are checked where they are parsed, so the broker
trusts their shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

UNAVAILABLE = {"reason": "unavailable"}

JSONObject = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Push:
    """`push(socket, event, payload)`: a message to the asking channel only."""

    event: str
    payload: JSONObject


@dataclass(frozen=True, slots=True)
class Publish:
    """`broadcast!` to the channel's topic (`topic` None), `broadcast_from!` (`except_self`),
    or `Endpoint.broadcast` to another topic."""

    event: str
    payload: JSONObject
    topic: str | None = None
    except_self: bool = False


@dataclass(frozen=True, slots=True)
class JoinAnswer:
    """`{:ok, response, socket}` (ok) or `{:error, response}` from `join/3`."""

    ok: bool
    response: JSONObject = field(default_factory=dict)
    assigns: JSONObject | None = None  # None: the channel starts without assigns
    pushes: tuple[Push, ...] = ()
    broadcasts: tuple[Publish, ...] = ()
    presence_meta: JSONObject | None = None  # tracked with this meta on presence topics


@dataclass(frozen=True, slots=True)
class EventAnswer:
    """What `handle_in/3` returned: a reply or none (`{:noreply, socket}`), assigns that
    replace the channel's, pushes, broadcasts, and whether the channel stops (`"close"`:
    phx_close, no rejoin; `"error"`: phx_error, phoenix.js rejoins) or the whole socket is
    disconnected."""

    reply: tuple[str, JSONObject] | None = None  # (status, response)
    assigns: JSONObject | None = None  # None: the channel's assigns are kept
    pushes: tuple[Push, ...] = ()
    broadcasts: tuple[Publish, ...] = ()
    stop: str | None = None
    disconnect: bool = False
