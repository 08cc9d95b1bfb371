"""Verify JWT connect tokens with PyJWT.

A `JwtVerifier` is built once from configuration: the accepted algorithms, and either a
shared secret (HS256/384/512) or a public key in PEM (RS*, PS*, ES*, EdDSA). The
algorithm list is fixed there and never taken from a token, `none` is never accepted, and
symmetric and asymmetric algorithms cannot be mixed, so a token signed with HS256 using
the public key as its secret is refused. `verify(token)` returns the user id claim, or the
part of it a `user_claim_pattern` names (Guardian's `sub = "User:1"` with the pattern
`"User:{user}"` is user `1`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from phxbroker.auth.phoenix_token import TokenError, three_part_token
from phxbroker.protocol.messages import describe_json

__all__ = ["ASYMMETRIC_ALGORITHMS", "HMAC_ALGORITHMS", "JwtVerifier", "TokenError"]

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
_KEY_FAMILIES = {
    "RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "EC": ("ES256", "ES384", "ES512"),
    "EdDSA": ("EdDSA",),
}
ASYMMETRIC_ALGORITHMS = tuple(alg for family in _KEY_FAMILIES.values() for alg in family)
_FAMILY_BY_ALGORITHM = {alg: family for family, algs in _KEY_FAMILIES.items() for alg in algs}
_FAMILY_BY_ALGORITHM.update(dict.fromkeys(HMAC_ALGORITHMS, "HMAC"))

# RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
_MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_MIN_RSA_BITS = 2048
_PUBLIC_KEY_TYPES: dict[str, tuple[type[Any], ...]] = {
    "RSA": (rsa.RSAPublicKey,),
    "EC": (ec.EllipticCurvePublicKey,),
    "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
_CURVE_BY_ALGORITHM = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
USER_PLACEHOLDER = "{user}"


class JwtVerifier:
    """Verifies JWT connect tokens against one key and a fixed algorithm allow-list.

    Construction raises ValueError with one sentence when the arguments cannot work
    together (unknown or mixed algorithms, missing or unusable key, short HMAC secret,
    RSA key under 2048 bits, private key given as public key).
    """

    def __init__(
        self,
        *,
        algorithms: str | Sequence[str] = ("HS256",),
        secret: str | bytes | None = None,
        public_key: str | bytes | None = None,
        user_claim: str = "sub",
        user_claim_pattern: str | None = None,
        issuer: str | Sequence[str] | None = None,
        audience: str | Sequence[str] | None = None,
        leeway: float = 0,
        required_claims: Sequence[str] = ("exp",),
    ) -> None:
        self._algorithms = _check_algorithms(algorithms)
        family = _FAMILY_BY_ALGORITHM[self._algorithms[0]]
        if family == "HMAC":
            self._key: Any = _hmac_key(self._algorithms, secret, public_key)
        else:
            self._key = _public_key(self._algorithms, public_key, secret)
        if not isinstance(user_claim, str) or not user_claim:
            raise ValueError("user_claim must be a non-empty claim name")
        if isinstance(leeway, bool) or not isinstance(leeway, int | float) or not leeway >= 0:
            raise ValueError("leeway must be a number of seconds, zero or more")
        self._user_claim = user_claim
        self._user_claim_pattern = user_claim_pattern
        self._user_in_claim = _compile_user_pattern(user_claim_pattern)
        self._issuer = _names(issuer, "issuer")
        self._audience = _names(audience, "audience")
        self._leeway = leeway
        required = _names(required_claims, "required_claims", allow_empty=True) or ()
        self._required = list(required)

    def __repr__(self) -> str:
        return (
            f"JwtVerifier(algorithms={list(self._algorithms)!r}, "
            f"user_claim={self._user_claim!r}, "
            f"user_claim_pattern={self._user_claim_pattern!r}, issuer={self._issuer!r}, "
            f"audience={self._audience!r}, leeway={self._leeway!r})"
        )

    def verify_claims(self, token: str | bytes | None) -> dict[str, Any]:
        """Return the token's claims once signature, algorithm and claims all check out.

        Raises `TokenError` (reason "missing", "expired" or "invalid") with one sentence.
        """
        token = three_part_token(token)
        try:
            return jwt.decode(
                token,
                self._key,
                algorithms=list(self._algorithms),
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": self._required},
            )
        except jwt.PyJWTError as exc:
            raise self._refusal(exc, token) from None

    def verify(self, token: str | bytes | None) -> str:
        """Return the user id in the configured claim; raise `TokenError` otherwise.

        A string claim is returned as is and an integer as its decimal text; other JSON
        values are refused. With a `user_claim_pattern`, the user is the part of the claim
        in the pattern's `{user}`, and a claim the pattern does not match is refused.
        """
        claims = self.verify_claims(token)
        if self._user_claim not in claims:
            raise TokenError(f"token is missing the user claim {self._user_claim!r}")
        user = _user_id(claims[self._user_claim], self._user_claim)
        if self._user_in_claim is None:
            return user
        found = self._user_in_claim.fullmatch(user)
        if found is None:
            raise TokenError(
                f"token claim {self._user_claim!r} does not match "
                f"user_claim_pattern {self._user_claim_pattern!r}"
            )
        return found.group("user")

    def _refusal(self, exc: jwt.PyJWTError, token: str) -> TokenError:
        if isinstance(exc, jwt.ExpiredSignatureError):
            return TokenError("token expired", reason="expired")
        if isinstance(exc, jwt.ImmatureSignatureError):
            return TokenError("token is not valid yet")
        if isinstance(exc, jwt.InvalidSignatureError):
            return TokenError("token signature does not match")
        if isinstance(exc, jwt.InvalidAlgorithmError):
            return _algorithm_refusal(token, ", ".join(self._algorithms))
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return TokenError(f"token is missing the required claim {exc.claim!r}")
        if isinstance(exc, jwt.InvalidAudienceError):
            if self._audience is None:
                return TokenError("token names an audience (aud) but none is configured")
            return TokenError("token audience (aud) does not match")
        if isinstance(exc, jwt.InvalidIssuerError):
            return TokenError("token issuer (iss) does not match")
        if isinstance(exc, InvalidSubjectError):
            return TokenError("token subject (sub) is not a string")
        if isinstance(exc, InvalidJTIError):
            return TokenError("token id (jti) is not a string")
        if isinstance(exc, jwt.InvalidIssuedAtError):
            return TokenError("token issued-at time (iat) is not a number")
        return TokenError(f"token is not a valid JWT: {_fragment(str(exc))}")


def _compile_user_pattern(pattern: str | None) -> re.Pattern[str] | None:
    """A regex taking the user out of a claim: `{user}` is one or more characters, the
    rest of the pattern literal text. ValueError names what is wrong with the pattern."""
    if pattern is None:
        return None
    if not isinstance(pattern, str) or pattern.count(USER_PLACEHOLDER) != 1:
        raise ValueError(
            'user_claim_pattern must contain "{user}" once, e.g. "User:{user}" for Guardian'
        )
    before, _, after = pattern.partition(USER_PLACEHOLDER)
    if "{" in before + after or "}" in before + after:
        raise ValueError('user_claim_pattern may contain no placeholder other than "{user}"')
    return re.compile(f"{re.escape(before)}(?P<user>.+){re.escape(after)}", re.DOTALL)


def _check_algorithms(algorithms: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(algorithms, str):
        algorithms = (algorithms,)
    if not algorithms:
        raise ValueError("algorithms must name at least one JWT algorithm")
    for alg in algorithms:
        if not isinstance(alg, str):
            raise ValueError("algorithms must be JWT algorithm names such as HS256")
        if alg.lower() == "none":
            raise ValueError("the JWT algorithm 'none' is never accepted")
        if alg not in _FAMILY_BY_ALGORITHM:
            supported = ", ".join((*HMAC_ALGORITHMS, *ASYMMETRIC_ALGORITHMS))
            raise ValueError(f"unsupported JWT algorithm {alg!r} (supported: {supported})")
    families = {_FAMILY_BY_ALGORITHM[alg] for alg in algorithms}
    if len(families) > 1:
        raise ValueError(
            f"algorithms {', '.join(algorithms)} need different kinds of key; "
            "list algorithms of one kind only"
        )
    return tuple(dict.fromkeys(algorithms))


def _hmac_key(
    algorithms: tuple[str, ...], secret: str | bytes | None, public_key: str | bytes | None
) -> bytes:
    if public_key is not None:
        raise ValueError(f"{algorithms[0]} verifies with a shared secret, not a public_key")
    if not secret:
        raise ValueError(f"{algorithms[0]} needs a non-empty shared secret")
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    try:
        get_default_algorithms()[algorithms[0]].prepare_key(raw)
    except jwt.InvalidKeyError:
        # PyJWT refuses PEM/SSH text as an HMAC secret: the classic alg-confusion setup.
        raise ValueError(
            "secret looks like a public key; give it as public_key with an RS/PS/ES algorithm"
        ) from None
    for alg in algorithms:
        if len(raw) < _MIN_SECRET_BYTES[alg]:
            raise ValueError(
                f"secret is {len(raw)} bytes; {alg} needs at least {_MIN_SECRET_BYTES[alg]} "
                "(RFC 7518 section 3.2)"
            )
    return raw


def _public_key(
    algorithms: tuple[str, ...], public_key: str | bytes | None, secret: str | bytes | None
) -> Any:
    if secret is not None:
        raise ValueError(f"{algorithms[0]} verifies with a public_key, not a shared secret")
    if not public_key:
        raise ValueError(f"{algorithms[0]} needs a public_key in PEM format")
    implementations = get_default_algorithms()
    key: Any = public_key
    for alg in algorithms:
        implementation = implementations[alg]
        try:
            key = implementation.prepare_key(key)
        except (jwt.InvalidKeyError, UnsupportedAlgorithm, ValueError, TypeError):
            raise ValueError(f"public_key is not a PEM public key usable with {alg}") from None
        if hasattr(key, "private_bytes"):
            raise ValueError("public_key holds a private key; give only the public key")
        if not isinstance(key, _PUBLIC_KEY_TYPES[_FAMILY_BY_ALGORITHM[alg]]):
            raise ValueError(f"public_key is not a PEM public key usable with {alg}")
        curve = _CURVE_BY_ALGORITHM.get(alg)
        if curve is not None and key.curve.name != curve:
            raise ValueError(f"public_key is on curve {key.curve.name}; {alg} needs {curve}")
        if _FAMILY_BY_ALGORITHM[alg] == "RSA" and key.key_size < _MIN_RSA_BITS:
            raise ValueError(
                f"public_key is a {key.key_size}-bit RSA key; "
                f"at least {_MIN_RSA_BITS} bits are required"
            )
    return key


def _names(
    value: str | Sequence[str] | None, what: str, *, allow_empty: bool = False
) -> str | tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{what} must not be empty")
        return value
    names = tuple(value)
    if not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"{what} must be a string or a list of non-empty strings")
    if not names and not allow_empty:
        raise ValueError(f"{what} must not be an empty list")
    return names


def _algorithm_refusal(token: str, allowed: str) -> TokenError:
    """Name the token's algorithm in the error, without echoing arbitrary token text."""
    try:
        alg = jwt.get_unverified_header(token).get("alg")
    except (jwt.PyJWTError, AttributeError):
        alg = None
    if not alg:
        return TokenError("token header does not name an algorithm (alg)")
    if isinstance(alg, str) and len(alg) <= 16 and alg.isprintable():
        return TokenError(f"token algorithm {alg!r} is not allowed ({allowed})")
    return TokenError(f"token algorithm is not allowed ({allowed})")


def _user_id(value: Any, claim: str) -> str:
    if isinstance(value, bool) or value is None:
        kind = describe_json(value)
    elif isinstance(value, int):
        try:
            return str(value)
        except ValueError:
            raise TokenError(
                f"token claim {claim!r} is too large an integer for a user id"
            ) from None
    elif isinstance(value, str):
        if not value:
            raise TokenError(f"token claim {claim!r} is an empty string, not a user id")
        try:
            value.encode()
        except UnicodeEncodeError:
            # JSON lets a token carry a lone surrogate ("\ud800"); as a user id it could not
            # be written back to clients, logs or the CLI exactly.
            raise TokenError(f"token claim {claim!r} is not valid Unicode text") from None
        return value
    else:
        kind = describe_json(value)
    raise TokenError(f"token claim {claim!r} is {kind}, not a string or integer user id")


def _fragment(message: str) -> str:
    """Turn a PyJWT message such as "Invalid header padding." into a clause."""
    return message.strip().rstrip(".") or "unreadable"
