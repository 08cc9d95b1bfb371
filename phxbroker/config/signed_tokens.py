"""The `[auth.jwt]` and `[auth.phoenix_token]` config sections: verifiers built at load.

Secrets are never written in the config file: each comes from an environment variable
(`*_env`) or a file (`*_file`, read on every load, so a reload picks up a rotated key).
The secret then lives only inside the verifier object; the config keeps a digest of it
(`fingerprint`) so that a reload can tell which connections a changed key invalidates.
"""

from __future__ import annotations

import hashlib
import os
import re

from phxbroker.auth.jwt_tokens import ASYMMETRIC_ALGORITHMS, HMAC_ALGORITHMS, JwtVerifier
from phxbroker.auth.phoenix_token import PhoenixTokenVerifier
from phxbroker.auth.settings import SignedTokenConfig
from phxbroker.config.table import Table, config_relative

MIN_SECRET_KEY_BASE = 32  # bytes; `mix phx.gen.secret` makes 64
DEFAULT_SALT = "user socket"
DEFAULT_MAX_AGE = 1_209_600  # two weeks, as in Phoenix's generated UserSocket
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def parse_jwt(t: Table) -> SignedTokenConfig:
    """[auth.jwt]: algorithms and a secret (HS*) or a public key file (RS*, PS*, ES*, EdDSA)."""
    algorithms = t.str_list("algorithms", ("HS256",))
    supported = HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS
    if not algorithms:
        raise t.error("algorithms", "must name at least one algorithm, such as HS256")
    for alg in algorithms:
        if alg.lower() == "none":
            raise t.error("algorithms", "the JWT algorithm 'none' is never accepted")
        if alg not in supported:
            raise t.error(
                "algorithms", f"unsupported algorithm {alg!r} (supported: {', '.join(supported)})"
            )
    if algorithms[0] in HMAC_ALGORITHMS:
        if t.has("public_key_file"):
            raise t.error("public_key_file", f"{algorithms[0]} verifies with a shared secret")
        key_name = "secret_env" if t.has("secret_env") else "secret_file"
        key = read_secret(t, "secret", "a shared secret for HS256/384/512")
        material: dict[str, bytes] = {"secret": key}
    else:
        for name in ("secret", "secret_env", "secret_file"):
            if t.has(name):
                raise t.error(name, f"{algorithms[0]} verifies with public_key_file")
        key_name = "public_key_file"
        key = read_file(t, "public_key_file")
        material = {"public_key": key}
    try:
        verifier = JwtVerifier(
            algorithms=algorithms,
            user_claim=t.string("user_claim", "sub"),
            user_claim_pattern=(
                t.string("user_claim_pattern", "") if t.has("user_claim_pattern") else None
            ),
            leeway=t.number("leeway", 0, minimum=0),
            issuer=_one_or_list(t, "issuer"),
            audience=_one_or_list(t, "audience"),
            required_claims=t.str_list("required_claims", ("exp",)),
            **material,
        )
    except ValueError as exc:
        raise t.error(_jwt_error_key(str(exc), key_name), str(exc)) from None
    t.done()
    return SignedTokenConfig(verifier, _fingerprint(b"jwt", ",".join(algorithms).encode(), key))


def parse_phoenix_token(t: Table) -> SignedTokenConfig:
    """[auth.phoenix_token]: the app's secret_key_base, salt, max_age and user_key."""
    secret_key_base = read_secret(t, "secret_key_base", "the Phoenix app's secret_key_base")
    if len(secret_key_base) < MIN_SECRET_KEY_BASE:
        key = "secret_key_base_env" if t.has("secret_key_base_env") else "secret_key_base_file"
        raise t.error(
            key,
            f"secret_key_base is {len(secret_key_base)} bytes; at least {MIN_SECRET_KEY_BASE} "
            "are required (`mix phx.gen.secret` makes 64)",
        )
    salt = t.string("salt", DEFAULT_SALT)
    verifier = PhoenixTokenVerifier(
        secret_key_base=secret_key_base,
        salt=salt,
        max_age=t.integer("max_age", DEFAULT_MAX_AGE, minimum=1),
        user_key=t.string("user_key", "id") or None,
    )
    t.done()
    return SignedTokenConfig(
        verifier, _fingerprint(b"phoenix_token", salt.encode(), secret_key_base)
    )


def read_secret(t: Table, name: str, what: str) -> bytes:
    """The secret named by `<name>_env` (an environment variable) or `<name>_file`.

    Inline secrets are refused, so a config file can be shared or shown without leaking
    one. A file's trailing newline is not part of the secret.
    """
    env_key, file_key = f"{name}_env", f"{name}_file"
    if t.has(name):
        raise t.error(name, f"secrets are not accepted inline; give {env_key} or {file_key}")
    if t.has(env_key) == t.has(file_key):
        raise t.error(env_key, f"give exactly one of {env_key} or {file_key} ({what})")
    if t.has(file_key):
        secret = read_file(t, file_key).rstrip(b"\r\n")
        if not secret:
            raise t.error(file_key, "the file is empty")
        return secret
    var = t.string(env_key, "")
    if not var:
        raise t.error(env_key, "must name an environment variable")
    # A name that cannot be a variable's is likely the secret itself, pasted in: not shown.
    shown = var if _ENV_NAME.fullmatch(var) else "it names (not shown: not a variable name)"
    value = os.environ.get(var)
    if value is None:
        raise t.error(env_key, f"the environment variable {shown} is not set")
    if not value:
        raise t.error(env_key, f"the environment variable {shown} is empty")
    return value.encode()


def read_file(t: Table, name: str) -> bytes:
    """The contents of the file the key `name` names (relative to the config file)."""
    text = t.string(name, "")
    if not text:
        raise t.error(name, "is required")
    path = config_relative(t, text)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise t.error(name, f"{str(path)!r} does not exist") from None
    except OSError as exc:
        raise t.error(name, f"{str(path)!r} cannot be read ({exc.strerror})") from None


def _fingerprint(*parts: bytes) -> bytes:
    return hashlib.sha256(b"\0".join(parts)).digest()


def _jwt_error_key(message: str, key_name: str) -> str:
    """Which [auth.jwt] key a JwtVerifier complaint is about."""
    for name in (
        "algorithms",
        "user_claim_pattern",
        "user_claim",
        "leeway",
        "issuer",
        "audience",
        "required_claims",
    ):
        if message.startswith(name):
            return name
    return key_name


def _one_or_list(t: Table, name: str) -> str | tuple[str, ...] | None:
    value = t.raw(name)
    if value is None:
        return None
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise t.error(name, "expected a non-empty string or a list of them")
