"""CLI commands that write files: `init` (a fresh config) and `token` (the tokens file).

Secrets are printed once, on stdout alone, so a script can capture them; everything else
goes to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import tomli_w
from rich.console import Console
from rich.table import Table

from phxbroker.cli.common import DEFAULT_CONFIG, config_option, fail
from phxbroker.cli.statsview import literal
from phxbroker.config.table import ConfigError
from phxbroker.config.tokens_file import HEADER, TokensFile, new_secret, sha256_hex, write_new

CONFIG_NAME = "phxbroker.toml"
TOKENS_NAME = "tokens.toml"

CONFIG_TEMPLATE = """\
# phxbroker configuration, written by `phxbroker init`.
# Every key is described in config.example.toml (in the source tree). Check this file
# with `phxbroker check-config`, apply changes to a running daemon with `phxbroker reload`.

[server]
# Address for phoenix.js clients and the HTTP API; put a TLS proxy in front in production.
listen = "127.0.0.1:4000"
# phoenix.js connects to <path>/websocket: new Socket("wss://host/socket").
socket_paths = ["/socket"]
# Seconds of silence before a client is dropped (phoenix.js heartbeats every 30 s).
idle_timeout = 60

[auth]
# The connect param that carries a token: new Socket(url, {{params: {{token}}}}).
token_param = "token"
# Connect tokens and API keys, stored as SHA-256 digests in a file of their own (relative
# to this one), so that `phxbroker token add/revoke` never rewrites this file.
tokens_file = "{tokens_name}"

[api]
# POST /api/broadcast, POST /api/disconnect and GET /api/stats need
# "Authorization: Bearer <api key>"; keys are in the tokens file.
# Largest request body, in bytes.
max_body_size = 1_048_576

# The control socket the CLI (stats, kick, publish, reload...) talks to. The default suits
# systemd's RuntimeDirectory=phxbroker; only root and the daemon's user may connect.
# [admin]
# socket = "/run/phxbroker/admin.sock"
# mode = 0o600

# Topics: what used to be Phoenix channel modules (see config.example.toml for every rule).
[[topics]]
pattern = "room:*"
join = "authenticated"
relay = ["new_msg"]
relay_user_key = "user"
presence = true

[[topics]]
pattern = "users:{{user}}"
join = "self"

[log]
level = "info"
"""


@click.command()
@click.argument(
    "directory",
    metavar="[DIR]",
    required=False,
    type=click.Path(file_okay=False, path_type=Path),
    default=str(Path(DEFAULT_CONFIG).parent),
)
@click.option(
    "--user", "users", multiple=True, metavar="NAME", help="Also make a connect token for NAME."
)
@click.option("--api-key-name", default="backend", show_default=True, help="Name of the API key.")
def init(directory: Path, users: tuple[str, ...], api_key_name: str) -> None:
    """Write a fresh config and tokens file into DIR (default /etc/phxbroker)."""
    config_path = directory / CONFIG_NAME
    tokens_path = directory / TOKENS_NAME
    for path in (config_path, tokens_path):
        if path.exists():
            fail(f"{path} already exists: init never overwrites a file", 1)
    api_key = new_secret()
    user_tokens = {user: new_secret() for user in users}
    tokens_document = {
        "auth": {
            "tokens": [{"user": u, "token_sha256": sha256_hex(t)} for u, t in user_tokens.items()]
        },
        "api": {"keys": [{"name": api_key_name, "key_sha256": sha256_hex(api_key)}]},
    }
    if not users:
        del tokens_document["auth"]
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_new(config_path, CONFIG_TEMPLATE.format(tokens_name=TOKENS_NAME), 0o644)
        write_new(tokens_path, HEADER + tomli_w.dumps(tokens_document), 0o600)
    except OSError as exc:
        fail(f"cannot write into {directory}: {(exc.strerror or str(exc)).lower()}")
    click.echo(f"wrote {config_path}", err=True)
    click.echo(f"wrote {tokens_path} (mode 0600; it keeps only SHA-256 digests)", err=True)
    click.echo("the secrets below are shown this once:", err=True)
    click.echo(f"api key {api_key_name}: {api_key}")
    for user, token in user_tokens.items():
        click.echo(f"token {user}: {token}")


@click.group()
def token() -> None:
    """Add, revoke and list connect tokens and API keys (in the tokens file)."""


def _open(config_path: Path) -> TokensFile:
    try:
        return TokensFile.of_config(config_path)
    except ConfigError as exc:
        fail(str(exc), 2)


def _save(tokens: TokensFile) -> None:
    try:
        tokens.save()
    except ConfigError as exc:
        fail(f"not saved, the change would break the config: {exc}", 2)
    except OSError as exc:
        fail(f"cannot write {tokens.path}: {(exc.strerror or str(exc)).lower()}")


@token.command("add")
@config_option
@click.argument("name")
@click.option("--api", is_flag=True, help="NAME names an API key rather than a user.")
def token_add(config_path: Path, name: str, api: bool) -> None:
    """Make a token for user NAME (or an API key named NAME) and print it once."""
    tokens = _open(config_path)
    secret = tokens.add_api_key(name) if api else tokens.add_token(name)
    _save(tokens)
    click.echo(secret)
    kind = f"API key {name}" if api else f"token for {name}"
    click.echo(
        f"added the {kind} to {tokens.path} (shown once above; only its SHA-256 is kept); "
        "`phxbroker reload` applies it",
        err=True,
    )


@token.command("revoke")
@config_option
@click.argument("name")
@click.option("--api", is_flag=True, help="NAME names an API key rather than a user.")
def token_revoke(config_path: Path, name: str, api: bool) -> None:
    """Remove every token of user NAME (or the API key NAME) from the tokens file."""
    tokens = _open(config_path)
    removed = tokens.revoke_api_keys(name) if api else tokens.revoke_tokens(name)
    kind = "API key" if api else "token"
    if not removed:
        elsewhere = [
            e for e in tokens.entries() if e.name == name and e.source == tokens.config_path
        ]
        if elsewhere:
            fail(
                f"the {kind} of {name} is in {tokens.config_path}, not in the tokens file: "
                "remove it there by hand"
            )
        fail(f"no {kind} for {name} in {tokens.path}")
    _save(tokens)
    click.echo(
        f"revoked {removed} {kind}{'s' if removed > 1 else ''} of {name}; "
        "`phxbroker reload` applies it and closes the sockets that used "
        f"{'them' if removed > 1 else 'it'}"
    )


@token.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def token_list(config_path: Path, as_json: bool) -> None:
    """List tokens and API keys: who, a digest prefix and where (never a secret)."""
    entries = _open(config_path).entries()
    if as_json:
        rows = [
            {"kind": e.kind, "name": e.name, "sha256": e.sha256, "file": str(e.source)}
            for e in entries
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("kind", "user / name", "sha256", "file", box=None)
    for e in entries:
        table.add_row(e.kind, literal(e.name), e.sha256[:12] + "…", literal(e.source))
    Console().print(table if entries else "no tokens or API keys")


COMMANDS = (init, token)
