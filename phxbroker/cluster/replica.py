"""What the other nodes of a cluster own, as this node knows it. Sans-io.

Each node owns its entries (presence metas, the users of status topics, its hit counts)
and announces them: a delta as each changes, numbered in one sequence per incarnation,
heartbeats carrying the latest number, and its whole state when another node asks. A
node that hears a number it has not seen asks for the whole state, so one lost delta
costs a transfer, never a wrong view.

An incarnation (a random id per start) stands for one run of a node: when a node of the
same name says hello with a new one, the old one's entries leave at once (a restart
leaves no ghosts). A node stopping says bye; one never heard from for `down_after`
seconds is taken for dead and its entries leave. Hits counted by a node that is gone stay
counted.

Every method returns the `Changes` to apply to the broker's view, plus what to send.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Meta = dict[str, Any]
DEPARTED = 1000
PresenceChange = tuple[str, str, Meta | None, Meta | None]  # topic, key, joined, left


@dataclass
class Changes:
    """What a message changed in the view, for the broker, and what to answer."""

    presence: list[PresenceChange] = field(default_factory=list)
    users: list[tuple[str, str, int]] = field(default_factory=list)  # topic, user, +1/-1
    hits: dict[str, int] = field(default_factory=dict)  # topic -> hits counted elsewhere
    request_sync: str | None = None  # ask this incarnation for its whole state
    send_state_to: str | None = None  # send our whole state to this incarnation
    left_nodes: list[str] = field(default_factory=list)  # node names whose entries left

    def __bool__(self) -> bool:
        return bool(self.presence or self.users or self.hits)


@dataclass
class NodeView:
    """One incarnation of another node: what it owns, as far as we know."""

    node: str
    incarnation: str
    heard: float
    seq: int = 0
    synced: bool = False  # its state is known (from a transfer, or an empty start)
    sync_asked: float = float("-inf")
    presences: dict[tuple[str, str, str], Meta] = field(default_factory=dict)
    users: set[tuple[str, str]] = field(default_factory=set)


class Replica:
    """The other nodes' entries; `receive` takes their control messages in order."""

    def __init__(
        self, incarnation: str, down_after: float, clock: Callable[[], float], resync: float
    ) -> None:
        self.incarnation = incarnation
        self.down_after = down_after
        self.clock = clock
        self.resync = resync  # seconds before asking the same node for its state again
        self.views: dict[str, NodeView] = {}  # by incarnation
        self.hits: dict[str, dict[str, int]] = {}  # topic -> incarnation -> count
        # Incarnations that left: "gone" (said bye, or a newer one of the same node said
        # hello), whose late messages are ignored, or "silent" (taken for dead), which
        # come back with their next message and are asked for their state. The most
        # recent DEPARTED are remembered.
        self.departed: dict[str, str] = {}

    def receive(self, msg: dict[str, Any]) -> Changes:
        """Apply one decoded control message (see wire.KINDS) from another node."""
        changes = Changes()
        incarnation = msg["i"]
        if incarnation == self.incarnation:
            return changes
        kind = msg["k"]
        departed = self.departed.get(incarnation)
        if departed == "gone" and kind != "hits":
            return changes
        if departed == "silent":
            del self.departed[incarnation]  # only late: it is back, and will be asked
        if kind == "bye":
            self._drop(incarnation, changes, "gone")
            return changes
        view = self._view(msg, changes)
        if kind == "hello":
            changes.send_state_to = incarnation
            if msg["s"] == 0 and not view.presences and not view.users:
                view.synced = True  # a fresh start owns nothing yet
                view.seq = 0
            elif not view.synced or view.seq != msg["s"]:
                self._ask(view, changes)
        elif kind == "hb":
            if not view.synced or view.seq < msg["s"]:
                self._ask(view, changes)
        elif kind in ("p", "u"):
            if view.synced and msg["s"] == view.seq + 1:
                view.seq = msg["s"]
                self._apply_delta(view, msg, changes)
            elif not view.synced or msg["s"] > view.seq:
                self._ask(view, changes)
        elif kind == "state":
            self._replace(view, msg, changes)
        elif kind == "hits":
            self._count(msg["t"], incarnation, msg["c"], changes)
        return changes

    # -- time ----------------------------------------------------------------------------

    def expire(self) -> Changes:
        """Incarnations silent for longer than `down_after`: their entries leave."""
        changes = Changes()
        limit = self.clock() - self.down_after
        for incarnation, view in list(self.views.items()):
            if view.heard < limit:
                self._drop(incarnation, changes, "silent")
        return changes

    def heard_everyone_now(self) -> None:
        """After this node's own outage: nobody is blamed for the silence it caused."""
        now = self.clock()
        for view in self.views.values():
            view.heard = now
            view.sync_asked = float("-inf")

    def forget_everyone(self) -> Changes:
        """Every other node's entries leave (this node stops)."""
        changes = Changes()
        for incarnation in list(self.views):
            self._drop(incarnation, changes, "gone")
        return changes

    # -- inspection ----------------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        """The other incarnations known, with their entry counts and silence."""
        now = self.clock()
        return [
            {
                "node": v.node,
                "incarnation": v.incarnation,
                "presences": len(v.presences),
                "silent_for": round(now - v.heard, 3),
                "synced": v.synced,
            }
            for v in self.views.values()
        ]

    # -- internals -----------------------------------------------------------------------

    def _view(self, msg: dict[str, Any], changes: Changes) -> NodeView:
        incarnation = msg["i"]
        view = self.views.get(incarnation)
        now = self.clock()
        if view is None:
            # A new incarnation of a node we knew: the old one is gone for good.
            for old in [i for i, v in self.views.items() if v.node == msg["n"]]:
                self._drop(old, changes, "gone")
            view = self.views[incarnation] = NodeView(msg["n"], incarnation, now)
        view.heard = now
        return view

    def _ask(self, view: NodeView, changes: Changes) -> None:
        now = self.clock()
        if now - view.sync_asked >= self.resync:
            view.sync_asked = now
            changes.request_sync = view.incarnation

    def _apply_delta(self, view: NodeView, msg: dict[str, Any], changes: Changes) -> None:
        topic = msg["t"]
        if msg["k"] == "p":
            key, joined, left = msg["key"], msg["j"], msg["l"]
            if left is not None and (topic, key, left["phx_ref"]) in view.presences:
                del view.presences[(topic, key, left["phx_ref"])]
                changes.presence.append((topic, key, None, left))
            if joined is not None:
                view.presences[(topic, key, joined["phx_ref"])] = joined
                changes.presence.append((topic, key, joined, None))
            return
        entry = (topic, msg["user"])
        if msg["on"] and entry not in view.users:
            view.users.add(entry)
            changes.users.append((topic, msg["user"], +1))
        elif not msg["on"] and entry in view.users:
            view.users.discard(entry)
            changes.users.append((topic, msg["user"], -1))

    def _replace(self, view: NodeView, msg: dict[str, Any], changes: Changes) -> None:
        presences = {(t, key, meta["phx_ref"]): meta for t, key, meta in msg["p"]}
        for entry, meta in view.presences.items():
            if entry not in presences:
                changes.presence.append((entry[0], entry[1], None, meta))
        for entry, meta in presences.items():
            if entry not in view.presences:
                changes.presence.append((entry[0], entry[1], meta, None))
        users = {(t, user) for t, user in msg["u"]}
        changes.users.extend((t, u, -1) for t, u in view.users - users)
        changes.users.extend((t, u, +1) for t, u in users - view.users)
        view.presences, view.users = presences, users
        view.seq = msg["s"]
        view.synced = True
        hits = msg.get("h")
        for topic, count in hits.items() if isinstance(hits, dict) else ():
            if isinstance(topic, str) and isinstance(count, int):
                self._count(topic, view.incarnation, count, changes)

    def _count(self, topic: str, incarnation: str, count: int, changes: Changes) -> None:
        counts = self.hits.setdefault(topic, {})
        if count > counts.get(incarnation, 0):
            counts[incarnation] = count
            changes.hits[topic] = sum(counts.values())

    def _drop(self, incarnation: str, changes: Changes, why: str) -> None:
        self.departed[incarnation] = why
        if len(self.departed) > DEPARTED:
            del self.departed[next(iter(self.departed))]
        view = self.views.pop(incarnation, None)
        if view is None:
            return
        changes.left_nodes.append(view.node)
        for (topic, key, _ref), meta in view.presences.items():
            changes.presence.append((topic, key, None, meta))
        changes.users.extend((topic, user, -1) for topic, user in view.users)
