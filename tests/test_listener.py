"""The listen port's promises about the sockets it accepts, checked on a real server."""

from __future__ import annotations

import socket

import trio
from support.daemon import serve
from trio_websocket import open_websocket_url

CONFIG = """
[server]
listen = "127.0.0.1:0"
[auth]
allow_anonymous = true
[[topics]]
pattern = "room:*"
join = "anyone"
"""


async def test_accepted_connections_send_without_nagles_delay() -> None:
    # Small frames (a join reply, a broadcast) must leave at once, not wait for an ACK.
    async with serve(CONFIG) as (server, port):
        url = f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0"
        async with open_websocket_url(url) as ws:
            await ws.send_message('[null,"1","phoenix","heartbeat",{}]')
            with trio.fail_after(5):
                await ws.get_message()
            (peer,) = server.websockets.live
            assert peer.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
