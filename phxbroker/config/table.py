"""Reading TOML with errors an operator can act on: every problem is one ConfigError
sentence naming the file, the dotted key and the reason; unknown keys are errors too.

An error about a secret-bearing key (`token`, `key`, `secret`, `secret_key_base`, anything
`*_sha256`) names the key and the type of its value, never the value: config errors end
up in terminals, logs and the journal."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SECRET_KEYS = frozenset({"token", "key", "secret", "secret_key_base", "password"})


def is_secret_key(name: str) -> bool:
    """Whether a key's value may be a secret (or a digest of one)."""
    return name in SECRET_KEYS or name.endswith("_sha256")


class ConfigError(Exception):
    """A configuration problem, worded as one sentence for the operator."""

    def __init__(self, file: str | Path, key: str, reason: str) -> None:
        self.file = str(file)
        self.key = key
        self.reason = reason
        where = f" at {key}" if key else ""
        super().__init__(f"config error in {self.file}{where}: {reason}")


class Table:
    """Typed, key-checked access to one TOML table; errors name file and dotted key."""

    def __init__(self, data: dict[str, Any], file: str | Path, prefix: str) -> None:
        self._data = data
        self._file = file
        self._prefix = prefix
        self._seen: set[str] = set()

    @property
    def file(self) -> str | Path:
        return self._file

    def key(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self._file, self.key(name), reason)

    def describe(self, name: str, value: Any) -> str:
        """A value for an error message: its type only when the key may hold a secret."""
        return _describe(value, secret=is_secret_key(name))

    def shown(self, name: str, value: Any) -> str:
        """A value as an error message may show it (withheld for secret-bearing keys)."""
        return self.describe(name, value) if is_secret_key(name) else str(value)

    def _get(self, name: str) -> Any:
        self._seen.add(name)
        return self._data.get(name)

    def has(self, name: str) -> bool:
        return name in self._data

    def string(self, name: str, default: str) -> str:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {self.describe(name, value)}")
        return value

    def integer(self, name: str, default: int, *, minimum: int | None = None) -> int:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {self.describe(name, value)}")
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}, got {self.shown(name, value)}")
        return value

    def number(self, name: str, default: float, *, minimum: float | None = None) -> float:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"expected a number, got {self.describe(name, value)}")
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}, got {self.shown(name, value)}")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {self.describe(name, value)}")
        return value

    def str_list(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, f"expected a list of strings, got {self.describe(name, value)}")
        return tuple(value)

    def raw(self, name: str) -> Any:
        return self._get(name)

    def table(self, name: str) -> Table:
        value = self._get(name)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table, got {self.describe(name, value)}")
        return Table(value, self._file, self.key(name))

    def tables(self, name: str) -> Iterator[Table]:
        value = self._get(name)
        if value is None:
            return
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(name, f"expected an array of tables ([[{self.key(name)}]])")
        for index, item in enumerate(value):
            yield Table(item, self._file, f"{self.key(name)}[{index}]")

    def done(self) -> None:
        """Reject keys nobody asked for: they are almost always typos."""
        for name in self._data:
            if name not in self._seen:
                raise self.error(name, "unknown key")


def _describe(value: Any, *, secret: bool = False) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if secret:
        return f"{type(value).__name__} (value withheld: the key may hold a secret)"
    return f"{type(value).__name__} {value!r}"


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's document; ConfigError names the file when it cannot be had."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, "", "the file does not exist") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot be read ({exc.strerror})") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(path, "", "the file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML ({exc})") from None


def config_relative(t: Table, path: str) -> Path:
    """A path from the config file, relative to the file's directory unless absolute."""
    return Path(t.file).parent / Path(path).expanduser()
