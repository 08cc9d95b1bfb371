"""Presence for one topic, in the shapes phoenix.js `Presence` consumes.

State is keyed by user (string); each tracked channel contributes one meta carrying a
unique `phx_ref`. Changes accumulate into a pending diff that the broker flushes as one
`presence_diff` (joins and leaves), so N changes in one interval cost one message per
subscriber. The last flushed state is kept encoded: a joiner gets that snapshot at once and
the pending diff (which includes its own join) right after, which phoenix.js merges exactly.
"""

from __future__ import annotations

import base64
import itertools
import os
from typing import Any

from phxbroker.protocol.messages import dumps

# Refs are unique across the nodes of a cluster too: 48 random bits per process.
_REF_PREFIX = os.urandom(6)
_ref_counter = itertools.count(1)


def new_phx_ref() -> str:
    """A unique opaque ref: 16 url-safe base64 characters, like Phoenix's.

    A random per-process prefix keeps refs unique across restarts and nodes; a counter
    within one.
    """
    raw = _REF_PREFIX + next(_ref_counter).to_bytes(6, "big")
    return base64.urlsafe_b64encode(raw).decode()


class Presence:
    """Who is present on one topic, plus the diff not yet sent."""

    __slots__ = ("_snapshot", "joins", "leaves", "metas")

    def __init__(self) -> None:
        self.metas: dict[str, dict[str, dict[str, Any]]] = {}  # key -> phx_ref -> meta
        self.joins: dict[str, list[dict[str, Any]]] = {}
        self.leaves: dict[str, list[dict[str, Any]]] = {}
        self._snapshot: bytes | None = dumps({})

    def track(self, key: str, meta: dict[str, Any]) -> dict[str, Any]:
        """Add a meta for key; returns it with its new phx_ref."""
        meta = {**meta, "phx_ref": new_phx_ref()}
        self.metas.setdefault(key, {})[meta["phx_ref"]] = meta
        self.joins.setdefault(key, []).append(meta)
        return meta

    def insert(self, key: str, meta: dict[str, Any]) -> None:
        """Add a meta that already has its phx_ref (one another node tracked)."""
        ref = meta["phx_ref"]
        metas = self.metas.setdefault(key, {})
        if ref in metas:
            return
        metas[ref] = meta
        self.joins.setdefault(key, []).append(meta)

    def untrack(self, key: str, phx_ref: str) -> dict[str, Any] | None:
        """Remove a meta; returns it (None if it was not tracked)."""
        metas = self.metas.get(key)
        if metas is None or phx_ref not in metas:
            return None
        meta = metas.pop(phx_ref)
        if not metas:
            del self.metas[key]
        # A meta that joined since the last diff leaves it again instead of adding a leave:
        # clients end in the same state, and the pending diff never holds more metas than
        # were present at the last flush plus those present now, however often they change.
        joined = self.joins.get(key)
        if joined is not None:
            for index, pending in enumerate(joined):
                if pending is meta:
                    del joined[index]
                    if not joined:
                        del self.joins[key]
                    return meta
        self.leaves.setdefault(key, []).append(meta)
        return meta

    def update(self, key: str, phx_ref: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        """Replace a meta: the new one (new phx_ref, phx_ref_prev) joins, the old one leaves."""
        old = self.metas.get(key, {}).get(phx_ref)
        if old is None:
            return None
        fields = {k: v for k, v in old.items() if k not in ("phx_ref", "phx_ref_prev")}
        self.untrack(key, phx_ref)
        new = self.track(key, {**fields, **changes})
        new["phx_ref_prev"] = phx_ref
        return new

    @property
    def dirty(self) -> bool:
        return bool(self.joins or self.leaves)

    def take_diff(self) -> dict[str, Any]:
        """The pending diff as a presence_diff payload; the snapshot moves to the new state."""
        diff = {
            "joins": {k: {"metas": v} for k, v in self.joins.items()},
            "leaves": {k: {"metas": v} for k, v in self.leaves.items()},
        }
        self.joins = {}
        self.leaves = {}
        self._snapshot = None
        return diff

    def state(self) -> dict[str, Any]:
        return {k: {"metas": list(v.values())} for k, v in self.metas.items()}

    def snapshot_json(self) -> bytes:
        """The state as of the last take_diff(), JSON-encoded once and reused."""
        if self._snapshot is None:
            self._snapshot = dumps(self._flushed_state())
        return self._snapshot

    def _flushed_state(self) -> dict[str, Any]:
        # Current state, undoing what the pending diff will still announce. Refs are never
        # reused, so a ref in both joins and leaves came and went after the last flush.
        joined = {m["phx_ref"] for metas in self.joins.values() for m in metas}
        state = {k: {r: m for r, m in v.items() if r not in joined} for k, v in self.metas.items()}
        for key, metas in self.leaves.items():
            for meta in metas:
                if meta["phx_ref"] not in joined:
                    state.setdefault(key, {})[meta["phx_ref"]] = meta
        return {k: {"metas": list(v.values())} for k, v in state.items() if v}

    def __len__(self) -> int:
        return len(self.metas)
