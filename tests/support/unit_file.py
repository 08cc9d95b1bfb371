"""Reading systemd/phxbroker.service, so tests run the unit's own command lines."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
UNIT = ROOT / "systemd" / "phxbroker.service"
INSTALLED_BIN = "/opt/phxbroker/bin/phxbroker"
INSTALLED_CONFIG = "/etc/phxbroker/phxbroker.toml"
VENV_BIN = str(Path(sys.executable).parent / "phxbroker")
# Exec*= prefixes that change how systemd runs a command, not what it runs.
EXEC_PREFIXES = "-@:+!"


class UnitFile:
    """A unit file's settings as (section, key) -> values in order; repeated keys such as
    ExecReload= keep every value, as systemd does."""

    def __init__(self, path: Path = UNIT) -> None:
        self.path = path
        self.settings: dict[tuple[str, str], list[str]] = {}
        section = ""
        lines = path.read_text().splitlines()
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                continue
            if "=" not in line or line.endswith("\\"):
                raise ValueError(f"{path}:{number}: not a plain `Key=value` line: {raw!r}")
            key, value = line.split("=", 1)
            self.settings.setdefault((section, key.strip()), []).append(value.strip())

    def values(self, key: str, section: str = "Service") -> list[str]:
        return self.settings.get((section, key), [])

    def value(self, key: str, section: str = "Service") -> str | None:
        """The effective value of a single-valued setting (the last one wins)."""
        values = self.values(key, section)
        return values[-1] if values else None

    def commands(self, key: str) -> list[list[str]]:
        """The argv of each `key=` command line (ExecStart, ExecReload, ...)."""
        return [shlex.split(v.lstrip(EXEC_PREFIXES)) for v in self.values(key) if v]


def localize(argv: list[str], config: str, **variables: str) -> list[str]:
    """An installed command line pointed at this checkout's virtualenv and a test config;
    `variables` fill in $NAME references such as $MAINPID."""
    out = []
    for part in argv:
        part = part.replace(INSTALLED_BIN, VENV_BIN).replace(INSTALLED_CONFIG, config)
        for name, value in variables.items():
            part = part.replace(f"${{{name}}}", value).replace(f"${name}", value)
        out.append(part)
    return out


def run_commands(
    key: str, config: str, timeout: float = 30, **variables: str
) -> list[subprocess.CompletedProcess[str]]:
    """Run a unit's `key=` command lines in order, as systemd does: stop at the first that
    fails. Returns every process that ran."""
    done = []
    for argv in UnitFile().commands(key):
        result = subprocess.run(
            localize(argv, config, **variables), capture_output=True, text=True, timeout=timeout
        )
        done.append(result)
        if result.returncode != 0:
            break
    return done
