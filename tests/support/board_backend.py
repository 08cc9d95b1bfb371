"""The example board app's back end (examples/board), run as a real process for tests."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
SECRET = "board-hook-secret-for-tests"
JWT_SECRET = "board-jwt-secret-for-tests-" + "x" * 48
LISTENING = re.compile(r"listening on (http://\S+)")
TIMEOUT = 10
BOARD = "boards:1-welcome-board"


class BoardBackend:
    """`python -m examples.board` on a free port, with its own database and log."""

    def __init__(self, workdir: Path, args: tuple[str, ...] = (), env: dict | None = None):
        self.db_path = workdir / "board.sqlite3"
        self.log_path = workdir / "board.log"
        environment = {
            **os.environ,
            "BOARD_HOOK_SECRET": SECRET,
            "BOARD_JWT_SECRET": JWT_SECRET,
            **(env or {}),
        }
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "examples.board",
                "--port",
                "0",
                "--db",
                str(self.db_path),
                *args,
            ],
            cwd=REPO,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(lines,), daemon=True).start()
        try:
            line = lines.get(timeout=TIMEOUT)
        except queue.Empty:
            line = ""
        match = LISTENING.search(line)
        if match is None:
            self.stop()
            raise AssertionError(f"the board back end did not start: {self.log_text()}")
        self.url = match.group(1)
        self.http = httpx.Client(base_url=self.url, timeout=TIMEOUT)

    def _read(self, lines: queue.Queue[str]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            lines.put(line)

    def log_text(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout=TIMEOUT)
        self._log.close()
        return code

    # -- calls as phxbroker makes them -----------------------------------------------

    def login(self, email: str) -> str:
        response = self.http.post(
            "/api/v1/sessions", json={"session": {"email": email, "password": "12345678"}}
        )
        assert response.status_code == 201, response.text
        return response.json()["jwt"]


def example_config(board: BoardBackend) -> dict[str, Any]:
    """examples/board/phxbroker.toml as shipped, pointed at this run's back end."""
    config = tomllib.loads((REPO / "examples" / "board" / "phxbroker.toml").read_text())
    config["server"]["listen"] = "127.0.0.1:0"
    config["admin"]["socket"] = "admin.sock"
    config["hooks"]["url"] = f"{board.url}/hooks"
    return config
