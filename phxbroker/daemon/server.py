"""`phxbroker serve`: one Trio nursery holding the listener, one task per connection, the
broker task (sole owner of broker state), the idle sweeper and the signal handler."""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import logging
import math
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import trio

from phxbroker.auth.authenticator import Authenticator
from phxbroker.auth.bans import Bans
from phxbroker.auth.origin import LoggedOnce, allowing_change, origin_problem
from phxbroker.broker.core import Broker
from phxbroker.broker.stats import Stats
from phxbroker.config.settings import Config, load_config
from phxbroker.config.table import ConfigError
from phxbroker.ops import api, logs, notify
from phxbroker.ops.control import ControlSocket, ControlSocketError
from phxbroker.ops.health import install_health
from phxbroker.ops.metrics import install_metrics
from phxbroker.ops.notify import Notifier
from phxbroker.protocol import close_codes
from phxbroker.transport.admission import ConnectionCounter, client_address
from phxbroker.transport.frontdoor import FrontDoor
from phxbroker.transport.http import Request
from phxbroker.transport.longpoll import LongPoll
from phxbroker.transport.sockets import SocketHub, close_socket
from phxbroker.transport.tls import TlsHandshakeError, TlsSocket
from phxbroker.transport.websocket import CLOSING, OPEN, WebSocketPeer

log = logging.getLogger("phxbroker")

BROKER_QUEUE = 4096  # commands waiting for the broker; a full queue slows readers down
MAX_BATCH = 256  # commands the broker runs before it flushes sockets
ACCEPT_BATCH = 64
SWEEP_INTERVAL = 1.0
CLOSE_HANDSHAKE_TIMEOUT = 5.0
SHUTDOWN_GRACE = 5.0
ACCEPT_ERROR_LOG_INTERVAL = 10.0  # descriptor exhaustion is logged at most this often

T = TypeVar("T")


class StartupError(Exception):
    """The daemon cannot start (e.g. the port is taken); one sentence for the operator."""


class Server:
    """The running daemon's shared parts; `serve()` runs it until cancelled or signalled."""

    def __init__(
        self,
        config: Config,
        *,
        listen_override: tuple[str, int] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        # A listen address given on the command line outlives config reloads.
        self._listen_override = listen_override
        config = self._with_overrides(config)
        self.config = config
        self.stats = Stats()
        self.hub = SocketHub(self.stats)
        self.bans = Bans()  # outlive reloads: the authenticator is rebuilt, bans are kept
        self.authenticator = Authenticator(config.auth, self.bans)
        self.broker = Broker(
            config.topics,
            self.stats,
            max_channels=config.server.max_channels,
            clock=trio.current_time,
        )
        self.frontdoor = FrontDoor(self)
        self.commands, self._inbox = trio.open_memory_channel[Any](BROKER_QUEUE)
        self.connections: set[WebSocketPeer] = set()
        self._peer_ids = itertools.count(1)
        self.listen_address: tuple[str, int] | None = None
        self._listener: socket.socket | None = None
        self._all_closed = trio.Event()
        # True once shutdown began: readiness fails and new connections are refused.
        self.draining = False
        self._shutdown_hooks: list[Callable[[], Awaitable[None]]] = []
        self.open_connections = ConnectionCounter()  # TCP connections, per client address
        self.notifier = notifier if notifier is not None else Notifier.from_environ()
        self._reload_lock = trio.Lock()
        self.reload_error: str | None = None  # why the last reload was refused
        self._status_note = ""
        self._stop_requested = False
        self._stopping = False  # the nursery is being cancelled: the broker is going away
        self._drain_scope: trio.CancelScope | None = None
        self._hurried = False
        self._accept_error_logged_at = -math.inf
        self._refused_origins = LoggedOnce()  # phoenix.js retries a refused page for ever
        self._apply_limits(config)
        install_health(self)
        install_metrics(self)
        self.longpoll = LongPoll(self)
        api.install(self)

    def _with_overrides(self, config: Config) -> Config:
        if self._listen_override is None:
            return config
        host, port = self._listen_override
        return replace(config, server=replace(config.server, listen_host=host, listen_port=port))

    def _apply_limits(self, config: Config) -> None:
        self.hub.outbox_limit = config.server.outbox_limit
        self.hub.max_frame_size = config.server.max_frame_size
        self.hub.message_rate = config.limits.message_rate
        self.hub.message_burst = config.limits.message_burst
        self.hub.rate_limit_close_after = config.limits.rate_limit_close_after

    def next_peer_id(self) -> int:
        return next(self._peer_ids)

    def check_origin(self, request: Request) -> str | None:
        """Why this request's Origin is not allowed, or None when it is (every transport's
        handshake asks before authenticating). Each refused origin is logged once, with the
        config change that would allow it."""
        cfg = self.config.server
        origin = request.headers.get("origin")
        problem = origin_problem(
            origin,
            cfg.check_origin,
            host=cfg.host,
            request_scheme="https" if cfg.tls_context is not None else "http",
            request_host=request.header("host"),
        )
        if problem and self._refused_origins.first((origin, cfg.check_origin, cfg.host)):
            change = allowing_change(origin or "", cfg.check_origin)
            log.info(
                "refused connect from %s on %s: %s%s (logged once per origin)",
                request.remote,
                request.path,
                problem,
                f"; to allow it, {change}" if change else "",
            )
        return problem

    def admission_problem(self, request: Request) -> tuple[int, str, str] | None:
        """(HTTP status, refusal reason, sentence) when the connection carrying this
        transport request is over a connection limit, or None."""
        return self.open_connections.problem(client_address(request.remote), self.config.limits)

    def on_shutdown(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run `hook` during shutdown, after websockets were told to close."""
        self._shutdown_hooks.append(hook)

    async def ask(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the broker task, the only one that may touch broker state, and
        return its result (or raise its exception) here."""
        done = trio.Event()
        result: list[Any] = []

        def run() -> None:
            try:
                result.append((True, fn(*args)))
            except Exception as exc:
                result.append((False, exc))
            finally:
                done.set()

        await self.commands.send((run, ()))
        await done.wait()
        ok, value = result[0]
        if not ok:
            raise value
        return value

    # -- running -------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled; SIGTERM/SIGINT end it cleanly."""
        self._listener = self._bind()
        self.listen_address = self._listener.getsockname()[:2]
        control = None
        try:
            try:
                control = ControlSocket.open(self)
            except ControlSocketError as exc:
                raise StartupError(str(exc)) from None
            async with trio.open_nursery() as nursery:
                self.hub.attach(nursery)
                self.hub.now = trio.current_time()
                nursery.start_soon(self._run_broker)
                if control is not None:
                    nursery.start_soon(control.serve)
                nursery.start_soon(self._sweep)
                # Handlers are in place before "listening" is logged: a signal sent as
                # soon as the daemon says it is up must not hit the default action.
                await nursery.start(self._handle_signals, nursery)
                nursery.start_soon(self._accept, nursery)
                nursery.start_soon(
                    lambda: notify.keep_informed(
                        self.notifier, self.status_text, watchdog=notify.watchdog_interval()
                    )
                )
                host, port = self.listen_address
                log.info(
                    "listening on %s://%s:%d",
                    "https" if self.config.server.tls_context is not None else "http",
                    host if ":" not in host else f"[{host}]",
                    port,
                )
                self.notifier.ready(self.status_text())
                task_status.started(self.listen_address)
        finally:
            if self._listener is not None:
                close_socket(self._listener)
            if control is not None:
                control.close()

    def _bind(self) -> socket.socket:
        cfg = self.config.server
        family = socket.AF_INET6 if ":" in cfg.listen_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((cfg.listen_host, cfg.listen_port))
            sock.listen(4096)
        except OSError as exc:
            sock.close()
            reason = (
                "the address is already in use"
                if exc.errno == errno.EADDRINUSE
                else (exc.strerror or str(exc)).lower()
            )
            raise StartupError(f"cannot listen on {cfg.listen}: {reason}") from None
        sock.setblocking(False)
        return sock

    async def _accept(self, nursery: trio.Nursery) -> None:
        listener = self._listener
        assert listener is not None
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
                        self.stats.count_refusal("out_of_file_descriptors")
                        now = trio.current_time()
                        if now - self._accept_error_logged_at >= ACCEPT_ERROR_LOG_INTERVAL:
                            self._accept_error_logged_at = now
                            log.error(
                                "cannot accept connections: %s (%d open; raise LimitNOFILE)",
                                exc.strerror,
                                len(self.connections),
                            )
                        await trio.sleep(0.1)  # back off until descriptors free up
                    break
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(self._serve_connection, sock, _format_addr(addr))

    async def _serve_connection(self, sock: socket.socket, remote: str) -> None:
        # A one-item list: the front door moves the count to the client behind a proxy.
        counted = [client_address(remote)]
        self.open_connections.opened(counted[0])
        try:
            context = self.config.server.tls_context
            if context is None:
                await self.frontdoor.serve(sock, remote, counted)
            else:
                tls_sock = TlsSocket(sock, context)
                if await self._tls_handshake(tls_sock, remote):
                    await self.frontdoor.serve(tls_sock, remote, counted)
        except OSError:
            pass  # the client went away mid-request
        except Exception:
            log.exception("internal error while serving %s", remote)
        finally:
            self.open_connections.closed(counted[0])
            close_socket(sock)

    async def _tls_handshake(self, tls_sock: TlsSocket, remote: str) -> bool:
        try:
            await tls_sock.handshake(self.config.server.handshake_timeout)
        except (EOFError, ConnectionError):
            log.debug("%s closed the connection before a TLS handshake", remote)
            return False
        except TlsHandshakeError as exc:
            self.stats.count_refusal("tls_handshake")
            log.info("closing %s: %s", remote, exc)
            return False
        return True

    async def run_peer(self, peer: WebSocketPeer, trailing_data: bytes) -> None:
        """Run an upgraded websocket connection until it ends, registered with the broker."""
        self.stats.connections_total += 1
        self.stats.connections_open += 1
        self.connections.add(peer)
        log.debug("connected %s", peer)
        if self.draining:  # upgraded after the drain began: send it elsewhere at once
            peer.close(close_codes.GOING_AWAY, "server shutting down")
        try:
            await self.commands.send((self.broker.connect, (peer,)))
            await peer.run(self.commands, self.broker.handle, trailing_data)
        finally:
            self.connections.discard(peer)
            if not self.connections:
                self._all_closed.set()
            self.stats.connections_open -= 1
            await self._tell_broker(self.broker.disconnect, peer)
            peer.finish()
            log.debug("disconnected %s", peer)

    async def _tell_broker(self, fn: Any, *args: Any) -> None:
        """Queue a command even while being cancelled (cleanup must reach the broker)."""
        try:
            self.commands.send_nowait((fn, args))
            return
        except trio.WouldBlock:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if self._stopping:
            return
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(SHUTDOWN_GRACE),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await self.commands.send((fn, args))

    async def _run_broker(self) -> None:
        broker = self.broker
        inbox = self._inbox
        hub = self.hub
        stats = self.stats
        batches = stats.broker_batches
        clock = time.perf_counter
        while True:
            deadline = broker.next_deadline()
            ran = 0
            with trio.move_on_at(math.inf if deadline is None else deadline):
                command = await inbox.receive()
                # Timed per batch, not per command, so the measurement stays off the hot path.
                started = clock()
                _run_command(command)
                ran = 1
                for _ in range(MAX_BATCH - 1):
                    try:
                        command = inbox.receive_nowait()
                    except trio.WouldBlock:
                        break
                    _run_command(command)
                    ran += 1
            if not ran:
                started = clock()
            broker.tick()
            hub.flush()
            batches.observe(clock() - started)
            stats.broker_commands += ran

    async def _sweep(self) -> None:
        """Close connections silent for idle_timeout; abort ones stuck closing."""
        hub = self.hub
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            now = hub.now = trio.current_time()
            idle_after = self.config.server.idle_timeout
            # While draining, clients get the whole drain timeout to answer the close;
            # shutdown() cuts whoever is left when it expires.
            closing_grace = math.inf if self.draining else CLOSE_HANDSHAKE_TIMEOUT
            for peer in list(self.connections):
                if peer.state == OPEN and now - peer.last_rx > idle_after:
                    log.info("closing %s: nothing received for %g s", peer, idle_after)
                    peer.close(close_codes.IDLE_TIMEOUT)
                elif peer.state == CLOSING and now - peer.closing_since > closing_grace:
                    peer.abort()
            hub.flush()

    async def _handle_signals(
        self,
        nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if self._stop_requested:
                        log.info("ignoring SIGHUP: shutting down")
                    else:
                        await self.reload()
                elif not self._stop_requested:
                    self._stop_requested = True
                    log.info("received %s: shutting down (send it again to stop at once)", name)
                    nursery.start_soon(self._drain_and_stop, nursery)
                else:
                    log.warning("received %s again: stopping without waiting", name)
                    self.hurry()

    async def _drain_and_stop(self, nursery: trio.Nursery) -> None:
        try:
            await self.shutdown()
        finally:
            self._stopping = True
            nursery.cancel_scope.cancel()

    def status_text(self) -> str:
        """What systemd shows as the service's Status: one short line."""
        count = self.stats.connections_open  # every transport
        plural = "" if count == 1 else "s"
        if self.draining:
            return f"draining: {count} connection{plural} left"
        text = f"serving {count} connection{plural}"
        return f"{text}; {self._status_note}" if self._status_note else text

    # -- stopping ------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Drain: stop accepting, fail readiness, close every websocket with 1001 so that
        phoenix.js reconnects (to another node behind a load balancer), end long-poll
        sessions through the shutdown hooks, and wait for clients to go, at most
        `[server] drain_timeout` seconds; whoever is still connected then is cut."""
        if self.draining:
            return
        self.draining = True
        started = trio.current_time()
        timeout = self.config.server.drain_timeout
        if self._listener is not None:
            close_socket(self._listener)
            self._listener = None
        self.notifier.stopping(self.status_text())
        log.info(
            "draining: stopped accepting; closing %d websockets with 1001 and %d long-poll "
            "sessions; waiting up to %g s",
            len(self.connections),
            self.stats.longpoll_open,
            timeout,
        )
        for peer in list(self.connections):
            peer.close(close_codes.GOING_AWAY, "server shutting down")
        self.hub.flush()
        with trio.move_on_at(started + timeout) as self._drain_scope:
            if self._hurried:
                self._drain_scope.cancel()
            for hook in self._shutdown_hooks:
                try:
                    await hook()
                except Exception:
                    log.exception("internal error in a shutdown hook")
            while self.connections:
                self._all_closed = trio.Event()
                await self._all_closed.wait()
        left = list(self.connections)
        elapsed = trio.current_time() - started
        if not left:
            log.info("drained in %.1f s: every connection closed", elapsed)
        elif self._hurried:
            log.warning("stopping now: cutting %d connections", len(left))
        else:
            log.warning(
                "drain timeout after %g s: cutting %d connections that did not close",
                timeout,
                len(left),
            )
        for peer in left:
            peer.abort()

    def hurry(self) -> None:
        """End a drain now: connections still open are cut."""
        self._hurried = True
        if self._drain_scope is not None:
            self._drain_scope.cancel()

    # -- reloading -----------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config file and apply it without dropping connections: topic rules,
        auth and limits change in place. A config that cannot be loaded is refused with one
        log line and the running one stays in force. True when the new config is in force;
        otherwise `reload_error` says why.
        """
        async with self._reload_lock:
            if self.draining:
                self.reload_error = "the daemon is shutting down"
                log.info("reload ignored: shutting down")
                return False
            self.notifier.reloading()
            try:
                return await self._reload()
            finally:
                self.notifier.ready(self.status_text())

    async def _reload(self) -> bool:
        path = self.config.path
        if path is None:
            return self._refuse_reload("the running config was not read from a file")
        try:
            new = self._with_overrides(load_config(path))
            authenticator = Authenticator(new.auth, self.bans)
        except (ConfigError, OSError, ValueError) as exc:
            return self._refuse_reload(str(exc))
        except Exception as exc:
            log.exception("internal error while reloading %s", path)
            return self._refuse_reload(f"internal error ({type(exc).__name__})")
        wanted = (new.server.listen_host, new.server.listen_port)
        running = (self.config.server.listen_host, self.config.server.listen_port)
        if wanted not in (running, self.listen_address):
            log.warning(
                "reload: a new listen address (%s) takes effect only after a restart",
                new.server.listen,
            )
            server = replace(
                new.server,
                listen_host=self.config.server.listen_host,
                listen_port=self.config.server.listen_port,
            )
            new = replace(new, server=server)
        if (new.server.tls_context is None) != (self.config.server.tls_context is None):
            scheme = "https" if new.server.tls_context is not None else "http"
            log.warning("reload: the listen port now speaks %s to new connections", scheme)
        self.config = new
        self.authenticator = authenticator
        self._apply_limits(new)
        logs.reconfigure(new.log, secret_params=[new.auth.token_param])
        try:
            closed = await self.ask(self._apply_in_broker, new)
        except Exception:
            log.exception("internal error while applying the config from %s", path)
            self.reload_error = "internal error, see the daemon's log"
            return False
        self.reload_error = None
        self._status_note = f"config reloaded at {time.strftime('%H:%M:%S')}"
        log.info(
            "reloaded config from %s: %d topic patterns, %d static tokens%s",
            path,
            len(new.topics),
            len(new.auth.tokens),
            f"; closed {closed} connections whose credential is no longer accepted"
            if closed
            else "",
        )
        return True

    def _refuse_reload(self, reason: str) -> bool:
        self.reload_error = reason
        self._status_note = (
            f"reload refused at {time.strftime('%H:%M:%S')}, running the previous config"
        )
        log.error("reload refused, keeping the running config: %s", reason)
        return False

    def _apply_in_broker(self, config: Config) -> int:
        """Runs in the broker task: the new rules, and sockets whose credential is no longer
        accepted closed. Returns how many were closed."""
        self.broker.configure(config.topics, config.server.max_channels)
        closed = 0
        for peer in list(self.broker.peers):
            if not self.authenticator.credential_valid(
                getattr(peer, "credential", None), peer.user
            ):
                log.info("closing %s: its credential is no longer accepted", peer)
                self.broker.disconnect(peer)
                peer.close(close_codes.GOING_AWAY, "credential revoked")
                closed += 1
        return closed


def _run_command(command: tuple[Any, tuple[Any, ...]]) -> None:
    fn, args = command
    try:
        fn(*args)
    except Exception:
        # A bug must not take every connection down with the broker task.
        log.exception("internal error in broker command %s", getattr(fn, "__name__", fn))


def _format_addr(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr)


async def serve(config: Config) -> None:
    """Run the daemon until a signal stops it."""
    await Server(config).serve()


# Collect young objects every 5,000 allocations instead of 700. Every connection is a few
# dozen long-lived objects, and each collection that passes over them costs time: with the
# defaults the collector took about a third of the server's CPU per websocket join
# (measured: ~263 -> ~180 us per connect + upgrade + join). The pauses stay short (a
# young collection walks at most a few thousand objects).
GC_YOUNG_THRESHOLD = 5000


def tune_garbage_collector() -> None:
    """Call once, after start-up and before serving: start-up objects (modules, config)
    are moved out of the collector's sight, and young collections happen less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
