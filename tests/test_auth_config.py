"""[auth.jwt] and [auth.phoenix_token]: secrets from env or file, and which kind of token
the Authenticator hands each token to."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from support.phoenix_token_mint import mint
from support.token_vectors import VECTOR_SECRET, VECTORS

from phxbroker.auth.authenticator import Authenticator, Refused
from phxbroker.config.settings import load_config, parse_config
from phxbroker.config.table import ConfigError

JWT_SECRET = "j" * 32
SKB = "s" * 64


@pytest.fixture(autouse=True)
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHX_JWT_SECRET", JWT_SECRET)
    monkeypatch.setenv("PHX_SECRET_KEY_BASE", SKB)


def auth(**sections: Any) -> dict[str, Any]:
    return {"auth": sections}


def authenticator(**sections: Any) -> Authenticator:
    return Authenticator(parse_config(auth(**sections)).auth)


def good_jwt(sub: str = "42", **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": time.time() + 60, **claims}, JWT_SECRET, "HS256")


def good_phoenix_token(data: Any = 42, salt: str = "user socket") -> str:
    return mint(data, secret_key_base=SKB, salt=salt, signed_at_ms=int(time.time() * 1000))


# -- config ------------------------------------------------------------------------------


def test_a_jwt_secret_from_the_environment() -> None:
    signed = parse_config(auth(jwt={"secret_env": "PHX_JWT_SECRET"})).auth.jwt
    assert signed is not None
    assert signed.verifier.verify(good_jwt()) == "42"
    assert JWT_SECRET not in repr(signed) and JWT_SECRET not in repr(parse_config(auth()))


def test_a_secret_file_is_relative_to_the_config_and_loses_its_newline(tmp_path: Path) -> None:
    (tmp_path / "jwt.secret").write_text(JWT_SECRET + "\n")
    (tmp_path / "skb").write_text(SKB + "\r\n")
    config_file = tmp_path / "phxbroker.toml"
    config_file.write_text(
        '[auth.jwt]\nsecret_file = "jwt.secret"\n'
        '[auth.phoenix_token]\nsecret_key_base_file = "skb"\n'
    )
    config = load_config(config_file)
    assert config.auth.jwt.verifier.verify(good_jwt()) == "42"
    assert config.auth.phoenix_token.verifier.verify(good_phoenix_token()) == "42"


def test_public_key_files_for_rs256_and_es256(tmp_path: Path) -> None:
    for alg, key in [
        ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", ec.generate_private_key(ec.SECP256R1())),
    ]:
        pem = tmp_path / f"{alg}.pem"
        pem.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        signed = parse_config(auth(jwt={"algorithms": [alg], "public_key_file": str(pem)}))
        token = jwt.encode({"sub": "7", "exp": time.time() + 60}, key, alg)
        assert signed.auth.jwt.verifier.verify(token) == "7"


def test_jwt_claim_options() -> None:
    verifier = parse_config(
        auth(
            jwt={
                "secret_env": "PHX_JWT_SECRET",
                "user_claim": "user_id",
                "issuer": "board",
                "audience": ["board-web", "board-app"],
                "leeway": 30,
            }
        )
    ).auth.jwt.verifier
    token = good_jwt(user_id="99", iss="board", aud="board-app", exp=time.time() - 10)
    assert verifier.verify(token) == "99"  # expired 10 s ago, within the leeway


def test_a_guardian_token_maps_to_its_user_through_the_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    guardian_secret = "g" * 64  # HS512 wants 64 bytes
    monkeypatch.setenv("PHX_JWT_SECRET", guardian_secret)
    verifier = parse_config(
        auth(
            jwt={
                "algorithms": ["HS512"],
                "secret_env": "PHX_JWT_SECRET",
                "user_claim_pattern": "User:{user}",
                "issuer": "board",
                "audience": "board",
            }
        )
    ).auth.jwt.verifier
    claims = {"sub": "User:1", "iss": "board", "aud": "board", "typ": "access"}
    token = jwt.encode({**claims, "exp": time.time() + 60}, guardian_secret, "HS512")
    assert verifier.verify(token) == "1"


def test_phoenix_token_options() -> None:
    verifier = parse_config(
        auth(
            phoenix_token={
                "secret_key_base_env": "PHX_SECRET_KEY_BASE",
                "salt": "api",
                "max_age": 60,
                "user_key": "uid",
            }
        )
    ).auth.phoenix_token.verifier
    assert verifier.verify(good_phoenix_token({"uid": "u-1"}, salt="api")) == "u-1"
    old = mint(5, secret_key_base=SKB, salt="api", signed_at_ms=int(time.time() * 1000) - 61_000)
    with pytest.raises(Exception, match="token expired"):
        verifier.verify(old)


def user_of(data: Any) -> str | None:
    if isinstance(data, dict):
        data = data.get("id")
    return str(data) if isinstance(data, int | str) else None


@pytest.mark.parametrize(
    "vector",
    [v for v in VECTORS if v["salt"] == "user socket" and user_of(v["data"])],
    ids=lambda v: v["name"],
)
def test_tokens_minted_by_real_phoenix_verify_through_the_config(
    vector: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Phoenix.Token.sign(endpoint, "user socket", user), verified with the defaults."""
    monkeypatch.setenv("APP_SECRET_KEY_BASE", VECTOR_SECRET)
    config = parse_config(auth(phoenix_token={"secret_key_base_env": "APP_SECRET_KEY_BASE"}))
    verifier = config.auth.phoenix_token.verifier
    user = verifier.verify(vector["token"], now_ms=vector["signed_at_ms"] + 1000)
    assert user == user_of(vector["data"])


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ({"secret": JWT_SECRET}, r"auth\.jwt\.secret: secrets are not accepted inline"),
        ({}, r"auth\.jwt\.secret_env: give exactly one of secret_env or secret_file"),
        (
            {"secret_env": "PHX_JWT_SECRET", "secret_file": "x"},
            r"auth\.jwt\.secret_env: give exactly one",
        ),
        (
            {"secret_env": "NOT_SET_ANYWHERE"},
            r"the environment variable NOT_SET_ANYWHERE is not set",
        ),
        (
            {"secret_file": "/nonexistent/jwt"},
            r"auth\.jwt\.secret_file: '/nonexistent/jwt' does not",
        ),
        (
            {"secret_env": "SHORT"},
            r"auth\.jwt\.secret_env: secret is 5 bytes; HS256 needs at least 32",
        ),
        (
            {"algorithms": ["none"], "secret_env": "PHX_JWT_SECRET"},
            r"auth\.jwt\.algorithms: the JWT algorithm 'none' is never accepted",
        ),
        (
            {"algorithms": ["HS256", "RS256"], "secret_env": "PHX_JWT_SECRET"},
            r"auth\.jwt\.algorithms: algorithms HS256, RS256 need different kinds of key",
        ),
        (
            {"algorithms": ["RS256"], "secret_env": "PHX_JWT_SECRET"},
            r"auth\.jwt\.secret_env: RS256 verifies with public_key_file",
        ),
        (
            {"secret_env": "PHX_JWT_SECRET", "public_key_file": "k.pem"},
            r"auth\.jwt\.public_key_file: HS256 verifies with a shared secret",
        ),
        ({"secret_env": "PHX_JWT_SECRET", "leeway": -1}, r"auth\.jwt\.leeway: must be at least 0"),
        (
            {"secret_env": "PHX_JWT_SECRET", "issuer": []},
            r"auth\.jwt\.issuer: expected a non-empty",
        ),
        ({"secret_env": "PHX_JWT_SECRET", "sceret": 1}, r"auth\.jwt\.sceret: unknown key"),
        (
            {"secret_env": "PHX_JWT_SECRET", "user_claim_pattern": "User:"},
            r'auth\.jwt\.user_claim_pattern: user_claim_pattern must contain "\{user\}" once',
        ),
    ],
)
def test_jwt_config_errors(monkeypatch: pytest.MonkeyPatch, section: dict, error: str) -> None:
    monkeypatch.setenv("SHORT", "short")
    with pytest.raises(ConfigError, match=error) as raised:
        parse_config(auth(jwt=section))
    assert JWT_SECRET not in str(raised.value)


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ({"secret_key_base": SKB}, r"secret_key_base: secrets are not accepted inline"),
        (
            {"secret_key_base_env": "SHORT"},
            r"secret_key_base_env: secret_key_base is 5 bytes; at least 32 are required",
        ),
        ({"secret_key_base_env": "PHX_SECRET_KEY_BASE", "max_age": 0}, r"max_age: must be at"),
        ({"secret_key_base_env": "PHX_SECRET_KEY_BASE", "salt": 5}, r"salt: expected a string"),
    ],
)
def test_phoenix_token_config_errors(
    monkeypatch: pytest.MonkeyPatch, section: dict, error: str
) -> None:
    monkeypatch.setenv("SHORT", "short")
    with pytest.raises(ConfigError, match=r"at auth\.phoenix_token\." + error) as raised:
        parse_config(auth(phoenix_token=section))
    assert SKB not in str(raised.value)


# -- the Authenticator -------------------------------------------------------------------

ALL_KINDS = {
    "tokens": [{"user": "carol", "token": "carol-static-token"}],
    "jwt": {"secret_env": "PHX_JWT_SECRET"},
    "phoenix_token": {"secret_key_base_env": "PHX_SECRET_KEY_BASE"},
}


def test_each_token_goes_to_the_kind_its_shape_names() -> None:
    authn = authenticator(**ALL_KINDS)
    assert authn.authenticate({"token": "carol-static-token"}).user == "carol"
    assert authn.authenticate({"token": good_jwt("7")}).user == "7"
    assert authn.authenticate({}, good_phoenix_token("zoë")).user == "zoë"
    with pytest.raises(Refused) as refused:
        authn.authenticate({"token": "no-such-token"})
    assert (refused.value.reason, str(refused.value)) == ("bad_token", "token not recognised")


@pytest.mark.parametrize(
    ("make", "reason", "sentence"),
    [
        (
            lambda: good_jwt()[:-3] + "AAA",
            "jwt_invalid",
            "JWT refused: token signature does not match",
        ),
        (
            lambda: jwt.encode({"sub": "1", "exp": time.time() - 5}, JWT_SECRET, "HS256"),
            "jwt_expired",
            "JWT refused: token expired",
        ),
        (
            lambda: "a.b.c",
            "jwt_invalid",
            "JWT refused: token is not a valid JWT: Invalid header padding",
        ),
        (
            lambda: good_phoenix_token(salt="other"),
            "phoenix_token_invalid",
            "Phoenix.Token refused: token signature does not match",
        ),
    ],
    ids=["jwt-signature", "jwt-expired", "jwt-garbage", "phoenix-token-salt"],
)
def test_refusals_name_the_kind_and_the_reason(make: Any, reason: str, sentence: str) -> None:
    with pytest.raises(Refused) as refused:
        authenticator(**ALL_KINDS).authenticate({"token": make()})
    assert (refused.value.reason, str(refused.value)) == (reason, sentence)


def test_a_token_of_a_kind_not_configured_is_refused_as_such() -> None:
    with pytest.raises(Refused, match=r"looks like a Phoenix\.Token, but \[auth\.phoenix_token\]"):
        authenticator(jwt=ALL_KINDS["jwt"]).authenticate({"token": good_phoenix_token()})
    with pytest.raises(Refused, match=r"looks like a JWT, but \[auth\.jwt\] is not set"):
        authenticator(tokens=ALL_KINDS["tokens"]).authenticate({"token": good_jwt()})


def test_the_user_param_must_agree_with_the_signed_user() -> None:
    authn = authenticator(user_param="user", **ALL_KINDS)
    assert authn.authenticate({"token": good_jwt("7"), "user": "7"}).user == "7"
    with pytest.raises(Refused) as refused:
        authn.authenticate({"token": good_jwt("7"), "user": "8"})
    assert refused.value.reason == "user_mismatch"


def test_a_signed_user_id_with_control_characters_is_refused() -> None:
    with pytest.raises(Refused) as refused:
        authenticator(**ALL_KINDS).authenticate({"token": good_jwt("a\nb")})
    assert refused.value.reason == "bad_user"


def test_a_changed_key_invalidates_connections_it_admitted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = authenticator(**ALL_KINDS)
    by_jwt = before.authenticate({"token": good_jwt()}).credential
    by_phoenix = before.authenticate({"token": good_phoenix_token()}).credential
    by_static = before.authenticate({"token": "carol-static-token"}).credential

    assert authenticator(**ALL_KINDS).credential_valid(by_jwt, "42")  # same keys: still fine
    monkeypatch.setenv("PHX_JWT_SECRET", "k" * 32)
    after = authenticator(**ALL_KINDS)
    assert not after.credential_valid(by_jwt, "42")
    assert after.credential_valid(by_phoenix, "42") and after.credential_valid(by_static, "carol")
    assert not authenticator(tokens=ALL_KINDS["tokens"]).credential_valid(by_phoenix, "42")


def test_a_static_token_given_to_another_user_no_longer_admits_the_first() -> None:
    before = authenticator(tokens=[{"user": "carol", "token": "shared-once"}])
    credential = before.authenticate({"token": "shared-once"}).credential
    moved = authenticator(tokens=[{"user": "dave", "token": "shared-once"}])
    assert not moved.credential_valid(credential, "carol")
    assert moved.credential_valid(credential, "dave")
    shared = authenticator(user_param="user", tokens=[{"user": "*", "token": "shared-once"}])
    assert shared.credential_valid(credential, "carol")


def test_the_commented_sections_of_the_example_config_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncommented, [auth.jwt] and [auth.phoenix_token] in config.example.toml load and
    verify tokens."""
    monkeypatch.setenv("PHX_JWT_SECRET", "e" * 64)
    example = (Path(__file__).parent.parent / "config.example.toml").read_text()
    sections = []
    for header in ("[auth.jwt]", "[auth.phoenix_token]"):
        block = example.split(f"\n# {header}\n")[1].split("\n\n")[0]
        lines = [line[2:] for line in block.splitlines() if not line.startswith("# #")]
        sections.append("\n".join([header, *lines]))
    config = parse_config(tomllib.loads("\n".join(sections)))
    token = jwt.encode(
        {"sub": "User:5", "iss": "board", "aud": "board", "exp": time.time() + 60},
        "e" * 64,
        "HS512",
    )
    assert config.auth.jwt.verifier.verify(token) == "5"
    assert config.auth.phoenix_token.verifier.verify(good_phoenix_token({"id": 6})) == "6"
