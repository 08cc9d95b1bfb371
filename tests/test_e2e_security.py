"""End to end: connect tokens, origins, TLS and limits with the real phoenix.js client.

Tokens are real: JWTs minted with PyJWT, Phoenix.Tokens minted by the independent
plug_crypto-format minter in tests/support (itself checked against tokens minted by
real Phoenix). Each bad credential must be refused before the socket opens (phoenix.js
sees an error and close 1006, as a browser sees a 403) with its reason in the log.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.broker import BrokerProcess
from support.node_client import NodeClient
from support.phoenix_token_mint import mint

JWT_SECRET = "board-jwt-secret-0123456789-abcdefghijklmnopqrstuvwxyz-ABCDEFGHIJ"  # 64 bytes
SECRET_KEY_BASE = "phxbroker-e2e-secret-key-base-0123456789abcdefghijklmnopqrstuvwxyz"
STATIC_TOKEN = "static-token-for-carol"
ENV = {"PHX_JWT_SECRET": JWT_SECRET, "PHX_SECRET_KEY_BASE": SECRET_KEY_BASE}

AUTH_CONFIG: dict[str, Any] = {
    "server": {"idle_timeout": 30},
    "auth": {
        "token_param": "token",
        "tokens": [{"user": "carol", "token": STATIC_TOKEN}],
        "jwt": {
            "algorithms": ["HS256", "HS512"],
            "secret_env": "PHX_JWT_SECRET",
            "issuer": "board",
        },
        "phoenix_token": {"secret_key_base_env": "PHX_SECRET_KEY_BASE"},
    },
    "topics": [
        {"pattern": "users:{user}", "join": "self"},
        {"pattern": "room:*", "join": "authenticated", "echo": ["ping"]},
    ],
    "log": {"level": "debug"},
}

# phoenix.js retries refused sockets for ever; these tests want the first answer.
NO_RETRY = {"reconnectAfterMs": [60_000], "rejoinAfterMs": [60_000]}


def now() -> int:
    return int(time.time())


def jwt_token(
    sub: Any = "42",
    *,
    key: str = JWT_SECRET,
    algorithm: str = "HS256",
    exp_in: int = 600,
    **claims: Any,
) -> str:
    payload = {"sub": sub, "iss": "board", "iat": now(), "exp": now() + exp_in, **claims}
    return jwt.encode(payload, key, algorithm=algorithm)


def phoenix_token(
    data: Any = 42,
    *,
    secret_key_base: str = SECRET_KEY_BASE,
    salt: str = "user socket",
    age_s: float = 0,
) -> str:
    """Phoenix.Token.sign(endpoint, salt, data), signed `age_s` seconds ago."""
    signed_at_ms = int((time.time() - age_s) * 1000)
    return mint(
        data,
        secret_key_base=secret_key_base,
        salt=salt,
        signed_at_ms=signed_at_ms,
        max_age=86400,
    )


def tampered(token: str) -> str:
    """The token with its payload swapped for one naming another user; signature kept."""
    header, payload, signature = token.split(".")
    if token.startswith("SFMy"):
        forged = phoenix_token(7).split(".")[1]
    else:
        claims = jwt.decode(token, options={"verify_signature": False})
        forged = (
            base64.urlsafe_b64encode(jwt.api_jws.json.dumps({**claims, "sub": "7"}).encode())
            .rstrip(b"=")
            .decode()
        )
    assert forged != payload
    return f"{header}.{forged}.{signature}"


def unsigned_jwt(sub: str = "42") -> str:
    return jwt.encode({"sub": sub, "iss": "board", "exp": now() + 600}, None, algorithm="none")


def expect_refused(client: NodeClient) -> None:
    """The socket errored and closed with 1006 without ever opening, as a browser sees it."""
    error = client.expect({"type": "error"})
    assert re.search(r"\b(403|429|503)\b", error["message"]), error
    closed = client.expect({"type": "close"})
    assert closed["code"] == 1006, closed
    assert client.seen({"type": "open"}) == []


def shared_broker(
    config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, name: str
) -> Iterator[BrokerProcess]:
    """A broker for a whole module; it must exit 0 on SIGTERM without a traceback."""
    broker = BrokerProcess(config, tmp_path_factory.mktemp(name), env=ENV)
    broker.start()
    yield broker
    code = broker.stop()
    broker.kill()
    assert code == 0, broker.log_text
    assert "Traceback" not in broker.log_text, broker.log_text


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """Static tokens, JWT and Phoenix.Token at once, at debug log level."""
    yield from shared_broker(AUTH_CONFIG, tmp_path_factory, "auth-broker")


@pytest.fixture(scope="module")
def origin_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    yield from shared_broker(ORIGIN_CONFIG, tmp_path_factory, "origin-broker")


def connect_with(
    broker: BrokerProcess, client: NodeClient, token: str, carrier: str, **opts: Any
) -> None:
    if carrier == "longpoll":
        client.connect(
            broker.socket_url(), {}, authToken=token, transport="longpoll", **NO_RETRY, **opts
        )
    elif carrier == "authToken":
        client.connect(broker.socket_url(), {}, authToken=token, **NO_RETRY, **opts)
    else:
        client.connect(broker.socket_url(), {"token": token}, **NO_RETRY, **opts)


# -- accepted tokens ---------------------------------------------------------------------

GOOD_TOKENS: dict[str, Callable[[], tuple[str, str]]] = {
    "jwt-hs256": lambda: (jwt_token("42"), "42"),
    "jwt-hs512": lambda: (jwt_token("43", algorithm="HS512"), "43"),
    "phoenix-token-integer": lambda: (phoenix_token(42), "42"),
    "phoenix-token-string": lambda: (phoenix_token("zoë"), "zoë"),
    "phoenix-token-map": lambda: (phoenix_token({"id": 9, "role": "admin"}), "9"),
    "static": lambda: (STATIC_TOKEN, "carol"),
}


@pytest.mark.parametrize("carrier", ["params", "authToken"])
@pytest.mark.parametrize("kind", list(GOOD_TOKENS))
def test_a_valid_token_opens_the_socket_as_its_user(
    auth_broker: BrokerProcess,
    node_client_factory: Callable[..., NodeClient],
    kind: str,
    carrier: str,
) -> None:
    token, user = GOOD_TOKENS[kind]()
    client = node_client_factory()

    connect_with(auth_broker, client, token, carrier)

    client.expect_open()
    # The user came from the token: only that user's own topic may be joined.
    assert client.join(f"users:{user}")["status"] == "ok"
    refused = client.join("users:someone-else")
    assert (refused["status"], refused["response"]) == ("error", {"reason": "unauthorized"})


# -- refused tokens ----------------------------------------------------------------------

BAD_TOKENS: dict[str, tuple[Callable[[], str], str]] = {
    "jwt-tampered": (lambda: tampered(jwt_token("42")), "JWT refused: token signature"),
    "jwt-expired": (lambda: jwt_token("42", exp_in=-60), "JWT refused: token expired"),
    "jwt-wrong-key": (
        lambda: jwt_token("42", key="another-secret-of-enough-length-0123456789"),
        "JWT refused: token signature does not match",
    ),
    "jwt-none-algorithm": (unsigned_jwt, "JWT refused: token algorithm 'none' is not allowed"),
    "jwt-wrong-issuer": (
        lambda: jwt_token("42", iss="someone-else"),
        r"JWT refused: token issuer \(iss\) does not match",
    ),
    "jwt-not-yet-valid": (
        lambda: jwt_token("42", nbf=now() + 600),
        "JWT refused: token is not valid yet",
    ),
    "phoenix-token-tampered": (
        lambda: tampered(phoenix_token(42)),
        "Phoenix.Token refused: token signature does not match",
    ),
    "phoenix-token-expired": (
        lambda: phoenix_token(42, age_s=1_209_600 + 60),
        "Phoenix.Token refused: token expired",
    ),
    "phoenix-token-wrong-salt": (
        lambda: phoenix_token(42, salt="another salt"),
        "Phoenix.Token refused: token signature does not match",
    ),
    "phoenix-token-wrong-key": (
        lambda: phoenix_token(42, secret_key_base="x" * 64),
        "Phoenix.Token refused: token signature does not match",
    ),
    "unknown-static": (lambda: "not-a-known-token", "token not recognised"),
}


@pytest.mark.parametrize("carrier", ["params", "authToken"])
@pytest.mark.parametrize("kind", list(BAD_TOKENS))
def test_a_bad_token_is_refused_before_the_socket_opens(
    auth_broker: BrokerProcess,
    node_client_factory: Callable[..., NodeClient],
    kind: str,
    carrier: str,
) -> None:
    make, reason = BAD_TOKENS[kind]
    token = make()
    client = node_client_factory()
    mark = auth_broker.mark()

    connect_with(auth_broker, client, token, carrier)

    expect_refused(client)
    line = auth_broker.wait_for_log(
        rf"refused connect from 127\.0\.0\.1:\d+ .*: {reason}", since=mark
    )
    assert token not in line.string


def test_an_es256_jwt_verifies_with_a_public_key_file(
    broker_factory: Callable[..., BrokerProcess],
    node_client_factory: Callable[..., NodeClient],
    tmp_path: Path,
) -> None:
    private_key = ec.generate_private_key(ec.SECP256R1())
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "jwt-public.pem"
    key_file.write_bytes(public_pem)
    config = {
        "auth": {"jwt": {"algorithms": ["ES256"], "public_key_file": str(key_file)}},
        "topics": [{"pattern": "users:{user}", "join": "self"}],
    }
    broker = broker_factory(config)
    claims = {"sub": "42", "exp": now() + 600}
    good = jwt.encode(claims, private_key, algorithm="ES256")
    other_key = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(claims, other_key, algorithm="ES256")
    # The classic confusion attack: HS256 keyed with the public key's PEM text.
    confused_token = _hs256_with_raw_key(claims, public_pem)

    alice = node_client_factory("alice")
    alice.connect(broker.socket_url(), {}, authToken=good, **NO_RETRY)
    alice.expect_open()
    assert alice.join("users:42")["status"] == "ok"

    for name, token in [("forged", forged), ("hs256-with-public-key", confused_token)]:
        mark = broker.mark()
        client = node_client_factory(name)
        client.connect(broker.socket_url(), {"token": token}, **NO_RETRY)
        expect_refused(client)
        broker.wait_for_log(r"refused connect .*: JWT refused: token", since=mark)


def _hs256_with_raw_key(claims: dict[str, Any], key: bytes) -> str:
    """Sign HS256 by hand (PyJWT refuses a PEM as an HMAC key, as it should)."""
    import hashlib
    import hmac
    import json

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    mac = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


# -- check_origin ------------------------------------------------------------------------

ORIGIN_CONFIG = {
    "server": {"check_origin": ["https://app.example.com", "//*.example.org"]},
    "auth": {"tokens": [{"user": "alice", "token": "alice-token"}]},
    "topics": [{"pattern": "room:*", "echo": ["ping"]}],
}


@pytest.mark.parametrize(
    "origin",
    [None, "https://app.example.com", "https://example.org", "http://deep.sub.example.org:8080"],
)
def test_an_allowed_origin_connects(
    origin_broker: BrokerProcess,
    node_client_factory: Callable[..., NodeClient],
    origin: str | None,
) -> None:
    broker = origin_broker
    client = node_client_factory()
    opts = {} if origin is None else {"origin": origin}

    client.connect(broker.socket_url(), {"token": "alice-token"}, **opts)

    client.expect_open()
    assert client.join("room:x")["status"] == "ok"
    assert client.call("room:x", "ping", {"n": 1})["response"] == {"n": 1}


@pytest.mark.parametrize(
    "origin",
    ["https://evil.example.com", "http://app.example.com", "https://example.org.evil.net", "null"],
)
def test_a_foreign_origin_is_refused_with_one_log_line(
    origin_broker: BrokerProcess,
    node_client_factory: Callable[..., NodeClient],
    origin: str,
) -> None:
    broker = origin_broker
    bystander = node_client_factory("bystander")
    bystander.connect(
        broker.socket_url(), {"token": "alice-token"}, origin="https://app.example.com"
    )
    bystander.expect_open()
    assert bystander.join("room:x")["status"] == "ok"
    mark = broker.mark()
    client = node_client_factory()

    client.connect(broker.socket_url(), {"token": "alice-token"}, origin=origin, **NO_RETRY)

    expect_refused(client)
    broker.wait_for_log(
        rf"refused connect from .*: origin '{re.escape(origin)}' (is not allowed|names no host)",
        since=mark,
    )
    # Exactly one line for the refusal, and the connection next door never noticed.
    assert bystander.call("room:x", "ping", {"n": 2})["response"] == {"n": 2}
    refusals = [line for line in broker.lines[mark:] if "refused" in line]
    assert len(refusals) == 1, refusals
    assert bystander.seen({"type": "close"}) == []


# -- secrets hygiene ---------------------------------------------------------------------


def test_no_token_or_secret_ever_reaches_the_log(
    broker_factory: Callable[..., BrokerProcess],
    node_client_factory: Callable[..., NodeClient],
    tmp_path: Path,
) -> None:
    """Good and bad connects of every kind, every way of carrying a token (connect param,
    websocket subprotocol, long-poll header), at debug level: no log line may contain a
    token (whole, in part, or as its subprotocol form) or a secret."""
    jwt_file = tmp_path / "jwt.secret"
    jwt_file.write_text(JWT_SECRET + "\n")
    skb_file = tmp_path / "secret_key_base"
    skb_file.write_text(SECRET_KEY_BASE + "\n")
    config = {
        **AUTH_CONFIG,
        "auth": {
            **AUTH_CONFIG["auth"],
            "jwt": {"algorithms": ["HS256"], "secret_file": str(jwt_file), "issuer": "board"},
            "phoenix_token": {"secret_key_base_file": str(skb_file)},
        },
    }
    broker = broker_factory(config)
    good = [jwt_token("42"), phoenix_token(42), STATIC_TOKEN]
    bad = [make() for make, _ in BAD_TOKENS.values()]
    carriers = ("params", "authToken", "longpoll")
    clients = {carrier: node_client_factory(carrier) for carrier in carriers}

    for token in good + bad:
        for carrier, client in clients.items():
            connect_with(broker, client, token, carrier)
            if token in good:
                client.expect_open()
                assert client.join("room:lobby")["status"] == "ok"
                client.disconnect()
                client.expect({"type": "close"})
            else:
                client.expect({"type": "error"})
                client.expect({"type": "close"})
                client.disconnect()
    assert broker.stop() == 0

    needles = {JWT_SECRET, SECRET_KEY_BASE}
    for token in good + bad:
        needles.add(token)
        needles.add(base64.b64encode(token.encode()).decode().rstrip("="))
        needles.update(part for part in token.split(".") if len(part) >= 12)
    # It did log: one line per refusal, and debug lines for the connections.
    assert sum("refused" in line for line in broker.lines) == len(carriers) * len(bad)
    assert sum(" DEBUG " in line for line in broker.lines) >= 2 * len(good)
    leaks = [(n, line) for line in broker.lines for n in needles if n in line]
    assert leaks == []


def test_long_polling_clients_authenticate_with_the_same_tokens(
    auth_broker: BrokerProcess, node_client_factory: Callable[..., NodeClient]
) -> None:
    """phoenix.js's LongPoll sends authToken as X-Phoenix-AuthToken on its polls."""
    good = node_client_factory("good")
    good.connect(auth_broker.socket_url(), {}, authToken=jwt_token("42"), transport="longpoll")
    assert good.expect_open()["transport"] == "LongPoll"
    assert good.join("users:42")["status"] == "ok"

    mark = auth_broker.mark()
    bad = node_client_factory("bad")
    expired = phoenix_token(42, age_s=1_209_600 + 60)
    bad.connect(auth_broker.socket_url(), {}, authToken=expired, transport="longpoll", **NO_RETRY)
    bad.expect({"type": "error"})
    bad.expect({"type": "close"})
    assert bad.seen({"type": "open"}) == []
    auth_broker.wait_for_log(
        r"refused long-poll connect .*: Phoenix.Token refused: token expired", mark
    )
