"""Running the `phxbroker` command as a user would, and checking what it says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def cli(*args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phxbroker", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_one_sentence(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def add_token(config: Path, name: str, *flags: str) -> str:
    """`phxbroker token add`; returns the secret it printed (alone on stdout)."""
    result = cli("token", "add", name, *flags, "--config", config)
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip()
    assert result.stdout == secret + "\n"  # the secret, alone on stdout
    return secret
