"""Run the board app whole: ``python -m examples.board.demo``.

Starts the back end on 4001 and phxbroker on 4000 (examples/board/phxbroker.toml) with a
fresh hook secret shared through the environment, prints the page's address, and stops
both on Ctrl-C. Sign in as john@phoenix-trello.com or jane@phoenix-trello.com (password
12345678) in two browser windows and watch lists and cards appear in both.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    env = {**os.environ, "BOARD_HOOK_SECRET": secrets.token_urlsafe(32)}
    env.setdefault("BOARD_JWT_SECRET", secrets.token_urlsafe(48))
    back_end = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "examples.board",
            "--port",
            "4001",
            "--db",
            str(HERE / "board.sqlite3"),
        ],
        cwd=HERE.parent.parent,
        env=env,
    )
    broker = subprocess.Popen(
        [sys.executable, "-m", "phxbroker", "serve", "--config", str(HERE / "phxbroker.toml")],
        env=env,
    )
    print(
        "open http://127.0.0.1:4001/?socket=ws://127.0.0.1:4000/socket (Ctrl-C stops both)",
        flush=True,
    )
    try:
        return broker.wait() or back_end.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in (broker, back_end):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
