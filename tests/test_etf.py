import struct
import tracemalloc
import zlib

import pytest
from support.phoenix_token_mint import term_to_binary

from phxbroker.auth.etf import DEFAULT_MAX_DEPTH, Atom, BitString, TermError, decode


def ext(body: bytes) -> bytes:
    return b"\x83" + body


def compressed(body: bytes, *, declared: int | None = None, stream: bytes | None = None) -> bytes:
    size = len(body) if declared is None else declared
    return b"\x83P" + struct.pack(">I", size) + (zlib.compress(body) if stream is None else stream)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"a\x00", 0),
        (b"a\xff", 255),
        (b"b\xff\xff\xff\xd6", -42),
        (b"b\x7f\xff\xff\xff", 2**31 - 1),
        (b"n\x06\x00\x00\x5e\x56\xee\xa1\x01", 1795000000000),
        (b"n\x02\x01\x00\x01", -256),
        (b"n\x00\x00", 0),
        (b"o\x00\x00\x00\x09\x00" + b"\x00" * 8 + b"\x01", 2**64),
        (b"F" + struct.pack(">d", 1.5), 1.5),
        (b"m\x00\x00\x00\x05alice", "alice"),
        (b"m\x00\x00\x00\x04zo\xc3\xab", "zoë"),
        (b"m\x00\x00\x00\x00", ""),
        (b"m\x00\x00\x00\x02\xff\x00", b"\xff\x00"),
        (b"j", []),
        (b"k\x00\x03abc", [97, 98, 99]),
        (b"l\x00\x00\x00\x02a\x01m\x00\x00\x00\x01xj", [1, "x"]),
        (b"h\x00", ()),
        (b"h\x02a\x01a\x02", (1, 2)),
        (b"i\x00\x00\x00\x01a\x07", (7,)),
        (b"t\x00\x00\x00\x00", {}),
        (b"M\x00\x00\x00\x02\x08ab", "ab"),
    ],
)
def test_decodes_supported_terms(body, expected):
    value = decode(ext(body))
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    "body",
    [b"d\x00\x03nil", b"s\x03nil", b"v\x00\x03nil", b"w\x03nil"],
    ids=["ATOM_EXT", "SMALL_ATOM_EXT", "ATOM_UTF8_EXT", "SMALL_ATOM_UTF8_EXT"],
)
def test_nil_in_every_atom_encoding_is_none(body):
    assert decode(ext(body)) is None


def test_true_and_false_are_booleans():
    assert decode(ext(b"w\x04true")) is True
    assert decode(ext(b"d\x00\x05false")) is False


def test_other_atoms_are_atom_strings():
    value = decode(ext(b"w\x08infinity"))
    assert isinstance(value, Atom)
    assert value == "infinity"
    assert repr(value) == "Atom('infinity')"
    assert decode(ext(b"v\x00\x05\xc3\xa9t\xc3\xa9")) == Atom("été")
    assert decode(ext(b"s\x02\xe9t")) == Atom("ét")


def test_map_with_binary_and_atom_keys():
    body = b"t\x00\x00\x00\x02" + b"w\x02id" + b"a\x07" + b"m\x00\x00\x00\x04role" + b"w\x05admin"
    value = decode(ext(body))
    assert value == {"id": 7, "role": Atom("admin")}
    assert [type(key) for key in value] == [Atom, str]


def test_non_utf8_map_key_stays_bytes():
    assert decode(ext(b"t\x00\x00\x00\x01m\x00\x00\x00\x01\xffa\x01")) == {b"\xff": 1}


def test_tuple_map_key_is_kept():
    assert decode(ext(b"t\x00\x00\x00\x01h\x02a\x01a\x02j")) == {(1, 2): []}


def test_bitstring_keeps_its_bit_count_and_clears_unused_bits():
    value = decode(ext(b"M\x00\x00\x00\x02\x03\xab\xff"))
    assert value == BitString(b"\xab\xe0", 3)


def test_list_whose_tail_is_another_list_is_flattened():
    assert decode(ext(b"l\x00\x00\x00\x01a\x01k\x00\x02\x02\x03")) == [1, 2, 3]


def test_round_trips_what_the_test_encoder_produces():
    term = (
        {"user": {"id": 12345678901234567890, "tags": ["a", Atom("b"), None]}, 1: 2.5},
        -(2**40),
        [True, False, (), b"\x80"],
    )
    assert decode(term_to_binary(term)) == term
    assert decode(term_to_binary(term, atoms="utf8")) == term


def test_compressed_envelope_is_inflated():
    term = {"name": "x" * 500, "list": list(range(300))}
    data = term_to_binary(term, compressed=True)
    assert data[:2] == b"\x83P"
    assert decode(data) == term


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "term is empty"),
        (b"\x82a\x01", "not the format version 131"),
        (ext(b""), "truncated inside a tag at byte 1"),
        (ext(b"a\x01a\x02"), "2 unexpected bytes after the term"),
        (ext(b"b\x00\x00"), "truncated inside an integer"),
        (ext(b"m\x00\x00\x00\x09abc"), "truncated inside a binary"),
        (ext(b"l\x00\x00\x00\x01a\x01"), "truncated inside a tag"),
        (ext(b"l\xff\xff\xff\xffa\x01j"), "a list claims 4294967295 elements"),
        (ext(b"t\x00\x10\x00\x00a\x01"), "a map claims 1048576 elements"),
        (ext(b"l\x00\x00\x00\x01a\x01a\x02"), "improper list (its tail is not a list) at byte 8"),
        (ext(b"X\x00"), "a pid (tag 88) is not allowed in a token at byte 1"),
        (ext(b"gw\x01a" + b"\x00" * 9), "a pid (tag 103) is not allowed"),
        (ext(b"Z\x00\x01w\x01a\x00\x00\x00\x00\x00\x00\x00\x00"), "a reference (tag 90)"),
        (ext(b"q"), "an exported fun (tag 113) is not allowed"),
        (ext(b"p"), "a fun (tag 112) is not allowed"),
        (ext(b"c" + b"0" * 31), "an old-style float (tag 99)"),
        (ext(b"h\x01P"), "a nested compressed term (tag 80) is not allowed in a token at byte 3"),
        (ext(b"\xfe"), "unknown term tag 254 at byte 1"),
        (ext(b"F" + struct.pack(">d", float("nan"))), "float is not finite"),
        (ext(b"n\x01\x02\x05"), "big integer has sign byte 2"),
        (ext(b"w\x02\xc3\x28"), "atom is not valid UTF-8"),
        (ext(b"v\x01\x00" + b"a" * 256), "atom is longer than 255 characters"),
        (ext(b"M\x00\x00\x00\x01\x00\xff"), "bitstring has 0 bits in its last byte"),
        (ext(b"M\x00\x00\x00\x01\x09\xff"), "bitstring has 9 bits in its last byte"),
        (ext(b"t\x00\x00\x00\x01ja\x01"), "map key contains a list or map"),
        (
            ext(b"t\x00\x00\x00\x02w\x02ida\x01m\x00\x00\x00\x02ida\x02"),
            "map has two keys equal to 'id' once converted at byte 12",
        ),
        (ext(b"t\x00\x00\x00\x02a\x01a\x02w\x04truea\x03"), "map has two keys equal to True"),
    ],
)
def test_rejects_malformed_or_unsupported_terms(data, reason):
    with pytest.raises(TermError) as caught:
        decode(data)
    assert reason in str(caught.value)


def test_every_truncation_of_a_valid_term_is_rejected():
    data = term_to_binary(({"id": 7, "name": "zoë"}, [1, 2**70, Atom("x")], 1.25))
    decode(data)
    for cut in range(len(data)):
        with pytest.raises(TermError):
            decode(data[:cut])


def test_nesting_up_to_the_depth_limit_is_accepted_and_beyond_refused():
    def nested(levels: int) -> bytes:
        return ext(b"h\x01" * levels + b"a\x01")

    decode(nested(DEFAULT_MAX_DEPTH))
    with pytest.raises(TermError, match=f"nested deeper than {DEFAULT_MAX_DEPTH} levels"):
        decode(nested(DEFAULT_MAX_DEPTH + 1))
    with pytest.raises(TermError, match="nested deeper than 3 levels"):
        decode(ext(b"l\x00\x00\x00\x01" * 4 + b"j" * 5), max_depth=3)
    assert decode(ext(b"t\x00\x00\x00\x01a\x01" * 3 + b"j"), max_depth=3) == {1: {1: {1: []}}}


def test_very_deep_nesting_fails_cleanly_without_recursion_error():
    with pytest.raises(TermError, match="nested deeper"):
        decode(ext(b"l\x00\x00\x00\x01" * 50_000 + b"j" * 50_001), max_size=10**6)


def test_input_over_the_size_limit_is_refused():
    data = term_to_binary("x" * 100)
    assert decode(data, max_size=len(data)) == "x" * 100
    with pytest.raises(TermError, match=f"term is {len(data)} bytes long, over the limit of 100"):
        decode(data, max_size=100)


def test_zip_bomb_declaring_its_true_size_is_refused_before_inflating():
    body = b"m" + struct.pack(">I", 10_000_000) + b"\x00" * 10_000_000
    bomb = compressed(body)
    assert len(bomb) < 100_000
    with pytest.raises(TermError, match="declares 10000005 bytes uncompressed, over the limit"):
        decode(bomb)


def test_zip_bomb_lying_about_its_size_is_cut_off():
    body = b"m" + struct.pack(">I", 10_000_000) + b"\x00" * 10_000_000
    bomb = compressed(body, declared=1000)
    del body
    tracemalloc.start()
    try:
        with pytest.raises(TermError, match="inflates to more than its declared 1000 bytes"):
            decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Inflating the whole stream would allocate 10 MB; the bounded inflate stays tiny.
    assert peak < 1_000_000


def test_compressed_envelope_errors():
    body = term_to_binary(list(range(200)))[1:]
    good = compressed(body)
    assert decode(good) == list(range(200))
    cases = [
        (good[:5], "truncated before its size field"),
        (good[:-4], "zlib stream is truncated"),
        (good + b"\x00", "unexpected bytes after the compressed term's zlib stream"),
        (compressed(body, declared=len(body) + 1), f"not its declared {len(body) + 1}"),
        (compressed(body, stream=b"not zlib at all"), "not a valid zlib stream"),
        (compressed(body + b"j"), "1 unexpected bytes after the term"),
        (compressed(b"h\x02a\x01"), "truncated inside a tag at byte 4 of the inflated term"),
    ]
    for data, reason in cases:
        with pytest.raises(TermError) as caught:
            decode(data)
        assert reason in str(caught.value), (data, reason)
