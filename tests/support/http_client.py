"""A minimal keep-alive HTTP/1.1 client over a real socket (h11), for in-process tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import h11
import trio

TIMEOUT = 5.0


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HttpClient:
    """One connection; requests are sent and answered one at a time."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> HttpClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        return cls(stream, f"127.0.0.1:{port}")

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stream.aclose()

    async def send_request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        if self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()
        hdrs = [("host", self.host), ("content-length", str(len(body)))]
        hdrs += list((headers or {}).items())
        data = self.h11.send(h11.Request(method=method, target=target, headers=hdrs))
        data += self.h11.send(h11.Data(data=body)) if body else b""
        data += self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def read_response(self, timeout: float = TIMEOUT) -> Response:
        status = 0
        headers: dict[str, str] = {}
        chunks: list[bytes] = []
        with trio.fail_after(timeout):
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    self.h11.receive_data(await self.stream.receive_some())
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return Response(status, headers, b"".join(chunks))
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("the server closed the connection")

    async def request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout: float = TIMEOUT,
    ) -> Response:
        await self.send_request(method, target, body, headers)
        return await self.read_response(timeout)


async def fetch(
    port: int,
    method: str,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> Response:
    """One request on a fresh connection."""
    async with await HttpClient.open(port) as client:
        return await client.request(method, target, body, headers, timeout)
