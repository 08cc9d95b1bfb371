"""Serializers: V2 JSON arrays, V1 JSON objects, V2 binary frames, vsn negotiation."""

from __future__ import annotations

import json

import pytest

from phxbroker.protocol.messages import (
    MAX_DEPTH,
    MAX_FRAME_DEPTH,
    EncodeError,
    Message,
    ProtocolError,
    RawJSON,
    dumps,
    loads,
)
from phxbroker.protocol.serializers import V1, V2, serializer_for


def test_v2_decodes_the_reference_frames() -> None:
    msg = V2.decode_text('["3","3","room:lobby","phx_join",{"name":"bob"}]')
    assert msg == Message("3", "3", "room:lobby", "phx_join", {"name": "bob"})
    heartbeat = V2.decode_text('[null,"6","phoenix","heartbeat",{}]')
    assert (heartbeat.join_ref, heartbeat.ref, heartbeat.topic) == (None, "6", "phoenix")


def test_v2_keeps_refs_exactly_as_sent_and_ignores_extra_elements() -> None:
    msg = V2.decode_text('[7, "8", "t", "e", null, "extra"]')
    assert (msg.join_ref, msg.ref, msg.payload) == (7, "8", None)


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "{}",
        '["1","2","t","e"]',
        "[NaN]",
        "",
    ],
)
def test_v2_rejects_frames_that_are_not_messages(frame: str) -> None:
    with pytest.raises(ProtocolError):
        V2.decode_text(frame)


@pytest.mark.parametrize("frame", ['[null,"1",5,"phx_join",{}]', '["1","2","t",[2],{}]'])
def test_a_topic_or_event_that_is_not_a_string_is_kept_as_sent(frame: str) -> None:
    # Phoenix decodes these; no channel has such a topic, no handler such an event.
    value = json.loads(frame)
    msg = V2.decode_text(frame)
    assert (msg.topic, msg.event) == (value[2], value[3])
    v1 = V1.decode_text(
        json.dumps(dict(zip(["join_ref", "ref", "topic", "event", "payload"], value, strict=True)))
    )
    assert (v1.topic, v1.event) == (value[2], value[3])


def test_v1_reads_a_binary_frame_as_text() -> None:
    # Phoenix's V1 serializer decodes whatever frame it gets as JSON.
    frame = b'{"topic":"room:lobby","event":"ping","payload":{},"ref":"2"}'
    assert V1.decode_binary(frame) == V1.decode_text(frame)
    with pytest.raises(ProtocolError):
        V1.decode_binary(b"\x00\x01\x01\x0a\x04")


def test_v2_encodes_replies_pushes_broadcasts_and_controls() -> None:
    assert json.loads(V2.encode_reply("3", "4", "room:lobby", "ok", {"id": 1})[1]) == [
        "3",
        "4",
        "room:lobby",
        "phx_reply",
        {"status": "ok", "response": {"id": 1}},
    ]
    assert json.loads(V2.encode_push("3", "room:lobby", "presence_state", {})[1]) == [
        "3",
        None,
        "room:lobby",
        "presence_state",
        {},
    ]
    assert json.loads(V2.encode_broadcast("room:lobby", "new_msg", {"body": "hi"})[1]) == [
        None,
        None,
        "room:lobby",
        "new_msg",
        {"body": "hi"},
    ]
    assert json.loads(V2.encode_control("3", "room:lobby", "phx_close", {})[1]) == [
        "3",
        "3",
        "room:lobby",
        "phx_close",
        {},
    ]


def test_v2_binary_push_from_client_matches_the_reference_bytes() -> None:
    frame = bytes.fromhex("0001010a043134726f6f6d3a6c6f62627966696c65010203")
    msg = V2.decode_binary(frame)
    assert msg == Message("1", "4", "room:lobby", "file", b"\x01\x02\x03")


def test_v2_binary_server_frames_match_the_reference_bytes() -> None:
    push = V2.encode_push("12", "room:lobby", "blob", b"\xde\xad\xbe\xef")
    assert push == (True, bytes.fromhex("00020a043132726f6f6d3a6c6f626279626c6f62deadbeef"))
    reply = V2.encode_reply("12", "13", "room:lobby", "ok", b"\x01\x02")
    assert reply == (True, bytes.fromhex("0102020a0231323133726f6f6d3a6c6f6262796f6b0102"))
    broadcast = V2.encode_broadcast("room:lobby", "blob", b"\xff")
    assert broadcast == (True, bytes.fromhex("020a04726f6f6d3a6c6f626279626c6f62ff"))


def test_v2_binary_roundtrip_with_null_refs() -> None:
    frame = bytes([0, 0, 0, 1, 1]) + b"te" + b"\x00"
    assert V2.decode_binary(frame) == Message(None, None, "t", "e", b"\x00")


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00\x01",
        bytes([1, 0, 0, 1, 1]) + b"te",
        bytes([0, 9, 0, 1, 1]) + b"te",
        bytes([0, 0, 0, 1, 1]) + b"\xff" + b"e",
    ],
)
def test_v2_rejects_bad_binary_frames(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        V2.decode_binary(frame)


def test_binary_fields_longer_than_255_bytes_cannot_be_encoded() -> None:
    with pytest.raises(EncodeError):
        V2.encode_broadcast("t" * 256, "e", b"x")


def test_v1_decodes_objects_and_requires_its_four_keys() -> None:
    msg = V1.decode_text('{"topic":"room:lobby","event":"phx_join","payload":{},"ref":"1"}')
    assert msg == Message(None, "1", "room:lobby", "phx_join", {})
    with_join_ref = V1.decode_text('{"topic":"t","event":"e","payload":1,"ref":"2","join_ref":"1"}')
    assert with_join_ref.join_ref == "1"
    with pytest.raises(ProtocolError):
        V1.decode_text('{"topic":"t","event":"e","ref":"1"}')
    with pytest.raises(ProtocolError):
        V1.decode_text('[null,"1","phoenix","heartbeat",{}]')
    with pytest.raises(ProtocolError):
        V1.decode_binary(b"\x00\x01\x01\x01\x01abcd")


def test_v1_encodes_without_join_ref() -> None:
    reply = json.loads(V1.encode_reply("1", "2", "t", "ok", {})[1])
    assert reply == {
        "topic": "t",
        "event": "phx_reply",
        "ref": "2",
        "payload": {"status": "ok", "response": {}},
    }
    close = json.loads(V1.encode_control("1", "t", "phx_close", {})[1])
    assert close == {"topic": "t", "event": "phx_close", "payload": {}, "ref": "1"}
    assert json.loads(V1.encode_broadcast("t", "e", {"a": 1})[1])["ref"] is None
    with pytest.raises(EncodeError):
        V1.encode_broadcast("t", "e", b"binary")


def test_big_integers_and_unicode_survive_a_round_trip() -> None:
    msg = V2.decode_text('[null,"1","t","e",{"n":123456789012345678901234567890,"s":"zoë ☃"}]')
    assert msg.payload["n"] == 123456789012345678901234567890
    encoded = V2.encode_broadcast("t", "e", msg.payload)[1]
    assert loads(encoded)[4] == msg.payload


def test_raw_json_payloads_are_spliced_not_reencoded() -> None:
    data = V2.encode_push("1", "t", "presence_state", RawJSON(b'{"a":{"metas":[]}}'))[1]
    assert data == b'["1",null,"t","presence_state",{"a":{"metas":[]}}]'


@pytest.mark.parametrize(
    ("vsn", "expected"),
    [
        (None, V1),
        ("1.0.0", V1),
        ("1.0.7", V1),
        ("2.0.0", V2),
        ("2.0.1", V2),
        ("2.1.0", None),
        ("3.0.0", None),
        ("2.0", None),
        ("2", None),
        ("", None),
        ("2.0.0-rc.1", None),
        ("v2.0.0", None),
    ],
)
def test_vsn_negotiation_follows_phoenix_requirements(vsn, expected) -> None:
    assert serializer_for(vsn) is expected


# -- what the server could not write back is refused where it is decoded -------------------

LONE = "\\ud800"  # a lone surrogate, as a JSON escape


def v2_frame(
    join_ref: str = '"1"',
    ref: str = '"1"',
    topic: str = '"t"',
    event: str = '"e"',
    payload: str = "{}",
) -> str:
    return f"[{join_ref},{ref},{topic},{event},{payload}]"


def v1_frame(
    join_ref: str = '"1"',
    ref: str = '"1"',
    topic: str = '"t"',
    event: str = '"e"',
    payload: str = "{}",
) -> str:
    return (
        f'{{"join_ref":{join_ref},"ref":{ref},"topic":{topic},"event":{event},"payload":{payload}}}'
    )


@pytest.mark.parametrize("build", [v2_frame, v1_frame], ids=["v2", "v1"])
@pytest.mark.parametrize("field", ["join_ref", "ref", "topic", "event", "payload"])
def test_a_lone_surrogate_anywhere_is_a_protocol_error(build, field) -> None:
    value = f'{{"k":[1,"a{LONE}"]}}' if field == "payload" else f'"st:{LONE}"'
    serializer = V2 if build is v2_frame else V1
    with pytest.raises(ProtocolError):
        serializer.decode_text(build(**{field: value}))
    # Also where the stdlib reads the document (a long number elsewhere in it).
    with pytest.raises(ProtocolError):
        serializer.decode_text(build(**{field: value}).replace("{}", '{"n":12345678901234567890}'))


def test_a_surrogate_pair_is_a_character_and_accepted() -> None:
    msg = V2.decode_text(v2_frame(topic='"room:\\ud83d\\ude00"'))
    assert msg.topic == "room:\U0001f600"


@pytest.mark.parametrize(
    "ref",
    [
        "[]",
        "[[],[]]",
        "{}",
        '{"a":1}',
        "true",
        "false",
        "1.5",
        "1e3",
        "332390310229623818021765120",
        str(2**64),
        str(-(2**63) - 1),
        '"' + "x" * 256 + '"',
        '"' + "é" * 128 + '"',  # 256 UTF-8 bytes
    ],
)
@pytest.mark.parametrize("field", ["join_ref", "ref"])
@pytest.mark.parametrize("build", [v2_frame, v1_frame], ids=["v2", "v1"])
def test_refs_that_are_not_short_scalars_are_protocol_errors(build, field, ref) -> None:
    serializer = V2 if build is v2_frame else V1
    with pytest.raises(ProtocolError, match=field):
        serializer.decode_text(build(**{field: ref}))


@pytest.mark.parametrize(
    ("ref", "value"),
    [
        ("null", None),
        ('"3"', "3"),
        ('"' + "x" * 255 + '"', "x" * 255),
        ('"' + "é" * 127 + '"', "é" * 127),
        ("0", 0),
        (str(2**64 - 1), 2**64 - 1),
        (str(-(2**63)), -(2**63)),
    ],
)
@pytest.mark.parametrize("build", [v2_frame, v1_frame], ids=["v2", "v1"])
def test_short_scalar_refs_are_kept_as_sent(build, ref, value) -> None:
    serializer = V2 if build is v2_frame else V1
    msg = serializer.decode_text(build(join_ref=ref, ref=ref))
    assert msg.join_ref == value
    assert msg.ref == value
    # ...and written back exactly.
    assert loads(serializer.encode_reply(value, value, "t", "ok", {})[1]) is not None
    assert serializer.encode_control(value, "t", "phx_close", {})[1].count(dumps(value)) == (
        1 if serializer is V1 else 2
    )


def test_binary_frames_carry_the_same_kind_of_refs() -> None:
    longest = "é" * 127  # 254 bytes: the header's one-byte lengths bound every field
    raw = longest.encode()
    frame = bytes([0, len(raw), len(raw), 1, 1]) + raw + raw + b"te" + b"\x01"
    msg = V2.decode_binary(frame)
    assert (msg.join_ref, msg.ref) == (longest, longest)
    assert V2.decode_text(v2_frame(join_ref=dumps(longest).decode())).join_ref == longest


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [MAX_FRAME_DEPTH + 1, MAX_DEPTH + 1, 300, 1024, 1025, 5000])
def test_deep_nesting_is_a_protocol_error_not_a_recursion_error(depth: int) -> None:
    # The payload sits one level inside the frame's array.
    with pytest.raises(ProtocolError):
        V2.decode_text(v2_frame(payload=nested(depth - 1)))
    with pytest.raises(ProtocolError):
        V1.decode_text(v1_frame(payload=nested(depth - 1)))
    if depth > MAX_DEPTH:
        with pytest.raises(ValueError):
            loads(nested(depth))
    else:
        assert loads(nested(depth))  # other JSON (API bodies) may nest up to MAX_DEPTH


def test_nesting_up_to_the_limit_is_accepted_and_written_back_readable() -> None:
    # With a big integer inside, so that the exact (stdlib) reading is taken too.
    depth = MAX_FRAME_DEPTH - 1  # the payload's own levels
    payload = "[" * depth + "123456789012345678901234567890" + "]" * depth
    msg = V2.decode_text(v2_frame(payload=payload))
    meta = f'{{"status":{payload}}}'
    for encoded in (
        V2.encode_reply("1", "1", "t", "ok", msg.payload),
        V1.encode_reply("1", "1", "t", "ok", msg.payload),
        V2.encode_broadcast("t", "e", {"msgs": [msg.payload]}),
        # The deepest the server goes: a presence meta value inside a presence_diff.
        V1.encode_broadcast(
            "t", "presence_diff", {"joins": {"u": {"metas": [loads(meta)]}}, "leaves": {}}
        ),
    ):
        assert payload.encode() in encoded[1]
        loads(encoded[1])  # the server's own output is readable JSON again


@pytest.mark.parametrize(
    "payload",
    [
        "1" * 5000,  # beyond Python's int-string limit
        "-" + "9" * 400,  # beyond a double
        "1e400",
        "-1e400",
        "NaN",
        "Infinity",
    ],
)
def test_numbers_that_cannot_be_written_back_are_protocol_errors(payload: str) -> None:
    with pytest.raises(ProtocolError):
        V2.decode_text(v2_frame(payload=payload))
    with pytest.raises(ValueError):
        loads(payload)


@pytest.mark.parametrize(
    "raw",
    [
        b'["1","1","t","e","\xff"]',
        b'["1","1","t","e","\xed\xa0\x80"]',  # a surrogate encoded as UTF-8
        b'\xef\xbb\xbf["1","1","t","e",{}]',  # a byte order mark
        b'["1","1","t","e",{}]\x00',
    ],
)
def test_bytes_that_are_not_utf8_json_are_protocol_errors(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        V2.decode_text(raw)
    with pytest.raises(ValueError):
        loads(raw)


def test_loads_refuses_text_with_a_lone_surrogate_character() -> None:
    with pytest.raises(ValueError):
        loads('["\ud800"]')


def test_dumps_never_raises_for_server_values() -> None:
    big = 123456789012345678901234567890
    value = [RawJSON(b'{"a":1}'), big, {"s": "x\ud800", "t": (1, 2)}, 1.5, None, True]
    assert (
        dumps(value)
        == b'[{"a":1},123456789012345678901234567890,{"s":"x\\ud800","t":[1,2]},1.5,null,true]'
    )
    # A status map whose history holds a big integer, spliced into a push envelope.
    status = dumps({"msgs": [{"n": big}]})
    assert V2.encode_push("1", "t", "status", RawJSON(status))[1] == (
        b'["1",null,"t","status",{"msgs":[{"n":123456789012345678901234567890}]}]'
    )
