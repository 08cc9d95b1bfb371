"""The TLS certificate and key named by `[server] tls_cert` / `tls_key`, loaded into a
server context when the config is read, so a reload re-reads renewed files and a broken
pair is refused before anything changes."""

from __future__ import annotations

import ssl
from pathlib import Path


class TlsConfigError(Exception):
    """tls_cert / tls_key cannot be used; `key` names the config key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context (TLS 1.2+, the platform's default ciphers, no renegotiation) for a
    PEM certificate chain and its private key. Raises TlsConfigError with one sentence."""
    for key, path in (("tls_cert", cert_file), ("tls_key", key_file)):
        try:
            path.read_bytes()
        except FileNotFoundError:
            raise TlsConfigError(key, f"{str(path)!r} does not exist") from None
        except OSError as exc:
            raise TlsConfigError(key, f"{str(path)!r} cannot be read ({exc.strerror})") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client-initiated renegotiation only lets a client make us redo handshake work.
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except _EncryptedKey:
        message = "the private key is encrypted; give it unencrypted"
        raise TlsConfigError("tls_key", message) from None
    except ssl.SSLError as exc:
        reason = (exc.reason or "").lower().replace("_", " ")
        if "key values mismatch" in reason:
            message = "the private key does not belong to the certificate in tls_cert"
            raise TlsConfigError("tls_key", message) from None
        raise TlsConfigError(
            "tls_cert", f"cannot load the certificate and key as PEM ({reason or exc})"
        ) from None
    return context


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for a passphrase.
    raise _EncryptedKey
