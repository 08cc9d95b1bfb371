"""Decoder for the subset of Erlang's External Term Format found in Phoenix tokens.

`Phoenix.Token` signs `:erlang.term_to_binary({data, signed_at_ms, max_age_s})`. Once a
token's signature has been checked, `decode` turns that binary into plain Python values:

=========================  ==============================================
Erlang                     Python
=========================  ==============================================
integer                    int
float                      float
atom `nil`/`true`/`false`  None / True / False
other atom                 `Atom` (a `str` subclass)
binary                     str when valid UTF-8, else bytes
bitstring (not whole byte) `BitString`
tuple                      tuple
list, charlist             list
map                        dict (keys converted the same way)
=========================  ==============================================

Pids, ports, references, funs and anything else unknown raise `TermError`; nothing is ever
evaluated. Input size, decompressed size and nesting depth are bounded.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_SIZE",
    "Atom",
    "BitString",
    "TermError",
    "decode",
]

DEFAULT_MAX_SIZE = 64 * 1024
"""Largest encoded term accepted, before or after decompression, in bytes."""

DEFAULT_MAX_DEPTH = 64
"""Deepest nesting of tuples, lists and maps accepted."""

VERSION = 131
_MAX_ATOM_CHARS = 255


class TermError(ValueError):
    """The bytes are not a term this decoder accepts; the message says what and where."""


class Atom(str):
    """An Erlang atom other than nil/true/false; compares equal to its name as a str."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Atom({str(self)!r})"


@dataclass(frozen=True, slots=True)
class BitString:
    """A bitstring whose length is not a whole number of bytes.

    `bits` (1-7) is how many high-order bits of the last byte of `data` belong to it.
    """

    data: bytes
    bits: int


# Tags that are real Erlang terms but have no place in a token: named in errors.
_REFUSED_TAGS = {
    68: "a distribution header",
    80: "a nested compressed term",
    82: "an atom cache reference",
    88: "a pid",
    89: "a port",
    90: "a reference",
    99: "an old-style float",
    101: "a reference",
    102: "a port",
    103: "a pid",
    112: "a fun",
    113: "an exported fun",
    114: "a reference",
    117: "a fun",
    120: "a port",
    121: "a local term",
}

_SPECIAL_ATOMS = {"nil": None, "true": True, "false": False}


def decode(
    data: bytes,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Any:
    """Decode one complete external-format term (starting with byte 131).

    Accepts the compressed envelope (tag 80) as long as the declared and actual inflated
    size stay within `max_size`. Raises `TermError` for anything malformed, truncated,
    followed by extra bytes, nested deeper than `max_depth` or outside the supported subset.
    """
    data = bytes(data)
    if len(data) > max_size:
        raise TermError(f"term is {len(data)} bytes long, over the limit of {max_size}")
    if not data:
        raise TermError("term is empty")
    if data[0] != VERSION:
        raise TermError(f"term starts with byte {data[0]}, not the format version {VERSION}")
    if len(data) > 1 and data[1] == 80:
        reader = _Reader(_inflate(data, max_size), 0, max_depth, " of the inflated term")
    else:
        reader = _Reader(data, 1, max_depth, "")
    body = reader.buf
    term = reader.term(0)
    if reader.pos != len(body):
        raise TermError(f"{len(body) - reader.pos} unexpected bytes after the term")
    return term


def _inflate(data: bytes, max_size: int) -> bytes:
    if len(data) < 6:
        raise TermError("compressed term is truncated before its size field")
    (declared,) = struct.unpack_from(">I", data, 2)
    if declared > max_size:
        raise TermError(
            f"compressed term declares {declared} bytes uncompressed, over the limit of {max_size}"
        )
    inflater = zlib.decompressobj()
    try:
        # max_length caps the output, so a stream that inflates far beyond its declared
        # size costs at most declared + 1 bytes of memory.
        body = inflater.decompress(data[6:], declared + 1)
    except zlib.error as exc:
        raise TermError(f"compressed term is not a valid zlib stream ({exc})") from None
    if len(body) > declared or inflater.unconsumed_tail:
        raise TermError(f"compressed term inflates to more than its declared {declared} bytes")
    if not inflater.eof:
        raise TermError("compressed term's zlib stream is truncated")
    if inflater.unused_data:
        raise TermError("unexpected bytes after the compressed term's zlib stream")
    if len(body) != declared:
        raise TermError(
            f"compressed term inflates to {len(body)} bytes, not its declared {declared}"
        )
    return body


class _Reader:
    """Cursor over a tag stream; errors name the byte offset where the problem starts."""

    def __init__(self, buf: bytes, start: int, max_depth: int, where: str) -> None:
        self.buf = buf
        self.pos = start
        self.max_depth = max_depth
        self.where = where

    def fail(self, reason: str, at: int) -> TermError:
        return TermError(f"{reason} at byte {at}{self.where}")

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise self.fail(f"term is truncated inside {what}", self.pos)
        chunk = self.buf[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        (value,) = struct.unpack(fmt, self.take(size, what))
        return int(value)

    def count(self, fmt: str, what: str, min_bytes_each: int) -> int:
        """Read a length field and refuse one the remaining input cannot possibly hold."""
        at = self.pos
        n = self.unpack(fmt, what)
        if n * min_bytes_each > len(self.buf) - self.pos:
            raise self.fail(f"{what} claims {n} elements, more than the input holds", at)
        return n

    def term(self, depth: int) -> Any:
        at = self.pos
        tag = self.unpack(">B", "a tag")
        if tag == 97:
            return self.unpack(">B", "a small integer")
        if tag == 98:
            return self.unpack(">i", "an integer")
        if tag in (110, 111):
            return self.big(tag)
        if tag == 70:
            value = struct.unpack(">d", self.take(8, "a float"))[0]
            if not math.isfinite(value):
                raise self.fail("float is not finite", at)
            return value
        if tag in (100, 115, 118, 119):
            return self.atom(tag, at)
        if tag == 109:
            size = self.unpack(">I", "a binary length")
            return _binary(self.take(size, "a binary"))
        if tag == 77:
            return self.bitstring(at)
        if tag == 107:
            size = self.unpack(">H", "a charlist length")
            return list(self.take(size, "a charlist"))
        if tag == 106:
            return []
        if depth >= self.max_depth:
            raise self.fail(f"term is nested deeper than {self.max_depth} levels", at)
        if tag in (104, 105):
            arity = self.count(">B" if tag == 104 else ">I", "a tuple", 1)
            return tuple(self.term(depth + 1) for _ in range(arity))
        if tag == 108:
            return self.proper_list(depth)
        if tag == 116:
            return self.mapping(depth)
        name = _REFUSED_TAGS.get(tag)
        if name is not None:
            raise self.fail(f"{name} (tag {tag}) is not allowed in a token", at)
        raise self.fail(f"unknown term tag {tag}", at)

    def big(self, tag: int) -> int:
        n = self.unpack(">B" if tag == 110 else ">I", "a big integer length")
        sign_at = self.pos
        sign = self.unpack(">B", "a big integer sign")
        if sign > 1:
            raise self.fail(f"big integer has sign byte {sign}, not 0 or 1", sign_at)
        magnitude = int.from_bytes(self.take(n, "a big integer"), "little")
        return -magnitude if sign else magnitude

    def atom(self, tag: int, at: int) -> Any:
        size = self.unpack(">B" if tag in (115, 119) else ">H", "an atom length")
        raw = self.take(size, "an atom")
        if tag in (100, 115):
            name = raw.decode("latin-1")
        else:
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail("atom is not valid UTF-8", at) from None
        if len(name) > _MAX_ATOM_CHARS:
            raise self.fail(f"atom is longer than {_MAX_ATOM_CHARS} characters", at)
        if name in _SPECIAL_ATOMS:
            return _SPECIAL_ATOMS[name]
        return Atom(name)

    def bitstring(self, at: int) -> Any:
        size = self.unpack(">I", "a bitstring length")
        bits = self.unpack(">B", "a bitstring bit count")
        if (size == 0 and bits != 0) or (size > 0 and not 1 <= bits <= 8):
            raise self.fail(f"bitstring has {bits} bits in its last byte", at)
        raw = self.take(size, "a bitstring")
        if size == 0 or bits == 8:
            return _binary(raw)
        # Bits past the bitstring's end carry no meaning; clear them so equal values compare equal.
        last = raw[-1] & (0xFF << (8 - bits)) & 0xFF
        return BitString(raw[:-1] + bytes([last]), bits)

    def proper_list(self, depth: int) -> list[Any]:
        length = self.count(">I", "a list", 1)
        items = [self.term(depth + 1) for _ in range(length)]
        tail_at = self.pos
        tail = self.term(depth + 1)
        if not isinstance(tail, list):
            raise self.fail("improper list (its tail is not a list)", tail_at)
        items.extend(tail)
        return items

    def mapping(self, depth: int) -> dict[Any, Any]:
        arity = self.count(">I", "a map", 2)
        result: dict[Any, Any] = {}
        for _ in range(arity):
            key_at = self.pos
            key = self.term(depth + 1)
            value = self.term(depth + 1)
            try:
                present = key in result
            except TypeError:
                raise self.fail(
                    "map key contains a list or map, which cannot be a Python dict key", key_at
                ) from None
            if present:
                # e.g. the atom :id and the binary "id", or 1 and 1.0: distinct in Erlang
                # but one key in Python.
                raise self.fail(f"map has two keys equal to {_preview(key)} once converted", key_at)
            result[key] = value
        return result


def _binary(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _preview(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
