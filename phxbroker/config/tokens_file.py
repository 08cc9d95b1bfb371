"""The tokens file: connect tokens and API keys, kept as SHA-256 digests.

The main config names it (`[auth] tokens_file`), so that `phxbroker token` rewrites only
this machine-managed file and never the hand-written, commented main config. Its shape
mirrors the main config's sections:

    [[auth.tokens]]                 [[api.keys]]
    user = "alice"                  name = "backend"
    token_sha256 = "<hex>"          key_sha256 = "<hex>"

Secrets are generated here, shown once by the CLI, and never stored. Writes are atomic
(a temporary file renamed over the old one) and leave the file at mode 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from phxbroker.config.settings import parse_config
from phxbroker.config.table import ConfigError, read_toml

HEADER = (
    "# phxbroker connect tokens and API keys, as SHA-256 digests of the secrets.\n"
    "# Managed by `phxbroker token add/revoke/list`; apply changes with `phxbroker reload`.\n"
    "# Entries added by hand are kept, comments are not.\n\n"
)
SECRET_BYTES = 32


def new_secret() -> str:
    """A random secret (256 bits, url-safe base64: also safe in phoenix.js authToken)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Entry:
    """One stored credential as `token list` shows it (never the secret)."""

    kind: str  # "token" or "api key"
    name: str  # the user, or the API key's name
    sha256: str  # hex digest
    source: Path


@dataclass
class TokensFile:
    """The tokens file of one config, loaded for editing."""

    config_path: Path
    path: Path
    config_data: dict[str, Any]
    document: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_config(cls, config_path: Path) -> TokensFile:
        """The tokens file `config_path` names (empty if it does not exist yet); raises
        ConfigError when the config names none or a file cannot be read."""
        data = read_toml(config_path)
        config = parse_config(data, config_path, tokens_document={})
        path = config.auth.tokens_file
        if path is None:
            raise ConfigError(
                config_path,
                "auth.tokens_file",
                'is not set: add tokens_file = "tokens.toml" under [auth] to manage tokens',
            )
        document = read_toml(path) if path.exists() else {}
        return cls(config_path, path, data, document)

    # -- reading -------------------------------------------------------------------------

    def tokens(self) -> list[dict[str, Any]]:
        tokens: list[dict[str, Any]] = self.document.setdefault("auth", {}).setdefault("tokens", [])
        return tokens

    def api_keys(self) -> list[dict[str, Any]]:
        keys: list[dict[str, Any]] = self.document.setdefault("api", {}).setdefault("keys", [])
        return keys

    def entries(self) -> list[Entry]:
        """Every credential of the config: the main file's and this file's."""
        found = []
        main = self.config_data
        for source, doc in ((self.config_path, main), (self.path, self.document)):
            for t in doc.get("auth", {}).get("tokens", []):
                found.append(Entry("token", t.get("user", "?"), _digest_of(t, "token"), source))
            for k in doc.get("api", {}).get("keys", []):
                found.append(Entry("api key", k.get("name", "?"), _digest_of(k, "key"), source))
        return found

    # -- changing ------------------------------------------------------------------------

    def add_token(self, user: str) -> str:
        """Add a connect token for `user`; returns the secret (to show once)."""
        secret = new_secret()
        self.tokens().append({"user": user, "token_sha256": sha256_hex(secret)})
        return secret

    def add_api_key(self, name: str) -> str:
        secret = new_secret()
        self.api_keys().append({"name": name, "key_sha256": sha256_hex(secret)})
        return secret

    def revoke_tokens(self, user: str) -> int:
        """Remove every connect token of `user` from this file; how many there were."""
        return _remove(self.tokens(), "user", user)

    def revoke_api_keys(self, name: str) -> int:
        return _remove(self.api_keys(), "name", name)

    def save(self) -> None:
        """Check the config with the new content, then replace the file atomically."""
        document = _without_empty(self.document)
        parse_config(self.config_data, self.config_path, tokens_document=document)
        write_atomically(self.path, HEADER + tomli_w.dumps(document), mode=0o600)


def _digest_of(entry: dict[str, Any], name: str) -> str:
    digest = entry.get(f"{name}_sha256")
    if isinstance(digest, str):
        return digest.lower()
    secret = entry.get(name)
    return sha256_hex(secret) if isinstance(secret, str) else "?"


def _remove(entries: list[dict[str, Any]], key: str, value: str) -> int:
    kept = [e for e in entries if e.get(key) != value]
    removed = len(entries) - len(kept)
    entries[:] = kept
    return removed


def _without_empty(document: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, table in document.items():
        if isinstance(table, dict):
            table = {k: v for k, v in table.items() if v != []}
            if not table:
                continue
        out[section] = table
    return out


def write_atomically(path: Path, text: str, mode: int) -> None:
    """Replace `path` with `text` so that readers see the old or the new file, never a
    part; the new file keeps the old one's owner (a daemon running as another user must
    still read it) and gets `mode`."""
    path = Path(path)
    try:
        previous = os.stat(path)
    except FileNotFoundError:
        previous = None
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        if previous is not None and (previous.st_uid, previous.st_gid) != (
            os.geteuid(),
            os.getegid(),
        ):
            with contextlib.suppress(PermissionError):
                os.chown(temporary, previous.st_uid, previous.st_gid)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_new(path: Path, text: str, mode: int) -> None:
    """Create `path` with `text`; FileExistsError if it is already there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)  # whatever the umask
