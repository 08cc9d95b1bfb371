"""The CLI's end of the admin control socket: a blocking client, one request at a time."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Any

from phxbroker.ops import control_protocol
from phxbroker.ops.control_protocol import AdminError, AdminProtocolError, LineBuffer

__all__ = ["AdminClient", "AdminError", "DaemonUnreachable"]


class DaemonUnreachable(Exception):
    """No daemon answers on the socket (or it went away); str() is one sentence."""


class AdminClient:
    """A connection to a running daemon's control socket."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self._lines = LineBuffer()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            self._sock.close()
            raise DaemonUnreachable(f"no phxbroker is running: cannot connect to {path}") from None
        except PermissionError:
            self._sock.close()
            raise DaemonUnreachable(
                f"permission denied on {path}: run as root or as the daemon's user"
            ) from None
        except OSError as exc:
            self._sock.close()
            raise DaemonUnreachable(
                f"cannot connect to {path}: {(exc.strerror or str(exc)).lower()}"
            ) from None

    def call(self, command: str, **args: Any) -> Any:
        """Run one command; its result, or AdminError with the daemon's sentence."""
        try:
            # A daemon that refuses us answers, then closes: read its answer all the same.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._sock.sendall(control_protocol.encode_request(command, **args))
            while True:
                data = self._sock.recv(65536)
                if not data:
                    raise DaemonUnreachable(f"the phxbroker at {self.path} closed the connection")
                lines = self._lines.feed(data)
                if lines:
                    return control_protocol.decode_response(lines[0])
        except TimeoutError:
            raise DaemonUnreachable(f"the phxbroker at {self.path} did not answer") from None
        except (BrokenPipeError, ConnectionResetError):
            raise DaemonUnreachable(f"the phxbroker at {self.path} closed the connection") from None
        except AdminProtocolError as exc:
            raise DaemonUnreachable(f"unexpected answer from {self.path}: {exc}") from None

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
