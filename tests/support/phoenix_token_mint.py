"""Mint Phoenix.Token-format tokens for tests, following plug_crypto's documented algorithm.

Independent of `phxbroker.phoenix_token` on purpose: the verifier is checked against what
this module produces, and this module is checked byte for byte against tokens minted by
real Phoenix (shared/phoenix-token-vectors.jsonl). Test code only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import zlib
from typing import Any

from phxbroker.auth.etf import Atom

PREFIXES = {"sha256": "SFMyNTY", "sha384": "SFMzODQ", "sha512": "SFM1MTI"}


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def derive_key(
    secret_key_base: str,
    salt: str,
    *,
    iterations: int = 1000,
    length: int = 32,
    digest: str = "sha256",
) -> bytes:
    return hashlib.pbkdf2_hmac(
        digest, secret_key_base.encode(), salt.encode(), iterations, dklen=length
    )


def sign_message(
    message: bytes,
    *,
    secret_key_base: str,
    salt: str,
    mac_digest: str = "sha256",
    prefix: str | None = None,
    key_iterations: int = 1000,
    key_length: int = 32,
    key_digest: str = "sha256",
) -> str:
    """Sign arbitrary message bytes as `Plug.Crypto.MessageVerifier.sign/3` would.

    `prefix` overrides the protected header text (to forge a wrong prefix); the MAC is
    always computed over the text actually emitted.
    """
    key = derive_key(
        secret_key_base, salt, iterations=key_iterations, length=key_length, digest=key_digest
    )
    plain_text = f"{PREFIXES[mac_digest] if prefix is None else prefix}.{b64url(message)}"
    mac = hmac.new(key, plain_text.encode("ascii"), mac_digest).digest()
    return f"{plain_text}.{b64url(mac)}"


def mint(
    data: Any,
    *,
    secret_key_base: str,
    salt: str,
    signed_at_ms: int,
    max_age: Any = 86400,
    shape: str = "current",
    compressed: bool = False,
    atoms: str = "latin1",
    **sign_options: Any,
) -> str:
    """Mint `Phoenix.Token.sign(endpoint, salt, data, signed_at: signed_at_ms / 1000)`.

    `shape` picks the payload: "current" `{data, signed, max_age}`, "legacy"
    `{data, signed}` or "map" `%{data: data, signed: signed}`. `atoms` is "latin1"
    (OTP 25 and older) or "utf8" (OTP 26 and newer).
    """
    if shape == "current":
        term: Any = (data, signed_at_ms, max_age)
    elif shape == "legacy":
        term = (data, signed_at_ms)
    elif shape == "map":
        term = {Atom("data"): data, Atom("signed"): signed_at_ms}
    else:
        raise ValueError(f"unknown payload shape {shape!r}")
    message = term_to_binary(term, compressed=compressed, atoms=atoms)
    return sign_message(message, secret_key_base=secret_key_base, salt=salt, **sign_options)


def term_to_binary(term: Any, *, compressed: bool = False, atoms: str = "latin1") -> bytes:
    """Encode like `:erlang.term_to_binary/2` for the value kinds tokens hold.

    With `compressed`, uses the zlib envelope only when it is smaller, as Erlang does.
    """
    body = _encode(term, atoms)
    if compressed:
        packed = zlib.compress(body, 6)
        if len(packed) + 5 < len(body):
            return bytes([131, 80]) + struct.pack(">I", len(body)) + packed
    return bytes([131]) + body


_SPECIAL_ATOMS = {None: "nil", True: "true", False: "false"}


def _atom_name(term: Any) -> str | None:
    if isinstance(term, Atom):
        return str(term)
    if term is None or isinstance(term, bool):
        return _SPECIAL_ATOMS[term]
    return None


def _encode(term: Any, atoms: str) -> bytes:
    name = _atom_name(term)
    if name is not None:
        return _atom(name, atoms)
    if isinstance(term, int):
        return _integer(term)
    if isinstance(term, float):
        return b"F" + struct.pack(">d", term)
    if isinstance(term, str):
        term = term.encode("utf-8")
    if isinstance(term, bytes):
        return b"m" + struct.pack(">I", len(term)) + term
    if isinstance(term, tuple):
        head = b"h" + bytes([len(term)]) if len(term) < 256 else b"i" + struct.pack(">I", len(term))
        return head + b"".join(_encode(item, atoms) for item in term)
    if isinstance(term, list):
        if not term:
            return b"j"
        if all(isinstance(item, int) and 0 <= item < 256 for item in term) and len(term) < 65536:
            return b"k" + struct.pack(">H", len(term)) + bytes(term)
        items = b"".join(_encode(item, atoms) for item in term)
        return b"l" + struct.pack(">I", len(term)) + items + b"j"
    if isinstance(term, dict):
        pairs = sorted(term.items(), key=lambda pair: _erlang_order(pair[0]))
        encoded = b"".join(_encode(k, atoms) + _encode(v, atoms) for k, v in pairs)
        return b"t" + struct.pack(">I", len(term)) + encoded
    raise TypeError(f"cannot encode {type(term).__name__}")


def _atom(name: str, atoms: str) -> bytes:
    if atoms == "latin1":
        raw = name.encode("latin-1")
        return b"d" + struct.pack(">H", len(raw)) + raw
    raw = name.encode("utf-8")
    if len(raw) < 256:
        return b"w" + bytes([len(raw)]) + raw
    return b"v" + struct.pack(">H", len(raw)) + raw


def _integer(n: int) -> bytes:
    if 0 <= n < 256:
        return b"a" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"b" + struct.pack(">i", n)
    magnitude = abs(n)
    digits = magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "little")
    sign = bytes([1 if n < 0 else 0])
    if len(digits) < 256:
        return b"n" + bytes([len(digits)]) + sign + digits
    return b"o" + struct.pack(">I", len(digits)) + sign + digits


def _erlang_order(key: Any) -> tuple[int, Any]:
    """Sort key for small-map keys: number < atom < tuple < list < binary, as Erlang does."""
    name = _atom_name(key)
    if name is not None:
        return (1, name)
    if isinstance(key, int | float):
        return (0, key)
    if isinstance(key, tuple):
        return (2, (len(key), [_erlang_order(item) for item in key]))
    if isinstance(key, list):
        return (3, [_erlang_order(item) for item in key])
    if isinstance(key, str):
        return (4, key.encode("utf-8"))
    return (4, bytes(key))
