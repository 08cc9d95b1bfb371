"""What the `[auth]` section configures, as the authenticator uses it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from phxbroker.auth.jwt_tokens import JwtVerifier
from phxbroker.auth.phoenix_token import PhoenixTokenVerifier


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """A static connect token; only its SHA-256 is kept in memory."""

    user: str  # "*" accepts any name given in the user param
    sha256: bytes


@dataclass(frozen=True, slots=True)
class AuthConfig:
    token_param: str = "token"
    user_param: str = ""
    allow_anonymous: bool = False
    hook: bool = False  # ask the app's back end on every connect ([hooks] url /connect)
    tokens: tuple[TokenEntry, ...] = ()  # the main config's and the tokens file's
    tokens_file: Path | None = None  # managed by `phxbroker token`; resolved absolute
    jwt: SignedTokenConfig | None = None
    phoenix_token: SignedTokenConfig | None = None


@dataclass(frozen=True, slots=True)
class SignedTokenConfig:
    """A ready verifier (JWT or Phoenix.Token) and a digest identifying its key."""

    verifier: JwtVerifier | PhoenixTokenVerifier
    fingerprint: bytes = field(repr=False)
