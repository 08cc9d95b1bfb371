"""Serializers: V2 JSON arrays, V1 JSON objects, V2 binary frames, vsn negotiation."""

from __future__ import annotations

import json

import pytest

from phxbroker.protocol.messages import EncodeError, Message, ProtocolError, RawJSON, loads
from phxbroker.protocol.serializers import V1, V2, serializer_for


def test_v2_decodes_the_reference_frames() -> None:
    msg = V2.decode_text('["3","3","room:lobby","phx_join",{"name":"bob"}]')
    assert msg == Message("3", "3", "room:lobby", "phx_join", {"name": "bob"})
    heartbeat = V2.decode_text('[null,"6","phoenix","heartbeat",{}]')
    assert (heartbeat.join_ref, heartbeat.ref, heartbeat.topic) == (None, "6", "phoenix")


def test_v2_keeps_refs_exactly_as_sent_and_ignores_extra_elements() -> None:
    msg = V2.decode_text('[7, 8.5, "t", "e", null, "extra"]')
    assert (msg.join_ref, msg.ref, msg.payload) == (7, 8.5, None)


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
