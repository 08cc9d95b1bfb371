"""Headless Chromium for the browser tests, and the web server its pages come from.

`Browser` runs tests/e2e/browser.mjs (playwright-core driving Debian's /usr/bin/chromium)
and opens `Page`s; a page reports what happens to it with `window.reportToTest(name,
detail)`, which the test waits for with `Page.expect`. `PageServer` serves the pages from
an origin of their own, and passes chosen paths (the socket paths) on to phxbroker as a
reverse proxy in front of an app would.
"""

from __future__ import annotations

import contextlib
import http.server
import mimetypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from support.node_client import E2E_DIR, NodeClient, NodeClientError, check_node_installed

DRIVER = E2E_DIR / "browser.mjs"
CHROMIUM = Path(os.environ.get("PHXBROKER_CHROMIUM", "/usr/bin/chromium"))
PHOENIX_JS = E2E_DIR / "node_modules" / "phoenix" / "priv" / "static" / "phoenix.js"
INSTALL_HINT = (
    "run `make test` (or scripts/install-system-packages.sh and `npm ci --prefix tests/e2e`)"
)
# How long Chromium's processes may take to go once the driver has closed the browser.
EXIT_GRACE_S = 5.0

Event = dict[str, Any]


class BrowserError(NodeClientError):
    """The browser or a page did not do what the test waited for; the message says what
    it did report."""


def check_browser_installed() -> str:
    """Return the `node` executable, or raise BrowserError saying what to install."""
    node = check_node_installed()
    if not os.access(CHROMIUM, os.X_OK):
        raise BrowserError(f"{CHROMIUM} is missing: {INSTALL_HINT} to install Chromium")
    if not (E2E_DIR / "node_modules" / "playwright-core").is_dir():
        raise BrowserError(f"{E2E_DIR / 'node_modules'} has no playwright-core: {INSTALL_HINT}")
    return node


def processes_using(marker: str) -> list[int]:
    """Pids of the processes whose command line contains `marker` (pgrep -f)."""
    found = subprocess.run(["pgrep", "-f", "--", marker], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


class Browser(NodeClient):
    """One headless Chromium with its own fresh profile in `user_data_dir`.

    Every Chromium process of this browser has that directory on its command line, so
    `chromium_pids()` finds them; `close()` leaves none behind (it kills the driver's whole
    process group if the driver does not close the browser itself in time).
    """

    def __init__(self, user_data_dir: Path, name: str = "chromium") -> None:
        super().__init__(name)
        self.user_data_dir = Path(user_data_dir)
        self.version = ""
        self.playwright_version = ""
        self._pages: dict[str, Page] = {}

    def start(self, timeout: float = 20) -> Browser:
        """Launch Chromium; return once it is ready for pages."""
        node = check_browser_installed()
        self.user_data_dir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [node, str(DRIVER), str(self.user_data_dir)],
            cwd=E2E_DIR,
            env={**os.environ, "PHXBROKER_CHROMIUM": str(CHROMIUM)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            bufsize=1,
            # Its own process group, which Chromium's processes inherit: close() can end
            # them all even if the driver hangs.
            start_new_session=True,
        )
        threading.Thread(target=self._read_events, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        try:
            ready = self.expect({"type": "ready"}, timeout=timeout)
        except NodeClientError as exc:
            self.close()
            raise BrowserError(str(exc)) from None
        self.version, self.playwright_version = ready["browser"], ready["playwright"]
        return self

    def open(self, name: str, url: str, timeout: float = 10) -> Page:
        """Open a new page called `name` at `url` and return once it has loaded."""
        ack = self.run({"cmd": "open", "page": name, "url": url, "timeout": timeout * 1000})
        page = Page(self, name, ack["url"], ack["status"])
        self._pages[name] = page
        return page

    def run(self, cmd: Mapping[str, Any], timeout: float = 10) -> Event:
        """Send a command and return its ack once the driver has carried it out.

        A command the driver could not carry out (a selector never found, a JS error, a
        page that does not load) raises BrowserError with its message.
        """
        cmd_id = self.send(cmd)

        def answer(event: Event) -> bool:
            return event["type"] in ("ack", "command_error") and event.get("id") == cmd_id

        # The driver applies `timeout` to the command itself; leave it room to answer.
        event = self.expect(answer, timeout=timeout + 5)
        if event["type"] == "command_error":
            raise BrowserError(f"{cmd['cmd']} failed: {event['message']}; {self.diagnostics()}")
        return event

    @property
    def returncode(self) -> int | None:
        """The driver's exit code, None while it runs."""
        return None if self._proc is None else self._proc.poll()

    def chromium_pids(self) -> list[int]:
        """Pids of this browser's Chromium processes still running."""
        return processes_using(f"--user-data-dir={self.user_data_dir}")

    def close(self, timeout: float = 10) -> None:
        """Close the browser and end the driver; kill whatever is left after `timeout` s.

        Raises BrowserError if Chromium processes had to be killed: a browser that outlives
        its driver is a bug worth seeing.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, ValueError, OSError):
                proc.stdin.write('{"cmd": "exit"}\n')
                proc.stdin.close()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
        leftovers = self.wait_for_chromium_exit(EXIT_GRACE_S)
        if leftovers:
            self._kill_group()
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise BrowserError(
                f"Chromium processes {leftovers} outlived the driver and were killed; "
                + self.diagnostics()
            )

    def kill(self) -> None:
        """SIGKILL the driver and every process of its group (Chromium included)."""
        self._kill_group()

    def _kill_group(self) -> None:
        proc = self._require_proc()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def signal_driver(self, signum: int) -> None:
        """Send a signal to the driver alone (not to Chromium)."""
        self._require_proc().send_signal(signum)

    def wait_for_chromium_exit(self, timeout: float) -> list[int]:
        """Wait up to `timeout` s for this browser's Chromium processes to be gone; return
        those still running."""
        # Chromium's helper processes exit a moment after the browser process, which the
        # driver waited for; nothing signals that moment, so look until they are gone.
        deadline = time.monotonic() + timeout
        while (pids := self.chromium_pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return pids


class Page:
    """One tab of a Browser. Its events are what the page passed to `reportToTest`, what
    it logged to the console, and its websockets opening and closing."""

    def __init__(self, browser: Browser, name: str, url: str, status: int | None) -> None:
        self.browser = browser
        self.name = name
        self.url = url
        self.status = status

    def expect(self, name: str, timeout: float = 5) -> Any:
        """The first `reportToTest(name, ...)` of this page not yet consumed: its detail.

        Raises BrowserError, with what the page did report, if none comes within `timeout`
        s; a JavaScript error in the page fails it at once.
        """

        def wanted(event: Event) -> bool:
            if event.get("page") != self.name:
                return False
            if event["type"] == "page_error":  # no point waiting on: the page is broken
                raise BrowserError(f"page {self.name}: {event['message']}")
            return event["type"] == "page_event" and event["name"] == name

        try:
            return self.browser.expect(wanted, timeout=timeout)["detail"]
        except NodeClientError as exc:
            if isinstance(exc, BrowserError):
                raise
            raise BrowserError(
                f"page {self.name} did not report {name!r} within {timeout} s; "
                + self.browser.diagnostics()
            ) from None

    def reported(self, name: str) -> list[Any]:
        """Details of every `reportToTest(name, ...)` so far (consumed or not); never waits."""
        return [
            event["detail"]
            for event in self.browser.seen({"type": "page_event", "page": self.name})
            if event["name"] == name
        ]

    def console(self) -> list[str]:
        """The page's console messages so far."""
        return [e["text"] for e in self.browser.seen({"type": "console", "page": self.name})]

    def evaluate(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page; its JSON value."""
        return self.browser.run({"cmd": "evaluate", "page": self.name, "expression": expression})[
            "value"
        ]

    def wait_for(self, expression: str, timeout: float = 5) -> Any:
        """Wait until a JavaScript expression is truthy in the page; return its value."""
        cmd = {"cmd": "wait_for", "page": self.name, "expression": expression}
        try:
            return self.browser.run({**cmd, "timeout": timeout * 1000}, timeout=timeout)["value"]
        except BrowserError as exc:
            raise BrowserError(f"page {self.name}: {expression} never held: {exc}") from None

    def fill(self, selector: str, value: str) -> None:
        self.browser.run({"cmd": "fill", "page": self.name, "selector": selector, "value": value})

    def click(self, selector: str) -> None:
        self.browser.run({"cmd": "click", "page": self.name, "selector": selector})

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the whole page (for a person to look at)."""
        self.browser.run({"cmd": "screenshot", "page": self.name, "path": str(path)})
        return path

    def close(self) -> None:
        self.browser.run({"cmd": "close_page", "page": self.name})


class PageServer:
    """A small web server standing for an app's front: it serves `files` (URL path ->
    file) and passes every request under one of `proxied` paths (e.g. "/status", for
    /status/websocket and /status/longpoll) to `upstream`, websocket upgrades included,
    as nginx or Caddy in front of an app and phxbroker would.

    It listens on 127.0.0.1; its pages may be loaded as http://127.0.0.1:PORT or, as a
    different origin, http://localhost:PORT.
    """

    def __init__(
        self,
        files: Mapping[str, Path],
        proxied: tuple[str, ...] = (),
        upstream: tuple[str, int] | None = None,
    ) -> None:
        self.files = dict(files)
        self.proxied = proxied
        self.upstream = upstream  # may be set once phxbroker is up
        self.requests: list[str] = []  # "GET /path", for diagnostics and assertions
        self._server = _ThreadingServer(("127.0.0.1", 0), _Handler, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> PageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def origin(self, host: str = "127.0.0.1") -> str:
        """The origin of the pages when loaded through `host`."""
        return f"http://{host}:{self.port}"

    def url(self, path: str = "/", host: str = "127.0.0.1", **query: str) -> str:
        """The URL of `path` (with `query` encoded) through `host`."""
        return self.origin(host) + path + (f"?{urlencode(query)}" if query else "")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()

    def is_proxied(self, path: str) -> bool:
        return any(path == prefix or path.startswith(prefix + "/") for prefix in self.proxied)


class _ThreadingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, owner: PageServer) -> None:
        self.owner = owner
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__(address, handler)

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)

    def forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)

    def close_connections(self) -> None:
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ThreadingServer

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_OPTIONS(self) -> None:
        self._route()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are recorded in PageServer.requests instead

    def _route(self) -> None:
        owner = self.server.owner
        path = urlsplit(self.path).path
        owner.requests.append(f"{self.command} {path}")
        if owner.is_proxied(path):
            self._proxy()
        elif self.command == "GET" and path in owner.files:
            self._send_file(owner.files[path])
        else:
            self._send_plain(404, f"no page at {path}\n")

    def _send_file(self, file: Path) -> None:
        body = file.read_bytes()
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self.send_response(200)
        self.send_header(
            "Content-Type", f"{kind}; charset=utf-8" if kind.startswith("text/") else kind
        )
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _send_plain(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _proxy(self) -> None:
        """Forward this request and everything after it on the connection to upstream."""
        self.close_connection = True
        upstream_address = self.server.owner.upstream
        if upstream_address is None:
            self._send_plain(502, "no upstream set for proxied paths\n")
            return
        try:
            upstream = socket.create_connection(upstream_address, timeout=5)
        except OSError as exc:
            self._send_plain(502, f"cannot reach {upstream_address}: {exc}\n")
            return
        upstream.settimeout(None)
        upgrade = self.headers.get("Upgrade", "").lower() == "websocket"
        # Hop-by-hop headers: a plain request goes alone on its upstream connection
        # (Connection: close), so nothing the client sends after it goes astray.
        dropped = {"x-forwarded-for"} | (set() if upgrade else {"connection", "keep-alive"})
        head = [self.requestline]
        head += [
            f"{key}: {value}" for key, value in self.headers.items() if key.lower() not in dropped
        ]
        head.append(f"X-Forwarded-For: {self.client_address[0]}")
        if not upgrade:
            head.append("Connection: close")
        client = self.connection
        self.server.track(client)
        self.server.track(upstream)
        try:
            upstream.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                upstream.sendall(self.rfile.read(length))
            if upgrade:
                threading.Thread(
                    target=self._pump_to_upstream, args=(upstream,), daemon=True
                ).start()
            _pump(upstream, client)
        finally:
            for sock in (upstream, client):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            upstream.close()
            self.server.forget(client)
            self.server.forget(upstream)

    def _pump_to_upstream(self, upstream: socket.socket) -> None:
        # Read through rfile: it may already hold bytes the client sent after the request.
        with contextlib.suppress(OSError, ValueError):
            while chunk := self.rfile.read1(65536):
                upstream.sendall(chunk)
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            sink.sendall(chunk)
