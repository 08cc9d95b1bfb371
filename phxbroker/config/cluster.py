"""The `[cluster]` config section: several phxbroker nodes sharing broadcasts, presence,
kicks and stats through Redis.

Without the section the broker is one process and nothing of the cluster is loaded. A
Redis URL that carries a password is never written in the config file: it comes from the
environment variable `redis_url_env` names. `rediss://` connects with TLS and verifies
the server's certificate and host name (against the system's CAs, or `tls_ca`).
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from phxbroker.config.table import Table, config_relative

DEFAULT_PREFIX = "phxbroker"
DEFAULT_DOWN_AFTER = 30.0  # seconds, as Phoenix.Tracker's down period
MAX_NAME = 100  # bytes in a node name or prefix: they are parts of Redis channel names
SCHEMES = ("redis", "rediss")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    redis_url: str = field(repr=False)  # may carry a password: never logged whole
    node: str = ""  # empty: "<host name>:<pid>", chosen when the node starts
    prefix: str = DEFAULT_PREFIX
    down_after: float = DEFAULT_DOWN_AFTER
    tls_ca: str = ""
    # Built when the config is read for rediss:// URLs (certificate verification on).
    tls_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    @property
    def redis_address(self) -> str:
        """The URL without user or password, for logs."""
        parts = urlsplit(self.redis_url)
        host = parts.hostname or "localhost"
        host = f"[{host}]" if ":" in host else host
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"


def default_node_name() -> str:
    """The name a node takes when the config gives none: host name and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def parse_cluster(t: Table) -> ClusterConfig:
    """[cluster]: where Redis is, this node's name, the cluster's prefix, the down period."""
    has_url, has_env = t.has("redis_url"), t.has("redis_url_env")
    if has_url == has_env:
        raise t.error("redis_url", 'give exactly one of "redis_url" or "redis_url_env"')
    if has_url:
        url = t.string("redis_url", "")
        if urlsplit(url).password:
            raise t.error(
                "redis_url",
                "carries a password: put the URL in an environment variable and name it "
                "with redis_url_env",
            )
        key = "redis_url"
    else:
        variable = t.string("redis_url_env", "")
        url = os.environ.get(variable, "") if variable else ""
        if not url:
            raise t.error(
                "redis_url_env", f"the environment variable {variable!r} is not set or empty"
            )
        key = "redis_url_env"
    _check_url(t, key, url)
    node = t.string("node", "")
    _check_name(t, "node", node, allow_empty=True)
    prefix = t.string("prefix", DEFAULT_PREFIX)
    _check_name(t, "prefix", prefix, allow_empty=False)
    down_after = t.number("down_after", DEFAULT_DOWN_AFTER, minimum=0.5)
    tls_ca = t.string("tls_ca", "")
    tls_context = None
    if urlsplit(url).scheme == "rediss":
        tls_context = _client_context(t, tls_ca)
    elif tls_ca:
        raise t.error("tls_ca", "is only used with a rediss:// URL")
    t.done()
    return ClusterConfig(
        redis_url=url,
        node=node,
        prefix=prefix,
        down_after=down_after,
        tls_ca=tls_ca,
        tls_context=tls_context,
    )


def _check_url(t: Table, key: str, url: str) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise t.error(key, "is not a URL such as redis://127.0.0.1:6379/0") from None
    if parts.scheme not in SCHEMES:
        raise t.error(key, "must start with redis:// or rediss:// (TLS)")
    if not parts.hostname:
        raise t.error(key, "names no host (e.g. redis://127.0.0.1:6379/0)")
    if port == 0:
        raise t.error(key, "has port 0")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise t.error(key, f"the path must be a database number, got {parts.path!r}")


def _check_name(t: Table, key: str, value: str, *, allow_empty: bool) -> None:
    if not value:
        if allow_empty:
            return
        raise t.error(key, "must not be empty")
    if len(value.encode()) > MAX_NAME:
        raise t.error(key, f"must be at most {MAX_NAME} bytes")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise t.error(key, "must not contain spaces or control characters")


def _client_context(t: Table, tls_ca: str) -> ssl.SSLContext:
    """TLS 1.2+ with certificate and host name verification."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls_ca:
        path = config_relative(t, tls_ca)
        try:
            context.load_verify_locations(cafile=str(path))
        except FileNotFoundError:
            raise t.error("tls_ca", f"{str(path)!r} does not exist") from None
        except (OSError, ssl.SSLError) as exc:
            reason = f"cannot load {str(path)!r} as PEM CA certificates ({exc})"
            raise t.error("tls_ca", reason) from None
    return context
