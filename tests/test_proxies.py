"""Behind a reverse proxy on this host: limits and logs apply to the client it names."""

from __future__ import annotations

import logging

import trio
from support.daemon import serve
from trio_websocket import ConnectionRejected, open_websocket_url

CONFIG = """
[server]
listen = "127.0.0.1:0"
{proxies}
[limits]
max_connections_per_ip = 1
[[auth.tokens]]
user = "alice"
token = "alice-token"
"""

URL = "ws://127.0.0.1:{port}/socket/websocket?token=alice-token&vsn=2.0.0"


def forwarded(ip: str) -> list[tuple[str, str]]:
    return [("X-Forwarded-For", ip)]


async def test_each_forwarded_client_gets_its_own_connection_limit(caplog) -> None:
    caplog.set_level(logging.INFO, logger="phxbroker")
    async with serve(CONFIG.format(proxies="")) as (server, port):
        url = URL.format(port=port)
        async with (
            open_websocket_url(url, extra_headers=forwarded("203.0.113.7")),
            open_websocket_url(url, extra_headers=forwarded("198.51.100.2")),
        ):
            assert server.admission.connections.per_address == {"203.0.113.7": 1, "198.51.100.2": 1}
            try:
                async with open_websocket_url(url, extra_headers=forwarded("203.0.113.7")):
                    raise AssertionError("a second connection for 203.0.113.7 was accepted")
            except ConnectionRejected as exc:
                assert exc.status_code == 429
    refusals = [r.getMessage() for r in caplog.records if "refused connect" in r.getMessage()]
    assert refusals == [refusals[0]] and "from 203.0.113.7 " in refusals[0]


async def test_without_trusted_proxies_the_header_is_ignored() -> None:
    async with serve(CONFIG.format(proxies="trusted_proxies = []")) as (server, port):
        url = URL.format(port=port)
        async with open_websocket_url(url, extra_headers=forwarded("203.0.113.7")):
            assert server.admission.connections.per_address == {"127.0.0.1": 1}
            with trio.fail_after(5):
                try:
                    async with open_websocket_url(url, extra_headers=forwarded("198.51.100.2")):
                        raise AssertionError("the forged header escaped the per-address limit")
                except ConnectionRejected as exc:
                    assert exc.status_code == 429
