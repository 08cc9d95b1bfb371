"""The `phxbroker` command line. Thin: parse, call, print."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import click
import trio

from phxbroker import __version__
from phxbroker.cli import admin, tokens
from phxbroker.cli.common import DEFAULT_CONFIG, OneSentenceGroup, config_option, fail
from phxbroker.config.settings import config_warnings, load_config, parse_listen
from phxbroker.config.table import ConfigError
from phxbroker.daemon.assembly import Daemon, StartupError, tune_garbage_collector
from phxbroker.daemon.supervisor import Supervisor
from phxbroker.daemon.worker import SupervisorLink, WorkerRole
from phxbroker.ops import logs

EXIT_BAD_CONFIG = 2  # also what click uses for bad usage; systemd shows it as INVALIDARGUMENT

log = logging.getLogger("phxbroker")


@click.group(cls=OneSentenceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="phxbroker")
def main() -> None:
    """phxbroker: a standalone Phoenix Channels broker."""


@main.command()
@config_option
@click.option("--listen", metavar="HOST:PORT", help="Override [server] listen.")
# How a supervisor starts its workers ([server] workers > 1): see daemon/supervisor.py.
@click.option("--worker", "worker_index", type=int, hidden=True)
@click.option("--worker-node", hidden=True)
@click.option("--worker-link", type=int, hidden=True)
@click.option("--worker-admin", hidden=True, default="")
def serve(
    config_path: Path,
    listen: str | None,
    worker_index: int | None,
    worker_node: str | None,
    worker_link: int | None,
    worker_admin: str,
) -> None:
    """Run the broker."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        fail(str(exc), EXIT_BAD_CONFIG)
    listen_override = None
    if listen is not None:
        try:
            listen_override = parse_listen(listen)
        except ValueError as exc:
            fail(f"--listen: {exc}", EXIT_BAD_CONFIG)
    if worker_index is not None:
        if worker_node is None or worker_link is None:
            fail("--worker needs --worker-node and --worker-link", EXIT_BAD_CONFIG)
        role = WorkerRole(
            worker_index,
            worker_node,
            SupervisorLink(worker_link),
            Path(worker_admin) if worker_admin else None,
        )
        logs.setup(config.log, secret_params=[config.auth.token_param], tag=worker_node)
        log.info("worker %d starting (pid %d)", worker_index, os.getpid())
        _run(Daemon(config, listen_override=listen_override, worker=role).serve)
        return
    logs.setup(config.log, secret_params=[config.auth.token_param])
    workers = config.server.workers
    log.info(
        "phxbroker %s starting (pid %d, config %s%s)",
        __version__,
        os.getpid(),
        config_path,
        f", {workers} workers" if workers > 1 else "",
    )
    for warning in config_warnings(config):
        log.warning("%s: %s", config_path, warning)
    if workers > 1:
        supervisor = Supervisor(config, listen_override=listen_override)
        sys.exit(_run(supervisor.run, tune=False))
    _run(Daemon(config, listen_override=listen_override).serve)


def _run(serve: Callable[[], Awaitable[int | None]], *, tune: bool = True) -> int:
    """Run the daemon (or the supervisor) to its end; its exit status."""
    code: int | None = 0
    try:
        if tune:
            tune_garbage_collector()
        code = trio.run(serve)
    except StartupError as exc:
        fail(str(exc))
    except SystemExit:
        raise
    except BaseException as exc:  # the last line of defence: say why, exit 1
        if not _only_interrupts(exc):
            log.critical("stopped by an internal error", exc_info=exc)
            sys.exit(1)
    log.info("stopped")
    return code or 0


def _only_interrupts(exc: BaseException) -> bool:
    """Ctrl-C before the signal handler was listening (possibly wrapped by a nursery)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_interrupts(e) for e in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt)


@main.command("check-config")
@click.argument("file_path", metavar="[FILE]", required=False, type=click.Path(path_type=Path))
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help=f"The TOML config file, as FILE.  [default: {DEFAULT_CONFIG}]",
)
def check_config(file_path: Path | None, config_path: Path | None) -> None:
    """Validate a config file without starting: exit 0 if it is good (with a warning line
    on stderr for each thing it may still get wrong), else 2 with one sentence on stderr
    (fit for systemd's ExecStartPre= and ExecReload=)."""
    if file_path is not None and config_path is not None and file_path != config_path:
        fail("give the config file once, as FILE or as --config", EXIT_BAD_CONFIG)
    path = file_path or config_path or Path(DEFAULT_CONFIG)
    try:
        config = load_config(path)
    except ConfigError as exc:
        fail(str(exc), EXIT_BAD_CONFIG)
    for warning in config_warnings(config):
        click.echo(
            logs.stderr_line(f"phxbroker: warning: {path}: {warning}", logging.WARNING), err=True
        )
    click.echo(
        f"{path}: ok ({len(config.topics)} topic patterns, {len(config.auth.tokens)} static tokens)"
    )


for _command in (*admin.COMMANDS, *tokens.COMMANDS):
    main.add_command(_command)
