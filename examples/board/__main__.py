"""Run the board app's back end: ``python -m examples.board [--port 4001] [--db FILE]``.

Prints ``board back end listening on http://HOST:PORT`` once it accepts connections
(``--port 0`` picks a free port). The hook signing secret comes from an environment
variable (``BOARD_HOOK_SECRET`` unless ``--secret-env`` names others); the JWT key from
``BOARD_JWT_SECRET``, or a random one for this run.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import sqlite3
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PHOENIX_JS_CANDIDATES = (
    HERE / "node_modules/phoenix/priv/static/phoenix.mjs",
    REPO / "tests/e2e/node_modules/phoenix/priv/static/phoenix.mjs",
    Path.cwd() / "node_modules/phoenix/priv/static/phoenix.mjs",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.board",
        description="The board app's back end: phxbroker hooks, the seed's API and its page.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=4001, help="port to listen on (0: any)")
    parser.add_argument(
        "--db", type=Path, default=Path("board.sqlite3"), help="SQLite file (made and seeded)"
    )
    parser.add_argument(
        "--secret-env",
        action="append",
        metavar="VAR",
        help="environment variable holding the hook signing secret (repeat while replacing"
        " a secret; default BOARD_HOOK_SECRET)",
    )
    parser.add_argument(
        "--jwt-secret-env",
        default="BOARD_JWT_SECRET",
        metavar="VAR",
        help="environment variable holding the key that signs and checks users' JWTs",
    )
    parser.add_argument(
        "--tolerance", type=float, default=300, help="accepted clock skew of hook calls, seconds"
    )
    parser.add_argument(
        "--broker-api",
        metavar="URL",
        help="phxbroker's base URL, to send user:left through its HTTP API",
    )
    parser.add_argument(
        "--broker-api-key-env",
        default="PHXBROKER_API_KEY",
        metavar="VAR",
        help="environment variable holding the phxbroker API key",
    )
    parser.add_argument("--phoenix-js", type=Path, help="phoenix.mjs to serve to the page")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("board")

    secret_vars = args.secret_env or ["BOARD_HOOK_SECRET"]
    hook_secrets = tuple(os.environ.get(name, "") for name in secret_vars)
    missing = [name for name, value in zip(secret_vars, hook_secrets, strict=True) if not value]
    if missing:
        print(
            f"board: the hook signing secret is missing: set {missing[0]} to the secret"
            " phxbroker's [hooks] secret_env names",
            file=sys.stderr,
        )
        return 2
    jwt_secret = os.environ.get(args.jwt_secret_env, "")
    if not jwt_secret:
        jwt_secret = secrets.token_urlsafe(48)
        log.info("%s is not set: signing JWTs with a random key for this run", args.jwt_secret_env)
    api_key = os.environ.get(args.broker_api_key_env) or None
    if args.broker_api and api_key is None:
        print(f"board: --broker-api needs an API key in {args.broker_api_key_env}", file=sys.stderr)
        return 2
    phoenix_js = args.phoenix_js or next((p for p in PHOENIX_JS_CANDIDATES if p.is_file()), None)
    if phoenix_js is None:
        log.info("phoenix.mjs not found: run `npm install` in %s to serve the page", HERE)

    # Imported here so that --help and the checks above need no third-party package.
    import uvicorn

    from examples.board.app import Settings, create_app
    from examples.board.db import Database

    try:
        db = Database(args.db)
    except (sqlite3.Error, OSError) as exc:
        print(f"board: cannot open the database {args.db}: {exc}", file=sys.stderr)
        return 2
    if db.seed_if_empty():
        log.info("seeded %s: john@, jane@ and bob@phoenix-trello.com, password 12345678", args.db)
    settings = Settings(
        db_path=args.db,
        hook_secrets=hook_secrets,
        jwt_secret=jwt_secret,
        tolerance=args.tolerance,
        broker_api=args.broker_api,
        broker_api_key=api_key,
        phoenix_js=phoenix_js,
    )
    app = create_app(settings, db)

    try:
        listener = listen(args.host, args.port)
    except OSError as exc:
        print(f"board: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    port = listener.getsockname()[1]
    # The socket listens already, so a client that reads this line can connect at once.
    print(f"board back end listening on http://{args.host}:{port}", flush=True)
    config = uvicorn.Config(
        app, log_config=None, log_level="warning", access_log=False, lifespan="off"
    )
    # uvicorn stops gracefully on SIGTERM or SIGINT, then raises the signal again for the
    # handler it found; this one turns that into a clean exit instead of a death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    except SystemExit:
        pass
    finally:
        db.close()
    log.info("stopped")
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Its protocol is named explicitly: asyncio sets TCP_NODELAY
    only on sockets whose proto is IPPROTO_TCP, and without it every answer written in two
    parts waited for the client's delayed ACK (~40 ms per keep-alive request)."""
    family, kind, proto, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(1024)
    except OSError:
        listener.close()
        raise
    return listener


def _exit_cleanly(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
