"""The daemon's admin control socket: a Unix socket the `phxbroker` CLI talks to.

Created with mode [admin] mode (0600 by default) and served only to root and the
daemon's own user, checked with SO_PEERCRED on every connection whatever the file mode.
The protocol is control_protocol.py's; this module does the I/O and runs the commands
through the daemon's operations (`Operator`), which change broker state only in the
broker task.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any, Protocol

import trio

from phxbroker.config.settings import AdminConfig
from phxbroker.ops import control_protocol
from phxbroker.ops.control_protocol import AdminProtocolError, LineBuffer
from phxbroker.protocol import close_codes

log = logging.getLogger("phxbroker.admin")

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
MAX_CLOSE_REASON = 123  # what a websocket close frame can carry


class ControlSocketError(Exception):
    """The control socket cannot be created; one sentence for the operator."""


class Operator(Protocol):
    """What the CLI's commands do to the running daemon."""

    @property
    def config_path(self) -> Path | None: ...

    @property
    def clustered(self) -> bool: ...

    async def report(self) -> dict[str, Any]: ...

    async def topics(self) -> list[dict[str, Any]]: ...

    async def users(self) -> list[dict[str, Any]]: ...

    def active_bans(self) -> dict[str, float]: ...

    def topic_declared(self, topic: str) -> bool: ...

    async def publish(self, topic: str, event: str, payload: dict[str, Any]) -> int: ...

    async def kick(self, user: str, topic: str) -> int: ...

    async def disconnect_user(self, user: str, code: int, reason: str) -> int: ...

    def ban(self, user: str, seconds: float) -> None: ...

    def unban(self, user: str) -> bool: ...

    async def reload(self) -> str | None:
        """None once the re-read config is in force, else why it was refused."""
        ...


class ControlServer:
    """A listening admin socket: who may connect, and one answer line per request line.
    `ControlSocket` runs the commands in this process; a supervisor of workers answers
    them by asking its workers."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.path = path
        self._sock = sock
        self._inode = os.stat(path).st_ino

    @staticmethod
    def bind(cfg: AdminConfig) -> tuple[socket.socket, Path] | None:
        """Bind the socket [admin] names; None when there is none.

        A configured path that cannot be used raises ControlSocketError; the default path
        only disables the socket, with a warning (e.g. a development run without
        /run/phxbroker).
        """
        if cfg.socket is None:
            return None
        try:
            sock = _bind(cfg.socket, cfg.mode)
        except ControlSocketError as exc:
            if cfg.configured:
                raise
            log.warning("no admin control socket, so the CLI cannot reach this daemon: %s", exc)
            return None
        return sock, cfg.socket

    def close(self) -> None:
        """Stop listening and remove the socket file (unless another daemon replaced it)."""
        self._sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    async def serve(self) -> None:
        log.info("admin control socket at %s", self.path)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))
        await trio.serve_listeners(self._serve_client, [listener])

    async def answer(self, line: bytes) -> bytes:
        """The response line for one request line."""
        raise NotImplementedError

    # -- one client ----------------------------------------------------------------------

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                creds = stream.socket.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size
                )
                pid, uid, _gid = _PEERCRED.unpack(creds)
                if uid not in (0, os.geteuid()):
                    log.warning(
                        "refused admin connection from uid %d (pid %d): only root and the "
                        "daemon's user may use the control socket",
                        uid,
                        pid,
                    )
                    await stream.send_all(
                        control_protocol.encode_error(
                            f"permission denied: uid {uid} is neither root nor the daemon's user"
                        )
                    )
                    await _drain(stream)
                    return
                await self._serve_requests(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the client went away

    async def _serve_requests(self, stream: trio.SocketStream) -> None:
        lines = LineBuffer()
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            try:
                requests = lines.feed(data)
            except AdminProtocolError as exc:
                await stream.send_all(control_protocol.encode_error(str(exc)))
                await _drain(stream)
                return
            for line in requests:
                await stream.send_all(await self.answer(line))


class ControlSocket(ControlServer):
    """The admin socket of a daemon, running each command through its `Operator`."""

    def __init__(self, operator: Operator, sock: socket.socket, path: Path) -> None:
        super().__init__(sock, path)
        self.operator = operator

    @classmethod
    def open(cls, cfg: AdminConfig, operator: Operator) -> ControlSocket | None:
        """Bind the socket [admin] names (see `ControlServer.bind`); None when there is none."""
        bound = cls.bind(cfg)
        return None if bound is None else cls(operator, *bound)

    async def answer(self, line: bytes) -> bytes:
        """The response line for one request line."""
        try:
            request = control_protocol.decode_request(line)
        except AdminProtocolError as exc:
            return control_protocol.encode_error(str(exc))
        try:
            result = await getattr(self, f"do_{request.command}")(**request.args)
        except CommandError as exc:
            return control_protocol.encode_error(str(exc))
        except Exception:
            log.exception("internal error in admin command %s", request.command)
            return control_protocol.encode_error(
                f"internal error while running {request.command}: see the daemon's log"
            )
        return control_protocol.encode_result(result)

    # -- commands ------------------------------------------------------------------------

    async def do_stats(self) -> dict[str, Any]:
        return await self.operator.report()

    async def do_topics(self) -> list[dict[str, Any]]:
        topics = await self.operator.topics()
        return sorted(topics, key=lambda t: (-t["subscribers"], t["topic"]))

    async def do_users(self) -> dict[str, Any]:
        users = await self.operator.users()
        users.sort(key=lambda u: u["user"])
        bans = self.operator.active_bans()
        return {"users": users, "bans": {u: round(left, 1) for u, left in sorted(bans.items())}}

    async def do_kick(
        self, user: str, topic: str | None = None, reason: str = "", ban: float | None = None
    ) -> dict[str, Any]:
        operator = self.operator
        if len(reason.encode()) > MAX_CLOSE_REASON:
            raise CommandError(f"the reason must fit a close frame: {MAX_CLOSE_REASON} bytes")
        if topic is not None:
            if ban is not None:
                raise CommandError("a ban refuses connects, so it cannot be limited to a topic")
            removed = await operator.kick(user, topic)
            log.info("admin: removed user %r from %s (%d channels)", user, topic, removed)
            return {"removed": removed, "everywhere": self.operator.clustered}
        if ban is not None:
            if ban <= 0:
                raise CommandError("the ban must last a positive number of seconds")
            # Before closing: phoenix.js is back within milliseconds and must meet the ban.
            operator.ban(user, ban)
        closed = await operator.disconnect_user(user, close_codes.GOING_AWAY, reason or "kicked")
        log.info(
            "admin: kicked user %r (%d connections)%s",
            user,
            closed,
            f", banned for {ban:g} s" if ban is not None else "",
        )
        return {"closed": closed, "banned_for": ban, "everywhere": self.operator.clustered}

    async def do_unban(self, user: str) -> dict[str, Any]:
        lifted = self.operator.unban(user)
        if lifted:
            log.info("admin: lifted the ban on user %r", user)
        return {"lifted": lifted}

    async def do_publish(
        self, topic: str, event: str, payload: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if event.startswith("phx_"):
            raise CommandError(f"event {event!r} is reserved by the protocol (phx_*)")
        if not self.operator.topic_declared(topic):
            raise CommandError(
                f"no [[topics]] pattern matches {topic!r}, so no client can join it: "
                "nothing was published"
            )
        reached = await self.operator.publish(topic, event, payload or {})
        return {"subscribers": reached}

    async def do_reload(self) -> dict[str, Any]:
        path = self.operator.config_path
        if path is None:
            raise CommandError("the daemon was started without a config file to reload")
        # The daemon logs a refusal and tells systemd, whichever way the reload was asked for.
        refused = await self.operator.reload()
        if refused is not None:
            raise CommandError(f"reload refused, the running config is kept: {refused}")
        return {"path": str(path)}


async def _drain(stream: trio.SocketStream) -> None:
    """Half-close and read what the client sent (briefly): closing a Unix socket with
    unread data resets it, and the client would lose our answer."""
    await stream.send_eof()
    with trio.move_on_after(1.0):
        while await stream.receive_some(65536):
            pass


class CommandError(Exception):
    """A command the daemon will not run; str() is one sentence for the operator."""


def _bind(path: Path, mode: int) -> socket.socket:
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise ControlSocketError(
            f"cannot create the directory {path.parent} ({_reason(exc)})"
        ) from None
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # never exists with wider permissions than 0600
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ControlSocketError(f"cannot create {path} ({_reason(exc)})") from None
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock


def _remove_stale(path: Path) -> None:
    """Remove a socket file a dead daemon left; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlSocketError(f"cannot inspect {path} ({_reason(exc)})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        raise ControlSocketError(f"cannot check {path} ({_reason(exc)})") from None
    finally:
        probe.close()
    raise ControlSocketError(f"another phxbroker is already serving {path}")


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EACCES:
        return "permission denied"
    return (exc.strerror or str(exc)).lower()
