"""Config loading: every mistake is one sentence naming the file, the key and the reason."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from phxbroker.config.settings import config_warnings, load_config
from phxbroker.config.table import ConfigError

ROOT = Path(__file__).parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "phxbroker.toml"
    path.write_text(text)
    return path


def test_the_example_config_loads() -> None:
    config = load_config(ROOT / "config.example.toml")
    assert config.server.listen == "127.0.0.1:4000"
    assert config.server.socket_paths == ("/socket",)
    assert config.topics, "the example declares topics"


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert (config.server.listen_host, config.server.listen_port) == ("127.0.0.1", 4000)
    assert config.auth.token_param == "token"
    assert config.topics == ()
    assert config.server.drain_timeout == 10
    assert (config.log.level, config.log.format) == ("info", "text")


def test_tokens_are_kept_only_as_digests(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"b-secret").hexdigest()
    config = load_config(
        write(
            tmp_path,
            f"""
[[auth.tokens]]
user = "alice"
token = "a-secret"
[[auth.tokens]]
user = "bob"
token_sha256 = "{digest}"
""",
        )
    )
    assert [t.sha256 for t in config.auth.tokens] == [
        hashlib.sha256(b"a-secret").digest(),
        bytes.fromhex(digest),
    ]
    assert "a-secret" not in repr(config)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[server]\nlisten = 4000", "server.listen", "expected a string"),
        ('[server]\nlisten = "localhost"', "server.listen", 'expected "host:port"'),
        ('[server]\nlisten = "h:99999"', "server.listen", "port must be a number"),
        ("[server]\nmax_frame_size = 1", "server.max_frame_size", "at least 256"),
        ("[server]\nsocket_paths = []", "server.socket_paths", "at least one path"),
        ('[server]\nsocket_paths = ["socket"]', "server.socket_paths", 'must start with "/"'),
        ("[server]\nlisten_port = 1", "server.listen_port", "unknown key"),
        ("[[auth.tokens]]\ntoken = 'x'", "auth.tokens[0].user", "is required"),
        ("[[auth.tokens]]\nuser = 'a'", "auth.tokens[0].token", "exactly one"),
        (
            "[[auth.tokens]]\nuser = 'a'\ntoken_sha256 = 'abc'",
            "auth.tokens[0].token_sha256",
            "64 hexadecimal",
        ),
        ("[[auth.tokens]]\nuser = '*'\ntoken = 'x'", "auth.user_param", "must name"),
        ("[[topics]]\njoin = 'anyone'", "topics[0].pattern", "is required"),
        ("[[topics]]\npattern = 'a*b'", "topics[0].pattern", "only allowed at the end"),
        ("[[topics]]\npattern = 'x'\njoin = 'everyone'", "topics[0].join", "expected"),
        ("[[topics]]\npattern = 'x'\njoin = 'self'", "topics[0].join", "{user}"),
        (
            "[[topics]]\npattern = 'x'\nrelay = ['a']\necho = ['a']",
            "topics[0].relay",
            "more than one",
        ),
        ("[[topics]]\npattern = 'x'\nrelay = ['phx_join']", "topics[0].relay", "reserved"),
        ("[[topics]]\npattern = 'x'\nunhandled = 'explode'", "topics[0].unhandled", "expected"),
        (
            "[[topics]]\npattern = 'x'\nstatus_fields = ['hats']",
            "topics[0].status_fields",
            "not one of",
        ),
        ("[[topics]]\npattern = 'x'\nrelay = 'new_msg'", "topics[0].relay", "list of strings"),
        ("[[api.keys]]\nkey = 'x'", "api.keys[0].name", "is required"),
        ("[[api.keys]]\nname = 'a'", "api.keys[0].key", "exactly one"),
        ("[[api.keys]]\nname = 'a'\nkey_sha256 = 'zz'", "api.keys[0].key_sha256", "64 hex"),
        ("[api]\nmax_body_size = 1", "api.max_body_size", "at least 64"),
        ("[api]\nkeys = ['secret']", "api.keys", "array of tables"),
        ("[admin]\nmode = 600", "admin.mode", "at most 0o777"),
        (f"[admin]\nsocket = '/{'x' * 120}'", "admin.socket", "longer than 107 bytes"),
        ("[admin]\nsocket = 1", "admin.socket", "expected a string"),
        ("[auth]\ntokens_file = 1", "auth.tokens_file", "expected a string"),
        ("[log]\nlevel = 'loud'", "log.level", "expected"),
        ("[log]\nformat = 'xml'", "log.format", 'expected "text" or "json"'),
        ("[server]\ndrain_timeout = -1", "server.drain_timeout", "at least 0"),
        ("[surver]\nlisten = 'a:1'", "surver", "unknown key"),
        ("topics = 3", "topics", "array of tables"),
    ],
)
def test_mistakes_name_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert f"at {key}:" in message
    assert reason in message
    assert "\n" not in message


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"not valid TOML \(.*line 1"):
        load_config(write(tmp_path, "[server\n"))
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_serve_with_a_bad_config_exits_with_one_sentence(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlisten = "nowhere"\n')
    result = subprocess.run(
        [sys.executable, "-m", "phxbroker", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr and "server.listen" in result.stderr


def test_serve_reports_a_taken_port_in_one_sentence(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write(tmp_path, f'[server]\nlisten = "127.0.0.1:{port}"\n')
        result = subprocess.run(
            [sys.executable, "-m", "phxbroker", "serve", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in result.stderr


def test_api_keys_are_kept_only_as_digests(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"k2").hexdigest()
    text = (
        f"[[api.keys]]\nname = 'a'\nkey = 'k1'\n[[api.keys]]\nname = 'b'\nkey_sha256 = '{digest}'"
    )
    config = load_config(write(tmp_path, text))
    assert [(k.name, k.sha256) for k in config.api.keys] == [
        ("a", hashlib.sha256(b"k1").digest()),
        ("b", bytes.fromhex(digest)),
    ]
    assert "k1" not in repr(config)


def test_admin_socket_default_relative_and_off(tmp_path: Path) -> None:
    default = load_config(write(tmp_path, "")).admin
    assert (default.socket, default.mode, default.configured) == (
        Path("/run/phxbroker/admin.sock"),
        0o600,
        False,
    )
    relative = load_config(write(tmp_path, "[admin]\nsocket = 'run/admin.sock'\nmode = 0o660"))
    assert relative.admin.socket == tmp_path / "run" / "admin.sock"
    assert (relative.admin.mode, relative.admin.configured) == (0o660, True)
    assert load_config(write(tmp_path, "[admin]\nsocket = ''")).admin.socket is None


def test_the_tokens_file_adds_tokens_and_api_keys(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "tokens.toml").write_text(
        f"""
[[auth.tokens]]
user = "carol"
token_sha256 = "{hashlib.sha256(b"c-secret").hexdigest()}"
[[api.keys]]
name = "backend"
key = "api-secret"
"""
    )
    text = """
[auth]
tokens_file = "secrets/tokens.toml"
[[auth.tokens]]
user = "alice"
token = "a-secret"
"""
    config = load_config(write(tmp_path, text))
    assert config.auth.tokens_file == tmp_path / "secrets" / "tokens.toml"
    assert [(t.user, t.sha256) for t in config.auth.tokens] == [
        ("alice", hashlib.sha256(b"a-secret").digest()),
        ("carol", hashlib.sha256(b"c-secret").digest()),
    ]
    assert [k.name for k in config.api.keys] == ["backend"]


@pytest.mark.parametrize(
    ("tokens", "key", "reason"),
    [
        ("[[auth.tokens]]\nuser = 'a'", "auth.tokens[0].token", "exactly one"),
        ("[auth]\ntoken_param = 'x'", "auth.token_param", "unknown key"),
        ("[server]\nlisten = 'a:1'", "server", "unknown key"),
        ("[[api.keys]]\nname = ''\nkey = 'k'", "api.keys[0].name", "is required"),
    ],
)
def test_mistakes_in_the_tokens_file_name_that_file(
    tmp_path: Path, tokens: str | None, key: str, reason: str
) -> None:
    tokens_path = tmp_path / "tokens.toml"
    if tokens is not None:
        tokens_path.write_text(tokens)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[auth]\ntokens_file = 'tokens.toml'"))
    message = str(info.value)
    assert f"config error in {tokens_path}" in message
    assert (f"at {key}:" in message) if key else True
    assert reason in message


def test_a_missing_tokens_file_names_the_key_that_names_it(tmp_path: Path) -> None:
    config_path = write(tmp_path, "[auth]\ntokens_file = 'tokens.toml'")
    with pytest.raises(ConfigError) as info:
        load_config(config_path)
    assert str(info.value) == (
        f"config error in {config_path} at auth.tokens_file: {tmp_path / 'tokens.toml'}: "
        "the file does not exist (`phxbroker token add NAME` creates it)"
    )


def test_a_config_that_lets_nobody_in_or_join_loads_with_warnings(tmp_path: Path) -> None:
    empty = load_config(write(tmp_path, "[server]\nlisten = '127.0.0.1:4000'"))
    assert config_warnings(empty) == [
        'no [[topics]]: every join is refused with "unmatched topic"',
        "no connect tokens ([[auth.tokens]] or the tokens file), no [auth.jwt], no "
        "[auth.phoenix_token] and allow_anonymous = false: every connect is refused",
    ]
    anonymous = load_config(
        write(tmp_path, "[auth]\nallow_anonymous = true\n[[topics]]\npattern = 'all'")
    )
    assert config_warnings(anonymous) == []


def test_a_shared_secret_in_the_tokens_file_needs_a_user_param(tmp_path: Path) -> None:
    (tmp_path / "tokens.toml").write_text("[[auth.tokens]]\nuser = '*'\ntoken = 'shared'")
    path = write(tmp_path, "[auth]\ntokens_file = 'tokens.toml'")
    with pytest.raises(ConfigError, match=r"at auth.user_param: must name a connect param"):
        load_config(path)
