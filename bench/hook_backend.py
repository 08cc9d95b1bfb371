"""A fast, trivial back end for the hooks benchmark: answers every hook call at once.

`python bench/hook_backend.py --port 0` prints `listening on PORT`. Joins and connects are
accepted, every event is answered `{"reply": {"status": "ok", "response": {}}}`, lifecycle
batches are taken. Signatures are not checked (the point is to measure phxbroker, not
HMAC in this process). On SIGTERM it prints one JSON line: calls answered by kind and the
time it spent answering them (its own service time, to subtract from what clients see).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

import h11
import trio

ANSWERS = {
    "/hooks/join": b'{"status":"ok","response":{}}',
    "/hooks/connect": b'{"status":"ok"}',
    "/hooks/event": b'{"reply":{"status":"ok","response":{}}}',
    "/hooks/events": b"{}",
}


class Backend:
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.busy_s = 0.0

    async def serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        path = ""
        started = 0.0
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    started = time.perf_counter()
                    path = event.target.decode()
                elif isinstance(event, h11.EndOfMessage):
                    body = ANSWERS.get(path, b"{}")
                    head = h11.Response(
                        status_code=200,
                        headers=[
                            ("content-type", "application/json"),
                            ("content-length", str(len(body))),
                        ],
                    )
                    out = conn.send(head) + conn.send(h11.Data(data=body))
                    out += conn.send(h11.EndOfMessage())
                    self.calls[path] = self.calls.get(path, 0) + 1
                    self.busy_s += time.perf_counter() - started
                    await stream.send_all(out)
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            return


async def main(port: int) -> None:
    backend = Backend()
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    print(f"listening on {listeners[0].socket.getsockname()[1]}", flush=True)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, backend.serve, listeners)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    print(json.dumps({"calls": backend.calls, "busy_s": round(backend.busy_s, 6)}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    trio.run(main, parser.parse_args().port)
    sys.exit(0)
