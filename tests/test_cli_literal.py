"""Every client-chosen string the CLI prints is shown literally: topic and user names that
look like rich markup, emoji codes or terminal escapes, against a real `phxbroker serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.broker import BrokerProcess
from support.raw_ws import RawWebSocket

MARKUP_USER = "[red]mallory[/red]"
TOPICS = [
    "room:[/]",  # rich's MarkupError: "closing tag '[/]' has nothing to close"
    "room:[link=https://evil.example]click[/link]",
    "room:[bold]loud",
    "room::smile:",
]
ESCAPE_TOPIC = "room:\x1b[2Jgone"  # would clear an operator's screen


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "300"}
    return subprocess.run(
        [sys.executable, "-m", "phxbroker", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env=env,
    )


@pytest.fixture
def broker(tmp_path: Path):
    config = {
        "server": {"check_origin": False},
        "auth": {"tokens": [{"user": MARKUP_USER, "token": "mallory-token"}]},
        "topics": [{"pattern": "room:*", "count": ["hit"]}],
    }
    broker = BrokerProcess(config, tmp_path).start()
    yield broker
    assert broker.stop() == 0


def test_topics_users_and_stats_print_client_chosen_names_literally(broker) -> None:
    with RawWebSocket(broker.port, "/socket/websocket?vsn=2.0.0&token=mallory-token") as ws:
        for n, topic in enumerate([*TOPICS, ESCAPE_TOPIC]):
            ws.send_text(json.dumps([str(n), str(n), topic, "phx_join", {}]))
            assert json.loads(ws.receive())[4]["status"] == "ok"
        config = ("--config", broker.config_path)
        for command in (["topics"], ["users"], ["stats", "--once", "--interval", "0.1"]):
            result = run_cli(*command, *config)
            assert result.returncode == 0, result.stderr
            assert "\x1b" not in result.stdout
            if command[0] != "users":
                for topic in TOPICS:
                    assert topic in result.stdout, (command, result.stdout)
                assert "room:\\x1b[2Jgone" in result.stdout
            if command[0] != "topics":
                assert MARKUP_USER in result.stdout or command[0] == "stats"
        kicked = run_cli("kick", MARKUP_USER, "--ban", "10m", *config)
        assert kicked.returncode == 0, kicked.stderr
    users = run_cli("users", *config)
    assert users.returncode == 0, users.stderr
    assert f"banned: {MARKUP_USER} for" in users.stdout
    stats = run_cli("stats", "--once", "--interval", "0.1", *config)
    assert stats.returncode == 0, stats.stderr
    assert MARKUP_USER in stats.stdout  # in the bans row


def test_token_list_prints_names_literally(tmp_path: Path) -> None:
    config = tmp_path / "phxbroker.toml"
    config.write_text('[auth]\ntokens_file = "tokens.toml"\n')
    (tmp_path / "tokens.toml").write_text("")
    assert run_cli("token", "add", MARKUP_USER, "--config", config).returncode == 0
    listed = run_cli("token", "list", "--config", config)
    assert listed.returncode == 0, listed.stderr
    assert MARKUP_USER in listed.stdout
