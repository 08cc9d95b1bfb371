"""Real pages in headless Chromium against a real `phxbroker serve`.

Each page comes from an origin of its own (a small web server on another port, standing
for the app), loads the npm package's phoenix.js, and connects as a browser does: with an
Origin header that phxbroker's `[server] check_origin` must allow.
"""

from __future__ import annotations

import json
import re
import signal
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.board_backend import SECRET as BOARD_SECRET
from support.board_backend import BoardBackend, example_config
from support.browser import (
    E2E_DIR,
    PHOENIX_JS,
    Browser,
    BrowserError,
    PageServer,
    check_browser_installed,
)
from support.cli import cli

ROOT = Path(__file__).resolve().parent.parent
CHANNEL_PAGE = E2E_DIR / "pages" / "channel.html"
STATUS_DIR = ROOT / "examples" / "status"
STATUS_CONFIG = STATUS_DIR / "phxbroker.toml"
STATUS_PASSWORD = "status-demo"  # the shared password whose digest the example holds


def origin_config(page_origin: str, workdir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The config `phxbroker init --origin <page_origin>` writes, as a new user gets it, and
    the connect params a page of that origin sends. Only where it listens and its admin
    socket change, so that tests run side by side. The one place the browser tests' config
    comes from."""
    made = cli("init", workdir, "--origin", page_origin, "--user", "alice")
    assert made.returncode == 0, made.stderr
    secrets = dict(line.rsplit(": ", 1) for line in made.stdout.splitlines())
    config = tomllib.loads((workdir / "phxbroker.toml").read_text())
    config["server"]["listen"] = "127.0.0.1:0"
    config.setdefault("admin", {})["socket"] = "admin.sock"
    config["auth"]["tokens_file"] = str(workdir / "tokens.toml")
    return config, {"token": secrets["token alice"]}


def status_config(page_origin: str) -> dict[str, Any]:
    """examples/status/phxbroker.toml as shipped, except for the two lines a user edits
    for their own site (where it listens, the app's origin) and a private admin socket."""
    config = tomllib.loads(STATUS_CONFIG.read_text())
    config["server"]["listen"] = "127.0.0.1:0"
    config["server"]["check_origin"] = [page_origin]
    config["admin"]["socket"] = "admin.sock"
    return config


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """A headless Chromium with a fresh profile; closed (every process of it) at teardown."""
    chromium = _start_browser(tmp_path / "chromium-profile")
    try:
        yield chromium
    finally:
        chromium.close()


@pytest.fixture
def channel_pages() -> Iterator[PageServer]:
    """The channel test page and phoenix.js, served from their own origin."""
    files = {"/channel.html": CHANNEL_PAGE, "/phoenix.js": PHOENIX_JS}
    with PageServer(files) as server:
        yield server


def test_a_page_from_an_allowed_origin_joins_pushes_and_sees_the_broadcast(
    broker_factory, channel_pages: PageServer, browser: Browser, tmp_path: Path
) -> None:
    page_origin = channel_pages.origin()
    config, params = origin_config(page_origin, tmp_path / "etc")
    broker = broker_factory(config)

    url = channel_pages.url(
        "/channel.html",
        endpoint=broker.socket_url(),
        params=json.dumps(params),
        topic="room:lobby",
        event="new_msg",
        payload=json.dumps({"body": "hello from a browser"}),
    )
    page = browser.open("page", url)

    assert page.status == 200
    page.expect("socket_open")
    assert page.expect("joined") == {}
    assert page.expect("broadcast") == {"body": "hello from a browser", "user": "alice"}
    assert not page.reported("socket_close")


def test_a_page_from_an_origin_not_configured_is_refused_and_never_joins(
    broker_factory, channel_pages: PageServer, browser: Browser, tmp_path: Path
) -> None:
    config, params = origin_config(channel_pages.origin("127.0.0.1"), tmp_path / "etc")
    broker = broker_factory(config)
    other_origin = channel_pages.origin("localhost")  # the same server, another origin
    since = broker.mark()

    url = channel_pages.url(
        "/channel.html",
        host="localhost",
        endpoint=broker.socket_url(),
        params=json.dumps(params),
        topic="room:lobby",
        event="new_msg",
    )
    page = browser.open("page", url)

    assert page.status == 200  # the page itself loads; only its socket is refused
    # Browsers hide the 403: phoenix.js sees an abnormal close and tries again.
    assert page.expect("socket_close") == {"code": 1006, "clean": False}
    assert page.expect("socket_close", timeout=5) == {"code": 1006, "clean": False}
    broker.wait_for_log(rf"refused connect .*origin.*{re.escape(other_origin)}", since=since)
    assert not page.reported("socket_open")
    assert not page.reported("joined")
    assert not page.reported("broadcast")


def test_two_status_pages_see_each_other_and_count_each_hit_once(
    broker_factory, browser: Browser
) -> None:
    files = {
        "/": STATUS_DIR / "index.html",
        "/index.html": STATUS_DIR / "index.html",
        "/phoenix.js": PHOENIX_JS,
    }
    # The app's host: its pages, and /status passed on to phxbroker (docs/deploy.md).
    with PageServer(files, proxied=("/status",)) as app:
        broker = broker_factory(status_config(app.origin()))
        app.upstream = ("127.0.0.1", broker.port)

        ann = browser.open("ann", app.url("/"))
        bob = browser.open("bob", app.url("/"))
        for page in (ann, bob):
            page.fill("#user", page.name)
            page.fill("#pass", STATUS_PASSWORD)
            page.click("#connect")

        for page in (ann, bob):
            page.wait_for(f"{_text('user-count')} === '2'")
            assert sorted(page.evaluate(_text("users")).split(", ")) == ["ann", "bob"]
            assert page.evaluate(_text("state")) == f"joined as {page.name}"

        # Each push counts once, whoever pushes it and however many pages watch.
        ann.click("#hit")
        for page in (ann, bob):
            page.wait_for(f"{_text('hits')} === '1'")
        bob.click("#hit")
        for page in (ann, bob):
            page.wait_for(f"{_text('hits')} === '2'")

        ann.fill("#msg", "hi bob")
        ann.click("#say button")
        bob.wait_for(f"{_text('msgs')} === 'ann: hi bob'")

        # The socket went to the app's own host, as the page's relative URL says.
        assert "GET /status/websocket" in app.requests
        assert "GET /phoenix.js" in app.requests


def test_closing_the_browser_leaves_no_chromium_process(tmp_path: Path) -> None:
    chromium = _start_browser(tmp_path / "profile")
    try:
        chromium.open("blank", "about:blank")
        running = chromium.chromium_pids()
        assert len(running) >= 2, "expected the browser and its helper processes"
    finally:
        chromium.close()
    assert chromium.chromium_pids() == []
    assert chromium.returncode == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_chromium_goes_with_a_driver_that_is_stopped(tmp_path: Path, signum: int) -> None:
    # As when a test run is interrupted, or killed by a timeout: SIGTERM lets the driver
    # close the browser; after SIGKILL, Chromium sees its control pipe close and exits.
    chromium = _start_browser(tmp_path / "profile")
    try:
        chromium.open("blank", "about:blank")
        assert chromium.chromium_pids()
        chromium.signal_driver(signum)
        assert chromium.wait_for_chromium_exit(timeout=10) == []
    finally:
        chromium.close()


def test_the_status_example_config_runs_as_is(broker_factory, node_client_factory) -> None:
    # The file verbatim; only the port is chosen here, so as not to clash with anything.
    broker = broker_factory(STATUS_CONFIG.read_text(), args=("--listen", "127.0.0.1:0"))
    ann = node_client_factory("ann")
    # The origin of the local try in examples/status/README.md (its Caddyfile).
    endpoint = broker.socket_url("/status")
    ann.connect(endpoint, {"user": "ann", "pass": STATUS_PASSWORD}, origin="http://localhost:8080")
    ann.expect_open()
    assert ann.join("all")["status"] == "ok"
    first = ann.expect({"type": "message", "event": "status_users"})
    assert first["payload"] == {"users": ["ann"], "user_count": 1, "hits": 0, "msgs": []}
    ann.push("all", "hit")
    counted = ann.expect({"type": "message", "event": "status_users", "payload": {"hits": 1}})
    assert counted["payload"]["user_count"] == 1


def _start_browser(profile: Path) -> Browser:
    """Launch Chromium; fail (never skip) the test, saying what to install, when it is missing."""
    try:
        check_browser_installed()
    except BrowserError as exc:
        pytest.fail(str(exc), pytrace=False)
    return Browser(profile).start()


def _text(element_id: str) -> str:
    """A JavaScript expression: the text of the page's element with that id."""
    return f"document.getElementById({element_id!r}).textContent"


def test_the_board_apps_page_works_unchanged_against_phxbroker_and_its_back_end(
    broker_factory, browser: Browser, tmp_path: Path
) -> None:
    board = BoardBackend(tmp_path)
    try:
        # The page comes from the back end; each user's page from its own origin, since
        # the app keeps its token in the origin's localStorage.
        origins = {"john": board.url, "jane": board.url.replace("127.0.0.1", "localhost")}
        config = example_config(board)
        config["server"]["check_origin"] = list(origins.values())
        broker = broker_factory(config, env={"BOARD_HOOK_SECRET": BOARD_SECRET})
        pages = {}
        for name, origin in origins.items():
            url = f"{origin}/?socket=ws://127.0.0.1:{broker.port}/socket"
            page = pages[name] = browser.open(name, url)
            page.fill("#sign-in input[name=email]", f"{name}@phoenix-trello.com")
            page.click("#sign-in button")
            page.wait_for("document.querySelector('#board-list button') !== null")
            page.click("#board-list button")
            page.wait_for(f"{_text('board-name')} === 'Welcome board'")
        john, jane = pages["john"], pages["jane"]
        john.fill("#add-list input[name=name]", "Doing")
        john.click("#add-list button")
        # Created through the back end's hook, broadcast as list:created to both pages.
        for page in (john, jane):
            page.wait_for(
                "[...document.querySelectorAll('#lists h3')].some(h => h.textContent === 'Doing')"
            )
    finally:
        assert board.stop() == 0
