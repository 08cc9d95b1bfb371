"""`phxbroker serve` with `[server] workers = N` (N > 1): a supervisor and N workers.

Each worker is a whole daemon (`phxbroker serve --worker I ...`, its own Python process
and core) listening on the same address with SO_REUSEPORT, so the kernel spreads new
connections over them, and each a node of the `[cluster]`, named `<node>-w<I>`, so
broadcasts, presence, kicks and stats cross between them through Redis as between hosts.
The supervisor serves no client. It

- reserves the listen port (bound, never listening: the kernel hands it no connection)
  so that port 0 becomes one port for every worker, and the port stays this service's
  while a worker restarts;
- starts the workers and starts a new one when one exits (after 0.5 s, doubling up to
  30 s while they keep failing), and kills one whose event loop stopped answering (no
  ping on its link for WORKER_WATCHDOG seconds);
- is the one that speaks to systemd: READY=1 once every worker listens, STATUS= summing
  them, WATCHDOG=1, RELOADING=1/READY=1 around a reload, STOPPING=1 at the drain;
- passes a reload (SIGHUP, `phxbroker reload`) and a drain (SIGTERM, SIGINT; again: stop
  at once) on to every worker, and exits 0 once all have drained;
- answers the CLI on `[admin] socket`: `stats` asks every worker (on its own control
  socket, `<socket>.w<I>`) and adds them up; `reload` goes to every worker; `topics`,
  `users`, `kick`, `unban` and `publish` go to one worker, since each already acts on, or
  reports, the whole cluster.

Each worker is given one end of a socket pair (see worker.py); up it come what the worker
would tell systemd and its reload answers, down it go `reload`, `drain` and `hurry`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from phxbroker import __version__
from phxbroker.config.cluster import default_node_name
from phxbroker.config.settings import Config, load_config, worker_suffix
from phxbroker.config.table import ConfigError
from phxbroker.daemon.worker import DRAIN, HURRY, MAX_MESSAGE, RELOAD
from phxbroker.ops import control_protocol, logs, notify
from phxbroker.ops.control import ControlServer, ControlSocketError
from phxbroker.ops.control_protocol import AdminError, AdminProtocolError, LineBuffer
from phxbroker.ops.notify import Notifier
from phxbroker.ops.report import TOP_TOPICS, rss_bytes
from phxbroker.transport.listener import StartupError, cannot_listen

__all__ = ["StartupError", "Supervisor", "merge_reports"]

log = logging.getLogger("phxbroker.supervisor")

RESTART_FIRST, RESTART_MAX = 0.5, 30.0  # seconds before a new worker, doubling
STABLE_AFTER = 60.0  # a worker that ran this long restarts after RESTART_FIRST again
WORKER_WATCHDOG = 30.0  # seconds a serving worker may stay silent before it is killed
START_TIMEOUT = 60.0  # seconds a worker may take to listen before it is killed
RELOAD_TIMEOUT = 30.0
ASK_TIMEOUT = 10.0  # for a worker's answer on its control socket
STOP_GRACE = 5.0  # beyond drain_timeout, before a worker that does not exit is killed
# What a worker must not inherit: it speaks to the supervisor, never to systemd.
SERVICE_MANAGER_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS")


class NoWorkerAnswers(Exception):
    """No worker could answer a command; str() is one sentence."""


@dataclass
class Worker:
    """One worker slot: the process serving it now (a new one after each exit)."""

    index: int
    node: str
    admin_socket: Path | None = None
    process: trio.Process | None = None
    link: socket.socket | None = None
    state: str = "starting"  # starting, serving, reloading, draining, restarting, exited
    connections: int = 0
    pinged: float = 0.0  # trio time of the last message on the link
    started: float = 0.0
    restarts: int = 0
    stopped_with: int | None = None  # the exit status of the process the drain stopped
    listening: trio.Event = field(default_factory=trio.Event)  # the first READY=1
    reload_answer: trio.MemorySendChannel[str | None] | None = None

    @property
    def name(self) -> str:
        return worker_suffix(self.index)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def tell(self, word: bytes) -> None:
        """Send a request down the link (a few bytes: never blocks)."""
        if self.link is not None and self.running:
            with contextlib.suppress(OSError):
                self.link.send(word)


class Supervisor:
    """Starts, watches and speaks for the workers of one `phxbroker serve`."""

    def __init__(
        self,
        config: Config,
        *,
        listen_override: tuple[str, int] | None = None,
        notifier: Notifier | None = None,
        command: list[str] | None = None,
    ) -> None:
        assert config.path is not None, "workers read the config from its file"
        self.config = config
        self.notifier = notifier if notifier is not None else Notifier.from_environ()
        host, port = listen_override or (config.server.listen_host, config.server.listen_port)
        self.listen_host, self.listen_port = host, port
        # The worker's command line, before its own options: this Python, this package.
        self.command = command or [sys.executable, "-m", "phxbroker"]
        base = (config.cluster.node if config.cluster else "") or default_node_name()
        self.workers = [
            Worker(i, f"{base}-{worker_suffix(i)}") for i in range(config.server.workers)
        ]
        self.started_at = time.time()
        self.stopping = False
        self._stop = trio.Event()
        self._all_listening = False
        self._reload_lock = trio.Lock()
        self._status_note = ""
        self._failure: str | None = None
        self.control: SupervisorControl | None = None

    # -- running -------------------------------------------------------------------------

    async def run(self) -> int:
        """Start the workers and keep them running until a drain has stopped them all;
        the exit status (0: every worker drained and exited 0). StartupError when the
        port, the admin socket or a first worker cannot start."""
        reservation = self._reserve_port()
        try:
            try:
                bound = ControlServer.bind(self.config.admin)
            except ControlSocketError as exc:
                raise StartupError(str(exc)) from None
            if bound is not None:
                self.control = SupervisorControl(self, *bound)
                for worker in self.workers:
                    worker.admin_socket = Path(f"{bound[1]}.{worker.name}")
            async with trio.open_nursery() as nursery:
                await nursery.start(self._handle_signals, nursery)
                nursery.start_soon(self._announce_when_listening, nursery)
                nursery.start_soon(self._watch_pings)
                async with trio.open_nursery() as keepers:
                    for worker in self.workers:
                        keepers.start_soon(self._keep_running, worker)
                nursery.cancel_scope.cancel()  # every worker has stopped for good
        finally:
            reservation.close()
            if self.control is not None:
                self.control.close()
        if self._failure is not None:
            raise StartupError(self._failure)
        failed = [
            f"{w.name} {_describe_exit(w.stopped_with)}" for w in self.workers if w.stopped_with
        ]
        if failed:
            log.warning("stopped; workers that did not exit cleanly: %s", ", ".join(failed))
            return 1
        return 0

    def _reserve_port(self) -> socket.socket:
        """Bind (never listen) the port with SO_REUSEPORT; StartupError with one sentence."""
        host, port = self.listen_host, self.listen_port
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if port and _someone_listens(host, port):
            raise StartupError(f"cannot listen on {shown}: the address is already in use")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise cannot_listen(shown, exc) from None
        self.listen_port = sock.getsockname()[1]
        return sock

    async def _announce_when_listening(self, nursery: trio.Nursery) -> None:
        for worker in self.workers:
            await worker.listening.wait()
        self._all_listening = True
        if self.control is not None:
            nursery.start_soon(self.control.serve)
        host = self.listen_host if ":" not in self.listen_host else f"[{self.listen_host}]"
        scheme = "https" if self.config.server.tls_context is not None else "http"
        log.info(
            "%d workers listening on %s://%s:%d (pids %s)",
            len(self.workers),
            scheme,
            host,
            self.listen_port,
            ", ".join(str(w.pid) for w in self.workers),
        )
        if not self.stopping:
            self.notifier.ready(self.status_text())
        nursery.start_soon(
            lambda: notify.keep_informed(
                self.notifier, self.status_text, watchdog=notify.watchdog_interval()
            )
        )

    async def _keep_running(self, worker: Worker) -> None:
        """Run the worker's slot: a new process whenever one exits, until the drain."""
        backoff = RESTART_FIRST
        while True:
            started = trio.current_time()
            code = await self._run_worker(worker)
            if self.stopping:
                worker.state = "exited"
                worker.stopped_with = code
                return
            if not self._all_listening and not worker.listening.is_set():
                self._fail(
                    f"worker {worker.name} exited with {_describe_exit(code)} while starting "
                    "(its log says why)"
                )
                worker.state = "exited"
                return
            if trio.current_time() - started >= STABLE_AFTER:
                backoff = RESTART_FIRST
            worker.state = "restarting"
            worker.connections = 0
            log.warning(
                "worker %s (pid %s) exited with %s; starting a new one in %.1f s",
                worker.name,
                worker.pid,
                _describe_exit(code),
                backoff,
            )
            with trio.move_on_after(backoff):
                await self._stop.wait()
            if self._stop.is_set():
                worker.state = "exited"
                return
            backoff = min(backoff * 2, RESTART_MAX)
            worker.restarts += 1

    async def _run_worker(self, worker: Worker) -> int:
        """Start one process for the slot and return its exit code once it has exited."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        env = {k: v for k, v in os.environ.items() if k not in SERVICE_MANAGER_VARS}
        env["WATCHDOG_USEC"] = str(int(WORKER_WATCHDOG * 1_000_000))
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        command = [
            *self.command,
            "serve",
            "--config",
            str(self.config.path),
            "--listen",
            f"{host}:{self.listen_port}",
            "--worker",
            str(worker.index),
            "--worker-node",
            worker.node,
            "--worker-link",
            str(theirs.fileno()),
            "--worker-admin",
            str(worker.admin_socket or ""),
        ]
        try:
            try:
                process = await trio.lowlevel.open_process(
                    command, pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL
                )
            finally:
                theirs.close()
        except OSError as exc:
            ours.close()
            log.error("cannot start worker %s: %s", worker.name, exc)
            return 127
        worker.process, worker.link = process, ours
        worker.state = "starting"
        worker.started = worker.pinged = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_link, worker, ours)
                code = await process.wait()
                nursery.cancel_scope.cancel()
            return code
        finally:
            with trio.CancelScope(shield=True):
                await self._reap(worker, process)
            ours.close()
            if worker.reload_answer is not None:
                worker.reload_answer.send_nowait("the worker exited")
                worker.reload_answer = None

    async def _reap(self, worker: Worker, process: trio.Process) -> None:
        """Make sure the process is gone (the supervisor itself is stopping or failed)."""
        if process.returncode is not None:
            return
        process.terminate()
        with trio.move_on_after(self.config.server.drain_timeout + STOP_GRACE):
            await process.wait()
            return
        log.warning("worker %s (pid %d) did not stop: killing it", worker.name, process.pid)
        process.kill()
        await process.wait()

    async def _read_link(self, worker: Worker, link: socket.socket) -> None:
        while True:
            try:
                await trio.lowlevel.wait_readable(link)
                data = link.recv(MAX_MESSAGE)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return
            worker.pinged = trio.current_time()
            lines = data.decode(errors="replace").split("\n")
            self._heard(worker, dict(line.split("=", 1) for line in lines if "=" in line))

    def _heard(self, worker: Worker, fields: dict[str, str]) -> None:
        if fields.get("CONNECTIONS", "").isdigit():
            worker.connections = int(fields["CONNECTIONS"])
        if fields.get("STOPPING") == "1":
            worker.state = "draining"
        elif fields.get("RELOADING") == "1" and worker.state == "serving":
            worker.state = "reloading"
        elif fields.get("READY") == "1" and worker.state in ("starting", "reloading"):
            if worker.state == "starting" and worker.listening.is_set():
                log.info("worker %s (pid %s) is serving again", worker.name, worker.pid)
            worker.state = "serving"
            worker.listening.set()
        answer = worker.reload_answer
        if answer is not None and ("RELOADED" in fields or "RELOAD_REFUSED" in fields):
            worker.reload_answer = None
            answer.send_nowait(fields.get("RELOAD_REFUSED"))

    async def _watch_pings(self) -> None:
        """Kill a worker whose event loop stopped, or that never finished starting: it
        answers nobody, so it must go (and a new one comes)."""
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            for worker in self.workers:
                process = worker.process
                if process is None or process.returncode is not None:
                    continue
                if worker.state == "starting":
                    why = f"did not listen within {START_TIMEOUT:.0f} s"
                    stuck = now - worker.started > START_TIMEOUT
                else:
                    why = f"sent no sign of life for {WORKER_WATCHDOG:.0f} s"
                    stuck = now - worker.pinged > WORKER_WATCHDOG  # it pings while draining too
                if stuck:
                    log.error("worker %s (pid %d) %s: killing it", worker.name, process.pid, why)
                    process.kill()
                    worker.pinged = worker.started = now

    # -- signals, drain and reload -------------------------------------------------------

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
                    if self.stopping:
                        log.info("ignoring SIGHUP: shutting down")
                    else:
                        nursery.start_soon(self.reload)
                elif not self.stopping:
                    log.info(
                        "received %s: draining every worker (send it again to stop at once)",
                        name,
                    )
                    self.drain()
                else:
                    log.warning("received %s again: the workers stop without waiting", name)
                    for worker in self.workers:
                        worker.tell(HURRY)

    def _fail(self, why: str) -> None:
        """A first start failed: stop the other workers, then the supervisor, with `why`."""
        self._failure = why
        self.stopping = True
        self._stop.set()
        for worker in self.workers:
            if worker.running and worker.process is not None:
                worker.process.terminate()

    def drain(self) -> None:
        """Every worker drains its clients and exits; none is started again."""
        if self.stopping:
            return
        self.stopping = True
        self._stop.set()
        self.notifier.stopping(self.status_text())
        for worker in self.workers:
            worker.tell(DRAIN)

    async def reload(self) -> str | None:
        """Re-read the config here and in every serving worker: None when all applied it,
        else why it was refused (by the file, or by which worker)."""
        async with self._reload_lock:
            if self.stopping:
                return "the daemon is shutting down"
            self.notifier.reloading()
            try:
                return await self._reload()
            finally:
                self.notifier.ready(self.status_text())

    async def _reload(self) -> str | None:
        path = self.config.path
        assert path is not None
        try:
            new = load_config(path)
        except (ConfigError, OSError, ValueError) as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self._status_note = (
                f"reload refused at {time.strftime('%H:%M:%S')}, running the previous config"
            )
            return str(exc)
        old = self.config
        for what, before, after in (
            ("[server] workers", old.server.workers, new.server.workers),
            ("[server] listen", old.server.listen, new.server.listen),
            ("[admin] socket", old.admin.socket, new.admin.socket),
        ):
            if before != after:
                log.warning("reload: a changed %s takes effect only after a restart", what)
        self.config = new
        logs.reconfigure(new.log, secret_params=[new.auth.token_param])
        asked = [w for w in self.workers if w.state == "serving" and w.running]
        refusals: list[str] = []

        async def ask(worker: Worker) -> None:
            send, receive = trio.open_memory_channel[str | None](1)
            worker.reload_answer = send
            worker.tell(RELOAD)
            with trio.move_on_after(RELOAD_TIMEOUT) as waited:
                refused = await receive.receive()
            if waited.cancelled_caught:
                worker.reload_answer = None
                refused = f"no answer within {RELOAD_TIMEOUT:g} s"
            if refused is not None:
                refusals.append(f"worker {worker.name}: {refused}")

        async with trio.open_nursery() as nursery:
            for worker in asked:
                nursery.start_soon(ask, worker)
        if refusals:
            self._status_note = f"reload refused at {time.strftime('%H:%M:%S')}"
            log.error("reload refused: %s", "; ".join(refusals))
            return "; ".join(refusals)
        self._status_note = f"config reloaded at {time.strftime('%H:%M:%S')}"
        log.info("reloaded config from %s in %d workers", path, len(asked))
        return None

    def status_text(self) -> str:
        """What systemd shows as the service's Status: the workers summed, in one line."""
        total = sum(w.connections for w in self.workers)
        plural = "" if total == 1 else "s"
        each = ", ".join(
            f"{w.name} {w.connections}"
            if w.state in ("serving", "reloading", "draining")
            else f"{w.name} {w.state}"
            for w in self.workers
        )
        if self.stopping:
            return f"draining: {total} connection{plural} left ({each})"
        text = f"{len(self.workers)} workers serving {total} connection{plural} ({each})"
        return f"{text}; {self._status_note}" if self._status_note else text

    # -- the CLI's commands --------------------------------------------------------------

    def answering(self) -> list[Worker]:
        """Workers whose control socket should answer now, lowest index first (a draining
        worker still answers until it exits)."""
        return [
            w
            for w in self.workers
            if w.admin_socket is not None
            and w.running
            and w.state in ("serving", "reloading", "draining")
        ]

    async def ask_one(self, line: bytes) -> bytes:
        """The answer line of the first worker that answers `line`."""
        for worker in self.answering():
            assert worker.admin_socket is not None
            try:
                return await ask_control(worker.admin_socket, line)
            except (OSError, trio.TooSlowError, AdminProtocolError) as exc:
                log.info("worker %s did not answer the CLI: %s", worker.name, exc)
        raise NoWorkerAnswers("no worker is serving right now (restarting?): try again")

    async def report(self) -> dict[str, Any]:
        """Every serving worker's report, added up, with a row per worker."""
        reports: dict[int, dict[str, Any]] = {}
        request = control_protocol.encode_request("stats").rstrip(b"\n")

        async def ask(worker: Worker) -> None:
            assert worker.admin_socket is not None
            try:
                answer = await ask_control(worker.admin_socket, request)
                reports[worker.index] = control_protocol.decode_response(answer)
            except (OSError, trio.TooSlowError, AdminProtocolError, AdminError) as exc:
                log.info("worker %s did not answer stats: %s", worker.name, exc)

        async with trio.open_nursery() as nursery:
            for worker in self.answering():
                nursery.start_soon(ask, worker)
        if not reports:
            raise NoWorkerAnswers("no worker is serving right now (restarting?): try again")
        rows = [
            {
                "worker": w.name,
                "node": w.node,
                "pid": w.pid,
                "state": w.state,
                "restarts": w.restarts,
                **_row(reports.get(w.index), w.connections),
            }
            for w in self.workers
        ]
        return merge_reports(
            [reports[i] for i in sorted(reports)],
            pid=os.getpid(),
            uptime=time.time() - self.started_at,
            rss=rss_bytes(),
            workers=rows,
        )


class SupervisorControl(ControlServer):
    """The admin socket of a supervisor: the CLI's commands answered by the workers."""

    def __init__(self, supervisor: Supervisor, sock: socket.socket, path: Path) -> None:
        super().__init__(sock, path)
        self.supervisor = supervisor

    async def answer(self, line: bytes) -> bytes:
        try:
            request = control_protocol.decode_request(line)
        except AdminProtocolError as exc:
            return control_protocol.encode_error(str(exc))
        try:
            if request.command == "stats":
                return control_protocol.encode_result(await self.supervisor.report())
            if request.command == "reload":
                refused = await self.supervisor.reload()
                if refused is not None:
                    return control_protocol.encode_error(
                        f"reload refused, the running config is kept: {refused}"
                    )
                return control_protocol.encode_result({"path": str(self.supervisor.config.path)})
            # The others act on, or report, the whole cluster from any one worker.
            return await self.supervisor.ask_one(line)
        except NoWorkerAnswers as exc:
            return control_protocol.encode_error(str(exc))
        except Exception:
            log.exception("internal error in admin command %s", request.command)
            return control_protocol.encode_error(
                f"internal error while running {request.command}: see the daemon's log"
            )


async def ask_control(path: Path, line: bytes) -> bytes:
    """Send one request line to a control socket and return its answer line."""
    with trio.fail_after(ASK_TIMEOUT):
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(line + b"\n")
            lines = LineBuffer()
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    raise ConnectionResetError(f"{path} closed the connection")
                answers = lines.feed(data)
                if answers:
                    return answers[0] + b"\n"


def merge_reports(
    reports: list[dict[str, Any]],
    *,
    pid: int,
    uptime: float,
    rss: int | None,
    workers: list[dict[str, Any]],
) -> dict[str, Any]:
    """One report for the host from its workers' (`report.py`'s shape): counters,
    connections, channels and users added up, topics merged by name, the first worker's
    view of the cluster, and `workers`, a row per worker."""
    topics: dict[str, dict[str, Any]] = {}
    listed = 0
    for report in reports:
        for entry in report.get("topics", []):
            listed += 1
            seen = topics.get(entry["topic"])
            if seen is None:
                topics[entry["topic"]] = dict(entry)
                continue
            seen["subscribers"] += entry["subscribers"]
            seen["users"] += entry["users"]
            # Presence and hits are the cluster's, the same in every worker.
            seen["presences"] = _larger(seen["presences"], entry["presences"])
            seen["hits"] = max(seen["hits"], entry["hits"])
    bans: dict[str, float] = {}
    for report in reports:
        for user, left in (report.get("bans") or {}).items():
            bans[user] = max(left, bans.get(user, 0.0))
    merged: dict[str, Any] = {
        "version": __version__,
        "pid": pid,
        "uptime": uptime,
        "rss_bytes": (rss or 0) + sum(r.get("rss_bytes") or 0 for r in reports),
        "connections": sum(r["connections"] for r in reports),
        "channels": sum(r["channels"] for r in reports),
        # A user with sockets on two workers counts on both; the cluster's totals (from
        # the user lists) count each user once.
        "user_count": sum(r["user_count"] for r in reports),
        # A topic listed by several workers is one topic.
        "topic_count": sum(r["topic_count"] for r in reports) - (listed - len(topics)),
        "topics": sorted(topics.values(), key=lambda t: (-t["subscribers"], t["topic"]))[
            :TOP_TOPICS
        ],
        "bans": bans,
        "counters": _add_up([r["counters"] for r in reports]),
        "workers": workers,
    }
    cluster = next((r["cluster"] for r in reports if r.get("cluster")), None)
    if cluster is not None:
        merged["cluster"] = cluster
    return merged


def _add_up(values: list[Any]) -> Any:
    """Numbers added, dicts merged key by key, anything else: the distinct values."""
    if all(isinstance(v, dict) for v in values):
        keys = dict.fromkeys(k for v in values for k in v)
        return {k: _add_up([v[k] for v in values if k in v]) for k in keys}
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return sum(values)
    distinct = sorted({str(v) for v in values})
    return distinct[0] if len(distinct) == 1 else ",".join(distinct)


def _larger(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _row(report: dict[str, Any] | None, connections: int) -> dict[str, Any]:
    if report is None:
        return {"connections": connections}
    return {
        "connections": report["connections"],
        "channels": report["channels"],
        "user_count": report["user_count"],
        "topic_count": report["topic_count"],
        "deliveries": report["counters"].get("deliveries", 0),
        "rss_bytes": report.get("rss_bytes"),
    }


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _someone_listens(host: str, port: int) -> bool:
    """Whether a server already accepts connections on the port (SO_REUSEPORT would let
    this service share it with that server, of the same user, unnoticed)."""
    target = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        with socket.create_connection((target, port), timeout=1.0):
            return True
    except OSError:
        return False
