"""Hostile input against a real `phxbroker serve`, over real sockets: every frame or body
the server cannot take gets its documented answer on every surface (close 1011 on a
websocket, 400 with a JSON error from the API, `{"status":400}` on a long-poll POST), and
the daemon serves everyone else on as before."""

from __future__ import annotations

import http.client
import json
import socket

import pytest
from support.raw_ws import DROPPED, RawWebSocket

API_KEY = "hostile-test-api-key-0123456789"
WS = "/socket/websocket?vsn=2.0.0"
LONGPOLL = "/socket/longpoll?vsn=2.0.0"

CONFIG = {
    "server": {"check_origin": False},
    "auth": {"allow_anonymous": True},
    "api": {"keys": [{"name": "backend", "key": API_KEY}]},
    "longpoll": {"max_post_size": 4096},
    "topics": [
        {"pattern": "st:*", "join": "anyone", "status_event": "status_users", "count": ["hit"]},
        {"pattern": "room:*", "join": "anyone", "presence": True, "relay": ["msg"]},
        {"pattern": "all", "join": "anyone", "echo": ["ping"]},
    ],
}


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# Each is one text frame a client may send; none is a message the server can take.
HOSTILE_TEXT = {
    # The reproducer: it used to stop the daemon from inside the status flush.
    "lone surrogate in a status topic": '["1","1","st:\\ud800","phx_join",{}]',
    "lone surrogate in a presence topic": '["1","1","room:\\udfff","phx_join",{}]',
    "lone surrogate in a payload": '["1","1","room:a","phx_join",{"name":"\\ud800"}]',
    "join_ref beyond 64 bits": '[332390310229623818021765120,{},"all","phx_join",{}]',
    "join_ref an array of arrays": "[" + deep(200) + ',"1","all","phx_join",{}]',
    "ref an object": '["1",{"a":[]},"all","phx_join",{}]',
    "ref a boolean": '["1",true,"all","phx_join",{}]',
    "nesting 1025 deep": '["1","1","all","ping",' + deep(1025) + "]",
    "nesting 129 deep": '["1","1","all","ping",' + deep(129) + "]",
    "a number beyond the int-string limit": '["1","1","all","ping",' + "9" * 5000 + "]",
    "a number beyond a double": '["1","1","all","ping",1e400]',
    "not JSON": "[nope",
}


def request(
    port: int, method: str, target: str, body: bytes = b"", headers: dict | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def assert_serving(port: int, bystander: RawWebSocket) -> None:
    """The daemon answers HTTP and a client that did nothing wrong is untouched."""
    assert request(port, "GET", "/healthz")[0] == 200
    bystander.send_text('[null,"99","phoenix","heartbeat",{}]')
    assert next_reply(bystander, "99") == [
        None,
        "99",
        "phoenix",
        "phx_reply",
        {"status": "ok", "response": {}},
    ]


def next_reply(ws: RawWebSocket, ref: str) -> list:
    """The next message with this ref, skipping broadcasts and pushes."""
    while True:
        message = json.loads(ws.receive())
        if message[1] == ref:
            return message


def next_event(ws: RawWebSocket, event: str) -> list:
    """The next message with this event, skipping others."""
    while True:
        message = json.loads(ws.receive())
        if message[3] == event:
            return message


@pytest.fixture
def broker(broker_factory):
    return broker_factory(CONFIG)


@pytest.fixture
def bystander(broker):
    with RawWebSocket(broker.port, WS) as ws:
        ws.send_text('["1","1","st:lobby","phx_join",{}]')
        assert json.loads(ws.receive())[4]["status"] == "ok"
        yield ws


def test_every_undecodable_frame_is_closed_with_1011(broker, bystander) -> None:
    for name, frame in HOSTILE_TEXT.items():
        with RawWebSocket(broker.port, WS) as ws:
            ws.send_text(frame)
            assert ws.close_code() == 1011, name
        assert_serving(broker.port, bystander)
    assert broker.returncode is None
    assert "internal error" not in broker.log_text


def test_undecodable_binary_frames_are_closed_with_1011(broker, bystander) -> None:
    for frame in (b"\x00\x01", bytes([1, 0, 0, 1, 1]) + b"te", bytes([0, 0, 0, 1, 1, 0xFF, 0x65])):
        with RawWebSocket(broker.port, WS) as ws:
            ws.send_bytes(frame)
            assert ws.close_code() == 1011
    assert_serving(broker.port, bystander)


def test_the_api_answers_400_with_a_json_error_for_undecodable_bodies(broker, bystander) -> None:
    auth = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    bodies = {
        "nesting 1025 deep": '{"topic":"all","event":"e","payload":{"a":' + deep(1025) + "}}",
        "nesting 129 deep": '{"topic":"all","event":"e","payload":{"a":' + deep(129) + "}}",
        "a lone surrogate": '{"topic":"st:\\ud800","event":"e","payload":{}}',
        "a number beyond the int-string limit": '{"topic":"all","event":"e","payload":{"n":'
        + "9" * 5000
        + "}}",
        "invalid UTF-8": b'{"topic":"all","event":"\xff","payload":{}}',
    }
    for name, body in bodies.items():
        raw = body if isinstance(body, bytes) else body.encode()
        status, answer = request(broker.port, "POST", "/api/broadcast", raw, auth)
        assert status == 400, name
        assert "not valid JSON" in json.loads(answer)["error"], name
    status, answer = request(
        broker.port, "POST", "/api/broadcast", b'{"topic":"st:lobby","event":"news"}', auth
    )
    assert (status, json.loads(answer)) == (200, {"ok": True, "subscribers": 1})
    assert next_event(bystander, "news")[4] == {}
    assert_serving(broker.port, bystander)


def open_session(port: int) -> str:
    status, body = request(port, "GET", LONGPOLL)
    answer = json.loads(body)
    assert (status, answer["status"]) == (200, 410)
    return answer["token"]


def test_a_longpoll_post_of_an_undecodable_line_ends_its_session(broker, bystander) -> None:
    """As Phoenix's session process crashes on it: the POST is never acknowledged (408)
    and the session is gone for what comes next."""
    ndjson = {"content-type": "application/x-ndjson"}
    for name, frame in HOSTILE_TEXT.items():
        token = open_session(broker.port)
        target = f"{LONGPOLL}&token={token}"
        status, body = request(broker.port, "POST", target, frame.encode(), ndjson)
        if len(frame) > 4096:  # over max_post_size
            assert status == 413, name
            continue
        assert (status, json.loads(body)) == (200, {"status": 408}), name
        status, body = request(broker.port, "POST", target, b"[]", ndjson)
        assert json.loads(body) == {"status": 410}, name  # the session ended
    assert_serving(broker.port, bystander)


def test_a_longpoll_post_over_max_post_size_is_answered_413_not_reset(broker) -> None:
    token = open_session(broker.port)
    body = b"[" + b" " * (8 * 1024 * 1024) + b"]"  # far more than the socket buffers hold
    status, answer = request(
        broker.port, "POST", f"{LONGPOLL}&token={token}", body, {"content-type": "text/plain"}
    )
    assert status == 413
    assert b"4096" in answer


def test_a_websocket_upgrade_over_http_1_0_is_400(broker) -> None:
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
        sock.sendall(
            b"GET " + WS.encode() + b" HTTP/1.0\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 400 ") or answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"HTTP/1.1" in answer.split(b"\r\n\r\n", 1)[1]


def test_a_client_that_is_dropped_never_sees_1011_instead(broker) -> None:
    # The helper itself tells a close frame from a dropped connection.
    with RawWebSocket(broker.port, WS) as ws:
        ws.send_raw(b"\x81\x05hello")  # an unmasked client frame: a protocol violation
        assert ws.close_code() in (1002, DROPPED)
