"""Replay the golden transcripts captured from a real Phoenix server against phxbroker.

Each transcript line is either a client action (a frame sent, a close, an HTTP request) or
an expectation (a frame or close the server sent, an HTTP response). Actions are performed
in order; for each expectation the named client's next frame is read and compared with the
captured one after masking the fields the transcripts' README lists as varying. Frames of
different clients are compared per client, since their relative order varies.

A client's Close frame is written as captured (any code, none, or a reason that is not
UTF-8) and the client then holds its TCP connection open, as a browser waits for the server
to close it: what the server does on the Close frame itself is what is compared.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
)

from support.websocket_client import masked_frame

TRANSCRIPTS = Path(
    os.environ.get("PHXBROKER_TRANSCRIPTS", Path(__file__).parents[1] / "golden" / "transcripts")
)
FRAME_TIMEOUT = 5.0

MASK = "<varies>"


def load(name: str) -> list[dict[str, Any]]:
    with open(TRANSCRIPTS / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def mask(value: Any, *, hits: bool = False) -> Any:
    """Replace per-run values: presence phx_ref/online_at, and the global hit counter."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in ("phx_ref", "phx_ref_prev", "online_at") or (hits and k == "hits"):
                out[k] = MASK
            else:
                out[k] = mask(v, hits=hits)
        return out
    if isinstance(value, list):
        return [mask(v, hits=hits) for v in value]
    return value


@dataclass
class Client:
    name: str
    ws: WebSocketConnection
    stream: trio.SocketStream
    v1: bool
    closed: tuple[int | None, str] | None = None
    refs: int = 0
    frame_timeout: float = FRAME_TIMEOUT

    async def next_frame(self) -> tuple[str, Any]:
        """('text'|'binary', data) or ('close', code) for the next thing the server sent."""
        try:
            with trio.fail_after(self.frame_timeout):
                msg = await self.ws.get_message()
        except ConnectionClosed as exc:
            return "close", exc.reason.code
        except trio.TooSlowError:
            raise AssertionError(
                f"client {self.name}: the server sent nothing for {self.frame_timeout} s"
            ) from None
        if isinstance(msg, bytes):
            return "binary", msg
        return "text", msg

    async def barrier(self) -> None:
        """A heartbeat round-trip: proves the server sent nothing unexpected before it."""
        self.refs += 1
        ref = f"barrier-{self.refs}"
        if self.v1:
            frame = json.dumps(
                {"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": ref}
            )
        else:
            frame = json.dumps([None, ref, "phoenix", "heartbeat", {}])
        await self.ws.send_message(frame)
        kind, data = await self.next_frame()
        assert kind == "text", f"client {self.name}: expected the barrier reply, got {kind}"
        value = json.loads(data)
        got_ref = value.get("ref") if isinstance(value, dict) else value[1]
        assert got_ref == ref, f"client {self.name}: unexpected frame before barrier: {data}"

    async def send_close(self, frame: dict[str, Any]) -> None:
        """Write the captured Close frame ({"code": N or null, "reason": text, or
        "reason_base64": raw bytes}) and keep the TCP connection open."""
        code = frame.get("code")
        if "reason_base64" in frame:
            reason = base64.b64decode(frame["reason_base64"])
        else:
            reason = frame.get("reason", "").encode()
        payload = b"" if code is None else struct.pack("!H", code) + reason
        await self.stream.send_all(masked_frame(0x8, payload))
        self.closed = (code, "")


@dataclass
class Replay:
    port: int
    scenario: str
    clients: dict[str, Client] = field(default_factory=dict)
    skip_events: frozenset[str] = frozenset()
    pending_handshake: str | None = None
    # Long-poll session tokens: the captured server's -> ours, substituted into requests.
    session_tokens: dict[str, str] = field(default_factory=dict)
    # Sent with every captured HTTP request (the capture's API had no authentication).
    http_headers: list[tuple[str, str]] = field(default_factory=list)
    # Response fields phxbroker adds to the captured JSON bodies; each response with them
    # is kept in `http_bodies` for the test to check.
    http_extra_fields: frozenset[str] = frozenset()
    http_bodies: list[dict[str, Any]] = field(default_factory=list)
    # Compare each run of presence frames by the state phoenix.js ends up with rather than
    # frame by frame: for captures where two joins raced (see the transcripts' README).
    settle_presence: bool = False
    # How long a client waits for each frame the transcript expects.
    frame_timeout: float = FRAME_TIMEOUT
    _consumed: set[int] = field(default_factory=set)
    _presence_captured: dict[str, list[str]] = field(default_factory=dict)
    _presence_received: dict[str, list[str]] = field(default_factory=dict)

    async def open(self, name: str, target: str) -> None:
        query = urlsplit(target).query
        v1 = "vsn=2" not in query
        ws, stream = await self._nursery.start(_hold_websocket, self.port, _path_of(target))
        self.clients[name] = Client(name, ws, stream, v1, frame_timeout=self.frame_timeout)

    async def run(self, lines: list[dict[str, Any]]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for index, line in enumerate(lines):
                await self.step(index, line, lines)
            for client in self.clients.values():
                if client.closed is None and not client.ws.closed:
                    await client.barrier()
            nursery.cancel_scope.cancel()

    async def step(self, index: int, line: dict[str, Any], lines: list[dict[str, Any]]) -> None:
        where = f"{self.scenario} line {index + 1}"
        if index in self._consumed:
            return
        kind, direction = line["opcode"], line["dir"]
        client_name = line.get("client", "")
        if direction == "note":
            text = line["frame"]
            if text.startswith("connect ws://"):
                await self.open(client_name, text.removeprefix("connect "))
            elif text.startswith("websocket handshake "):
                target = text.removeprefix("websocket handshake ")
                following = lines[index + 1] if index + 1 < len(lines) else {}
                if following.get("client") == "ws-handshake":
                    self.pending_handshake = target
                else:
                    await self.open(target, target)
            return
        if kind == "http":
            if direction == "in" and client_name == "ws-handshake":
                await self.expect_rejected_handshake(line["frame"], where)
            elif direction == "out":
                frame = dict(line["frame"])
                for theirs, ours in self.session_tokens.items():
                    frame["path"] = frame["path"].replace(theirs, ours)
                response = await http_request(self.port, frame, self.http_headers)
                expected = lines[index + 1]
                assert expected["dir"] == "in" and expected["opcode"] == "http", where
                compare_http(response, expected["frame"], f"{where} (+1)", self.http_extra_fields)
                self.learn_session_token(response, expected["frame"])
                if self.http_extra_fields:
                    self.http_bodies.append(json.loads(response["body"]))
            return
        client = self.clients[client_name]
        if direction == "out":
            if kind == "text":
                await client.ws.send_message(line["frame"])
            elif kind == "binary":
                await client.ws.send_message(base64.b64decode(line["frame"]))
            elif kind == "close":
                await client.barrier()
                await client.send_close(line["frame"])
            return
        # direction == "in": an expectation
        if kind == "close":
            got_kind, data = await self.next_relevant(client)
            assert (got_kind, data) == ("close", line["frame"]["code"]), (
                f"{where}: expected close {line['frame']['code']}, got {got_kind} {data!r}"
            )
            client.closed = (data, "")
            return
        expected_event = _event_of(line["frame"]) if kind == "text" else None
        if expected_event in self.skip_events:
            return
        if self.settle_presence and expected_event in PRESENCE_EVENTS:
            await self.compare_presence_run(client, index, lines, where)
            return
        got_kind, data = await self.next_relevant(client)
        assert got_kind == kind, f"{where}: expected a {kind} frame, got {got_kind} {data!r}"
        if kind == "binary":
            assert data == base64.b64decode(line["frame"]), f"{where}: binary frame differs"
            return
        hits = self.scenario.startswith("all_hits")
        want = mask(json.loads(line["frame"]), hits=hits)
        have = mask(json.loads(data), hits=hits)
        assert have == want, f"{where}:\n  expected {line['frame']}\n  received {data}"

    def learn_session_token(self, got: dict[str, Any], want: dict[str, Any]) -> None:
        """Pair the captured long-poll session token with the one phxbroker issued."""
        theirs, ours = _session_token(want.get("body")), _session_token(got.get("body"))
        if theirs and ours:
            self.session_tokens[theirs] = ours

    async def compare_presence_run(
        self, client: Client, index: int, lines: list[dict[str, Any]], where: str
    ) -> None:
        """After the captured run of presence frames starting at `index`, phoenix.js must
        hold the same presence state (refs masked) as after the frames received so far.

        Frames are read until the states agree: how many frames a server sends for the
        same outcome depends on how the joins interleaved.
        """
        captured = self._presence_captured.setdefault(client.name, [])
        received = self._presence_received.setdefault(client.name, [])
        for later, line in enumerate(lines[index:], start=index):
            if not (
                line["dir"] == "in"
                and line["opcode"] == "text"
                and line.get("client") == client.name
                and _event_of(line["frame"]) in PRESENCE_EVENTS
            ):
                break
            captured.append(line["frame"])
            self._consumed.add(later)
        want = presence_view(captured)
        while presence_view(received) != want:
            try:
                got_kind, data = await self.next_relevant(client)
            except AssertionError:
                raise AssertionError(
                    f"{where}: presence state never became {want}; "
                    f"received frames give {presence_view(received)}"
                ) from None
            assert got_kind == "text" and _event_of(data) in PRESENCE_EVENTS, (
                f"{where}: expected presence frames giving {want}, got {got_kind} {data!r}"
            )
            received.append(data)

    async def next_relevant(self, client: Client) -> tuple[str, Any]:
        """The client's next frame, passing over events this replay does not compare."""
        while True:
            got_kind, data = await client.next_frame()
            if not (got_kind == "text" and _event_of(data) in self.skip_events):
                return got_kind, data

    async def expect_rejected_handshake(self, frame: dict[str, Any], where: str) -> None:
        assert self.pending_handshake is not None, where
        url = f"ws://127.0.0.1:{self.port}{_path_of(self.pending_handshake)}"
        self.pending_handshake = None
        try:
            async with open_websocket_url(url):
                raise AssertionError(f"{where}: handshake was accepted, expected refusal")
        except ConnectionRejected as exc:
            assert exc.status_code == frame["status"], f"{where}: status {exc.status_code}"
            assert (exc.body or b"") == frame["body"].encode(), f"{where}: body {exc.body!r}"


async def _hold_websocket(
    port: int, resource: str, *, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    """A websocket over a TCP stream of our own, which stays open until the replay ends
    (whatever the websocket does), so that Close frames can be written as captured."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery, stream, f"127.0.0.1:{port}", resource, message_queue_size=1000
        )
        task_status.started((ws, stream))
        await trio.sleep_forever()


def _path_of(target: str) -> str:
    parts = urlsplit(target)
    return parts.path + (f"?{parts.query}" if parts.query else "")


PRESENCE_EVENTS = frozenset({"presence_state", "presence_diff"})


def presence_view(frames: list[str]) -> dict[str, list[Any]]:
    """The presence state phoenix.js's Presence holds after these frames (diffs before the
    first state wait for it; metas merge by phx_ref), with per-run fields masked."""
    state: dict[str, list[dict[str, Any]]] | None = None
    pending: list[dict[str, Any]] = []
    for frame in frames:
        value = json.loads(frame)
        event, payload = (
            (value[3], value[4])
            if isinstance(value, list)
            else (
                value["event"],
                value["payload"],
            )
        )
        if event == "presence_state":
            state = {key: list(entry["metas"]) for key, entry in payload.items()}
            for diff in pending:
                _apply_presence_diff(state, diff)
            pending = []
        elif state is None:
            pending.append(payload)
        else:
            _apply_presence_diff(state, payload)
    return {key: mask(metas) for key, metas in sorted((state or {}).items())}


def _apply_presence_diff(state: dict[str, list[Any]], diff: dict[str, Any]) -> None:
    for key, entry in diff["joins"].items():
        refs = {meta["phx_ref"] for meta in entry["metas"]}
        state[key] = [m for m in state.get(key, []) if m["phx_ref"] not in refs] + entry["metas"]
    for key, entry in diff["leaves"].items():
        refs = {meta["phx_ref"] for meta in entry["metas"]}
        remaining = [m for m in state.get(key, []) if m["phx_ref"] not in refs]
        if remaining:
            state[key] = remaining
        else:
            state.pop(key, None)


def _event_of(text: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, list) and len(value) >= 4:
        return value[3]
    if isinstance(value, dict):
        return value.get("event")
    return None


async def http_request(
    port: int, frame: dict[str, Any], extra_headers: list[tuple[str, str]] = ()
) -> dict[str, Any]:
    """Perform the captured HTTP request as a plain client would (Connection: close)."""
    body = frame.get("body")
    data = body.encode() if isinstance(body, str) else b""
    headers = [
        f"{frame['method']} {frame['path']} HTTP/1.1",
        f"host: 127.0.0.1:{port}",
        "connection: close",
        f"content-length: {len(data)}",
    ]
    if frame.get("content_type"):
        headers.append(f"content-type: {frame['content_type']}")
    headers.extend(f"{name}: {value}" for name, value in extra_headers)
    raw = ("\r\n".join(headers) + "\r\n\r\n").encode() + data
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        chunks = []
        with trio.fail_after(15):
            while chunk := await stream.receive_some():
                chunks.append(chunk)
    head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    response_headers = {}
    for h in header_lines:
        name, _, value = h.partition(":")
        response_headers[name.strip().lower()] = value.strip()
    return {
        "status": int(status_line.split()[1]),
        "headers": response_headers,
        "body": rest.decode(),
    }


def _session_token(body: Any) -> str | None:
    """The session token of a long-poll GET answer, if the body is one."""
    try:
        value = json.loads(body)
    except (TypeError, ValueError):
        return None
    if isinstance(value, dict) and "messages" in value and isinstance(value.get("token"), str):
        return value["token"]
    return None


def _normalize_longpoll(value: Any) -> Any:
    """A long-poll GET answer with its session token masked and each message (a JSON
    string) parsed, so that masking and key order apply to the messages too."""
    if not (isinstance(value, dict) and isinstance(value.get("messages"), list)):
        return value
    out = dict(value)
    if isinstance(out.get("token"), str) and out["token"]:
        out["token"] = MASK
    out["messages"] = [json.loads(m) if isinstance(m, str) else m for m in out["messages"]]
    return out


def compare_http(
    got: dict[str, Any],
    want: dict[str, Any],
    where: str,
    extra_fields: frozenset[str] = frozenset(),
) -> None:
    """Status and body must match (but for `extra_fields`, which phxbroker adds to a JSON
    body); so must the CORS header where the capture has one."""
    assert got["status"] == want["status"], f"{where}: status {got['status']} != {want['status']}"
    if want.get("body", "").startswith("{"):
        body = json.loads(got["body"])
        if isinstance(body, dict):
            body = {k: v for k, v in body.items() if k not in extra_fields}
        have = mask(_normalize_longpoll(body))
        expected = mask(_normalize_longpoll(json.loads(want["body"])))
        assert have == expected, f"{where}: body {got['body']!r} != {want['body']!r}"
    else:
        assert got["body"] == want.get("body", ""), f"{where}: body {got['body']!r}"
    cors = want.get("headers", {}).get("access-control-allow-origin")
    if cors is not None:
        assert got["headers"].get("access-control-allow-origin") == cors, where
