"""CLI commands that write files: `init` (a fresh config) and `token` (the tokens file).

Secrets are printed once, on stdout alone, so a script can capture them; everything else
goes to stderr.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

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
# Every key is described in the example config that `phxbroker init --example` prints.
# Check this file with `phxbroker check-config`, apply changes to a running daemon with
# `phxbroker reload`.

[server]
# Address for phoenix.js clients and the HTTP API; put a TLS proxy in front in production.
listen = "127.0.0.1:4000"
# phoenix.js connects to <path>/websocket: new Socket("wss://host/socket").
socket_paths = ["/socket"]
{origin_block}
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

# Topics: what used to be Phoenix channel modules (`phxbroker init --example` shows every
# rule).
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


ORIGIN_LIST_BLOCK = """\
# Browser pages may open a socket only from these origins (the Origin header they send);
# a page from anywhere else gets 403, and the log says once which line to add here.
check_origin = [{origins}]"""

NO_ORIGIN_CHECK_BLOCK = """\
# No origin check: a page from any site may open a socket, as in Phoenix's generated dev
# config (connects still need a token). Before production, list the app's origin:
#   check_origin = ["https://app.example.com"]
check_origin = false"""

ORIGIN_PROMPT = (
    "Public origin of the web app whose pages connect (e.g. https://app.example.com; "
    "empty: no origin check)"
)


def public_origin(text: str) -> str:
    """An origin as a browser sends it (`https://app.example.com`, `http://localhost:4000`),
    normalised; click.BadParameter says in one sentence what is wrong with it."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an origin such as https://app.example.com"
        ) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(
            f"{text!r} is not an origin: write the scheme and host, e.g. https://app.example.com"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise click.BadParameter(
            f"{text!r} is not an origin: it is only scheme, host and port, without a path"
        )
    scheme, host = parts.scheme.lower(), parts.hostname.lower()
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        netloc += f":{port}"  # a browser leaves the scheme's default port out
    return f"{scheme}://{netloc}"


def _public_origins(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> tuple[str, ...]:
    return tuple(dict.fromkeys(public_origin(v) for v in values))


def _print_example(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(example_config(), nl=False)
    ctx.exit()


def example_config() -> str:
    """The example config that ships with phxbroker: every key, commented."""
    return resources.files("phxbroker.config").joinpath("example.toml").read_text("utf-8")


@click.command()
@click.argument(
    "directory",
    metavar="[DIR]",
    required=False,
    type=click.Path(file_okay=False, path_type=Path),
    default=str(Path(DEFAULT_CONFIG).parent),
)
@click.option(
    "--origin",
    "origins",
    multiple=True,
    metavar="URL",
    callback=_public_origins,
    help="Public origin of the web app whose pages open sockets, e.g. https://app.example.com "
    "(repeat for more); written as [server] check_origin. Asked for on a terminal when not "
    "given; otherwise the config checks no origin (check_origin = false, as Phoenix's "
    "generated dev config): set it before production.",
)
@click.option(
    "--user", "users", multiple=True, metavar="NAME", help="Also make a connect token for NAME."
)
@click.option("--api-key-name", default="backend", show_default=True, help="Name of the API key.")
@click.option(
    "--example",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=_print_example,
    help="Print the example config (every key, commented) and exit.",
)
def init(
    directory: Path, origins: tuple[str, ...], users: tuple[str, ...], api_key_name: str
) -> None:
    """Write a fresh config and tokens file into DIR (default /etc/phxbroker)."""
    allowed = list(origins)
    if not allowed and sys.stdin is not None and sys.stdin.isatty():
        answer = click.prompt(
            ORIGIN_PROMPT,
            default="",
            show_default=False,
            value_proc=lambda text: public_origin(text) if text.strip() else "",
            err=True,
        )
        allowed = [answer] if answer else []
    if allowed:
        quoted = ", ".join(f'"{o}"' for o in allowed)
        origin_block = ORIGIN_LIST_BLOCK.format(origins=quoted)
    else:
        origin_block = NO_ORIGIN_CHECK_BLOCK
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
        config_text = CONFIG_TEMPLATE.format(tokens_name=TOKENS_NAME, origin_block=origin_block)
        write_new(config_path, config_text, 0o644)
        write_new(tokens_path, HEADER + tomli_w.dumps(tokens_document), 0o600)
    except OSError as exc:
        fail(f"cannot write into {directory}: {(exc.strerror or str(exc)).lower()}")
    click.echo(f"wrote {config_path}", err=True)
    if allowed:
        click.echo(f"pages may connect from {', '.join(allowed)}", err=True)
    else:
        click.echo(
            "no --origin: pages from any site may connect (check_origin = false); "
            f"list the app's origin in {config_path} before production",
            err=True,
        )
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
@click.option(
    "--replace",
    is_flag=True,
    help="Rotate: the new secret replaces NAME's (the old one stops working on reload).",
)
def token_add(config_path: Path, name: str, api: bool, replace: bool) -> None:
    """Make a token for user NAME (or an API key named NAME) and print it once."""
    tokens = _open(config_path)
    kind = "api key" if api else "token"
    what = f"an API key named {name}" if api else f"a token for {name}"
    existing = [e for e in tokens.entries() if e.kind == kind and e.name == name]
    in_main_config = [e for e in existing if e.source == tokens.config_path]
    if existing and not replace:
        fail(
            f"there is {what} already, in {existing[0].source}: "
            f"`phxbroker token add {name}{' --api' if api else ''} --replace` rotates it"
        )
    if in_main_config:
        fail(
            f"{what} is in {tokens.config_path}, not in the tokens file: "
            "remove it there by hand, then add the new one"
        )
    if existing and api:
        tokens.revoke_api_keys(name)
    elif existing:
        tokens.revoke_tokens(name)
    secret = tokens.add_api_key(name) if api else tokens.add_token(name)
    _save(tokens)
    click.echo(secret)
    if existing:
        click.echo(
            f"replaced {what} in {tokens.path} (shown once above; only its SHA-256 is kept); "
            "`phxbroker reload` applies it and closes the sockets the old one opened",
            err=True,
        )
        return
    click.echo(
        f"added {what} to {tokens.path} (shown once above; only its SHA-256 is kept); "
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
