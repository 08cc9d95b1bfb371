"""What installing phxbroker brings: `make serve` installs only what serving needs, and the
wheel carries the example config that `phxbroker init --example` prints."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "phxbroker" / "config" / "example.toml"


def test_make_serve_installs_no_test_extras(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    planned = subprocess.run(
        ["make", "--dry-run", "--always-make", "serve", f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installs = [line for line in planned.splitlines() if "pip install" in line]
    assert f"{venv}/bin/pip install --quiet -e ." in installs, planned
    assert not any("[test]" in line for line in installs), planned
    assert f"{venv}/bin/phxbroker serve --config config.example.toml" in planned


def test_the_wheel_ships_the_example_config(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("phxbroker-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("phxbroker/config/example.toml").decode()
    assert shipped == EXAMPLE.read_text()
    assert (ROOT / "config.example.toml").read_text() == shipped  # the name the docs use
