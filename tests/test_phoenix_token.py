import math
import struct
import time
import zlib

import pytest
from support.phoenix_token_mint import b64url, mint, sign_message, term_to_binary
from support.token_vectors import VECTORS

from phxbroker.auth.etf import Atom
from phxbroker.auth.phoenix_token import (
    PhoenixTokenVerifier,
    TokenError,
    derive_key,
    user_id_from_data,
    verify,
)

# Minted by real Phoenix (plug_crypto 2.1.1, Elixir 1.14 / OTP 25): the entries of
# shared/phoenix-token-vectors.jsonl, which all share one secret_key_base and signing time.
# In `data`, {"atom": name} stands for an Erlang atom.
VECTOR_IDS = [vector["name"] for vector in VECTORS]
EXPECTED_USER_IDS = {
    "int_user": "42",
    "string_user": "alice",
    "map_user": "7",
    "other_salt": "bob",
    "unicode_user": "zoë",
    "big_int_user": "12345678901234567890",
}

SECRET = VECTORS[0]["secret_key_base"]
SALT = "user socket"
SIGNED_AT = 1_795_000_000_000
DAY_MS = 86_400_000


def from_json(value):
    if isinstance(value, dict):
        if set(value) == {"atom"}:
            return Atom(value["atom"])
        return {key: from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json(item) for item in value]
    return value


def assert_same_types(actual, expected):
    """Equality alone would let a str pass for an Atom or True for 1."""
    assert type(actual) is type(expected), (actual, expected)
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_same_types(actual[key], expected[key])
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected)
        for actual_item, expected_item in zip(actual, expected, strict=True):
            assert_same_types(actual_item, expected_item)
    else:
        assert actual == expected


def vector_verify(vector, **options):
    options.setdefault("now_ms", vector["signed_at_ms"] + 1000)
    return verify(
        vector["token"],
        secret_key_base=vector["secret_key_base"],
        salt=vector["salt"],
        **options,
    )


def mint_default(data=42, **options):
    options.setdefault("signed_at_ms", SIGNED_AT)
    return mint(data, secret_key_base=SECRET, salt=SALT, **options)


def refused(token, **options) -> TokenError:
    options.setdefault("now_ms", SIGNED_AT + 1000)
    with pytest.raises(TokenError) as caught:
        verify(token, secret_key_base=SECRET, salt=SALT, **options)
    message = str(caught.value)
    assert SECRET not in message
    if isinstance(token, str) and len(token) > 8:
        assert token not in message
        assert all(part not in message for part in token.split(".") if len(part) > 8)
    return caught.value


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_every_vector_verifies_to_its_data(vector):
    data = vector_verify(vector)
    expected = from_json(vector["data"])
    assert data == expected
    assert_same_types(data, expected)


def test_atoms_inside_vector_data_stay_atoms():
    vector = next(v for v in VECTORS if v["name"] == "list_user")
    data = vector_verify(vector)
    assert data == [1, "two", Atom("three")]
    assert isinstance(data[2], Atom)
    assert not isinstance(data[1], Atom)


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_every_vector_yields_its_user_id_or_a_clear_refusal(vector):
    verifier = PhoenixTokenVerifier(secret_key_base=vector["secret_key_base"], salt=vector["salt"])
    now_ms = vector["signed_at_ms"] + 1000
    if vector["name"] in EXPECTED_USER_IDS:
        assert verifier.verify(vector["token"], now_ms=now_ms) == EXPECTED_USER_IDS[vector["name"]]
    else:
        with pytest.raises(TokenError, match="token data is a list, not a string or integer"):
            verifier.verify(vector["token"], now_ms=now_ms)


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_every_vector_against_the_real_clock(vector):
    now_ms = time.time_ns() // 1_000_000
    expires_at = vector["signed_at_ms"] + vector["max_age_s"] * 1000
    if now_ms > expires_at:
        with pytest.raises(TokenError, match=r"^token expired$") as caught:
            vector_verify(vector, now_ms=None)
        assert caught.value.reason == "expired"
    else:
        assert vector_verify(vector, now_ms=None) == from_json(vector["data"])


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_vector_expiry_boundary(vector):
    expires_at = vector["signed_at_ms"] + vector["max_age_s"] * 1000
    assert vector_verify(vector, now_ms=expires_at) == from_json(vector["data"])
    with pytest.raises(TokenError, match=r"^token expired$"):
        vector_verify(vector, now_ms=expires_at + 1)


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_mint_helper_reproduces_each_vector_byte_for_byte(vector):
    token = mint(
        from_json(vector["data"]),
        secret_key_base=vector["secret_key_base"],
        salt=vector["salt"],
        signed_at_ms=vector["signed_at_ms"],
        max_age=vector["max_age_s"],
    )
    assert token == vector["token"]


def test_documented_example_key_and_token():
    secret = "abcdefghij" * 7
    key = derive_key(secret, "user socket")
    assert key.hex() == "25af3cea2f85f91ac39b0f0adb4dcae82c895d091e33374ed15e1dff83d136c2"
    token = "SFMyNTY.g2gDYSpuBgAAaOXPiwFiABJ1AA.NvqRzFIoTDJwwDIb4X2nAYrk1EYiDfJR5Af150pZxMM"
    assert verify(token, secret_key_base=secret, salt="user socket", now_ms=1_700_000_000_000) == 42


def test_derived_keys_are_cached():
    first = derive_key(SECRET, "cache check", iterations=1001)
    assert derive_key(SECRET, "cache check", iterations=1001) is first
    assert derive_key(SECRET.encode(), b"cache check", iterations=1001) is first


def test_signed_in_the_future_is_invalid():
    error = refused(mint_default(), now_ms=SIGNED_AT - 1)
    assert str(error) == "token is signed in the future"
    assert error.reason == "invalid"
    assert verify(mint_default(), secret_key_base=SECRET, salt=SALT, now_ms=SIGNED_AT) == 42


def test_tampered_payload_is_refused():
    token = mint_default("alice")
    prefix, payload, signature = token.split(".")
    forged_payload = b64url(term_to_binary(("admin", SIGNED_AT, 86400)))
    for bad in (f"{prefix}.{forged_payload}.{signature}", f"{prefix}.{payload[:-2]}.{signature}"):
        assert str(refused(bad)) == "token signature does not match"


def test_tampered_signature_is_refused():
    token = mint_default()
    prefix, payload, signature = token.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    for bad in (f"{prefix}.{payload}.{flipped}", f"{prefix}.{payload}.{signature[:-4]}"):
        assert str(refused(bad)) == "token signature does not match"


def test_wrong_salt_and_wrong_secret_are_refused():
    other_salt = next(v for v in VECTORS if v["name"] == "other_salt")
    assert str(refused(other_salt["token"])) == "token signature does not match"
    assert vector_verify(other_salt) == "bob"
    with pytest.raises(TokenError, match=r"^token signature does not match$"):
        verify(mint_default(), secret_key_base=SECRET + "x", salt=SALT, now_ms=SIGNED_AT)


@pytest.mark.parametrize("mac_digest", ["sha256", "sha384", "sha512"])
def test_all_three_signature_prefixes_are_accepted(mac_digest):
    message = term_to_binary(("carol", SIGNED_AT, 60))
    token = sign_message(message, secret_key_base=SECRET, salt=SALT, mac_digest=mac_digest)
    assert verify(token, secret_key_base=SECRET, salt=SALT, now_ms=SIGNED_AT) == "carol"


def test_prefix_picks_the_mac_digest():
    message = term_to_binary(("carol", SIGNED_AT, 60))
    token = sign_message(message, secret_key_base=SECRET, salt=SALT, prefix="SFMzODQ")
    assert str(refused(token)) == "token signature does not match"


@pytest.mark.parametrize("prefix", ["SFMyNTZ", "HS256", "", "eyJhbGciOiJIUzI1NiJ9"])
def test_unknown_prefix_is_refused(prefix):
    message = term_to_binary((1, SIGNED_AT, 60))
    token = sign_message(message, secret_key_base=SECRET, salt=SALT, prefix=prefix)
    error = refused(token)
    assert str(error) == "token does not start with a Phoenix.Token signature prefix"


@pytest.mark.parametrize(
    ("payload", "part"),
    [
        ("g2gD+SpuBgAAXlbuoQFiAAFRgA", "payload"),
        ("g2gD/SpuBgAAXlbuoQFiAAFRgA", "payload"),
        ("g2gDYSpuBgAAXlbuoQFiAAFRgA==", "payload"),
        ("g2gDYSpuBgAAXlbuoQFiAAFRg", "payload"),
        ("g2gDYSpu BgAAXlbuoQFiAAFRgA", "payload"),
        ("g2gDYSpuBgAAXlbuoQFiAAFRgé", "payload"),
    ],
)
def test_malformed_base64_payload_is_refused(payload, part):
    signature = mint_default().split(".")[2]
    error = refused(f"SFMyNTY.{payload}.{signature}")
    assert str(error) == f"token {part} is not unpadded url-safe base64"


def test_malformed_base64_signature_is_refused():
    prefix, payload, signature = mint_default().split(".")
    for bad in (signature + "=", signature[:-1] + "+", signature + "AA", signature + "*"):
        message = str(refused(f"{prefix}.{payload}.{bad}"))
        assert message == "token signature is not unpadded url-safe base64"
    assert str(refused(f"{prefix}.{payload}.{signature}A")) == "token signature does not match"


@pytest.mark.parametrize("parts", [1, 2, 4, 5])
def test_wrong_number_of_parts_is_refused(parts):
    token = mint_default()
    pieces = token.split(".")
    shaped = ".".join((pieces * 2)[:parts])
    assert str(refused(shaped)) == f"token has {parts} dot-separated parts, not 3"


@pytest.mark.parametrize("token", [None, "", b""])
def test_missing_token(token):
    error = refused(token)
    assert str(error) == "token is missing"
    assert error.reason == "missing"


def test_token_as_bytes_is_accepted_and_non_text_refused():
    token = mint_default()
    assert verify(token.encode(), secret_key_base=SECRET, salt=SALT, now_ms=SIGNED_AT) == 42
    assert str(refused(b"\xff\xfe.a.b")) == "token is not ASCII text"
    assert str(refused(12345)) == "token is not a string"


def test_max_age_option_overrides_the_embedded_one():
    token = mint_default(max_age=60)
    late = SIGNED_AT + 61_000
    assert refused(token, now_ms=late).reason == "expired"
    assert verify(token, secret_key_base=SECRET, salt=SALT, now_ms=late, max_age=3600) == 42
    early = SIGNED_AT + 2_000
    assert verify(token, secret_key_base=SECRET, salt=SALT, now_ms=early) == 42
    assert refused(token, now_ms=early, max_age=1).reason == "expired"
    assert verify(token, secret_key_base=SECRET, salt=SALT, now_ms=early, max_age=2) == 42
    assert refused(token, now_ms=early, max_age=1.999).reason == "expired"


@pytest.mark.parametrize("max_age", [0, -5, 0.0, -math.inf])
def test_non_positive_max_age_is_expired_even_at_signing_time(max_age):
    error = refused(mint_default(), now_ms=SIGNED_AT, max_age=max_age)
    assert str(error) == "token expired"
    assert error.reason == "expired"
    if math.isfinite(max_age):
        error = refused(mint_default(max_age=max_age), now_ms=SIGNED_AT - 10)
        assert error.reason == "expired"


@pytest.mark.parametrize("max_age", ["infinity", math.inf])
def test_infinity_max_age_option_never_expires(max_age):
    token = mint_default(max_age=60)
    far = SIGNED_AT + 100 * 365 * DAY_MS
    assert verify(token, secret_key_base=SECRET, salt=SALT, now_ms=far, max_age=max_age) == 42


def test_embedded_infinity_never_expires_and_skips_the_future_check_like_plug_crypto():
    token = mint_default(max_age=Atom("infinity"))
    far = SIGNED_AT + 100 * 365 * DAY_MS
    assert verify(token, secret_key_base=SECRET, salt=SALT, now_ms=far) == 42
    assert verify(token, secret_key_base=SECRET, salt=SALT, now_ms=SIGNED_AT - DAY_MS) == 42
    assert refused(token, now_ms=far, max_age=60).reason == "expired"


def test_float_max_age_is_truncated_to_milliseconds():
    token = mint_default(max_age=0.1)
    assert verify(token, secret_key_base=SECRET, salt=SALT, now_ms=SIGNED_AT + 100) == 42
    assert refused(token, now_ms=SIGNED_AT + 101).reason == "expired"
    huge = mint_default(max_age=1e307)
    assert verify(huge, secret_key_base=SECRET, salt=SALT, now_ms=SIGNED_AT + DAY_MS) == 42


def test_legacy_two_tuple_payload_defaults_to_one_day():
    token = mint_default("dave", shape="legacy")
    assert verify(token, secret_key_base=SECRET, salt=SALT, now_ms=SIGNED_AT + DAY_MS) == "dave"
    assert refused(token, now_ms=SIGNED_AT + DAY_MS + 1).reason == "expired"
    assert refused(token, now_ms=SIGNED_AT - 1).reason == "invalid"


def test_very_old_map_payload_defaults_to_one_day():
    token = mint_default({"id": 9}, shape="map")
    now = SIGNED_AT + DAY_MS
    assert verify(token, secret_key_base=SECRET, salt=SALT, now_ms=now) == {"id": 9}
    assert refused(token, now_ms=now + 1).reason == "expired"
    assert PhoenixTokenVerifier(secret_key_base=SECRET, salt=SALT).verify(token, now_ms=now) == "9"


def test_map_payload_needs_atom_keys():
    message = term_to_binary({"data": 1, "signed": SIGNED_AT})
    token = sign_message(message, secret_key_base=SECRET, salt=SALT)
    assert str(refused(token)) == "token payload is not a {data, signed_at, max_age} tuple"


@pytest.mark.parametrize(
    ("term", "reason"),
    [
        ((1, SIGNED_AT, 60, 0), "token payload is not a {data, signed_at, max_age} tuple"),
        ([1, SIGNED_AT, 60], "token payload is not a {data, signed_at, max_age} tuple"),
        (42, "token payload is not a {data, signed_at, max_age} tuple"),
        ((1, "yesterday", 60), "token signing time is not an integer"),
        ((1, float(SIGNED_AT), 60), "token signing time is not an integer"),
        ((1, True, 60), "token signing time is not an integer"),
        ((1, SIGNED_AT, Atom("forever")), "token max age is neither a number nor infinity"),
        ((1, SIGNED_AT, "infinity"), "token max age is neither a number nor infinity"),
        ((1, SIGNED_AT, None), "token max age is neither a number nor infinity"),
    ],
)
def test_payload_with_the_wrong_shape_is_refused(term, reason):
    token = sign_message(term_to_binary(term), secret_key_base=SECRET, salt=SALT)
    assert str(refused(token)) == reason


def test_compressed_payload_verifies():
    data = {"id": 5, "roles": ["reader"] * 200}
    token = mint_default(data, compressed=True)
    message = token.split(".")[1]
    assert message.startswith("g1A")  # 131, 80: the compressed envelope
    assert verify(token, secret_key_base=SECRET, salt=SALT, now_ms=SIGNED_AT) == data


def test_utf8_atoms_from_newer_otp_verify():
    token = mint_default([Atom("été"), None, True], atoms="utf8")
    assert verify(token, secret_key_base=SECRET, salt=SALT, now_ms=SIGNED_AT) == [
        Atom("été"),
        None,
        True,
    ]


def signed(message: bytes) -> str:
    return sign_message(message, secret_key_base=SECRET, salt=SALT)


def test_zip_bomb_payload_is_refused():
    body = b"h\x03m" + struct.pack(">I", 5_000_000) + b"\x00" * 5_000_000 + b"a\x01a\x01"
    bomb = b"\x83P" + struct.pack(">I", len(body)) + zlib.compress(body, 9)
    assert len(bomb) < 20_000
    error = refused(signed(bomb))
    assert str(error).startswith("token payload is not a valid Phoenix term: compressed term")
    liar = b"\x83P" + struct.pack(">I", 100) + zlib.compress(body, 9)
    assert "inflates to more than its declared 100 bytes" in str(refused(signed(liar)))


def test_oversized_payload_is_refused_and_the_limit_is_configurable():
    token = mint_default("x" * 70_000)
    assert "over the limit of 65536" in str(refused(token))
    big = verify(token, secret_key_base=SECRET, salt=SALT, now_ms=SIGNED_AT, max_term_size=100_000)
    assert big == "x" * 70_000


def test_deeply_nested_payload_is_refused():
    data = 1
    for _ in range(200):
        data = [data]
    error = refused(mint_default(data))
    assert str(error).startswith("token payload is not a valid Phoenix term: term is nested deeper")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"h\x03X" + b"\x00" * 20 + b"a\x01a\x01", "a pid (tag 88) is not allowed in a token"),
        (b"h\x03q" + b"\x00" * 20 + b"a\x01a\x01", "an exported fun (tag 113) is not allowed"),
        (b"h\x03\xf0a\x01a\x01", "unknown term tag 240 at byte 3"),
        (b"h\x03a\x01a\x01a\x01a\x01", "2 unexpected bytes after the term"),
        (b"h\x03a\x01a\x01", "term is truncated inside a tag at byte 7"),
    ],
)
def test_payload_that_is_not_a_valid_term_is_refused(body, reason):
    message = str(refused(signed(b"\x83" + body)))
    assert message.startswith("token payload is not a valid Phoenix term: ")
    assert reason in message


def test_key_derivation_options_must_match_the_signer():
    options = {"key_iterations": 2, "key_length": 64, "key_digest": "sha512"}
    token = mint_default(**options)
    assert verify(token, secret_key_base=SECRET, salt=SALT, now_ms=SIGNED_AT, **options) == 42
    assert str(refused(token)) == "token signature does not match"
    for option, value in options.items():
        token = mint_default(**{option: value})
        assert str(refused(token)) == "token signature does not match"
        assert (
            verify(token, secret_key_base=SECRET, salt=SALT, now_ms=SIGNED_AT, **{option: value})
            == 42
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"key_iterations": 0}, "key iterations must be an integer of at least 1"),
        ({"key_iterations": True}, "key iterations must be an integer of at least 1"),
        ({"key_length": 0}, "key length must be an integer from 1 to 4294967295"),
        ({"key_digest": "md5"}, "key digest must be one of sha256, sha384, sha512"),
        ({"max_age": "forever"}, "max_age must be a number of seconds"),
        ({"max_age": math.nan}, "max_age must be a number of seconds"),
    ],
)
def test_bad_parameters_raise_value_error(options, message):
    with pytest.raises(ValueError, match=message):
        verify(mint_default(), secret_key_base=SECRET, salt=SALT, **options)
    with pytest.raises(ValueError, match=message):
        PhoenixTokenVerifier(secret_key_base=SECRET, salt=SALT, **options)


def test_verifier_refuses_an_empty_secret_and_hides_the_secret_in_repr():
    with pytest.raises(ValueError, match="secret_key_base must not be empty"):
        PhoenixTokenVerifier(secret_key_base="", salt=SALT)
    verifier = PhoenixTokenVerifier(secret_key_base=SECRET, salt=SALT, max_age=60)
    assert SECRET not in repr(verifier)
    assert derive_key(SECRET, SALT).hex() not in repr(verifier)


def test_verifier_applies_its_options():
    token = mint_default({"user_id": "erin", "id": 1}, max_age=60)
    verifier = PhoenixTokenVerifier(secret_key_base=SECRET, salt=SALT, user_key="user_id")
    assert verifier.verify(token, now_ms=SIGNED_AT) == "erin"
    assert verifier.verify_data(token, now_ms=SIGNED_AT) == {"user_id": "erin", "id": 1}
    assert verifier.verify(token, now_ms=SIGNED_AT + 61_000 - 1000) == "erin"
    with pytest.raises(TokenError, match=r"^token expired$"):
        verifier.verify(token, now_ms=SIGNED_AT + 61_000)
    longer = PhoenixTokenVerifier(secret_key_base=SECRET, salt=SALT, max_age=120, user_key="id")
    assert longer.verify(token, now_ms=SIGNED_AT + 61_000) == "1"
    with pytest.raises(TokenError, match=r"^token signature does not match$"):
        PhoenixTokenVerifier(secret_key_base=SECRET, salt="other").verify(token, now_ms=SIGNED_AT)


@pytest.mark.parametrize(
    ("data", "key", "user_id"),
    [
        (42, "id", "42"),
        (-3, "id", "-3"),
        (2**80, "id", str(2**80)),
        ("alice", "id", "alice"),
        ({"id": 7}, "id", "7"),
        ({Atom("id"): "frank", "role": "x"}, "id", "frank"),
        ({Atom("user_id"): 8, Atom("id"): 1}, "user_id", "8"),
        ("zoë", None, "zoë"),
    ],
)
def test_user_id_from_data(data, key, user_id):
    assert user_id_from_data(data, key=key) == user_id


@pytest.mark.parametrize(
    ("data", "key", "message"),
    [
        (None, "id", "token data is nil, not a string or integer user id"),
        (True, "id", "token data is a boolean, not a string or integer user id"),
        (1.5, "id", "token data is a float, not a string or integer user id"),
        (Atom("alice"), "id", "token data is an atom, not a string or integer user id"),
        ("", "id", "token data is an empty string, not a user id"),
        (b"\xff", "id", "token data is a binary that is not UTF-8 text, not a string or integer"),
        ((1, 2), "id", "token data is a tuple, not a string or integer user id"),
        ([1], "id", "token data is a list, not a string or integer user id"),
        ({"name": "x"}, "id", "token data map has no 'id' key"),
        ({"id": 1}, None, "token data is a map but no user key is configured"),
        ({"id": {"id": 1}}, "id", "token data map value at 'id' is a map, not a string or"),
        ({"id": None}, "id", "token data map value at 'id' is nil, not a string or integer"),
        ({"id": ""}, "id", "token data map value at 'id' is an empty string, not a user id"),
    ],
)
def test_user_id_from_data_refusals(data, key, message):
    with pytest.raises(TokenError) as caught:
        user_id_from_data(data, key=key)
    assert str(caught.value).startswith(message)
    assert caught.value.reason == "invalid"


def test_integer_too_large_to_print_is_refused():
    with pytest.raises(TokenError, match="token data is an integer too large for a user id"):
        user_id_from_data(10**5000)
