"""Which browser origins may open a socket: Phoenix's `check_origin`, sans-io.

A browser sends `Origin` with every websocket handshake and cross-origin request, so a
page on another site cannot ride on a user's cookies or network position to open a
socket here. Requests without an Origin header (native apps, servers, tests) are let
through, as in Phoenix.

Policies, as in Phoenix:
- off (`check_origin = false`): every origin is allowed;
- host (`check_origin = true`, the default): the origin's host must be `[server] host`
  (scheme and port are not compared);
- a list such as `["https://example.com", "//*.example.com", "//other.com:888"]`: the
  origin must match one entry; a component an entry leaves out matches anything, a
  scheme without a port means that scheme's default port, and `*.example.com` matches
  example.com and every sub-domain;
- conn (`check_origin = "conn"`): scheme, host and port must be those the request itself
  was sent to (its Host header and whether the port speaks TLS).
An origin that names no host (such as `null`) is refused by every policy but off. Hosts
and schemes are compared case-insensitively.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
MAX_SHOWN = 100  # characters of a client's Origin quoted in a log line
MAX_REMEMBERED = 1000  # refused origins remembered as logged; then they are logged anew
# A host worth quoting in a config line: a DNS name or an IP address, nothing else.
_PLAIN_HOST = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?|[0-9a-f.]*:[0-9a-f:.]*")


@dataclass(frozen=True, slots=True)
class AllowedOrigin:
    """One entry of an origin list; None matches anything."""

    scheme: str | None
    host: str | None
    port: int | None

    def matches(self, scheme: str | None, host: str, port: int | None) -> bool:
        if self.scheme is not None and self.scheme != scheme:
            return False
        if self.port is not None and self.port != port:
            return False
        if self.host is None:
            return True
        if self.host.startswith("*."):
            base = self.host[2:]
            return host == base or host.endswith("." + base)
        return host == self.host


@dataclass(frozen=True, slots=True)
class OriginPolicy:
    """What `check_origin` says: kind is "off", "host", "list" or "conn"."""

    kind: str = "host"
    origins: tuple[AllowedOrigin, ...] = ()

    def describe(self, host: str) -> str:
        if self.kind == "list":
            return "check_origin lists the allowed origins"
        if self.kind == "conn":
            return 'check_origin = "conn": it must be the address the request was sent to'
        return f'check_origin = true: its host must be [server] host, "{host}"'


ALLOW_ALL = OriginPolicy("off")
CHECK_HOST = OriginPolicy("host")


def parse_policy(value: object) -> OriginPolicy:
    """The policy for a `check_origin` config value; ValueError names what is wrong."""
    if value is False:
        return ALLOW_ALL
    if value is True:
        return CHECK_HOST
    if value == "conn":
        return OriginPolicy("conn")
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return OriginPolicy("list", tuple(parse_allowed(v) for v in value))
    raise ValueError(
        'expected true, false, "conn" or a list of origins such as "https://example.com"'
    )


def parse_allowed(text: str) -> AllowedOrigin:
    """Parse one allowed origin ("https://example.com", "//*.example.com", "//h.com:888")."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} is not an origin such as https://example.com") from None
    host = parts.hostname
    if not host:
        raise ValueError(
            f"{text!r} names no host; write an origin such as https://example.com "
            'or "//example.com"'
        )
    scheme = parts.scheme.lower() or None
    if port is None and scheme is not None:
        port = DEFAULT_PORTS.get(scheme)
    return AllowedOrigin(scheme, host.lower(), port)


def origin_problem(
    origin: str | None,
    policy: OriginPolicy,
    *,
    host: str,
    request_scheme: str = "http",
    request_host: str = "",
) -> str | None:
    """Why a request with this Origin header must be refused, or None when it is allowed.

    `host` is `[server] host`; `request_scheme` ("http" or "https") and `request_host`
    (the request's Host header) are used by the "conn" policy. The sentence quotes the
    origin with repr(), shortened, so a hostile header cannot forge log lines.
    """
    if origin is None or policy.kind == "off":
        return None
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return f"origin {_shown(origin)} is not a valid URL"
    origin_host = (parts.hostname or "").lower()
    if not origin_host:
        return f"origin {_shown(origin)} names no host"
    scheme = parts.scheme.lower() or None
    if port is None and scheme is not None:
        port = DEFAULT_PORTS.get(scheme)
    if policy.kind == "host":
        allowed = origin_host == host.lower()
    elif policy.kind == "conn":
        allowed = _same_as_request(scheme, origin_host, port, request_scheme, request_host)
    else:
        allowed = any(entry.matches(scheme, origin_host, port) for entry in policy.origins)
    if allowed:
        return None
    return f"origin {_shown(origin)} is not allowed ({policy.describe(host)})"


def allowing_change(origin: str, policy: OriginPolicy) -> str | None:
    """The config change that lets pages of `origin` connect, worded as an instruction
    (`add "https://app.example.com" to [server] check_origin`), or None when the origin is
    not a plain http(s) origin worth quoting in a config file."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not _PLAIN_HOST.fullmatch(host):
        return None
    netloc = f"[{host}]" if ":" in host else host
    if port not in (None, DEFAULT_PORTS[scheme]):
        netloc += f":{port}"
    shown = f"{scheme}://{netloc}"
    if policy.kind == "list":
        return f'add "{shown}" to [server] check_origin'
    if policy.kind == "host":
        return f'set [server] host = "{host}" or check_origin = ["{shown}"]'
    return f'set [server] check_origin = ["{shown}"]'


class LoggedOnce:
    """Remembers which keys were logged already, so that an event repeated for ever (a
    refused page that phoenix.js retries every few seconds) is logged once. Bounded: past
    MAX_REMEMBERED keys it forgets them all, and they are logged anew."""

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self.limit = limit
        self._seen: set[Hashable] = set()

    def first(self, key: Hashable) -> bool:
        """True the first time `key` is seen."""
        if key in self._seen:
            return False
        if len(self._seen) >= self.limit:
            self._seen.clear()
        self._seen.add(key)
        return True


def _same_as_request(
    scheme: str | None, host: str, port: int | None, request_scheme: str, request_host: str
) -> bool:
    try:
        own = urlsplit(f"{request_scheme}://{request_host}")
        own_port = own.port or DEFAULT_PORTS.get(request_scheme)
    except ValueError:
        return False
    return scheme == request_scheme and host == (own.hostname or "") and port == own_port


def _shown(origin: str) -> str:
    if len(origin) > MAX_SHOWN:
        origin = origin[:MAX_SHOWN] + "..."
    return repr(origin)
