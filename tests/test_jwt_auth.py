import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from phxbroker.auth.jwt_tokens import JwtVerifier, TokenError

SECRET = "s3cr3t-" * 10  # 70 bytes: long enough for HS512
ISSUER = "https://app.example"
AUDIENCE = "phxbroker"


def public_pem(private_key) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(private_key) -> str:
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def keys(rsa_key):
    """Signing key and verifier public PEM for each asymmetric algorithm tested."""
    p256 = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    edwards = ed25519.Ed25519PrivateKey.generate()
    return {
        "RS256": rsa_key,
        "RS512": rsa_key,
        "PS256": rsa_key,
        "ES256": p256,
        "ES384": p384,
        "EdDSA": edwards,
    }


def claims(**overrides):
    now = int(time.time())
    base = {"sub": "alice", "iat": now, "exp": now + 300}
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def hs_token(payload=None, *, secret=SECRET, algorithm="HS256", headers=None) -> str:
    return jwt.encode(claims() if payload is None else payload, secret, algorithm, headers)


def refused(verifier: JwtVerifier, token) -> TokenError:
    with pytest.raises(TokenError) as caught:
        verifier.verify(token)
    message = str(caught.value)
    assert SECRET not in message
    if isinstance(token, str) and len(token) > 10:
        assert token not in message
        assert all(part not in message for part in token.split(".") if len(part) > 10)
    return caught.value


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unsigned_parts(header: dict, payload: dict) -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
def test_hmac_tokens_verify(algorithm):
    verifier = JwtVerifier(algorithms=[algorithm], secret=SECRET)
    token = hs_token(algorithm=algorithm)
    assert verifier.verify(token) == "alice"
    assert verifier.verify(token.encode()) == "alice"
    assert verifier.verify_claims(token)["sub"] == "alice"


@pytest.mark.parametrize("algorithm", ["RS256", "RS512", "PS256", "ES256", "ES384", "EdDSA"])
def test_public_key_tokens_verify(keys, algorithm):
    private_key = keys[algorithm]
    verifier = JwtVerifier(algorithms=[algorithm], public_key=public_pem(private_key))
    token = jwt.encode(claims(sub="bob"), private_key, algorithm=algorithm)
    assert verifier.verify(token) == "bob"


def test_one_verifier_can_accept_several_algorithms_of_one_kind(rsa_key):
    verifier = JwtVerifier(algorithms=["RS256", "PS256"], public_key=public_pem(rsa_key))
    for algorithm in ("RS256", "PS256"):
        assert verifier.verify(jwt.encode(claims(), rsa_key, algorithm=algorithm)) == "alice"
    error = refused(verifier, jwt.encode(claims(), rsa_key, algorithm="RS384"))
    assert str(error) == "token algorithm 'RS384' is not allowed (RS256, PS256)"


def test_expired_token_is_refused():
    now = int(time.time())
    error = refused(JwtVerifier(secret=SECRET), hs_token(claims(exp=now - 60, iat=now - 120)))
    assert str(error) == "token expired"
    assert error.reason == "expired"


def test_leeway_tolerates_a_recently_expired_token():
    now = int(time.time())
    token = hs_token(claims(exp=now - 30, iat=now - 90))
    assert JwtVerifier(secret=SECRET, leeway=120).verify(token) == "alice"
    assert refused(JwtVerifier(secret=SECRET, leeway=0), token).reason == "expired"


def test_token_not_valid_yet_is_refused_unless_within_leeway():
    now = int(time.time())
    token = hs_token(claims(nbf=now + 300))
    error = refused(JwtVerifier(secret=SECRET), token)
    assert str(error) == "token is not valid yet"
    assert error.reason == "invalid"
    assert JwtVerifier(secret=SECRET, leeway=600).verify(token) == "alice"
    issued_later = hs_token(claims(iat=now + 300))
    assert str(refused(JwtVerifier(secret=SECRET), issued_later)) == "token is not valid yet"


def test_wrong_key_is_refused(keys, rsa_key, other_rsa_key):
    token = hs_token()
    error = refused(JwtVerifier(secret=SECRET + "x"), token)
    assert str(error) == "token signature does not match"
    verifier = JwtVerifier(algorithms=["RS256"], public_key=public_pem(other_rsa_key))
    signed_by_other = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert str(refused(verifier, signed_by_other)) == "token signature does not match"
    es_verifier = JwtVerifier(
        algorithms=["ES256"], public_key=public_pem(ec.generate_private_key(ec.SECP256R1()))
    )
    es_token = jwt.encode(claims(), keys["ES256"], algorithm="ES256")
    assert str(refused(es_verifier, es_token)) == "token signature does not match"


def test_tampered_payload_is_refused():
    header, _payload, signature = hs_token().split(".")
    forged = b64url(json.dumps(claims(sub="admin")).encode())
    error = refused(JwtVerifier(secret=SECRET), f"{header}.{forged}.{signature}")
    assert str(error) == "token signature does not match"


def test_issuer_is_checked_when_configured():
    verifier = JwtVerifier(secret=SECRET, issuer=ISSUER)
    assert verifier.verify(hs_token(claims(iss=ISSUER))) == "alice"
    error = refused(verifier, hs_token(claims(iss="https://evil.example")))
    assert str(error) == "token issuer (iss) does not match"
    error = refused(verifier, hs_token(claims()))
    assert str(error) == "token is missing the required claim 'iss'"
    several = JwtVerifier(secret=SECRET, issuer=[ISSUER, "https://other.example"])
    assert several.verify(hs_token(claims(iss="https://other.example"))) == "alice"
    assert JwtVerifier(secret=SECRET).verify(hs_token(claims(iss="anyone"))) == "alice"


def test_audience_is_checked_when_configured():
    verifier = JwtVerifier(secret=SECRET, audience=AUDIENCE)
    assert verifier.verify(hs_token(claims(aud=AUDIENCE))) == "alice"
    assert verifier.verify(hs_token(claims(aud=["billing", AUDIENCE]))) == "alice"
    error = refused(verifier, hs_token(claims(aud="billing")))
    assert str(error) == "token audience (aud) does not match"
    error = refused(verifier, hs_token(claims()))
    assert str(error) == "token is missing the required claim 'aud'"


def test_token_with_an_audience_is_refused_when_none_is_configured():
    error = refused(JwtVerifier(secret=SECRET), hs_token(claims(aud=AUDIENCE)))
    assert str(error) == "token names an audience (aud) but none is configured"


def test_alg_none_is_refused(rsa_key):
    token = jwt.encode(claims(), None, algorithm="none")
    assert token.endswith(".")
    error = refused(JwtVerifier(secret=SECRET), token)
    assert str(error) == "token algorithm 'none' is not allowed (HS256)"
    rs_verifier = JwtVerifier(algorithms=["RS256"], public_key=public_pem(rsa_key))
    assert str(refused(rs_verifier, token)) == "token algorithm 'none' is not allowed (RS256)"
    for spelling in ("None", "NONE"):
        forged = unsigned_parts({"alg": spelling, "typ": "JWT"}, claims()) + "."
        message = str(refused(JwtVerifier(secret=SECRET), forged))
        assert message == f"token algorithm {spelling!r} is not allowed (HS256)"


def test_hs256_token_signed_with_the_public_key_is_refused(rsa_key):
    pem = public_pem(rsa_key)
    signing_input = unsigned_parts({"alg": "HS256", "typ": "JWT"}, claims(sub="mallory"))
    mac = hmac.new(pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{b64url(mac)}"
    verifier = JwtVerifier(algorithms=["RS256"], public_key=pem)
    error = refused(verifier, forged)
    assert str(error) == "token algorithm 'HS256' is not allowed (RS256)"
    assert verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256")) == "alice"


def test_the_confusion_setups_cannot_be_configured(rsa_key):
    pem = public_pem(rsa_key)
    with pytest.raises(ValueError, match="need different kinds of key"):
        JwtVerifier(algorithms=["RS256", "HS256"], public_key=pem)
    with pytest.raises(ValueError, match="secret looks like a public key"):
        JwtVerifier(algorithms=["HS256"], secret=pem)


def test_missing_user_claim_is_refused():
    token = hs_token(claims(sub=None))
    assert (
        str(refused(JwtVerifier(secret=SECRET), token)) == "token is missing the user claim 'sub'"
    )
    verifier = JwtVerifier(secret=SECRET, user_claim="user_id")
    assert verifier.verify(hs_token(claims(user_id="carol"))) == "carol"
    assert str(refused(verifier, hs_token())) == "token is missing the user claim 'user_id'"


def test_exp_is_required_by_default_and_the_requirement_is_configurable():
    token = hs_token(claims(exp=None))
    error = refused(JwtVerifier(secret=SECRET), token)
    assert str(error) == "token is missing the required claim 'exp'"
    assert JwtVerifier(secret=SECRET, required_claims=()).verify(token) == "alice"
    strict = JwtVerifier(secret=SECRET, required_claims=["exp", "jti"])
    assert str(refused(strict, hs_token())) == "token is missing the required claim 'jti'"
    assert strict.verify(hs_token(claims(jti="abc"))) == "alice"


def test_non_string_sub_is_refused_as_the_jwt_spec_requires():
    error = refused(JwtVerifier(secret=SECRET), hs_token(claims(sub=42)))
    assert str(error) == "token subject (sub) is not a string"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (42, "42"),
        (-7, "-7"),
        (12345678901234567890, "12345678901234567890"),
        ("zoë", "zoë"),
    ],
)
def test_custom_user_claim_accepts_strings_and_integers(value, expected):
    verifier = JwtVerifier(secret=SECRET, user_claim="user_id")
    assert verifier.verify(hs_token(claims(user_id=value))) == expected


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (True, "a boolean"),
        (1.5, "a fractional number"),
        (["alice"], "an array"),
        ({"id": 1}, "an object"),
    ],
)
def test_custom_user_claim_refuses_other_json_values(value, kind):
    verifier = JwtVerifier(secret=SECRET, user_claim="user_id")
    error = refused(verifier, hs_token(claims(user_id=value)))
    assert str(error) == f"token claim 'user_id' is {kind}, not a string or integer user id"


@pytest.mark.parametrize("claim", ["sub", "user_id"])
def test_a_user_claim_with_a_lone_surrogate_is_refused(claim):
    verifier = JwtVerifier(secret=SECRET, user_claim=claim)
    error = refused(verifier, hs_token(claims(**{claim: "mal\ud800lory"})))
    assert str(error) == f"token claim {claim!r} is not valid Unicode text"


def test_null_and_empty_user_claims_are_refused():
    verifier = JwtVerifier(secret=SECRET, user_claim="user_id")
    payload = {**claims(), "user_id": None}
    assert str(refused(verifier, hs_token(payload))) == (
        "token claim 'user_id' is null, not a string or integer user id"
    )
    assert str(refused(verifier, hs_token(claims(user_id="")))) == (
        "token claim 'user_id' is an empty string, not a user id"
    )


@pytest.mark.parametrize("token", [None, "", b""])
def test_missing_token(token):
    error = refused(JwtVerifier(secret=SECRET), token)
    assert str(error) == "token is missing"
    assert error.reason == "missing"


@pytest.mark.parametrize(("token", "parts"), [("abc", 1), ("a.b", 2), ("a.b.c.d", 4)])
def test_wrong_number_of_parts(token, parts):
    error = refused(JwtVerifier(secret=SECRET), token)
    assert str(error) == f"token has {parts} dot-separated parts, not 3"


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("!!!.???.***", "token is not a valid JWT: Invalid header"),
        (b64url(b"[1, 2]") + ".e30.c2ln", "token is not a valid JWT: Invalid header string"),
        ("e30.e30.c2ln", "token header does not name an algorithm (alg)"),
        (b64url(b'{"alg": ["HS256"]}') + ".e30.c2ln", "token algorithm is not allowed (HS256)"),
        ("eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln", "token signature does not match"),
        ("eyJhbGciOiJIUzI1NiJ9.e30.", "token signature does not match"),
    ],
)
def test_malformed_tokens_are_refused_with_one_sentence(token, message):
    error = refused(JwtVerifier(secret=SECRET, required_claims=()), token)
    assert str(error).startswith(message)
    assert "\n" not in str(error)
    assert error.reason == "invalid"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"sub": "a", "exp": "soon"}, "Expiration Time claim (exp) must be an integer"),
        ({"sub": "a", "exp": 9e9, "nbf": "now"}, "Not Before claim (nbf) must be an integer"),
        ({"sub": "a", "exp": 9e9, "jti": 5}, "token id (jti) is not a string"),
        ({"sub": "a", "exp": 9e9, "iat": "x"}, "token issued-at time (iat) is not a number"),
    ],
)
def test_signed_tokens_with_malformed_claims_are_refused(payload, message):
    error = refused(JwtVerifier(secret=SECRET), hs_token(payload))
    assert str(error).endswith(message)


def test_non_text_tokens_are_refused():
    assert str(refused(JwtVerifier(secret=SECRET), b"\xff.\xfe.\xfd")) == "token is not ASCII text"
    assert str(refused(JwtVerifier(secret=SECRET), 12)) == "token is not a string"


def test_repr_does_not_reveal_the_secret():
    verifier = JwtVerifier(secret=SECRET, issuer=ISSUER)
    assert SECRET not in repr(verifier)
    assert "HS256" in repr(verifier)


def rsa_1024_pem() -> str:
    return public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"algorithms": [], "secret": SECRET}, "algorithms must name at least one JWT algorithm"),
        ({"algorithms": ["none"], "secret": SECRET}, "the JWT algorithm 'none' is never accepted"),
        ({"algorithms": ["HS256", "None"], "secret": SECRET}, "'none' is never accepted"),
        ({"algorithms": ["XS256"], "secret": SECRET}, "unsupported JWT algorithm 'XS256'"),
        ({"algorithms": [256], "secret": SECRET}, "algorithms must be JWT algorithm names"),
        ({"algorithms": ["ES256", "EdDSA"], "public_key": "x"}, "need different kinds of key"),
        ({"algorithms": ["HS256"]}, "HS256 needs a non-empty shared secret"),
        ({"algorithms": ["HS256"], "secret": ""}, "HS256 needs a non-empty shared secret"),
        ({"secret": "short"}, r"secret is 5 bytes; HS256 needs at least 32 \(RFC 7518"),
        ({"algorithms": ["HS256", "HS512"], "secret": "x" * 40}, "HS512 needs at least 64"),
        ({"secret": SECRET, "public_key": "pem"}, "HS256 verifies with a shared secret, not a"),
        ({"algorithms": ["RS256"]}, "RS256 needs a public_key in PEM format"),
        ({"algorithms": ["RS256"], "secret": SECRET}, "RS256 verifies with a public_key, not a"),
        (
            {"algorithms": ["RS256"], "public_key": "-----BEGIN PUBLIC KEY-----\nnope\n"},
            "public_key is not a PEM public key usable with RS256",
        ),
        ({"secret": SECRET, "user_claim": ""}, "user_claim must be a non-empty claim name"),
        ({"secret": SECRET, "leeway": -1}, "leeway must be a number of seconds, zero or more"),
        ({"secret": SECRET, "issuer": []}, "issuer must not be an empty list"),
        ({"secret": SECRET, "audience": ""}, "audience must not be empty"),
        ({"secret": SECRET, "audience": [""]}, "audience must be a string or a list of non-empty"),
        ({"secret": SECRET, "user_claim_pattern": "User:1"}, 'must contain "{user}" once'),
        ({"secret": SECRET, "user_claim_pattern": "{user}:{user}"}, 'must contain "{user}" once'),
        ({"secret": SECRET, "user_claim_pattern": "{kind}:{user}"}, "no placeholder other than"),
    ],
)
def test_bad_configuration_raises_value_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        JwtVerifier(**arguments)


def test_unsuitable_public_keys_are_refused(rsa_key, keys):
    with pytest.raises(ValueError, match="public_key holds a private key"):
        JwtVerifier(algorithms=["RS256"], public_key=private_pem(rsa_key))
    with pytest.raises(ValueError, match="public_key is a 1024-bit RSA key; at least 2048 bits"):
        JwtVerifier(algorithms=["RS256"], public_key=rsa_1024_pem())
    # Newer PyJWT checks the curve itself; older releases leave it to our own check.
    wrong_curve = "public_key is (on curve secp384r1; ES256 needs secp256r1|not a PEM public key)"
    with pytest.raises(ValueError, match=wrong_curve):
        JwtVerifier(algorithms=["ES256"], public_key=public_pem(keys["ES384"]))
    with pytest.raises(ValueError, match="public_key is not a PEM public key usable with ES256"):
        JwtVerifier(algorithms=["ES256"], public_key=public_pem(rsa_key))
    with pytest.raises(ValueError, match="public_key is not a PEM public key usable with RS256"):
        JwtVerifier(algorithms=["RS256"], public_key=public_pem(keys["ES256"]))


@pytest.mark.parametrize(
    ("pattern", "sub", "user"),
    [
        ("User:{user}", "User:1", "1"),  # Guardian's GuardianSerializer.for_token
        ("User:{user}", "User:a:b", "a:b"),
        ("{user}@example.com", "ann@example.com", "ann"),
        ("user|{user}|v2", "user|42|v2", "42"),  # pattern text is literal, not a regex
    ],
)
def test_a_user_claim_pattern_takes_the_user_out_of_the_claim(pattern, sub, user):
    verifier = JwtVerifier(algorithms="HS512", secret=SECRET, user_claim_pattern=pattern)
    assert verifier.verify(hs_token(claims(sub=sub), algorithm="HS512")) == user


@pytest.mark.parametrize("sub", ["Admin:1", "User:", "user:1", "xUser:1", "1"])
def test_a_claim_the_pattern_does_not_match_is_refused_naming_claim_and_pattern(sub):
    verifier = JwtVerifier(secret=SECRET, user_claim_pattern="User:{user}")
    error = refused(verifier, hs_token(claims(sub=sub)))
    assert str(error) == "token claim 'sub' does not match user_claim_pattern 'User:{user}'"
    assert error.reason == "invalid"


def test_an_integer_claim_is_matched_as_its_decimal_text():
    verifier = JwtVerifier(secret=SECRET, user_claim="uid", user_claim_pattern="{user}")
    assert verifier.verify(hs_token(claims(uid=7))) == "7"
