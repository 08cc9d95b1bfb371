"""Config errors about secret-bearing keys name the key and the type, never the value: in
`check-config`, `serve` and a reload of a running daemon."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from support.broker import BrokerProcess

from phxbroker.config.settings import parse_config
from phxbroker.config.table import ConfigError

SECRET = 918273645546372819
SECRET_TEXT = "hunter2-s3cr3t-VALUE!"

BAD_CONFIGS = {
    "token": ({"auth": {"tokens": [{"user": "alice", "token": SECRET}]}}, "auth.tokens[0].token"),
    "token_sha256": (
        {"auth": {"tokens": [{"user": "alice", "token_sha256": SECRET}]}},
        "auth.tokens[0].token_sha256",
    ),
    "api key": ({"api": {"keys": [{"name": "backend", "key": SECRET}]}}, "api.keys[0].key"),
    "api key_sha256 as a float": (
        {"api": {"keys": [{"name": "backend", "key_sha256": float(SECRET)}]}},
        "api.keys[0].key_sha256",
    ),
    "jwt secret inline": (
        {"auth": {"jwt": {"secret": SECRET}}},
        "auth.jwt.secret",
    ),
    "phoenix_token secret_key_base inline": (
        {"auth": {"phoenix_token": {"secret_key_base": SECRET_TEXT}}},
        "auth.phoenix_token.secret_key_base",
    ),
    "a pasted secret as an env var name": (
        {"auth": {"jwt": {"secret_env": SECRET_TEXT}}},
        "auth.jwt.secret_env",
    ),
}


def shows_a_secret(text: str) -> bool:
    return str(SECRET) in text or SECRET_TEXT in text or "9.18273645" in text


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_the_loader_withholds_secret_values(case: str) -> None:
    document, key = BAD_CONFIGS[case]
    with pytest.raises(ConfigError) as info:
        parse_config(document, "/etc/phxbroker/phxbroker.toml")
    assert info.value.key == key
    assert not shows_a_secret(str(info.value)), str(info.value)


def test_a_wrong_type_under_another_key_still_shows_its_value() -> None:
    with pytest.raises(ConfigError, match="got int 42"):
        parse_config({"server": {"host": 42}}, "x.toml")


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phxbroker", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("case", ["token", "api key", "a pasted secret as an env var name"])
def test_check_config_and_serve_withhold_secret_values(tmp_path: Path, case: str) -> None:
    document, key = BAD_CONFIGS[case]
    path = tmp_path / "phxbroker.toml"
    path.write_text(tomli_w.dumps(document))
    for command in (["check-config", path], ["serve", "--config", path]):
        result = run_cli(*command)
        assert result.returncode == 2, result
        assert key in result.stderr
        assert not shows_a_secret(result.stderr + result.stdout), result.stderr


def test_a_refused_reload_withholds_secret_values(tmp_path: Path) -> None:
    config = {
        "auth": {"tokens": [{"user": "alice", "token": "alice-token"}]},
        "topics": [{"pattern": "room:*"}],
    }
    broker = BrokerProcess(config, tmp_path).start()
    try:
        text = broker.config_path.read_text()
        broker.config_path.write_text(text.replace('token = "alice-token"', f"token = {SECRET}"))
        result = run_cli("reload", "--config", broker.config_path)
        assert result.returncode != 0
        assert "auth.tokens[0].token" in result.stderr
        assert not shows_a_secret(result.stderr), result.stderr
        broker.wait_for_log("reload refused")
        assert not shows_a_secret(broker.log_text), broker.log_text
    finally:
        assert broker.stop() == 0
