"""The back-end helper for phxbroker's hooks: signatures it accepts and refuses, and the
answers its builders make (the shapes the module docstring documents)."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from phxbroker.hooks import backend as hooks

SECRET = "hook-secret-for-tests"
NOW = 1_800_000_000
BODY = json.dumps({"topic": "boards:1", "payload": {"list": {"name": "To do"}}}).encode()


def signed(body: bytes = BODY, secret: str | list[str] = SECRET, stamp: int = NOW):
    return hooks.sign(secret, stamp, body, request_id="req-1")


def test_sign_makes_the_documented_headers():
    headers = signed()
    expected = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert headers == {
        "Content-Type": "application/json",
        "X-Phxbroker-Timestamp": str(NOW),
        "X-Phxbroker-Signature": f"v1={expected}",
        "X-Phxbroker-Request-Id": "req-1",
    }


def test_sign_without_a_request_id_makes_a_fresh_one_each_time():
    first = hooks.sign(SECRET, NOW, BODY)["X-Phxbroker-Request-Id"]
    second = hooks.sign(SECRET, NOW, BODY)["X-Phxbroker-Request-Id"]
    assert first and second and first != second


def test_a_signed_call_is_accepted_and_decoded():
    assert hooks.check_signature(SECRET, signed(), BODY, now=NOW) == "req-1"
    assert hooks.verify(SECRET, signed(), BODY, now=NOW) == json.loads(BODY)


@pytest.mark.parametrize(
    "headers",
    [
        {name.lower(): value for name, value in signed().items()},
        {name.upper(): value for name, value in signed().items()},
        {"HTTP_" + name.upper().replace("-", "_"): value for name, value in signed().items()},
    ],
    ids=["lowercase", "uppercase", "wsgi-environ"],
)
def test_header_names_are_found_in_any_case(headers):
    assert hooks.verify(SECRET, headers, BODY, now=NOW)["topic"] == "boards:1"


def test_a_tampered_body_is_refused():
    tampered = BODY.replace(b"To do", b"To da")
    with pytest.raises(hooks.HookSignatureError, match="matches no signing secret") as caught:
        hooks.verify(SECRET, signed(), tampered, now=NOW)
    assert caught.value.status == 401


def test_a_wrong_secret_is_refused():
    with pytest.raises(hooks.HookSignatureError, match="matches no signing secret"):
        hooks.verify("another-secret", signed(), BODY, now=NOW)


def test_a_tampered_timestamp_is_refused():
    headers = {**signed(), "X-Phxbroker-Timestamp": str(NOW + 1)}
    with pytest.raises(hooks.HookSignatureError, match="matches no signing secret"):
        hooks.verify(SECRET, headers, BODY, now=NOW)


@pytest.mark.parametrize(
    ("stamp", "message"),
    [
        (NOW - 301, r"is 301 s old, beyond the 300 s tolerance"),
        (NOW + 301, r"is 301 s in the future, beyond the 300 s tolerance"),
    ],
)
def test_a_stale_or_future_timestamp_is_refused(stamp, message):
    with pytest.raises(hooks.HookSignatureError, match=message):
        hooks.verify(SECRET, signed(stamp=stamp), BODY, now=NOW)


def test_the_tolerance_is_inclusive_and_configurable():
    assert hooks.verify(SECRET, signed(stamp=NOW - 300), BODY, now=NOW)
    assert hooks.verify(SECRET, signed(stamp=NOW + 300), BODY, now=NOW)
    with pytest.raises(hooks.HookSignatureError, match="beyond the 5 s tolerance"):
        hooks.verify(SECRET, signed(stamp=NOW - 6), BODY, now=NOW, tolerance=5)


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("X-Phxbroker-Timestamp", "the X-Phxbroker-Timestamp header is missing"),
        ("X-Phxbroker-Signature", "the X-Phxbroker-Signature header is missing"),
    ],
)
def test_a_missing_header_is_refused(missing, message):
    headers = {name: value for name, value in signed().items() if name != missing}
    with pytest.raises(hooks.HookSignatureError, match=message):
        hooks.verify(SECRET, headers, BODY, now=NOW)


def test_a_missing_request_id_is_not_a_refusal():
    headers = {k: v for k, v in signed().items() if k != "X-Phxbroker-Request-Id"}
    assert hooks.check_signature(SECRET, headers, BODY, now=NOW) == ""


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("X-Phxbroker-Timestamp", "soon", "'soon' is not a Unix time in seconds"),
        ("X-Phxbroker-Timestamp", "-5", "'-5' is not a Unix time in seconds"),
        ("X-Phxbroker-Timestamp", "1.5e9", "is not a Unix time in seconds"),
        ("X-Phxbroker-Signature", "sha256=abc", "has no v1= signature"),
        ("X-Phxbroker-Signature", "", "has no v1= signature"),
        ("X-Phxbroker-Signature", "v1=", "matches no signing secret"),
        ("X-Phxbroker-Signature", "v1=zz", "matches no signing secret"),
    ],
)
def test_malformed_headers_are_refused_in_one_sentence(field, value, message):
    headers = {**signed(), field: value}
    with pytest.raises(hooks.HookSignatureError, match=message) as caught:
        hooks.verify(SECRET, headers, BODY, now=NOW)
    assert "\n" not in str(caught.value)


def test_rotation_the_broker_signs_with_old_and_new_secrets():
    headers = signed(secret=["new-secret", "old-secret"])
    values = headers["X-Phxbroker-Signature"].split(",")
    assert len(values) == 2 and all(value.startswith("v1=") for value in values)
    # A back end still on the old secret, and one already on the new, both accept it.
    assert hooks.verify("old-secret", headers, BODY, now=NOW)
    assert hooks.verify("new-secret", headers, BODY, now=NOW)
    assert hooks.verify(["new-secret", "old-secret"], headers, BODY, now=NOW)
    with pytest.raises(hooks.HookSignatureError):
        hooks.verify("third-secret", headers, BODY, now=NOW)


def test_rotation_the_back_end_accepts_either_of_its_secrets():
    assert hooks.verify(["new-secret", SECRET], signed(), BODY, now=NOW)
    with pytest.raises(hooks.HookSignatureError):
        hooks.verify(["new-secret", "older"], signed(), BODY, now=NOW)


def test_unknown_schemes_and_spaces_beside_v1_are_tolerated():
    good = signed()["X-Phxbroker-Signature"]
    headers = {**signed(), "X-Phxbroker-Signature": f"v0=deadbeef, {good} ,v2=cafe"}
    assert hooks.verify(SECRET, headers, BODY, now=NOW)


def test_a_body_that_is_not_a_json_object_is_a_400():
    for body, message in [(b"{not json", "is not JSON"), (b"[1, 2]", "is a JSON list")]:
        with pytest.raises(hooks.HookRequestError, match=message) as caught:
            hooks.verify(SECRET, signed(body), body, now=NOW)
        assert caught.value.status == 400
        assert not isinstance(caught.value, hooks.HookSignatureError)


def test_an_empty_secret_is_a_programming_error():
    with pytest.raises(ValueError, match="non-empty"):
        hooks.sign("", NOW, BODY)


# -- answers ----------------------------------------------------------------------------


def roundtrip(answer):
    """What the broker reads: the answer after JSON encoding."""
    return json.loads(json.dumps(answer))


def test_connect_answers():
    assert roundtrip(hooks.connect_ok(1, {"current_user": {"id": 1}})) == {
        "status": "ok",
        "user": "1",
        "assigns": {"current_user": {"id": 1}},
    }
    assert hooks.connect_ok("1", socket_id="users_socket:1")["id"] == "users_socket:1"
    assert hooks.connect_ok(None)["user"] is None
    assert hooks.connect_error() == {"status": "error"}


def test_join_ok_with_every_effect():
    answer = hooks.join_ok(
        {"board": {"id": "1-welcome"}},
        assigns={"board_id": 1},
        pushes=[hooks.push("presence_hint", {"n": 1})],
        broadcasts=[hooks.broadcast("user:joined", {"users": [1]})],
        presence_meta={"online_at": "1"},
    )
    assert roundtrip(answer) == {
        "status": "ok",
        "response": {"board": {"id": "1-welcome"}},
        "assigns": {"board_id": 1},
        "push": [{"event": "presence_hint", "payload": {"n": 1}}],
        "broadcast": [{"event": "user:joined", "payload": {"users": [1]}}],
        "presence": {"meta": {"online_at": "1"}},
    }


def test_join_ok_plain_keeps_assigns_absent():
    assert hooks.join_ok() == {"status": "ok", "response": {}, "push": [], "broadcast": []}


def test_join_error_with_a_reason_or_a_whole_response():
    assert hooks.join_error("Invalid user") == {
        "status": "error",
        "response": {"reason": "Invalid user"},
    }
    assert hooks.join_error()["response"] == {"reason": "unauthorized"}
    assert hooks.join_error({"reason": "full", "max": 10})["response"] == {
        "reason": "full",
        "max": 10,
    }


def test_event_answers():
    assert hooks.reply_ok({"id": 7}) == {
        "reply": {"status": "ok", "response": {"id": 7}},
        "push": [],
        "broadcast": [],
        "stop": None,
    }
    assert hooks.reply_error({"error": "Error creating list"})["reply"] == {
        "status": "error",
        "response": {"error": "Error creating list"},
    }
    assert hooks.reply_error("nope")["reply"]["response"] == {"reason": "nope"}
    assert hooks.noreply() == {"reply": None, "push": [], "broadcast": [], "stop": None}


def test_event_answer_effects():
    answer = hooks.noreply(
        assigns={"count": 2},
        pushes=[hooks.push("ack")],
        broadcasts=[
            hooks.broadcast("list:created", {"list": {"id": 3}}),
            hooks.broadcast_from("typing", {"user": 1}),
            hooks.endpoint_broadcast("users:2", "boards:add", {"board": {}}),
        ],
        stop="close",
        disconnect=True,
    )
    assert roundtrip(answer) == {
        "reply": None,
        "assigns": {"count": 2},
        "push": [{"event": "ack", "payload": {}}],
        "broadcast": [
            {"event": "list:created", "payload": {"list": {"id": 3}}},
            {"event": "typing", "payload": {"user": 1}, "except_self": True},
            {"event": "boards:add", "payload": {"board": {}}, "topic": "users:2"},
        ],
        "stop": "close",
        "disconnect": True,
    }
    assert hooks.reply_ok(stop="error")["stop"] == "error"


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: hooks.noreply(stop="crash"), ValueError, "stop must be None, 'close' or 'error'"),
        (lambda: hooks.push(""), ValueError, "an event name must be a non-empty string"),
        (lambda: hooks.push("x", [1]), TypeError, "a payload must be a mapping"),
        (lambda: hooks.reply_ok([1]), TypeError, "a response must be a mapping"),
        (lambda: hooks.broadcast("x", topic=""), ValueError, "topic must be a non-empty"),
        (lambda: hooks.noreply(pushes=["x"]), TypeError, "each push must be built with push"),
        (lambda: hooks.join_ok(assigns=3), TypeError, "assigns must be a mapping"),
    ],
)
def test_builders_refuse_what_the_contract_cannot_carry(build, error, message):
    with pytest.raises(error, match=message):
        build()
