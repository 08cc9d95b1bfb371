"""What every `phxbroker` command shares: the config option and one-sentence failures."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from phxbroker.config.settings import DEFAULT_ADMIN_SOCKET, read_admin_config
from phxbroker.config.table import ConfigError
from phxbroker.ops import logs

DEFAULT_CONFIG = "/etc/phxbroker/phxbroker.toml"

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one sentence to stderr and exit non-zero (filed as an error when stderr is the
    journal, e.g. under ExecStartPre=)."""
    click.echo(logs.stderr_line(f"phxbroker: {message}"), err=True)
    sys.exit(code)


def config_option(func: F) -> F:
    """`--config FILE`, defaulting to the file `serve` reads. Any path is taken: the config
    loader explains in one sentence what is wrong with it (a directory, a missing file)."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        default=DEFAULT_CONFIG,
        show_default=True,
        help="The TOML config file.",
    )(func)


def admin_socket_path(config_path: Path) -> Path:
    """Where the daemon started with `config_path` listens for the CLI (the default socket
    when the default config file does not exist)."""
    if config_path == Path(DEFAULT_CONFIG) and not config_path.exists():
        return Path(DEFAULT_ADMIN_SOCKET)
    try:
        admin = read_admin_config(config_path)
    except ConfigError as exc:
        fail(str(exc), 2)
    if admin.socket is None:
        fail(f'{config_path} turns the admin socket off ([admin] socket = "")', 2)
    return admin.socket


class OneSentenceGroup(click.Group):
    """A command group whose usage errors are one line, like every other failure."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "phxbroker"
            message = exc.format_message().rstrip(".")
            click.echo(f"{where}: {message} (see `{where} --help`)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            fail("aborted")
        sys.exit(result if isinstance(result, int) else 0)
