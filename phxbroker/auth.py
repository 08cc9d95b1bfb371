"""Connect authentication: who is this socket, or why is it refused.

Static tokens are compared by their SHA-256 digest: the table holds only digests, and the
lookup is a hash-table probe on the digest of what the client sent, so neither the
stored secret nor its prefix can be learned from response timing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from phxbroker.bans import Bans
from phxbroker.config import AuthConfig

MAX_USER_LENGTH = 200


@dataclass(frozen=True, slots=True)
class Identity:
    """An admitted connection: its user (None when anonymous) and what admitted it."""

    user: str | None
    credential: object = None  # compared on reload to close sockets of revoked credentials


class Refused(Exception):
    """A refused connect: `reason` is a short code for counters, str() a sentence for logs."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Authenticator:
    """Checks connect params (and a header-borne token) against the [auth] config."""

    def __init__(self, config: AuthConfig, bans: Bans | None = None) -> None:
        self.config = config
        self.bans = bans if bans is not None else Bans()
        self._by_digest: dict[bytes, str] = {}
        for entry in config.tokens:
            self._by_digest[entry.sha256] = entry.user

    def authenticate(self, params: dict[str, str], header_token: str | None = None) -> Identity:
        """Identify a connecting client or raise Refused (also for a banned user). Never
        echoes the token."""
        identity = self._identify(params, header_token)
        if identity.user is not None:
            left = self.bans.remaining(identity.user)
            if left is not None:
                raise Refused("banned", f"user {identity.user!r} is banned for {left:.0f} s more")
        return identity

    def _identify(self, params: dict[str, str], header_token: str | None) -> Identity:
        cfg = self.config
        token = header_token if header_token is not None else params.get(cfg.token_param)
        if not token:
            if cfg.allow_anonymous:
                return Identity(user=None)
            raise Refused("missing_token", f"no token in connect param {cfg.token_param!r}")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        user = self._by_digest.get(digest)
        if user is None:
            raise Refused("bad_token", "token not recognised")
        named = params.get(cfg.user_param) if cfg.user_param else None
        if user == "*":
            if not named:
                raise Refused("missing_user", f"no user name in connect param {cfg.user_param!r}")
            _check_user_name(named)
            return Identity(user=named, credential=digest)
        if named and named != user:
            raise Refused(
                "user_mismatch",
                f"connect param {cfg.user_param!r} names a different user than the token",
            )
        return Identity(user=user, credential=digest)

    def credential_valid(self, credential: object) -> bool:
        """Whether a credential that admitted a connection is still accepted (for reload)."""
        return (credential is None and self.config.allow_anonymous) or credential in self._by_digest


def _check_user_name(name: str) -> None:
    if len(name) > MAX_USER_LENGTH or not name.isprintable():
        raise Refused("bad_user", "user name is too long or contains control characters")
