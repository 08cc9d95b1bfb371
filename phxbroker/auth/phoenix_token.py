"""Verify tokens minted by `Phoenix.Token.sign/4` (plug_crypto's signed message format).

A token is `PREFIX "." b64url(term) "." b64url(HMAC(key, PREFIX "." b64url(term)))` where
the key is PBKDF2-HMAC of the app's `secret_key_base` with the token's salt, and the term
is `{data, signed_at_ms, max_age_s}`. Verification follows plug_crypto: the MAC digest is
picked by the prefix, the MAC is compared in constant time before the term is decoded,
and expiry is checked against the clock in milliseconds.

Errors are `TokenError`s with one sentence that never contains the token or the secret.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import math
import re
import time
from typing import Any, Literal

from phxbroker.auth import etf

__all__ = [
    "DEFAULT_MAX_AGE",
    "KEY_DIGESTS",
    "PhoenixTokenVerifier",
    "TokenError",
    "derive_key",
    "user_id_from_data",
    "verify",
]

DEFAULT_MAX_AGE = 86400
"""Seconds a token lives when its payload does not say (legacy shapes), as in plug_crypto."""

KEY_DIGESTS = ("sha256", "sha384", "sha512")

_MAC_DIGEST_BY_PREFIX = {"SFMyNTY": "sha256", "SFMzODQ": "sha384", "SFM1MTI": "sha512"}
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_INFINITY = etf.Atom("infinity")

TokenFailure = Literal["missing", "invalid", "expired"]


class TokenError(Exception):
    """A connect token was refused.

    `reason` is "missing", "invalid" or "expired" (plug_crypto's three outcomes); the
    message is one sentence saying why, free of the token and of any secret.
    """

    def __init__(self, message: str, *, reason: TokenFailure = "invalid") -> None:
        super().__init__(message)
        self.reason: TokenFailure = reason


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


@functools.lru_cache(maxsize=64)
def _cached_pbkdf2(secret: bytes, salt: bytes, iterations: int, length: int, digest: str) -> bytes:
    return hashlib.pbkdf2_hmac(digest, secret, salt, iterations, dklen=length)


def derive_key(
    secret_key_base: str | bytes,
    salt: str | bytes,
    *,
    iterations: int = 1000,
    length: int = 32,
    digest: str = "sha256",
) -> bytes:
    """Return plug_crypto's signing key: PBKDF2-HMAC(digest, secret_key_base, salt).

    `secret_key_base` is used as its literal bytes, not decoded. Results are cached, since
    each derivation costs about a millisecond. Raises ValueError for bad parameters.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError("key iterations must be an integer of at least 1")
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length < 2**32:
        raise ValueError("key length must be an integer from 1 to 4294967295")
    if digest not in KEY_DIGESTS:
        raise ValueError(f"key digest must be one of {', '.join(KEY_DIGESTS)}")
    return _cached_pbkdf2(_as_bytes(secret_key_base), _as_bytes(salt), iterations, length, digest)


def verify(
    token: str | bytes | None,
    *,
    secret_key_base: str | bytes,
    salt: str | bytes,
    max_age: float | Literal["infinity"] | None = None,
    now_ms: int | None = None,
    key_iterations: int = 1000,
    key_length: int = 32,
    key_digest: str = "sha256",
    max_term_size: int = etf.DEFAULT_MAX_SIZE,
    max_term_depth: int = etf.DEFAULT_MAX_DEPTH,
) -> Any:
    """Return the data signed into `token`, as `Phoenix.Token.verify/4` would.

    `max_age` (seconds, `math.inf` or "infinity") overrides the age embedded in the token;
    `now_ms` fixes the clock (milliseconds since the epoch). Raises `TokenError` when the
    token is missing, malformed, signed with another key or salt, signed in the future,
    or expired. Raises ValueError for bad parameters.
    """
    if max_age is not None:
        _check_max_age_option(max_age)
    key = derive_key(
        secret_key_base, salt, iterations=key_iterations, length=key_length, digest=key_digest
    )
    return _verify_with_key(
        token,
        key,
        max_age=max_age,
        now_ms=now_ms,
        max_term_size=max_term_size,
        max_term_depth=max_term_depth,
    )


def _verify_with_key(
    token: str | bytes | None,
    key: bytes,
    *,
    max_age: float | Literal["infinity"] | None,
    now_ms: int | None,
    max_term_size: int,
    max_term_depth: int,
) -> Any:
    message = _check_signature(token, key)
    try:
        term = etf.decode(message, max_size=max_term_size, max_depth=max_term_depth)
    except etf.TermError as exc:
        raise TokenError(f"token payload is not a valid Phoenix term: {exc}") from None
    data, signed_at, embedded_max_age = _unpack_payload(term)
    _check_age(signed_at, embedded_max_age if max_age is None else max_age, now_ms)
    return data


def three_part_token(token: str | bytes | None) -> str:
    """The token as text with three dot-separated parts (Phoenix.Token and JWT alike);
    TokenError otherwise, never quoting the token."""
    if token is None or token in ("", b""):
        raise TokenError("token is missing", reason="missing")
    if isinstance(token, bytes | bytearray):
        try:
            token = bytes(token).decode("ascii")
        except UnicodeDecodeError:
            raise TokenError("token is not ASCII text") from None
    if not isinstance(token, str):
        raise TokenError("token is not a string")
    parts = token.count(".") + 1
    if parts != 3:
        raise TokenError(f"token has {parts} dot-separated parts, not 3")
    return token


def _check_signature(token: str | bytes | None, key: bytes) -> bytes:
    """Return the signed message bytes once the token's MAC is proven to match."""
    prefix, payload_text, signature_text = three_part_token(token).split(".")
    mac_digest = _MAC_DIGEST_BY_PREFIX.get(prefix)
    if mac_digest is None:
        raise TokenError("token does not start with a Phoenix.Token signature prefix")
    message = _b64url_decode(payload_text, "payload")
    signature = _b64url_decode(signature_text, "signature")
    # The MAC covers the text as received, so re-encoding quirks cannot change the outcome.
    expected = hmac.new(key, f"{prefix}.{payload_text}".encode("ascii"), mac_digest).digest()
    if not hmac.compare_digest(expected, signature):
        raise TokenError("token signature does not match")
    return message


def _b64url_decode(text: str, part: str) -> bytes:
    """Decode RFC 4648 url-safe base64 without padding, refusing anything else."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise TokenError(f"token {part} is not unpadded url-safe base64")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError(f"token {part} is not unpadded url-safe base64") from None


def _unpack_payload(term: Any) -> tuple[Any, int, Any]:
    """Accept the three payload shapes plug_crypto reads: current, legacy tuple, old map."""
    if isinstance(term, tuple) and len(term) == 3:
        data, signed_at, max_age = term
    elif isinstance(term, tuple) and len(term) == 2:
        (data, signed_at), max_age = term, DEFAULT_MAX_AGE
    elif isinstance(term, dict) and _has_atom_keys(term, "data", "signed"):
        data, signed_at, max_age = term["data"], term["signed"], DEFAULT_MAX_AGE
    else:
        raise TokenError("token payload is not a {data, signed_at, max_age} tuple")
    if isinstance(signed_at, bool) or not isinstance(signed_at, int):
        raise TokenError("token signing time is not an integer")
    if not _is_max_age(max_age):
        raise TokenError("token max age is neither a number nor infinity")
    return data, signed_at, max_age


def _has_atom_keys(term: dict[Any, Any], *names: str) -> bool:
    # A binary "data" key compares equal to the atom :data in Python; only atoms count here.
    atom_keys = {key for key in term if isinstance(key, etf.Atom)}
    return all(name in atom_keys for name in names)


def _is_max_age(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return not math.isnan(value)
    return isinstance(value, etf.Atom) and value == _INFINITY


def _check_age(signed_at: int, max_age: Any, now_ms: int | None) -> None:
    # Same order as plug_crypto: infinity skips every time check, then a non-positive age
    # is expired before the signing time is even looked at.
    if _is_infinite(max_age):
        return
    if max_age <= 0:
        raise TokenError("token expired", reason="expired")
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    if signed_at > now:
        raise TokenError("token is signed in the future")
    lifetime_ms = max_age * 1000
    if isinstance(lifetime_ms, float) and math.isinf(lifetime_ms):
        return
    if signed_at + int(lifetime_ms) < now:
        raise TokenError("token expired", reason="expired")


def _is_infinite(max_age: Any) -> bool:
    return bool(max_age == "infinity" or max_age == math.inf)


def user_id_from_data(data: Any, *, key: str | None = "id") -> str:
    """Turn verified token data into a user id.

    An integer becomes its decimal text, a non-empty string is kept, and a map yields the
    integer or string stored under `key` (an atom or binary key). Anything else raises
    `TokenError`.
    """
    if isinstance(data, dict):
        if key is None:
            raise TokenError("token data is a map but no user key is configured")
        if key not in data:
            raise TokenError(f"token data map has no {key!r} key")
        return _scalar_user_id(data[key], f"token data map value at {key!r}")
    return _scalar_user_id(data, "token data")


def _scalar_user_id(value: Any, what: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, etf.Atom):
        raise TokenError(f"{what} is {_describe(value)}, not a string or integer user id")
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:
            raise TokenError(f"{what} is an integer too large for a user id") from None
    if isinstance(value, str):
        if not value:
            raise TokenError(f"{what} is an empty string, not a user id")
        return value
    raise TokenError(f"{what} is {_describe(value)}, not a string or integer user id")


def _describe(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, etf.Atom):
        return "an atom"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, bytes | etf.BitString):
        return "a binary that is not UTF-8 text"
    if isinstance(value, tuple):
        return "a tuple"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a map"
    return f"a {type(value).__name__}"


class PhoenixTokenVerifier:
    """Verifies Phoenix.Token connect tokens for one `secret_key_base` and salt.

    Built once from configuration; derives the key up front. `verify` returns the user id
    (see `user_id_from_data`), `verify_data` the raw signed data. Construction raises
    ValueError with one sentence for bad parameters.
    """

    def __init__(
        self,
        *,
        secret_key_base: str | bytes,
        salt: str | bytes,
        max_age: float | Literal["infinity"] | None = None,
        user_key: str | None = "id",
        key_iterations: int = 1000,
        key_length: int = 32,
        key_digest: str = "sha256",
        max_term_size: int = etf.DEFAULT_MAX_SIZE,
        max_term_depth: int = etf.DEFAULT_MAX_DEPTH,
    ) -> None:
        if not secret_key_base:
            raise ValueError("secret_key_base must not be empty")
        if max_age is not None:
            _check_max_age_option(max_age)
        self._key = derive_key(
            secret_key_base,
            salt,
            iterations=key_iterations,
            length=key_length,
            digest=key_digest,
        )
        self._max_age = max_age
        self._user_key = user_key
        self._max_term_size = max_term_size
        self._max_term_depth = max_term_depth

    def verify_data(self, token: str | bytes | None, *, now_ms: int | None = None) -> Any:
        """Return the data signed into `token`; raise `TokenError` if it is not valid now."""
        return _verify_with_key(
            token,
            self._key,
            max_age=self._max_age,
            now_ms=now_ms,
            max_term_size=self._max_term_size,
            max_term_depth=self._max_term_depth,
        )

    def verify(self, token: str | bytes | None, *, now_ms: int | None = None) -> str:
        """Return the user id carried by `token`; raise `TokenError` otherwise."""
        return user_id_from_data(self.verify_data(token, now_ms=now_ms), key=self._user_key)

    def __repr__(self) -> str:
        return f"PhoenixTokenVerifier(max_age={self._max_age!r}, user_key={self._user_key!r})"


def _check_max_age_option(max_age: Any) -> None:
    if max_age == "infinity":
        return
    if isinstance(max_age, bool) or not isinstance(max_age, int | float) or math.isnan(max_age):
        raise ValueError('max_age must be a number of seconds, math.inf or "infinity"')
