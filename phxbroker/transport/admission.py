"""Who may become a client, and how much a client may send: the same for every transport.

`Admission` runs the checks a connect passes before the client becomes a broker peer:
the connection limits (per client address and in total, over TCP connections on the
listen port), the browser's Origin, the serializer version and the credential. A refusal
is one `Refusal`, counted by reason and logged once, never with the token.

`TokenBucket` meters one connection's messages, and `over_rate` decides (and logs, and
counts) what happens to a message it refused.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Protocol

from phxbroker.auth.authenticator import Authenticator, Identity, Refused
from phxbroker.auth.origin import LoggedOnce, allowing_change, origin_problem
from phxbroker.broker.stats import Stats
from phxbroker.config.settings import IPNetwork, LimitsConfig, ServerConfig
from phxbroker.hooks.contract import ConnectAnswer
from phxbroker.hooks.runner import HookUnavailable
from phxbroker.protocol.serializers import Serializer, serializer_for
from phxbroker.transport.http import Request

log = logging.getLogger("phxbroker.limits")
refusals_log = logging.getLogger("phxbroker.http")

RATE_LIMITED = {"reason": "rate limited"}  # the error reply to a message over the rate
MAX_REMEMBERED_VERSIONS = 64


def client_address(remote: str) -> str:
    """The address a client is counted under, from "host:port" / "[v6]:port".

    IPv6 clients are counted per /64, the block one subscriber usually holds, so a
    client cannot escape its limit by hopping between its own addresses; IPv4-mapped
    IPv6 addresses count as the IPv4 address they carry.
    """
    host = remote_ip(remote)
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host.split("%")[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


def remote_ip(remote: str) -> str:
    """The IP text of "host:port", "[v6]:port", "host" or "[v6]"."""
    if remote.startswith("["):
        return remote[1 : remote.find("]")]
    host, sep, _ = remote.rpartition(":")
    return host if sep and ":" not in host else remote


def forwarded_client(remote: str, forwarded_for: str, trusted: tuple[IPNetwork, ...]) -> str | None:
    """The client a trusted proxy speaks for, as "1.2.3.4" or "[2001:db8::1]", or None.

    Only a peer inside `trusted` is believed. X-Forwarded-For lists each hop's client,
    appended by each proxy, so the rightmost address that is not itself a trusted proxy
    is the first one nobody could forge; anything left of it is the client's own say.
    """
    if not forwarded_for or not _inside(remote_ip(remote), trusted):
        return None
    for hop in reversed(forwarded_for.split(",")):
        text = hop.strip()
        try:
            ip = ipaddress.ip_address(remote_ip(text) if text.startswith("[") else text)
        except ValueError:
            return None  # a garbled chain says nothing we can trust
        if not _inside(str(ip), trusted):
            return f"[{ip}]" if ip.version == 6 else str(ip)
    return None


def _inside(ip_text: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(ip_text.split("%")[0])
    except ValueError:
        return False
    return any(ip in network for network in networks)


class ConnectionCounter:
    """Open connections in total and per client address."""

    def __init__(self) -> None:
        self.total = 0
        self.per_address: dict[str, int] = {}

    def opened(self, address: str) -> None:
        self.total += 1
        self.per_address[address] = self.per_address.get(address, 0) + 1

    def moved(self, old: str, new: str) -> None:
        """Count an open connection under another address (the client behind a proxy)."""
        if old != new:
            self.closed(old)
            self.opened(new)

    def closed(self, address: str) -> None:
        self.total -= 1
        left = self.per_address.get(address, 0) - 1
        if left > 0:
            self.per_address[address] = left
        else:
            self.per_address.pop(address, None)

    def problem(self, address: str, limits: LimitsConfig) -> tuple[int, str, str] | None:
        """(HTTP status, refusal reason, sentence) when a connection from `address`, itself
        already counted, is one too many; None when it may be served."""
        per_address = limits.max_connections_per_ip
        count = self.per_address.get(address, 0)
        if per_address and count > per_address:
            return (
                429,
                "too_many_connections_per_ip",
                f"{count} connections from {address} (limit {per_address})",
            )
        if limits.max_connections and self.total > limits.max_connections:
            return (
                503,
                "too_many_connections",
                f"{self.total} connections open (limit {limits.max_connections})",
            )
        return None


class Refusal(Exception):
    """A refused connect: the HTTP status to answer, a short reason for counters, and one
    sentence for the log."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason


class ConnectHook(Protocol):
    """The app's back end, asked about a connect (`UserSocket.connect/3`)."""

    async def connect(
        self,
        params: dict[str, str],
        headers: dict[str, str],
        remote: str,
        transport: str,
        user: str | None,
    ) -> ConnectAnswer: ...


@dataclass(frozen=True, slots=True)
class Admitted:
    """A connect that passed every check: how to speak to the client, and who it is."""

    serializer: Serializer
    identity: Identity


class Admission:
    """The connect checks, in Phoenix's order, for the websocket and long-poll transports."""

    def __init__(
        self,
        stats: Stats,
        authenticator: Authenticator,
        server: ServerConfig,
        limits: LimitsConfig,
    ) -> None:
        self.stats = stats
        self.connect_hook: ConnectHook | None = None  # the app's back end, with [hooks]
        self.connections = ConnectionCounter()  # TCP connections on the listen port
        self._refused_origins = LoggedOnce()  # phoenix.js retries a refused page for ever
        self._serializers: dict[str | None, Serializer | None] = {}  # by `vsn` param
        self.configure(authenticator, server, limits)

    def configure(
        self, authenticator: Authenticator, server: ServerConfig, limits: LimitsConfig
    ) -> None:
        """Check new connects against a (reloaded) config."""
        self.authenticator = authenticator
        self.server = server
        self.limits = limits

    def over_limit(self, request: Request) -> Refusal | None:
        """The refusal when the connection carrying this request is one too many."""
        problem = self.connections.problem(client_address(request.remote), self.limits)
        if problem is None:
            return None
        return Refusal(*problem)

    def check_origin(self, request: Request) -> Refusal | None:
        """The refusal when the request's Origin is not allowed (Phoenix's check_origin).
        Each refused origin is logged once, with the config change that would allow it."""
        cfg = self.server
        origin = request.headers.get("origin")
        problem = origin_problem(
            origin,
            cfg.check_origin,
            host=cfg.host,
            request_scheme="https" if cfg.tls_context is not None else "http",
            request_host=request.header("host"),
        )
        if problem is None:
            return None
        if self._refused_origins.first((origin, cfg.check_origin, cfg.host)):
            change = allowing_change(origin or "", cfg.check_origin)
            refusals_log.info(
                "refused connect from %s on %s: %s%s (logged once per origin)",
                request.remote,
                request.path,
                problem,
                f"; to allow it, {change}" if change else "",
            )
        return Refusal(403, "origin", problem)

    async def admit(
        self,
        request: Request,
        params: dict[str, str],
        header_token: str | None,
        transport: str,
    ) -> Admitted:
        """The serializer the `vsn` param asks for and the client's identity: its token,
        then (with `[auth] hook = true`) the app's back end. Raises Refusal: 403 for an
        unsupported version or a refused credential, 503 when the back end cannot say."""
        vsn = params.get("vsn")
        try:
            serializer = self._serializers[vsn]
        except KeyError:
            serializer = serializer_for(vsn)
            # Clients send a handful of versions; what they send is remembered, up to a
            # bound, so a client making up versions cannot grow the table.
            if len(self._serializers) < MAX_REMEMBERED_VERSIONS:
                self._serializers[vsn] = serializer
        if serializer is None:
            raise Refusal(403, "bad_vsn", f"unsupported vsn {params.get('vsn')!r}")
        auth = self.authenticator.config
        asks_app = self.connect_hook is not None and auth.hook
        try:
            if asks_app and not (auth.tokens or auth.jwt or auth.phoenix_token):
                identity = Identity(user=None)  # the back end alone decides
            else:
                identity = self.authenticator.authenticate(params, header_token)
        except Refused as exc:
            if exc.reason != "banned":
                self.stats.auth_failures += 1
            raise Refusal(403, exc.reason, str(exc)) from None
        if asks_app:
            identity = await self._ask_app(request, params, header_token, transport, identity)
        return Admitted(serializer, identity)

    async def _ask_app(
        self,
        request: Request,
        params: dict[str, str],
        header_token: str | None,
        transport: str,
        identity: Identity,
    ) -> Identity:
        assert self.connect_hook is not None
        try:
            answer = await self.connect_hook.connect(
                params, request.headers, remote_ip(request.remote), transport, identity.user
            )
        except HookUnavailable as exc:
            raise Refusal(
                503, "app_unavailable", f"the app's back end did not answer: {exc}"
            ) from None
        if not answer.ok:
            self.stats.auth_failures += 1
            raise Refusal(403, "refused_by_app", "the app's back end refused the connect")
        user = answer.user if answer.user is not None else identity.user
        if user is not None:
            left = self.authenticator.bans.remaining(user)
            if left is not None:
                raise Refusal(403, "banned", f"user {user!r} is banned for {left:.0f} s more")
        return Identity(user=user, credential=identity.credential, assigns=answer.assigns)

    def refused(self, refusal: Refusal, request: Request, what: str = "connect") -> None:
        """Count and log a refusal (`what` says which kind of connect it was); a refused
        origin was logged once by `check_origin`."""
        self.stats.count_refusal(refusal.reason)
        if refusal.reason == "origin":
            return
        refusals_log.info(
            "refused %s from %s on %s: %s", what, request.remote, request.path, refusal
        )

    def attribute(self, request: Request, counted: list[str] | None) -> None:
        """Behind a trusted proxy the client is the one X-Forwarded-For names: it is what
        logs show and what the per-address limit counts. `counted` holds the address the
        connection is counted under and follows the client."""
        forwarded = request.header("x-forwarded-for")
        if not forwarded:
            return
        client = forwarded_client(request.remote, forwarded, self.server.trusted_proxies)
        if client is None:
            return
        request.remote = client
        if counted is not None:
            address = client_address(client)
            self.connections.moved(counted[0], address)
            counted[0] = address


class TokenBucket:
    """A connection's message allowance: `burst` messages at once, refilled at `rate` per
    second. `refused` counts messages refused since the last one accepted."""

    __slots__ = ("burst", "rate", "refused", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now
        self.refused = 0

    def take(self, now: float) -> bool:
        """Spend one token; False (and `refused` grows) when none is left."""
        tokens = self.tokens
        if now != self.stamp:
            tokens = min(self.burst, tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if tokens >= 1:
            self.tokens = tokens - 1
            self.refused = 0
            return True
        self.tokens = tokens
        self.refused += 1
        return False


def over_rate(peer: object, bucket: TokenBucket, stats: Stats, close_after: int) -> bool:
    """Account for a message `bucket` refused: True when the connection must now be closed
    (more than `close_after` refused in a row), else it gets an error reply RATE_LIMITED.
    Logs the start of an episode and the close, once each; counts every refusal."""
    stats.count_refusal("rate_limited")
    if close_after and bucket.refused > close_after:
        stats.count_refusal("rate_limit_close")
        log.info("closing %s: %d messages in a row over the rate limit", peer, bucket.refused)
        return True
    if bucket.refused == 1:
        log.info(
            "rate limiting %s: over %g messages per second (burst %d)",
            peer,
            bucket.rate,
            bucket.burst,
        )
    return False
