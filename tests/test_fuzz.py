"""The fuzz suite: only the documented error leaves each parser, whatever it is fed.

`pytest` runs a few hundred examples per property; `make fuzz` runs the same properties
with the `fuzz` hypothesis profile (100,000 examples each). Properties:

- V2 text, V1 text and V2 binary decoders: a Message or ProtocolError; and a decoded
  message can be written back by every encoder of the serializer (EncodeError only for
  what a serializer cannot carry at all, a binary payload on V1);
- `messages.loads`: a value or ValueError, and what it accepts `dumps` writes back equal;
- the HTTP request reader over a real socket pair: a Request (whose body reads or is
  refused with BadRequest), None, or BadRequest;
- the API body parser: a JSON object or a 400 ApiError;
- long-poll POST bodies, through a real `phxbroker serve` (the line handling has no
  sans-io entry point): only the documented answers, and the daemon serves on;
- the config loader on generated TOML documents: a Config or ConfigError.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trio
from hypothesis import given
from hypothesis import strategies as st
from support.broker import BrokerProcess
from support.fuzz import examples, frames_for, json_values, mutated, v1_frames, v2_frames

from phxbroker.config.settings import Config, parse_config
from phxbroker.config.table import ConfigError
from phxbroker.ops.api import ApiError, _parse_body
from phxbroker.protocol.messages import (
    EncodeError,
    Message,
    ProtocolError,
    dumps,
    loads,
    ref_problem,
)
from phxbroker.protocol.serializers import V1, V2, Serializer
from phxbroker.transport.http import BadRequest, HttpConnection, Request

REPO = Path(__file__).resolve().parent.parent


def assert_writable(serializer: Serializer, msg: Message) -> None:
    """Every encoder takes what the decoder gave, and its text output is JSON again."""
    payload = msg.payload
    attempts = [
        lambda: serializer.encode_reply(msg.join_ref, msg.ref, msg.topic, "ok", payload),
        lambda: serializer.encode_push(msg.join_ref, msg.topic, msg.event, payload),
        lambda: serializer.encode_broadcast(msg.topic, msg.event, payload),
        lambda: serializer.encode_control(msg.join_ref, msg.topic, "phx_close", {}),
    ]
    if not isinstance(payload, bytes):  # JSON values also go inside replies and status maps
        attempts += [
            lambda: serializer.encode_reply(
                msg.join_ref, msg.ref, msg.topic, "error", {"p": payload}
            ),
            lambda: serializer.encode_broadcast(msg.topic, "status", {"msgs": [payload] * 2}),
        ]
    for attempt in attempts:
        try:
            is_binary, data = attempt()
        except EncodeError:
            assert isinstance(payload, bytes) and serializer is V1
            continue
        if not is_binary:
            loads(data)


def decode_or_protocol_error(serializer: Serializer, data: bytes | str, binary: bool) -> None:
    try:
        msg = serializer.decode_binary(data) if binary else serializer.decode_text(data)
    except ProtocolError:
        return
    # Topic and event may be any JSON value (Phoenix answers those as unmatched); refs are
    # short scalars, echoed back as they came.
    assert ref_problem(msg.join_ref) is None and ref_problem(msg.ref) is None
    assert_writable(serializer, msg)


@given(frames_for(v2_frames()))
@examples(600)
def test_v2_text_decoder_raises_only_protocol_error(data: bytes | str) -> None:
    decode_or_protocol_error(V2, data, binary=False)


@given(frames_for(v1_frames()))
@examples(600)
def test_v1_text_decoder_raises_only_protocol_error(data: bytes | str) -> None:
    decode_or_protocol_error(V1, data, binary=False)


@st.composite
def binary_frames(draw) -> bytes:
    fields = [draw(st.binary(max_size=8)) for _ in range(4)]
    lengths = [len(f) for f in fields]
    if draw(st.booleans()):
        lengths = [draw(st.integers(0, 255)) for _ in range(4)]
    kind = draw(st.sampled_from([0, 0, 0, 1, 2, 255]))
    return bytes([kind, *lengths]) + b"".join(fields) + draw(st.binary(max_size=16))


@given(st.one_of(binary_frames(), st.binary(max_size=64)))
@examples(600)
def test_v2_binary_decoder_raises_only_protocol_error(data: bytes) -> None:
    decode_or_protocol_error(V2, data, binary=True)


@given(st.one_of(json_values(), mutated(json_values()), st.binary(max_size=100)))
@examples(600)
def test_loads_raises_only_value_error_and_round_trips(data: str | bytes) -> None:
    try:
        value = loads(data)
    except ValueError as exc:
        assert (
            type(exc) in (ValueError, json.JSONDecodeError)
            or "JSONDecodeError" in type(exc).__name__
        )
        return
    assert loads(dumps(value)) == value


@given(st.one_of(json_values(), mutated(json_values()), st.binary(max_size=100)))
@examples(400)
def test_the_api_body_parser_raises_only_a_400(raw: str | bytes) -> None:
    body = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    try:
        document = _parse_body(body)
    except ApiError as exc:
        assert exc.status == 400
        assert str(exc)
        return
    assert isinstance(document, dict)
    dumps(document)


# -- the HTTP request reader, over a real socket pair ---------------------------------------

TOKENS = [b"GET", b"POST", b"/", b"/socket/websocket?vsn=2.0.0", b"HTTP/1.1", b"HTTP/1.0"]
HEADER_NAMES = [b"host", b"content-length", b"transfer-encoding", b"connection", b"expect"]
HEADER_VALUES = [b"127.0.0.1", b"5", b"-1", b"99999999999", b"chunked", b"close", b"100-continue"]


@st.composite
def http_requests(draw) -> bytes:
    line = b" ".join(draw(st.lists(st.sampled_from(TOKENS) | st.binary(max_size=6), max_size=4)))
    headers = draw(
        st.lists(
            st.tuples(
                st.sampled_from(HEADER_NAMES) | st.binary(max_size=8),
                st.sampled_from(HEADER_VALUES) | st.binary(max_size=8),
            ),
            max_size=5,
        )
    )
    head = line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"
    return head + draw(st.binary(max_size=40))


async def read_one(data: bytes) -> None:
    server_sock, client_sock = socket.socketpair()
    server_sock.setblocking(False)
    try:
        client_sock.sendall(data)
        client_sock.shutdown(socket.SHUT_WR)
        conn = HttpConnection(server_sock, "fuzz", max_header_size=1024, timeout=1)
        try:
            request = await conn.read_request()
            if request is not None:
                assert isinstance(request, Request)
                body = await conn.read_body(request, 64)
                assert isinstance(body, bytes)
        except BadRequest as exc:
            # 4xx, or 501 for a transfer coding other than chunked (RFC 9112 section 6.1).
            assert 400 <= exc.status < 500 or exc.status == 501, exc.status
            assert str(exc)
    finally:
        server_sock.close()
        client_sock.close()


@given(
    st.one_of(
        http_requests(),
        mutated(st.sampled_from(["GET / HTTP/1.1\r\n\r\n"])),
        st.binary(max_size=200),
    )
)
@examples(300)
def test_the_http_reader_returns_a_request_none_or_bad_request(data: bytes) -> None:
    trio.run(read_one, data)


# -- long-poll POST bodies, through a real server ---------------------------------------------

LONGPOLL = "/socket/longpoll?vsn=2.0.0"


@pytest.fixture(scope="module")
def longpoll_broker(tmp_path_factory):
    config = {
        "server": {"check_origin": False, "max_channels": 5},
        "auth": {"allow_anonymous": True},
        "longpoll": {"max_post_size": 2048, "window_ms": 60_000},
        "topics": [
            {
                "pattern": "room:*",
                "join": "anyone",
                "presence": True,
                "relay": ["new_msg"],
                "echo": ["ping"],
                "presence_meta": ["status"],
                "presence_update": ["set_status"],
            },
            {
                "pattern": "all",
                "join": "anyone",
                "status_event": "status_users",
                "count": ["hit"],
                "history": 3,
                "relay": ["msg"],
            },
        ],
    }
    broker = BrokerProcess(config, tmp_path_factory.mktemp("longpoll-fuzz")).start()
    yield broker
    code = broker.stop()
    assert code == 0, broker.log_text
    assert "Traceback" not in broker.log_text
    assert "internal error" not in broker.log_text


class LongPollClient:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.token: str | None = None

    def request(self, method: str, target: str, body: bytes = b"", headers=None):
        try:
            self.conn.request(method, target, body=body, headers=headers or {})
            response = self.conn.getresponse()
            return response.status, response.read()
        except (http.client.HTTPException, OSError):
            self.conn.close()  # the server closed the connection: open a new one
            self.conn.request(method, target, body=body, headers=headers or {})
            response = self.conn.getresponse()
            return response.status, response.read()

    def session(self) -> str:
        if self.token is None:
            status, body = self.request("GET", LONGPOLL)
            answer = json.loads(body)
            assert (status, answer["status"]) == (200, 410)
            self.token = answer["token"]
        return self.token


line_frames = st.one_of(
    v2_frames(),
    st.sampled_from(['["1","1","room:a","phx_join",{"status":1}]', '[null,"2","all","hit",{}]']),
)
lines = st.one_of(
    line_frames.map(lambda t: t.encode("utf-8", "surrogatepass")),
    mutated(line_frames),
    binary_frames().map(base64.b64encode),
    st.binary(max_size=40),
)


@given(
    st.lists(lines, min_size=1, max_size=6),
    st.sampled_from([b"\n", b"\r\n"]),
    st.sampled_from(["application/x-ndjson", "text/plain", ""]),
)
@examples(150)
def test_longpoll_posts_get_only_documented_answers(longpoll_broker, body_lines, sep, kind):
    client = getattr(longpoll_broker, "_fuzz_client", None)
    if client is None:
        client = longpoll_broker._fuzz_client = LongPollClient(longpoll_broker.port)
    body = sep.join(body_lines)
    headers = {"content-type": kind} if kind else {}
    status, answer = client.request("POST", f"{LONGPOLL}&token={client.session()}", body, headers)
    if status == 413:
        assert len(body) > 2048
        return
    if status == 500:  # Phoenix's answer to a batched line that is neither JSON nor base64
        assert answer == b'{"errors":{"detail":"500.json"}}'
        return
    assert status == 200, (status, answer)
    outcome = json.loads(answer)["status"]
    assert outcome in (200, 408, 410), answer
    if outcome != 200:
        client.token = None  # the session ended (protocol error, or dropped as too slow)
    assert longpoll_broker.returncode is None


# -- the config loader -------------------------------------------------------------------------

EXAMPLE = tomllib.loads((REPO / "config.example.toml").read_text())


def _keys(document: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(document, dict):
        for key, value in document.items():
            found.add(key)
            found |= _keys(value)
    elif isinstance(document, list):
        for item in document:
            found |= _keys(item)
    return found


KEYS = sorted(
    _keys(EXAMPLE)
    | {
        "token",
        "token_sha256",
        "key",
        "key_sha256",
        "user",
        "name",
        "tokens",
        "keys",
        "jwt",
        "phoenix_token",
        "secret_env",
        "secret_file",
        "secret_key_base_env",
        "public_key_file",
        "algorithms",
        "tls_cert",
        "tls_key",
        "tokens_file",
        "join_reply",
        "status_fields",
    }
)
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(
        [
            "*",
            "room:*",
            "users:{user}",
            "{x}",
            "anyone",
            "self",
            "HS256",
            "none",
            "127.0.0.1:0",
            "[::1]:4000",
            "0.0.0.0:99999",
            "/socket",
            "",
            "crash",
        ]
    ),
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=4),
    ),
    max_leaves=10,
)


@st.composite
def config_documents(draw) -> dict:
    """The example config with some values replaced, keys dropped or added; or noise."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.dictionaries(st.sampled_from(KEYS), toml_values, max_size=5))
    document = json.loads(json.dumps(EXAMPLE))  # a deep copy

    def tables(node: Any) -> list[dict]:
        found = []
        if isinstance(node, dict):
            found.append(node)
            for value in node.values():
                found += tables(value)
        elif isinstance(node, list):
            for item in node:
                found += tables(item)
        return found

    for _ in range(draw(st.integers(1, 4))):
        table = draw(st.sampled_from(tables(document)))
        action = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if action == "add" or not table:
            table[draw(st.sampled_from(KEYS))] = draw(toml_values)
        elif action == "replace":
            table[draw(st.sampled_from(sorted(table)))] = draw(toml_values)
        else:
            del table[draw(st.sampled_from(sorted(table)))]
    return document


@given(config_documents())
@examples(300)
def test_the_config_loader_raises_only_config_error(tmp_path_factory, document: dict) -> None:
    try:
        text = tomli_w.dumps(document)
    except (TypeError, ValueError):
        return  # not representable as TOML (e.g. a list mixing tables and values)
    data = tomllib.loads(text)
    path = tmp_path_factory.getbasetemp() / "fuzz-config" / "phxbroker.toml"
    try:
        config = parse_config(data, path)
    except ConfigError as exc:
        assert str(exc).startswith(f"config error in {path}")
        return
    assert isinstance(config, Config)
