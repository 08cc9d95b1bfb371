"""The `phxbroker` command line. Thin: parse, call, print."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
import trio

from phxbroker import __version__, cli_admin, cli_tokens
from phxbroker.cli_common import DEFAULT_CONFIG, OneSentenceGroup, fail
from phxbroker.config import ConfigError, load_config, parse_listen
from phxbroker.server import Server, StartupError


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group(cls=OneSentenceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="phxbroker")
def main() -> None:
    """phxbroker: a standalone Phoenix Channels broker."""


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The TOML config file.",
)
@click.option("--listen", metavar="HOST:PORT", help="Override [server] listen.")
def serve(config_path: Path, listen: str | None) -> None:
    """Run the broker."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        fail(str(exc), 2)
    if listen is not None:
        try:
            host, port = parse_listen(listen)
        except ValueError as exc:
            fail(f"--listen: {exc}", 2)
        from dataclasses import replace

        config = replace(config, server=replace(config.server, listen_host=host, listen_port=port))
    setup_logging(config.log.level)
    try:
        trio.run(Server(config).serve)
    except StartupError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


@main.command("check-config")
@click.argument("config_path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
def check_config(config_path: Path) -> None:
    """Validate a config file without starting (exit 0 if it is good)."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        fail(str(exc), 2)
    click.echo(
        f"{config_path}: ok ({len(config.topics)} topic patterns, "
        f"{len(config.auth.tokens)} static tokens)"
    )


for _command in (*cli_admin.COMMANDS, *cli_tokens.COMMANDS):
    main.add_command(_command)
