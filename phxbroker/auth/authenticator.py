"""Connect authentication: who is this socket, or why is it refused.

A token comes from the connect param `token_param`, or from phoenix.js 1.8's `authToken`
(a websocket subprotocol, or LongPoll's X-Phoenix-AuthToken header), which wins. Several
kinds may be configured at once; each token is checked by exactly one of them:

1. a static token: its SHA-256 digest is looked up in `[[auth.tokens]]` (the table holds
   only digests and the probe is on the digest of what the client sent, so neither a
   stored secret nor its prefix can be learned from response timing);
2. otherwise a token starting with a Phoenix.Token prefix (`SFMyNTY.`, `SFMzODQ.`,
   `SFM1MTI.`) goes to `[auth.phoenix_token]`;
3. otherwise a token of three dot-separated parts goes to `[auth.jwt]`;
4. anything else is refused as not recognised.

Refusal sentences name the kind of token and why it failed, never the token itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from phxbroker.auth.bans import Bans
from phxbroker.auth.phoenix_token import TokenError
from phxbroker.auth.settings import AuthConfig, SignedTokenConfig

MAX_USER_LENGTH = 200
PHOENIX_TOKEN_PREFIXES = ("SFMyNTY.", "SFMzODQ.", "SFM1MTI.")


@dataclass(frozen=True, slots=True)
class Identity:
    """An admitted connection: its user (None when anonymous) and what admitted it."""

    user: str | None
    credential: object = None  # compared on reload to close sockets of revoked credentials
    assigns: dict[str, Any] | None = None  # the socket's assigns, from the app's connect hook


# Every anonymous connect is admitted as the same (immutable) identity.
ANONYMOUS = Identity(user=None)


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
        self._signed_keys = {
            signed.fingerprint for signed in (config.jwt, config.phoenix_token) if signed
        }

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
                return ANONYMOUS
            raise Refused("missing_token", f"no token in connect param {cfg.token_param!r}")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        user = self._by_digest.get(digest)
        if user is None:
            return self._signed(token, params)
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

    def _signed(self, token: str, params: dict[str, str]) -> Identity:
        """Verify a Phoenix.Token or a JWT, whichever the token's shape says it is."""
        cfg = self.config
        if token.startswith(PHOENIX_TOKEN_PREFIXES):
            kind, label, signed = "phoenix_token", "Phoenix.Token", cfg.phoenix_token
        elif token.count(".") == 2:
            kind, label, signed = "jwt", "JWT", cfg.jwt
        else:
            raise Refused("bad_token", "token not recognised")
        if signed is None:
            raise Refused("bad_token", f"token looks like a {label}, but [auth.{kind}] is not set")
        user = _verify(signed, token, kind, label)
        _check_user_name(user)
        named = params.get(cfg.user_param) if cfg.user_param else None
        if named and named != user:
            raise Refused(
                "user_mismatch",
                f"connect param {cfg.user_param!r} names a different user than the {label}",
            )
        return Identity(user=user, credential=signed.fingerprint)

    def credential_valid(self, credential: object, user: str | None) -> bool:
        """Whether a credential that admitted `user` is still accepted (for reload): the
        same static token still given to that user (or still a shared secret), or a token
        signed with a key still configured."""
        if credential is None:
            return self.config.allow_anonymous
        owner = self._by_digest.get(credential)  # type: ignore[call-overload]
        if owner is not None:
            return owner in ("*", user)
        return credential in self._signed_keys


def _verify(signed: SignedTokenConfig, token: str, kind: str, label: str) -> str:
    try:
        return signed.verifier.verify(token)
    except TokenError as exc:
        raise Refused(f"{kind}_{exc.reason}", f"{label} refused: {exc}") from None


def _check_user_name(name: str) -> None:
    if len(name) > MAX_USER_LENGTH or not name.isprintable():
        raise Refused("bad_user", "user name is too long or contains control characters")
