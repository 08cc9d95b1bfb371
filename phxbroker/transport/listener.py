"""The listen port: bind, accept in batches, and serve each TCP connection in its own task.

A connection is counted per client address from accept to close (the connection limits
read these counts), gets a TLS handshake when the port speaks TLS, and then answers HTTP
requests through the route table until it closes or is upgraded to a websocket.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import sys
from collections.abc import Callable

import trio

from phxbroker.broker.stats import Stats
from phxbroker.config.settings import ServerConfig
from phxbroker.transport.admission import Admission, client_address
from phxbroker.transport.http import BadRequest, HttpConnection
from phxbroker.transport.router import Router, Takeover
from phxbroker.transport.sockets import ClientSocket, close_socket
from phxbroker.transport.tls import TlsHandshakeError, TlsSocket

log = logging.getLogger("phxbroker")
http_log = logging.getLogger("phxbroker.http")

ACCEPT_BATCH = 64
# Linux gives an accepted socket the TCP_NODELAY of the socket it was accepted on: set
# once on the listener there, it saves a system call per connection.
NODELAY_INHERITED = sys.platform.startswith("linux")
LISTEN_BACKLOG = 4096
ACCEPT_ERROR_LOG_INTERVAL = 10.0  # descriptor exhaustion is logged at most this often


class StartupError(Exception):
    """The daemon cannot start (e.g. the port is taken); one sentence for the operator."""


def cannot_listen(address: str, exc: OSError) -> StartupError:
    """The one sentence for a listening socket that could not be bound."""
    reason = (
        "the address is already in use"
        if exc.errno == errno.EADDRINUSE
        else (exc.strerror or str(exc)).lower()
    )
    return StartupError(f"cannot listen on {address}: {reason}")


class Listener:
    """The listening socket and the task of every connection accepted on it."""

    def __init__(
        self,
        config: ServerConfig,
        admission: Admission,
        router: Router,
        stats: Stats,
        clients_open: Callable[[], int],
    ) -> None:
        self.config = config
        self.admission = admission
        self.router = router
        self.stats = stats
        self._clients_open = clients_open
        self._sock: socket.socket | None = None
        self.address: tuple[str, int] | None = None
        self._accept_error_logged_at = -math.inf

    def configure(self, config: ServerConfig) -> None:
        """Serve new connections with a (reloaded) config; the bound address stays."""
        self.config = config

    def bind(self, *, reuse_port: bool = False) -> tuple[str, int]:
        """Bind and listen (non-blocking); raises StartupError with one sentence. With
        `reuse_port` (workers) other processes of this user may listen on the same port,
        and the kernel spreads new connections over them."""
        cfg = self.config
        family = socket.AF_INET6 if ":" in cfg.listen_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((cfg.listen_host, cfg.listen_port))
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise cannot_listen(cfg.listen, exc) from None
        sock.setblocking(False)
        self._sock = sock
        self.address = sock.getsockname()[:2]
        return self.address

    def close(self) -> None:
        """Stop accepting (the accept loop returns); open connections are not touched."""
        if self._sock is not None:
            close_socket(self._sock)
            self._sock = None

    async def accept(self, nursery: trio.Nursery) -> None:
        """Accept connections until the listener is closed, each served in `nursery`."""
        listener = self._sock
        assert listener is not None, "bind() first"
        while True:
            try:
                await trio.lowlevel.wait_readable(listener)
            except trio.ClosedResourceError:
                return
            for _ in range(ACCEPT_BATCH):
                try:
                    sock, addr = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        await self._out_of_descriptors(exc)
                    break
                sock.setblocking(False)
                if not NODELAY_INHERITED:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(self.serve_connection, sock, format_address(addr))

    async def _out_of_descriptors(self, exc: OSError) -> None:
        self.stats.count_refusal("out_of_file_descriptors")
        now = trio.current_time()
        if now - self._accept_error_logged_at >= ACCEPT_ERROR_LOG_INTERVAL:
            self._accept_error_logged_at = now
            log.error(
                "cannot accept connections: %s (%d open; raise LimitNOFILE)",
                exc.strerror,
                self._clients_open(),
            )
        await trio.sleep(0.1)  # back off until descriptors free up

    async def serve_connection(self, sock: socket.socket, remote: str) -> None:
        """Serve one accepted connection until it ends."""
        # A one-item list: the client behind a trusted proxy takes the count over.
        counted = [client_address(remote)]
        connections = self.admission.connections
        connections.opened(counted[0])
        try:
            context = self.config.tls_context
            client: ClientSocket = sock
            if context is not None:
                client = tls_sock = TlsSocket(sock, context)
                if not await self._tls_handshake(tls_sock, remote):
                    return
            takeover = await self._serve_http(client, remote, counted)
            if takeover is not None:
                await takeover
        except OSError:
            pass  # the client went away mid-request
        except Exception:
            log.exception("internal error while serving %s", remote)
        finally:
            connections.closed(counted[0])
            close_socket(sock)

    async def _tls_handshake(self, tls_sock: TlsSocket, remote: str) -> bool:
        try:
            await tls_sock.handshake(self.config.handshake_timeout)
        except (EOFError, ConnectionError):
            log.debug("%s closed the connection before a TLS handshake", remote)
            return False
        except TlsHandshakeError as exc:
            self.stats.count_refusal("tls_handshake")
            log.info("closing %s: %s", remote, exc)
            return False
        return True

    async def _serve_http(
        self, sock: ClientSocket, remote: str, counted: list[str]
    ) -> Takeover | None:
        """Answer requests until the connection closes (None) or is taken over: then what it
        becomes, to be run after this returns and the HTTP objects are gone."""
        cfg = self.config
        conn = HttpConnection(
            sock, remote, max_header_size=cfg.max_header_size, timeout=cfg.handshake_timeout
        )
        try:
            while True:
                request = await conn.read_request()
                if request is None:
                    return None
                self.admission.attribute(request, counted)
                takeover = await self.router.dispatch(conn, request)
                if takeover is not None:
                    return takeover
                if not await conn.finish_request():
                    return None
        except BadRequest as exc:
            self.stats.count_refusal("bad_http")
            http_log.info("bad HTTP request from %s: %s", remote, exc)
            await conn.send_error(exc)
            return None


def format_address(addr: object) -> str:
    """ "host:port", or "[v6]:port", for logs and the connection limits."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr)
