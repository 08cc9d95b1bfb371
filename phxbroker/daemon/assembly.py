"""`phxbroker serve`: every part of the daemon built and wired together, run in one nursery.

The nursery holds the listener and one task per connection, the broker task (sole owner
of broker state), the idle sweeper, the signal handler, the systemd reporter and the
admin control socket. This is the only module that knows every part: the route table is
built here, a reload hands each part its new config section, and a drain ends them in
order.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import signal
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

from phxbroker.auth.authenticator import Authenticator
from phxbroker.auth.bans import Bans
from phxbroker.broker.core import Broker
from phxbroker.broker.stats import Stats
from phxbroker.config.settings import AdminConfig, Config, load_config
from phxbroker.config.table import ConfigError
from phxbroker.daemon.operations import Operations
from phxbroker.daemon.runtime import BrokerTask
from phxbroker.daemon.worker import WorkerRole
from phxbroker.hooks.runner import HookRunner
from phxbroker.ops import logs, notify
from phxbroker.ops.api import PREFIX as API_PREFIX
from phxbroker.ops.api import Api
from phxbroker.ops.control import ControlSocket, ControlSocketError
from phxbroker.ops.health import Health
from phxbroker.ops.metrics import Metrics
from phxbroker.ops.notify import Notifier
from phxbroker.protocol import close_codes
from phxbroker.transport.admission import Admission
from phxbroker.transport.inbound import Inbound
from phxbroker.transport.listener import Listener, StartupError
from phxbroker.transport.longpoll import LongPoll
from phxbroker.transport.longpoll_sessions import SUBPATH as LONGPOLL_SUBPATH
from phxbroker.transport.longpoll_sessions import LongPollSessions
from phxbroker.transport.router import Router
from phxbroker.transport.sockets import SocketHub
from phxbroker.transport.upgrade import WebSocketUpgrade
from phxbroker.transport.websocket import WebSockets

if TYPE_CHECKING:
    from phxbroker.cluster.node import ClusterNode

__all__ = ["Daemon", "StartupError", "serve", "tune_garbage_collector"]

log = logging.getLogger("phxbroker")

SWEEP_INTERVAL = 1.0
CLOSE_HANDSHAKE_TIMEOUT = 5.0


class Daemon:
    """The running daemon's parts; `serve()` runs it until cancelled or signalled."""

    def __init__(
        self,
        config: Config,
        *,
        listen_override: tuple[str, int] | None = None,
        notifier: Notifier | None = None,
        node: str | None = None,
        worker: WorkerRole | None = None,
    ) -> None:
        # A listen address given on the command line outlives config reloads.
        self._listen_override = listen_override
        # A worker listens beside the others, tells its supervisor (never systemd) and
        # has its own control socket and node name.
        self.worker = worker
        config = self._with_overrides(config)
        self.config = config
        self.stats = stats = Stats()
        if worker is not None:
            notifier = worker.link
            worker.link.connections = lambda: stats.connections_open
            node = worker.node
        self.notifier = notifier if notifier is not None else Notifier.from_environ()
        # Bans outlive reloads: the authenticator is rebuilt, bans are kept.
        self.bans = Bans() if config.cluster is None else _shared_bans()
        self.hub = hub = SocketHub(stats, config.server, config.limits)
        self.broker = broker = Broker(
            config.topics, stats, max_channels=config.server.max_channels, clock=trio.current_time
        )
        self.broker_task = gateway = BrokerTask(broker, hub, stats)
        # A cluster node (only with [cluster]; nothing of it is imported otherwise).
        self.cluster = _cluster_node(config, broker, gateway, stats, self.bans, node)
        peer_ids = itertools.count(1)

        # Clients: admission, the inbound path, and the two transports.
        self.admission = Admission(
            stats, Authenticator(config.auth, self.bans), config.server, config.limits
        )
        # The app's back end, when [hooks] names one.
        self.hooks: HookRunner | None = None
        if config.hooks is not None:
            self.hooks = HookRunner(config.hooks, gateway, broker, stats)
            broker.outside = self.hooks
            self.admission.connect_hook = self.hooks
        inbound = Inbound(gateway, broker, hub)
        self.websockets = WebSockets(gateway, broker, inbound, hub)
        self.longpoll_sessions = LongPollSessions(
            gateway, broker, hub, peer_ids, config.longpoll.window_ms
        )
        self.longpoll = LongPoll(
            config.longpoll, self.admission, self.longpoll_sessions, inbound, broker.activity
        )

        # Operators: one object behind the API, the control socket, health and metrics.
        self.operations = Operations(
            gateway,
            broker,
            stats,
            self.bans,
            is_draining=lambda: self.draining,
            reload=self._reload_for_operator,
            config_path=lambda: self.config.path,
            cluster=self.cluster,
        )
        self.api = Api(config.api, self.operations, stats, self._methods_at)

        # The route table, in one place.
        self.router = router = Router(self.admission, config.server.socket_paths)
        upgrade = WebSocketUpgrade(self.admission, self.websockets, hub, peer_ids, broker.activity)
        router.transport("/websocket", upgrade)
        router.transport(LONGPOLL_SUBPATH, self.longpoll)
        degraded = self.cluster.degraded if self.cluster is not None else None
        operator_routes = Health(self.operations, degraded).routes() + self.api.routes()
        if config.metrics.enabled:
            metrics = Metrics(stats, self.operations)
            if self.cluster is not None:
                from phxbroker.cluster.metrics import ClusterCollector

                metrics.registry.register(ClusterCollector(self.cluster))
            operator_routes += metrics.routes()
        for method, path, handler in operator_routes:
            router.route(method, path, handler)
        router.prefix(API_PREFIX, self.api.not_routed)

        self.listener = Listener(
            config.server, self.admission, router, stats, lambda: stats.connections_open
        )
        self.listen_address: tuple[str, int] | None = None
        self._nursery: trio.Nursery | None = None
        # True once shutdown began: readiness fails and new clients are refused.
        self.draining = False
        self._reload_lock = trio.Lock()
        self.reload_error: str | None = None  # why the last reload was refused
        self._status_note = ""
        self._stop_requested = False
        self._signalled = False  # SIGTERM or SIGINT received (a second one hurries)
        self._drain_scope: trio.CancelScope | None = None
        self._hurried = False

    def _with_overrides(self, config: Config) -> Config:
        if self.worker is not None:
            socket = self.worker.admin_socket
            admin = AdminConfig(socket=socket, mode=config.admin.mode, configured=True)
            config = replace(config, admin=admin)
        if self._listen_override is None:
            return config
        host, port = self._listen_override
        return replace(config, server=replace(config.server, listen_host=host, listen_port=port))

    def _methods_at(self, path: str) -> list[str]:
        return self.router.methods(path)

    # -- running -------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled; SIGTERM/SIGINT end it cleanly."""
        self.listen_address = self.listener.bind(reuse_port=self.worker is not None)
        control = None
        try:
            try:
                control = ControlSocket.open(self.config.admin, self.operations)
            except ControlSocketError as exc:
                raise StartupError(str(exc)) from None
            async with trio.open_nursery() as nursery:
                self.hub.attach(nursery)
                self.hub.now = trio.current_time()
                nursery.start_soon(self.broker_task.run)
                self._nursery = nursery
                if self.hooks is not None:
                    await nursery.start(self.hooks.run)
                if self.cluster is not None:
                    nursery.start_soon(self.cluster.run)
                if control is not None:
                    nursery.start_soon(control.serve)
                nursery.start_soon(self._sweep)
                # Handlers are in place before "listening" is logged: a signal sent as
                # soon as the daemon says it is up must not hit the default action.
                await nursery.start(self._handle_signals)
                if self.worker is not None:
                    nursery.start_soon(self.worker.link.follow, self)
                nursery.start_soon(self.listener.accept, nursery)
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
            self.listener.close()
            if control is not None:
                control.close()

    async def _sweep(self) -> None:
        """Once a second: the hub's coarse clock, idle websockets closed, stuck ones cut."""
        hub = self.hub
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            now = hub.now = trio.current_time()
            # While draining, clients get the whole drain timeout to answer the close;
            # shutdown() cuts whoever is left when it expires.
            closing_grace = math.inf if self.draining else CLOSE_HANDSHAKE_TIMEOUT
            self.websockets.sweep(now, self.config.server.idle_timeout, closing_grace)
            hub.flush()

    async def _handle_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
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
                elif not self._signalled:
                    # Only a second signal hurries: a worker may be draining already at
                    # its supervisor's request when the signal sent to them all arrives.
                    self._signalled = True
                    hint = "send it again to stop at once"
                    if not self.request_stop(f"received {name}", hint):
                        log.info("received %s: draining already (%s)", name, hint)
                else:
                    log.warning("received %s again: stopping without waiting", name)
                    self.hurry()

    def request_stop(self, why: str, hint: str = "") -> bool:
        """Drain and stop; False when that was asked before (nothing changes)."""
        if self._stop_requested or self._nursery is None:
            return False
        self._stop_requested = True
        log.info("%s: shutting down%s", why, f" ({hint})" if hint else "")
        self._nursery.start_soon(self._drain_and_stop, self._nursery)
        return True

    async def _drain_and_stop(self, nursery: trio.Nursery) -> None:
        try:
            await self.shutdown()
        finally:
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
        sessions, and wait for clients to go, at most `[server] drain_timeout` seconds;
        whoever is still connected then is cut."""
        if self.draining:
            return
        self.draining = self.websockets.draining = self.longpoll_sessions.draining = True
        started = trio.current_time()
        timeout = self.config.server.drain_timeout
        self.listener.close()
        self.notifier.stopping(self.status_text())
        log.info(
            "draining: stopped accepting; closing %d websockets with 1001 and %d long-poll "
            "sessions; waiting up to %g s",
            len(self.websockets.live),
            self.stats.longpoll_open,
            timeout,
        )
        for peer in list(self.websockets.live):
            peer.close(close_codes.GOING_AWAY, "server shutting down")
        self.hub.flush()
        with trio.move_on_at(started + timeout) as self._drain_scope:
            if self._hurried:
                self._drain_scope.cancel()
            try:
                await self.longpoll_sessions.drain()
            except Exception:
                log.exception("internal error while ending long-poll sessions")
            await self.websockets.wait_all_closed()
        left = list(self.websockets.live)
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
        if self.cluster is not None:
            await self.cluster.stop()

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

    async def _reload_for_operator(self) -> str | None:
        return None if await self.reload() else self.reload_error

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
        if new.cluster != self.config.cluster:
            log.warning("reload: a changed [cluster] section takes effect only after a restart")
            new = replace(new, cluster=self.config.cluster)
        if (new.server.tls_context is None) != (self.config.server.tls_context is None):
            scheme = "https" if new.server.tls_context is not None else "http"
            log.warning("reload: the listen port now speaks %s to new connections", scheme)
        dropped = _dropped_credentials(self.config, new)
        self.config = new
        self.admission.configure(authenticator, new.server, new.limits)
        self.hub.configure(new.server, new.limits)
        self.listener.configure(new.server)
        self.router.socket_paths = new.server.socket_paths
        self.longpoll.configure(new.longpoll)
        self.api.configure(new.api)
        await self._configure_hooks(new)
        logs.reconfigure(new.log, secret_params=[new.auth.token_param])
        try:
            closed = await self.broker_task.ask(self._apply_in_broker, new, authenticator, dropped)
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

    async def _configure_hooks(self, config: Config) -> None:
        """Ask the back end a (reloaded) [hooks] names, or stop asking when it is gone."""
        if config.hooks is None:
            self.broker.outside = None
            self.admission.connect_hook = None
            return
        if self.hooks is None:
            self.hooks = HookRunner(config.hooks, self.broker_task, self.broker, self.stats)
            if self._nursery is not None:
                await self._nursery.start(self.hooks.run)
        else:
            self.hooks.configure(config.hooks)
        self.admission.connect_hook = self.hooks
        self.broker.outside = self.hooks

    def _refuse_reload(self, reason: str) -> bool:
        self.reload_error = reason
        self._status_note = (
            f"reload refused at {time.strftime('%H:%M:%S')}, running the previous config"
        )
        log.error("reload refused, keeping the running config: %s", reason)
        return False

    def _apply_in_broker(
        self, config: Config, authenticator: Authenticator, dropped: frozenset[bytes] = frozenset()
    ) -> int:
        """Runs in the broker task: the new rules, and sockets whose credential is no longer
        accepted closed (in a cluster, on every node: `dropped` are the credentials the
        new config no longer has). Returns how many were closed here."""
        self.broker.configure(config.topics, config.server.max_channels)
        closed = 0
        revoked = []
        for peer in list(self.broker.peers):
            credential = getattr(peer, "credential", None)
            if not authenticator.credential_valid(credential, peer.user):
                log.info("closing %s: its credential is no longer accepted", peer)
                self.broker.disconnect(peer)
                peer.close(close_codes.GOING_AWAY, "credential revoked")
                closed += 1
                revoked.append(credential)
        if self.cluster is not None and (revoked or dropped):
            self.cluster.credentials_revoked([*revoked, *dropped])
        return closed


def _dropped_credentials(old: Config, new: Config) -> frozenset[bytes]:
    """Static token digests and signing key fingerprints the old config accepted and the
    new one does not."""

    def credentials(config: Config) -> set[bytes]:
        found = {entry.sha256 for entry in config.auth.tokens}
        found.update(s.fingerprint for s in (config.auth.jwt, config.auth.phoenix_token) if s)
        return found

    return frozenset(credentials(old) - credentials(new))


def _shared_bans() -> Bans:
    from phxbroker.cluster.bans import SharedBans

    return SharedBans()


def _cluster_node(
    config: Config,
    broker: Broker,
    gateway: BrokerTask,
    stats: Stats,
    bans: Bans,
    node: str | None,
) -> ClusterNode | None:
    """The node's cluster engine when [cluster] is set, as the broker's fanout; named
    `node`, else as the config says, else after this host and process."""
    if config.cluster is None:
        return None
    from phxbroker.cluster.bans import SharedBans
    from phxbroker.cluster.node import ClusterNode
    from phxbroker.config.cluster import default_node_name

    cluster = ClusterNode(
        config.cluster,
        broker,
        gateway,
        stats,
        bans,
        node=node or config.cluster.node or default_node_name(),
    )
    broker.fanout = cluster
    if isinstance(bans, SharedBans):
        bans.announce = cluster.ban_changed
    return cluster


async def serve(config: Config) -> None:
    """Run the daemon until a signal stops it."""
    await Daemon(config).serve()


# Collect young objects every 5,000 allocations instead of 700. Every connection is a few
# dozen long-lived objects, and each collection that passes over them costs time: with the
# defaults the collector took about a third of the server's CPU per websocket join
# (BENCHMARKS.md measures it by running without this: about 375 -> 254 us per connect +
# upgrade + join at 10,000 connections). The pauses stay short (a young collection walks
# at most a few thousand objects).
GC_YOUNG_THRESHOLD = 5000


def tune_garbage_collector() -> None:
    """Call once, after start-up and before serving: start-up objects (modules, config)
    are moved out of the collector's sight, and young collections happen less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
