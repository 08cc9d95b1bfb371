"""The one way a test starts an in-process phxbroker daemon."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from phxbroker.config.settings import Config, parse_config
from phxbroker.daemon.assembly import Daemon


@asynccontextmanager
async def serve(config: str | dict[str, Any] | Config) -> AsyncIterator[tuple[Daemon, int]]:
    """A real daemon on an ephemeral port, in this test's event loop; yields it and its
    port, and stops it on exit. `config` is TOML text, a TOML document, or a loaded Config
    (which keeps its file, for reload tests). TOML without an [admin] socket gets none."""
    if not isinstance(config, Config):
        data = tomllib.loads(config) if isinstance(config, str) else dict(config)
        data.setdefault("admin", {}).setdefault("socket", "")
        config = parse_config(data, "<test config>")
    daemon = Daemon(config)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(daemon.serve)
        yield daemon, port
        nursery.cancel_scope.cancel()
