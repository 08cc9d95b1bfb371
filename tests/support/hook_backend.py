"""A back end for phxbroker's hooks whose answers a test controls, run in a thread.

It verifies every call's signature (with the helper an app would use), records the calls
in the order they came, and answers by the event's name:

    count       reply ok {"n": assigns.n}, assigns {"n": n + 1}
    echo        reply ok with the payload
    slow        waits until the test opens `gate`, then replies ok {"slow": true}
    noreply     "reply": null
    bcast       broadcast "news" (the payload) to the topic; reply ok
    bcast_from  the same, except the sender (broadcast_from!)
    elsewhere   broadcast "news" to the topic the payload names (Endpoint.broadcast)
    stop_close  reply ok and stop the channel ("close"); stop_error: "error"
    bye         reply ok and disconnect the socket
    bad         an answer that breaks the contract

A join is accepted with response {"joined": topic, "socket_assigns": ...} and channel
assigns {"n": 0}, pushes "welcome", and tracks presence meta {"role": "tester"}; a join
payload {"refuse": REASON} is refused with that reason. A connect is accepted as the user
its params name (assigns {"plan": "gold"}), refused for user "nobody". `/events` batches
are recorded, or answered 500 while `events_down` is set; `down` makes every call 503.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from phxbroker.hooks import backend as hooks

SECRET = "test-hook-secret-0123456789"
TIMEOUT = 10


class HookBackend:
    """The server, its record of calls, and the switches a test turns."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []
        self.gate = threading.Event()
        self.down = False
        self.events_down = False
        self._changed = threading.Condition()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                status, answer = backend.handle(self.path, dict(self.headers), body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()

    # -- what tests wait for --------------------------------------------------------------

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the hook back end never saw {what}: {self.calls}")
                self._changed.wait(left)

    def calls_of(self, kind: str) -> list[dict[str, Any]]:
        with self._changed:
            return [body for k, body in self.calls if k == kind]

    # -- answering ------------------------------------------------------------------------

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        try:
            call = hooks.verify(self.secret, headers, body)
        except hooks.HookRequestError as exc:
            return exc.status, {"error": str(exc)}
        kind = path.rsplit("/", 1)[-1]
        if self.down:
            return 503, {"error": "down"}
        if kind == "events" and self.events_down:
            return 500, {"error": "events are down"}
        with self._changed:
            self.calls.append((kind, call))
            if kind == "events":
                self.events.extend(call["events"])
            self._changed.notify_all()
        if kind == "connect":
            user = call["params"].get("user")
            if user == "nobody":
                return 200, hooks.connect_error()
            return 200, hooks.connect_ok(user, assigns={"plan": "gold"})
        if kind == "join":
            refuse = call["payload"].get("refuse") if isinstance(call["payload"], dict) else None
            if refuse:
                return 200, hooks.join_error(refuse)
            return 200, hooks.join_ok(
                {"joined": call["topic"], "socket_assigns": call["socket"]["assigns"]},
                assigns={"n": 0},
                pushes=[hooks.push("welcome", {"to": call["socket"]["user"]})],
                presence_meta={"role": "tester"},
            )
        if kind == "event":
            return 200, self.event(call)
        return 200, {"ok": True}

    def event(self, call: dict[str, Any]) -> dict[str, Any]:
        event, payload, assigns = call["event"], call["payload"], call["assigns"]
        if event == "count":
            n = assigns.get("n", 0)
            return hooks.reply_ok({"n": n}, assigns={"n": n + 1})
        if event == "echo":
            return hooks.reply_ok(payload)
        if event == "slow":
            self.gate.wait(TIMEOUT)
            return hooks.reply_ok({"slow": True})
        if event == "noreply":
            return hooks.noreply()
        if event == "bcast":
            return hooks.reply_ok({}, broadcasts=[hooks.broadcast("news", payload)])
        if event == "bcast_from":
            return hooks.reply_ok({}, broadcasts=[hooks.broadcast_from("news", payload)])
        if event == "elsewhere":
            to = payload["topic"]
            return hooks.reply_ok({}, broadcasts=[hooks.endpoint_broadcast(to, "news", payload)])
        if event in ("stop_close", "stop_error"):
            return hooks.reply_ok({}, stop=event.removeprefix("stop_"))
        if event == "bye":
            return hooks.reply_ok({}, disconnect=True)
        return {"nope": "this is not the contract"}
