"""The admin control protocol spoken over the daemon's Unix socket (sans-io).

One JSON object per line in each direction; a connection may carry many requests, each
answered in order:

    -> {"command": "kick", "args": {"user": "alice", "ban": 600}}
    <- {"ok": true, "result": {"closed": 2, "banned_for": 600}}
    <- {"ok": false, "error": "<one sentence>"}

Both ends use these functions; the socket I/O lives in control.py (daemon) and
admin_client.py (CLI).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from phxbroker.protocol import messages

MAX_LINE = 4 * 1_048_576  # a publish carries a payload; keep well above [api] max_body_size

# command -> argument -> (type, required)
COMMANDS: dict[str, dict[str, tuple[type | tuple[type, ...], bool]]] = {
    "stats": {},
    "topics": {},
    "users": {},
    "kick": {"user": (str, True), "topic": (str, False), "reason": (str, False),
             "ban": ((int, float), False)},
    "unban": {"user": (str, True)},
    "publish": {"topic": (str, True), "event": (str, True), "payload": (dict, False)},
    "reload": {},
}  # fmt: skip


class AdminProtocolError(Exception):
    """A line that is not a valid request or response; str() is one sentence."""


class AdminError(Exception):
    """The daemon answered with an error; str() is its sentence."""


@dataclass(frozen=True, slots=True)
class AdminRequest:
    command: str
    args: dict[str, Any]


def encode_request(command: str, **args: Any) -> bytes:
    """One request line; arguments that are None are left out."""
    present = {name: value for name, value in args.items() if value is not None}
    return messages.dumps({"command": command, "args": present}) + b"\n"


def decode_request(line: bytes) -> AdminRequest:
    """Parse and check a request line against COMMANDS; AdminProtocolError says what is wrong."""
    document = _load(line)
    if not isinstance(document, dict):
        raise AdminProtocolError("a request must be a JSON object")
    command = document.get("command")
    spec = COMMANDS.get(command) if isinstance(command, str) else None
    if spec is None or not isinstance(command, str):
        raise AdminProtocolError(
            f"unknown command {command!r}; known: {', '.join(sorted(COMMANDS))}"
        )
    args = document.get("args", {})
    if not isinstance(args, dict):
        raise AdminProtocolError(f'"args" of {command} must be an object')
    for name, value in args.items():
        if name not in spec:
            raise AdminProtocolError(f"{command} takes no argument {name!r}")
        kind, _ = spec[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise AdminProtocolError(f"{command}: argument {name!r} has the wrong type")
    for name, (_, required) in spec.items():
        if required and not args.get(name):
            raise AdminProtocolError(f"{command} needs the argument {name!r}")
    return AdminRequest(command, args)


def encode_result(result: Any) -> bytes:
    return messages.dumps({"ok": True, "result": result}) + b"\n"


def encode_error(message: str) -> bytes:
    return messages.dumps({"ok": False, "error": message}) + b"\n"


def decode_response(line: bytes) -> Any:
    """The result of a response line; raises AdminError with the daemon's sentence."""
    document = _load(line)
    if not isinstance(document, dict) or not isinstance(document.get("ok"), bool):
        raise AdminProtocolError("the daemon's answer is not a response object")
    if not document["ok"]:
        raise AdminError(str(document.get("error") or "the daemon refused the request"))
    return document.get("result")


def _load(line: bytes) -> Any:
    try:
        return messages.loads(line)
    except ValueError as exc:
        raise AdminProtocolError(f"not a JSON line ({exc})") from None


class LineBuffer:
    """Splits a byte stream into lines, refusing a line longer than `limit`."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the complete lines now available (without their newline)."""
        self._buffer += data
        lines = []
        while (end := self._buffer.find(b"\n")) >= 0:
            if end > self.limit:
                raise AdminProtocolError(f"a line is longer than {self.limit} bytes")
            lines.append(bytes(self._buffer[:end]))
            del self._buffer[: end + 1]
        if len(self._buffer) > self.limit:
            raise AdminProtocolError(f"a line is longer than {self.limit} bytes")
        return [line for line in lines if line.strip()]

    @property
    def partial(self) -> bool:
        """Whether an incomplete line is waiting for more bytes."""
        return bool(self._buffer.strip())
