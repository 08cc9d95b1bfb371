"""Bans that every node of a cluster applies: one set here is announced to the others."""

from __future__ import annotations

from collections.abc import Callable

from phxbroker.auth.bans import Bans


class SharedBans(Bans):
    """`Bans` whose changes made here go to `announce(user, seconds or None)`; changes
    from other nodes are applied with the plain `Bans` methods, so they are not sent back."""

    announce: Callable[[str, float | None], None] | None = None

    def ban(self, user: str, seconds: float) -> None:
        super().ban(user, seconds)
        if self.announce is not None:
            self.announce(user, seconds)

    def lift(self, user: str) -> bool:
        lifted = super().lift(user)
        if self.announce is not None:
            self.announce(user, None)
        return lifted
