"""A client that floods the server with frames is closed with 1008 and never starves the
others: pings, endless continuation frames, and the frame budget with message limits off."""

from __future__ import annotations

import os

import trio
from support.daemon import serve
from support.http_client import fetch
from support.websocket_client import TIMEOUT, RawWebSocket, masked_frame, roundtrip_ok
from wsproto.events import CloseConnection

CONFIG = """
[server]
listen = "127.0.0.1:0"
[[auth.tokens]]
user = "alice"
token = "alice-token"
[[auth.tokens]]
user = "bob"
token = "bob-token"
[[topics]]
pattern = "room:*"
[limits]
message_rate = 0  # messages unmetered: the frame budget alone must hold
{limits}
"""

PING = masked_frame(0x9, b"")
TEXT_OPENED = bytes([0x01, 0x80]) + os.urandom(4)  # a text frame, not final, empty
CONTINUATION = bytes([0x00, 0x80]) + os.urandom(4)  # continuation, not final, empty


async def flood_until_closed(raw: RawWebSocket, burst: bytes) -> int:
    """Send `burst` again and again, reading what comes back, until the server's close
    frame arrives; returns its code."""
    async with trio.open_nursery() as nursery:

        async def keep_sending() -> None:
            try:
                while True:
                    await raw.send_raw(burst)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

        nursery.start_soon(keep_sending)
        with trio.fail_after(TIMEOUT * 4):
            while True:
                event = await raw.next_event()
                if isinstance(event, CloseConnection):
                    nursery.cancel_scope.cancel()
                    return event.code


async def test_a_ping_flood_is_closed_with_1008_while_others_are_served() -> None:
    async with serve(CONFIG.format(limits="")) as (server, port):
        flooder = await RawWebSocket.connect(port)
        served_meanwhile = trio.Event()

        async def the_others() -> None:
            await roundtrip_ok(port)
            response = await fetch(port, "GET", "/healthz")
            assert response.status == 200
            served_meanwhile.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(the_others)
            assert await flood_until_closed(flooder, PING * 4096) == 1008
        assert served_meanwhile.is_set()
        assert server.stats.refusals["frame_flood"] == 1
        await roundtrip_ok(port)


async def test_endless_continuation_frames_are_closed_with_1008() -> None:
    async with serve(CONFIG.format(limits="")) as (server, port):
        flooder = await RawWebSocket.connect(port)
        await flooder.send_raw(TEXT_OPENED)
        assert await flood_until_closed(flooder, CONTINUATION * 4096) == 1008
        assert server.stats.refusals["frame_flood"] == 1
        await roundtrip_ok(port)


async def test_the_fragment_cap_holds_with_the_frame_budget_off() -> None:
    limits = "frame_rate = 0\nmax_fragments = 16"
    async with serve(CONFIG.format(limits=limits)) as (server, port):
        flooder = await RawWebSocket.connect(port)
        await flooder.send_raw(TEXT_OPENED)
        assert await flood_until_closed(flooder, CONTINUATION * 64) == 1008
        assert server.stats.refusals["frame_flood"] == 1


async def test_a_message_in_a_few_fragments_is_still_a_message() -> None:
    async with serve(CONFIG.format(limits="max_fragments = 16")) as (_server, port):
        raw = await RawWebSocket.connect(port)
        text = b'[null,"1","phoenix","heartbeat",{}]'
        pieces = [text[i : i + 4] for i in range(0, len(text), 4)]  # 9 frames
        mask = os.urandom(4)
        for index, piece in enumerate(pieces):
            opcode = 0x1 if index == 0 else 0x0
            final = 0x80 if index == len(pieces) - 1 else 0
            body = bytes(b ^ mask[i % 4] for i, b in enumerate(piece))
            await raw.send_raw(bytes([final | opcode, 0x80 | len(piece)]) + mask + body)
        reply = await raw.next_event()
        assert reply.data == '[null,"1","phoenix","phx_reply",{"status":"ok","response":{}}]'


async def test_what_a_client_sends_after_we_closed_it_is_not_parsed() -> None:
    limits = """
message_rate = 1
message_burst = 1
rate_limit_close_after = 1
frame_rate = 100
frame_burst = 50
"""
    config = CONFIG.replace(
        "message_rate = 0  # messages unmetered: the frame budget alone must hold\n", ""
    )
    async with serve(config.format(limits=limits)) as (server, port):
        raw = await RawWebSocket.connect(port)
        push = masked_frame(0x1, b'["1","1","room:a","hi",{}]')
        # The third push is the second refused in a row: the server closes with 1008. The
        # pings behind it in the same write would spend the frame budget (50) if parsed.
        await raw.send_raw(push * 3 + PING * 200)
        with trio.fail_after(TIMEOUT):
            while not isinstance(event := await raw.next_event(), CloseConnection):
                pass
        assert event.code == 1008
        assert server.stats.refusals["rate_limit_close"] == 1
        assert server.stats.refusals.get("frame_flood", 0) == 0
        await roundtrip_ok(port)
