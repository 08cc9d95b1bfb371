"""`phxbroker init` and `phxbroker token`: the files they write and what they print."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import tomllib
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pytest
from support.broker import BrokerProcess
from support.cli import add_token, assert_one_sentence, cli
from support.node_client import NodeClient
from support.terminal import Terminal

from phxbroker.auth.origin import ALLOW_ALL, origin_problem
from phxbroker.config.settings import Config, load_config, parse_config

MAIN_CONFIG = """\
# Hand-written: these comments must survive every token command.
[auth]
tokens_file = "tokens.toml"   # next to this file
user_param = "user"

[[auth.tokens]]
user = "carol"
token = "carol-token"          # kept in the main config on purpose
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "phxbroker.toml"
    path.write_text(MAIN_CONFIG)
    return path


def load_config_text(text: str) -> Config:
    return parse_config(tomllib.loads(text))


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


# -- init ----------------------------------------------------------------------------------


def test_init_writes_a_working_config_and_secrets_shown_once(tmp_path: Path) -> None:
    target = tmp_path / "etc"
    result = cli("init", target, "--user", "alice", "--user", "bob")
    assert result.returncode == 0, result.stderr

    secrets = dict(line.rsplit(": ", 1) for line in result.stdout.splitlines())
    assert set(secrets) == {"api key backend", "token alice", "token bob"}
    config_path, tokens_path = target / "phxbroker.toml", target / "tokens.toml"
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o644
    assert stat.S_IMODE(tokens_path.stat().st_mode) == 0o600
    assert config_path.read_text().startswith("# phxbroker configuration")
    for secret in secrets.values():
        assert len(secret) >= 40
        assert secret not in config_path.read_text() + tokens_path.read_text()

    config = load_config(config_path)
    assert [(t.user, t.sha256) for t in config.auth.tokens] == [
        ("alice", digest(secrets["token alice"])),
        ("bob", digest(secrets["token bob"])),
    ]
    assert [(k.name, k.sha256) for k in config.api.keys] == [
        ("backend", digest(secrets["api key backend"]))
    ]


def test_init_takes_the_apps_public_origin(tmp_path: Path) -> None:
    result = cli(
        "init",
        tmp_path,
        "--origin",
        "https://App.example.com:443/",
        "--origin",
        "http://[::1]:3000",
    )
    assert result.returncode == 0, result.stderr
    assert "pages may connect from https://app.example.com, http://[::1]:3000" in result.stderr
    text = (tmp_path / "phxbroker.toml").read_text()
    assert 'check_origin = ["https://app.example.com", "http://[::1]:3000"]\n' in text
    policy = load_config(tmp_path / "phxbroker.toml").server.check_origin
    for origin, allowed in [
        ("https://app.example.com", True),
        ("http://[::1]:3000", True),
        ("http://app.example.com", False),
        ("https://www.example.com", False),
    ]:
        problem = origin_problem(origin, policy, host="localhost")
        assert (problem is None) is allowed, (origin, problem)


def test_init_without_an_origin_and_without_a_terminal_checks_none(tmp_path: Path) -> None:
    result = cli("init", tmp_path)  # stdin is not a terminal: nobody to ask
    assert result.returncode == 0, result.stderr
    assert "no --origin: pages from any site may connect (check_origin = false)" in result.stderr
    assert load_config(tmp_path / "phxbroker.toml").server.check_origin == ALLOW_ALL
    assert "config.example.toml" not in (tmp_path / "phxbroker.toml").read_text()


def test_init_asks_for_the_origin_on_a_terminal(tmp_path: Path) -> None:
    term = Terminal([sys.executable, "-m", "phxbroker", "init", str(tmp_path / "etc")])
    try:
        term.wait_for(lambda text: "Public origin of the web app" in text, "the question")
        os.write(term.master, b"app.example.com\r")  # not an origin: asked again
        term.wait_for(lambda text: "is not an origin" in text, "the complaint")
        os.write(term.master, b"https://app.example.com\r")
        assert term.proc.wait(timeout=10) == 0, term.text()
    finally:
        term.close()
    text = (tmp_path / "etc" / "phxbroker.toml").read_text()
    assert 'check_origin = ["https://app.example.com"]' in text


@pytest.mark.parametrize(
    "origin", ["app.example.com", "https://app.example.com/path", "ftp://x.com", "https://"]
)
def test_init_refuses_what_is_not_an_origin(tmp_path: Path, origin: str) -> None:
    assert_one_sentence(cli("init", tmp_path, "--origin", origin), 2, "--origin", "not an origin")
    assert list(tmp_path.iterdir()) == []


def test_init_example_prints_the_example_config_that_ships_with_the_package() -> None:
    result = cli("init", "--example")
    assert result.returncode == 0, result.stderr
    shipped = resources.files("phxbroker.config").joinpath("example.toml").read_text()
    assert result.stdout == shipped
    assert "[[topics]]" in shipped and "connections = true" in shipped
    load_config_text(shipped)  # runnable as is


def test_a_page_from_the_inited_origin_connects_and_others_are_refused(
    tmp_path: Path,
    broker_factory: Callable[..., BrokerProcess],
    node_client_factory: Callable[..., NodeClient],
) -> None:
    result = cli("init", tmp_path / "etc", "--origin", "https://app.example.com", "--user", "al")
    assert result.returncode == 0, result.stderr
    token = dict(line.split(": ", 1) for line in result.stdout.splitlines())["token al"]
    text = (tmp_path / "etc" / "phxbroker.toml").read_text()
    text = text.replace('listen = "127.0.0.1:4000"', 'listen = "127.0.0.1:0"')
    text = text.replace(
        'tokens_file = "tokens.toml"', f'tokens_file = "{tmp_path}/etc/tokens.toml"'
    )
    broker = broker_factory(text + '\n[admin]\nsocket = "admin.sock"\n')

    page = node_client_factory("page")
    page.connect(broker.socket_url(), {"token": token}, origin="https://app.example.com")
    page.expect_open()
    assert page.join("room:lobby")["status"] == "ok"
    foreign = node_client_factory("foreign")
    foreign.connect(
        broker.socket_url(), {"token": token}, origin="https://evil.example.net",
        reconnectAfterMs=[60_000],
    )  # fmt: skip
    assert "403" in foreign.expect({"type": "error"})["message"]
    broker.wait_for_log(r'to allow it, add "https://evil\.example\.net" to \[server\] check_origin')


@pytest.mark.parametrize("existing", ["phxbroker.toml", "tokens.toml"])
def test_init_never_overwrites(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_text("# mine\n")
    assert_one_sentence(cli("init", tmp_path), 1, str(tmp_path / existing), "already exists")
    assert (tmp_path / existing).read_text() == "# mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


# -- token add / revoke / list -------------------------------------------------------------


def test_token_add_stores_only_the_digest_atomically_and_keeps_the_main_config(
    config: Path,
) -> None:
    tokens_path = config.parent / "tokens.toml"
    first = add_token(config, "alice")
    second = add_token(config, "bob")
    key = add_token(config, "backend", "--api")

    assert stat.S_IMODE(tokens_path.stat().st_mode) == 0o600
    text = tokens_path.read_text()
    assert first not in text and second not in text and key not in text
    assert config.read_text() == MAIN_CONFIG  # byte for byte, comments and all
    assert sorted(p.name for p in config.parent.iterdir()) == ["phxbroker.toml", "tokens.toml"]

    loaded = load_config(config)
    assert [(t.user, t.sha256) for t in loaded.auth.tokens] == [
        ("carol", digest("carol-token")),
        ("alice", digest(first)),
        ("bob", digest(second)),
    ]
    assert [(k.name, k.sha256) for k in loaded.api.keys] == [("backend", digest(key))]


@pytest.mark.parametrize("flags", [(), ("--api",)], ids=["token", "api-key"])
def test_a_second_add_is_refused_and_replace_rotates(config: Path, flags: tuple[str, ...]) -> None:
    old = add_token(config, "bob", *flags)

    again = cli("token", "add", "bob", *flags, "--config", config)
    assert_one_sentence(again, 1, "already", str(config.parent / "tokens.toml"), "--replace")
    assert again.stdout == ""

    new = add_token(config, "bob", *flags, "--replace")
    loaded = load_config(config)
    digests = [t.sha256 for t in loaded.auth.tokens if t.user == "bob"] + [
        k.sha256 for k in loaded.api.keys if k.name == "bob"
    ]
    assert digests == [digest(new)]
    assert digest(old) not in digests


def test_a_token_in_the_main_config_is_not_replaced_behind_its_back(config: Path) -> None:
    assert_one_sentence(cli("token", "add", "carol", "--config", config), 1, "already")
    result = cli("token", "add", "carol", "--replace", "--config", config)
    assert_one_sentence(result, 1, str(config), "by hand")
    assert config.read_text() == MAIN_CONFIG


def test_token_revoke_removes_every_token_of_the_user(config: Path) -> None:
    tokens_path = config.parent / "tokens.toml"
    entry = '[[auth.tokens]]\nuser = "alice"\ntoken = "{}"\n'
    tokens_path.write_text(entry.format("a1") + entry.format("a2"))  # two, written by hand
    kept = add_token(config, "bob")

    result = cli("token", "revoke", "alice", "--config", config)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("revoked 2 tokens of alice;")
    assert [t.user for t in load_config(config).auth.tokens] == ["carol", "bob"]
    assert load_config(config).auth.tokens[1].sha256 == digest(kept)
    assert_one_sentence(cli("token", "revoke", "alice", "--config", config), 1, "no token")
    assert_one_sentence(
        cli("token", "revoke", "carol", "--config", config), 1, str(config), "by hand"
    )


def test_token_list_names_but_never_shows_secrets(config: Path) -> None:
    secret = add_token(config, "alice")
    key = add_token(config, "backend", "--api")

    table = cli("token", "list", "--config", config)
    as_json = cli("token", "list", "--json", "--config", config)

    for result in (table, as_json):
        assert result.returncode == 0, result.stderr
        assert secret not in result.stdout and key not in result.stdout
        assert "carol-token" not in result.stdout
    assert "alice" in table.stdout and "backend" in table.stdout
    assert hashlib.sha256(secret.encode()).hexdigest()[:12] in table.stdout
    rows = {(r["kind"], r["name"]) for r in json.loads(as_json.stdout)}
    assert rows == {("token", "carol"), ("token", "alice"), ("api key", "backend")}


def test_a_change_that_would_break_the_config_is_not_saved(tmp_path: Path) -> None:
    config = tmp_path / "phxbroker.toml"
    config.write_text('[auth]\ntokens_file = "tokens.toml"\n')  # no user_param
    result = cli("token", "add", "*", "--config", config)
    assert_one_sentence(result, 2, "not saved", "auth.user_param")
    assert result.stdout == ""  # no secret printed for a token that does not exist
    assert not (tmp_path / "tokens.toml").exists()


def test_token_commands_need_a_tokens_file(tmp_path: Path) -> None:
    config = tmp_path / "phxbroker.toml"
    config.write_text("[auth]\n")
    for args in (["add", "alice"], ["revoke", "alice"], ["list"]):
        assert_one_sentence(
            cli("token", *args, "--config", config), 2, "auth.tokens_file", "is not set"
        )


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_rewritten_tokens_file_keeps_its_owner(config: Path) -> None:
    add_token(config, "alice")
    tokens_path = config.parent / "tokens.toml"
    os.chown(tokens_path, 65534, 65534)  # e.g. the daemon's own user
    add_token(config, "bob")
    info = tokens_path.stat()
    assert (info.st_uid, info.st_gid) == (65534, 65534)
    assert stat.S_IMODE(info.st_mode) == 0o600
