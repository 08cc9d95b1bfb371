"""End to end: the README's examples, run as written against a real `phxbroker serve`.

The Node example is run by Node itself; the reference apps' TOML blocks are the brokers'
configs (with a free port and a private admin socket added) and the real phoenix.js
client plays each app's page.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from support.broker import BrokerProcess
from support.node_client import E2E_DIR, NodeClient, check_node_installed

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
APP_ORIGIN = "https://app.example.com"
NO_RETRY = {"reconnectAfterMs": [60_000], "rejoinAfterMs": [60_000]}

Factory = Callable[..., Any]


def code_block(heading: str, language: str) -> str:
    """The first ```language block after the README line `heading`."""
    section = README[README.index(f"\n{heading}\n") :]
    found = re.search(rf"^```{language}\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert found, f"no {language} block after {heading!r} in README.md"
    return found.group(1)


def runnable(config: str) -> str:
    """A README config block with a free port and an admin socket of its own."""
    if "[server]\n" not in config:
        config = "[server]\n" + config
    config = config.replace("[server]\n", '[server]\nlisten = "127.0.0.1:0"\n', 1)
    return config + '\n[admin]\nsocket = "admin.sock"\n'


def read_lines_until(proc: subprocess.Popen[str], pattern: str, timeout: float = 10) -> str:
    """Everything `proc` printed up to the first line matching `pattern`."""
    deadline = time.monotonic() + timeout
    out = ""
    assert proc.stdout is not None
    while not re.search(pattern, out, re.MULTILINE):
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"no line matching {pattern!r}; got:\n{out}"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            out += proc.stdout.readline()
    return out


# -- the Node example ----------------------------------------------------------------------


def test_the_node_example_talks_websocket(broker_factory: Factory, tmp_path: Path) -> None:
    node = check_node_installed()
    example = (ROOT / "config.example.toml").read_text()
    broker: BrokerProcess = broker_factory(
        example.replace('listen = "127.0.0.1:4000"', 'listen = "127.0.0.1:0"')
    )
    script = code_block(
        "`make serve` serves phoenix.js clients at `ws://127.0.0.1:4000/socket`. From Node", "js"
    )
    script = script.replace("ws://127.0.0.1:4000/socket", broker.socket_url())
    (tmp_path / "example.mjs").write_text(script)
    (tmp_path / "node_modules").symlink_to(E2E_DIR / "node_modules")  # phoenix and ws

    proc = subprocess.Popen(
        [node, "example.mjs"], cwd=tmp_path, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        out = read_lines_until(proc, r"^alice hello$")
    finally:
        proc.kill()
        proc.wait()

    assert "joined { joined: 'lobby' }" in out
    broker.wait_for_log(r"CONNECTED TO /socket in \S+: websocket \d+, user alice")
    assert "longpoll" not in broker.log_text


# -- the status app ------------------------------------------------------------------------


def test_the_status_app_config_serves_its_page_and_a_joiner_gets_the_map_once(
    broker_factory: Factory, node_client_factory: Factory
) -> None:
    password = "status-" + uuid.uuid4().hex
    config = code_block("#### The status app", "toml").replace(
        "<sha256 of the shared password>", hashlib.sha256(password.encode()).hexdigest()
    )
    broker: BrokerProcess = broker_factory(runnable(config))

    def page(user: str) -> NodeClient:
        client: NodeClient = node_client_factory(user)
        params = {"user": user, "pass": password}
        client.connect(broker.socket_url("/status"), params, origin=APP_ORIGIN, **NO_RETRY)
        client.expect_open()
        assert client.join("all")["status"] == "ok"
        return client

    def maps(client: NodeClient) -> list[list[str]]:
        return [e["payload"]["users"] for e in client.seen({"event": "status_users"})]

    ann = page("ann")
    ann.expect({"event": "status_users", "payload": {"users": ["ann"]}})
    bob = page("bob")
    bob.expect({"event": "status_users", "payload": {"users": ["ann", "bob"]}})
    ann.expect({"event": "status_users", "payload": {"users": ["ann", "bob"]}})
    # Once per change: no stale map pushed before the broadcast the join caused.
    assert maps(ann) == [["ann"], ["ann", "bob"]]
    assert maps(bob) == [["ann", "bob"]]

    bob.push("all", "hit", {})
    for client in (ann, bob):
        client.expect({"event": "status_users", "payload": {"hits": 1}})
    stranger: NodeClient = node_client_factory("stranger")
    stranger.connect(
        broker.socket_url("/status"),
        {"user": "eve", "pass": "guess"},
        origin=APP_ORIGIN,
        **NO_RETRY,
    )
    stranger.expect({"type": "close"})
    assert stranger.seen({"type": "open"}) == []


# -- the board app -------------------------------------------------------------------------


def guardian_token(secret: str, sub: str) -> str:
    """A token as Guardian signs it for the board app (HS512; aud is the issuer)."""
    now = int(time.time())
    claims = {
        "sub": sub,
        "aud": "board",
        "iss": "board",
        "typ": "access",
        "iat": now,
        "nbf": now - 1,
        "exp": now + 3600,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, secret, "HS512")


def test_a_guardian_token_joins_its_users_topic_and_no_other(
    broker_factory: Factory, node_client_factory: Factory
) -> None:
    secret = os.urandom(48).hex()
    config = code_block("#### The board app", "toml")
    broker: BrokerProcess = broker_factory(runnable(config), env={"GUARDIAN_SECRET": secret})

    user1: NodeClient = node_client_factory("user1")
    user1.connect(broker.socket_url(), {"token": guardian_token(secret, "User:1")}, **NO_RETRY)
    user1.expect_open()
    assert user1.join("users:1")["status"] == "ok"
    refused = user1.join("users:2")
    assert (refused["status"], refused["response"]) == ("error", {"reason": "unauthorized"})
    broker.wait_for_log(
        r"REFUSED JOIN users:2 in \S+: websocket \d+, user 1: \[\[topics\]\] pattern "
        r'"users:\{user\}" has join = "self": only user 2 may join$'
    )
    assert user1.join("boards:7")["status"] == "ok"

    admin: NodeClient = node_client_factory("admin")
    admin.connect(broker.socket_url(), {"token": guardian_token(secret, "Admin:1")}, **NO_RETRY)
    admin.expect({"type": "close"})
    broker.wait_for_log(
        r"JWT refused: token claim 'sub' does not match user_claim_pattern 'User:\{user\}'$"
    )
    assert secret not in broker.log_text
