"""TOML configuration -> frozen dataclasses.

Every error a user can make is reported as a ConfigError whose message is one sentence
naming the file, the key and the reason. Unknown keys are errors too, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from phxbroker.auth import origin
from phxbroker.auth.settings import AuthConfig, TokenEntry
from phxbroker.broker.topics import JoinPolicy, TopicRule, parse_pattern
from phxbroker.config import tls
from phxbroker.config.cluster import MAX_NAME as MAX_NODE_NAME
from phxbroker.config.cluster import ClusterConfig, parse_cluster
from phxbroker.config.signed_tokens import parse_jwt, parse_phoenix_token, read_secret
from phxbroker.config.table import ConfigError, Table, config_relative, read_toml

DEFAULT_LISTEN = "127.0.0.1:4000"
MAX_HOOK_TIMEOUT_MS = 8000  # well under phoenix.js's 10 s push and join timeout
# systemd's RuntimeDirectory=phxbroker creates /run/phxbroker for the daemon's user.
DEFAULT_ADMIN_SOCKET = "/run/phxbroker/admin.sock"
MAX_UNIX_PATH = 107  # sun_path holds 108 bytes, one of them the terminating NUL
MAX_WORKERS = 256


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 4000
    socket_paths: tuple[str, ...] = ("/socket",)
    max_frame_size: int = 1_048_576
    idle_timeout: float = 60.0
    outbox_limit: int = 4_194_304
    max_channels: int = 100
    handshake_timeout: float = 10.0
    max_header_size: int = 16_384
    drain_timeout: float = 10.0
    # Processes serving the listen port (SO_REUSEPORT), each a node of the [cluster];
    # above 1 a supervisor starts and watches them.
    workers: int = 1
    host: str = "localhost"
    check_origin: origin.OriginPolicy = origin.CHECK_HOST
    tls_cert: str = ""
    tls_key: str = ""
    # Peers whose X-Forwarded-For names the real client (a reverse proxy on this host).
    trusted_proxies: tuple[IPNetwork, ...] = LOOPBACK
    # Loaded from tls_cert/tls_key when the config is read, so a reload re-reads them.
    tls_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Per-client limits; 0 turns a limit off."""

    max_connections: int = 10_000
    max_connections_per_ip: int = 100
    message_rate: float = 100.0
    message_burst: int = 200
    rate_limit_close_after: int = 200
    frame_rate: float = 10_000.0  # websocket frames of every kind, per second
    frame_burst: int = 20_000
    max_fragments: int = 128  # frames one websocket message may come in


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key for the HTTP API; only its SHA-256 is kept in memory."""

    name: str
    sha256: bytes


@dataclass(frozen=True, slots=True)
class ApiConfig:
    keys: tuple[ApiKey, ...] = ()  # no keys: the API answers every request with 404
    max_body_size: int = 1_048_576


@dataclass(frozen=True, slots=True)
class AdminConfig:
    socket: Path | None = Path(DEFAULT_ADMIN_SOCKET)  # None: no control socket
    mode: int = 0o600
    # Whether `socket` was set in the file: a default path that cannot be used only
    # disables the control socket (with a warning); a configured one stops the start.
    configured: bool = False


@dataclass(frozen=True, slots=True)
class LongPollConfig:
    """phoenix.js's LongPoll transport at <socket path>/longpoll."""

    enabled: bool = True
    window_ms: int = 10_000  # how long a poll is held waiting for messages (Phoenix's default)
    max_post_size: int = 4_194_304  # bytes in one POST of batched messages


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True  # serve GET /metrics in the Prometheus text format


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "text"  # "text" or "json" (one JSON object per line)
    connections: bool = True  # connect, join and leave lines at info, as Phoenix writes them


@dataclass(frozen=True, slots=True)
class HooksConfig:
    """The app's back end, asked over HTTP: `<url>/connect`, `/join`, `/event`, `/events`."""

    url: str
    secret: bytes = field(repr=False)  # signs every call; from secret_env or secret_file
    timeout_ms: int = 3000  # a whole call, retries included
    max_concurrency: int = 64  # calls under way at once
    max_queue: int = 1024  # calls waiting for one of those; beyond it they fail at once
    forward_headers: tuple[str, ...] = ()  # client request headers the connect call carries
    lifecycle: bool = True  # join, leave, disconnect, occupied and vacated events to /events
    vacated_delay_ms: int = 5000  # a vacated topic is told after this, unless occupied again
    max_answer_size: int = 1_048_576
    max_assigns_size: int = 16_384  # socket or channel assigns, as JSON


@dataclass(frozen=True, slots=True)
class Config:
    path: Path | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    topics: tuple[TopicRule, ...] = ()
    log: LogConfig = field(default_factory=LogConfig)
    longpoll: LongPollConfig = field(default_factory=LongPollConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    hooks: HooksConfig | None = None
    cluster: ClusterConfig | None = None  # None: one process, no Redis


def load_config(path: str | Path) -> Config:
    """Read and validate the config file; raise ConfigError with one clear sentence."""
    path = Path(path)
    return parse_config(read_toml(path), path)


def read_admin_config(path: str | Path) -> AdminConfig:
    """Only the [admin] section of a config file: how the CLI finds the daemon, even while
    the rest of the file is being edited."""
    path = Path(path)
    return _parse_admin(Table(read_toml(path), path, "").table("admin"), path.parent)


def parse_config(
    data: dict[str, Any],
    path: str | Path = "<config>",
    *,
    tokens_document: dict[str, Any] | None = None,
) -> Config:
    """Validate an already-parsed TOML document.

    Relative paths in it are taken from the config file's directory. The tokens file it
    names is read too, unless `tokens_document` gives its content (to check a change
    before writing it).
    """
    root = Table(data, path, "")
    base = Path(path).parent
    server = _parse_server(root.table("server"))
    auth = _parse_auth(root.table("auth"), base)
    api = _parse_api(root.table("api"))
    admin = _parse_admin(root.table("admin"), base)
    topics = tuple(_parse_topic(t) for t in root.tables("topics"))
    log = _parse_log(root.table("log"))
    longpoll = _parse_longpoll(root.table("longpoll"))
    metrics = _parse_metrics(root.table("metrics"))
    limits = _parse_limits(root.table("limits"))
    hooks = _parse_hooks(root.table("hooks")) if root.has("hooks") else None
    cluster = parse_cluster(root.table("cluster")) if root.has("cluster") else None
    root.done()
    _check_workers(path, server, admin, cluster)
    if hooks is None:
        needing = [r for r in topics if r.join.kind == "hook" or r.hook_events]
        if needing:
            rule = needing[0]
            what = 'join = "hook"' if rule.join.kind == "hook" else "hook_events"
            raise ConfigError(
                path,
                "hooks",
                f'is missing: [[topics]] pattern "{rule.pattern.text}" has {what}, which asks '
                "the app's back end ([hooks] url)",
            )
        if auth.hook:
            raise ConfigError(
                path, "hooks", "is missing: [auth] hook = true asks the app's back end on connect"
            )
    if auth.tokens_file is not None:
        if tokens_document is None:
            tokens_document = _read_tokens_file(auth.tokens_file, path)
        tokens, keys = parse_tokens_document(tokens_document, auth.tokens_file)
        auth = replace(auth, tokens=auth.tokens + tokens)
        api = replace(api, keys=api.keys + keys)
    if any(e.user == "*" for e in auth.tokens) and not auth.user_param:
        raise ConfigError(
            path, "auth.user_param", 'must name a connect param when a token has user = "*"'
        )
    return Config(
        path=Path(path),
        server=server,
        auth=auth,
        topics=topics,
        log=log,
        longpoll=longpoll,
        metrics=metrics,
        api=api,
        admin=admin,
        limits=limits,
        hooks=hooks,
        cluster=cluster,
    )


def worker_suffix(index: int) -> str:
    """What a worker adds to the node name and to the admin socket path: "-w0", ".w0"."""
    return f"w{index}"


def _check_workers(
    path: str | Path, server: ServerConfig, admin: AdminConfig, cluster: ClusterConfig | None
) -> None:
    """Workers are cluster nodes, named after `[cluster] node`, each with a control socket
    beside the admin socket."""
    if server.workers == 1:
        return
    if cluster is None:
        raise ConfigError(
            path,
            "server.workers",
            f"{server.workers} workers share broadcasts, presence and kicks through Redis: "
            "add a [cluster] section (redis_url) or set workers = 1",
        )
    last = worker_suffix(server.workers - 1)
    if len(f"{cluster.node}-{last}".encode()) > MAX_NODE_NAME:
        raise ConfigError(
            path,
            "cluster.node",
            f"must leave room for the worker suffix (-{last}): at most "
            f"{MAX_NODE_NAME - len(last) - 1} bytes with workers = {server.workers}",
        )
    if admin.socket is not None and len(f"{admin.socket}.{last}".encode()) > MAX_UNIX_PATH:
        raise ConfigError(
            path,
            "admin.socket",
            f"the path with the worker suffix (.{last}) is longer than {MAX_UNIX_PATH} bytes",
        )


def _read_tokens_file(tokens_file: Path, config_path: str | Path) -> dict[str, Any]:
    """The tokens file's document. A file that is missing or unreadable is the main
    config's mistake (its auth.tokens_file key); mistakes inside it name that file."""
    try:
        return read_toml(tokens_file)
    except ConfigError as exc:
        if exc.key or not exc.reason.startswith(("the file does not exist", "cannot be read")):
            raise
        hint = " (`phxbroker token add NAME` creates it)" if "exist" in exc.reason else ""
        raise ConfigError(
            config_path, "auth.tokens_file", f"{tokens_file}: {exc.reason}{hint}"
        ) from None


def config_warnings(config: Config) -> list[str]:
    """What a config that loads may still get wrong: one sentence each."""
    found = []
    workers = config.server.workers
    cores = os.cpu_count() or 1
    if workers > cores:
        found.append(
            f"[server] workers = {workers} on a machine with {cores} cores: workers beyond "
            "one per core only add overhead"
        )
    if workers > 1 and config.longpoll.enabled:
        found.append(
            f"[server] workers = {workers} with [longpoll] enabled: a long-poll session lives "
            "in one worker and its next request may reach another, which starts the client "
            "over with a new session; serve websockets only ([longpoll] enabled = false) or "
            "run one worker"
        )
    if not config.topics:
        found.append('no [[topics]]: every join is refused with "unmatched topic"')
    auth = config.auth
    if not (auth.tokens or auth.jwt or auth.phoenix_token or auth.allow_anonymous or auth.hook):
        found.append(
            "no connect tokens ([[auth.tokens]] or the tokens file), no [auth.jwt], no "
            "[auth.phoenix_token] and allow_anonymous = false: every connect is refused"
        )
    return found


def parse_tokens_document(
    data: dict[str, Any], path: str | Path
) -> tuple[tuple[TokenEntry, ...], tuple[ApiKey, ...]]:
    """The connect tokens ([[auth.tokens]]) and API keys ([[api.keys]]) of a tokens file."""
    root = Table(data, path, "")
    auth = root.table("auth")
    tokens = _parse_tokens(auth)
    auth.done()
    api = root.table("api")
    keys = _parse_api_keys(api)
    api.done()
    root.done()
    return tokens, keys


def parse_listen(text: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:4000"); raise ValueError with a reason."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f'expected "host:port", got {text!r}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
    return host, int(port_text)


def _parse_server(t: Table) -> ServerConfig:
    d = ServerConfig()
    listen = t.string("listen", DEFAULT_LISTEN)
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise t.error("listen", str(exc)) from None
    paths = t.str_list("socket_paths", d.socket_paths)
    if not paths:
        raise t.error("socket_paths", "needs at least one path")
    for p in paths:
        if not p.startswith("/") or p.endswith("/") or "?" in p:
            raise t.error("socket_paths", f'{p!r} must start with "/" and not end with "/"')
    cfg = ServerConfig(
        listen_host=host,
        listen_port=port,
        socket_paths=paths,
        max_frame_size=t.integer("max_frame_size", d.max_frame_size, minimum=256),
        idle_timeout=t.number("idle_timeout", d.idle_timeout, minimum=0.1),
        outbox_limit=t.integer("outbox_limit", d.outbox_limit, minimum=4096),
        max_channels=t.integer("max_channels", d.max_channels, minimum=1),
        handshake_timeout=t.number("handshake_timeout", d.handshake_timeout, minimum=0.1),
        max_header_size=t.integer("max_header_size", d.max_header_size, minimum=1024),
        host=t.string("host", d.host).lower(),
        check_origin=_check_origin(t),
        trusted_proxies=_trusted_proxies(t),
        drain_timeout=t.number("drain_timeout", d.drain_timeout, minimum=0),
        workers=t.integer("workers", d.workers, minimum=1),
        **_tls(t),
    )
    if not cfg.host:
        raise t.error("host", "must not be empty")
    if cfg.workers > MAX_WORKERS:
        raise t.error("workers", f"must be at most {MAX_WORKERS}")
    t.done()
    return cfg


def _trusted_proxies(t: Table) -> tuple[IPNetwork, ...]:
    if not t.has("trusted_proxies"):
        return LOOPBACK
    networks = []
    for text in t.str_list("trusted_proxies"):
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise t.error(
                "trusted_proxies", f"{text!r} is not an IP address or network (e.g. 10.0.0.0/8)"
            ) from None
    return tuple(networks)


def _check_origin(t: Table) -> origin.OriginPolicy:
    value = t.raw("check_origin")
    if value is None:
        return origin.CHECK_HOST
    try:
        return origin.parse_policy(value)
    except ValueError as exc:
        raise t.error("check_origin", str(exc)) from None


def _tls(t: Table) -> dict[str, Any]:
    cert = t.string("tls_cert", "")
    key = t.string("tls_key", "")
    if not cert and not key:
        return {}
    if not cert or not key:
        missing = "tls_key" if cert else "tls_cert"
        raise t.error(missing, "is required when the other of tls_cert and tls_key is given")
    try:
        context = tls.server_context(config_relative(t, cert), config_relative(t, key))
    except tls.TlsConfigError as exc:
        raise t.error(exc.key, str(exc)) from None
    return {"tls_cert": cert, "tls_key": key, "tls_context": context}


def _parse_auth(t: Table, base: Path) -> AuthConfig:
    d = AuthConfig()
    tokens_file = t.string("tokens_file", "")
    cfg = AuthConfig(
        token_param=t.string("token_param", d.token_param),
        user_param=t.string("user_param", d.user_param),
        allow_anonymous=t.boolean("allow_anonymous", d.allow_anonymous),
        hook=t.boolean("hook", d.hook),
        tokens=_parse_tokens(t),
        tokens_file=(base / tokens_file).absolute() if tokens_file else None,
    )
    if t.has("jwt"):
        cfg = replace(cfg, jwt=parse_jwt(t.table("jwt")))
    if t.has("phoenix_token"):
        cfg = replace(cfg, phoenix_token=parse_phoenix_token(t.table("phoenix_token")))
    t.done()
    return cfg


def _parse_tokens(t: Table) -> tuple[TokenEntry, ...]:
    tokens = []
    for entry in t.tables("tokens"):
        user = entry.string("user", "")
        if not user:
            raise entry.error("user", 'is required (a user name, or "*" for a shared secret)')
        tokens.append(TokenEntry(user=user, sha256=_secret_digest(entry, "token")))
        entry.done()
    return tuple(tokens)


def _secret_digest(entry: Table, name: str) -> bytes:
    """The SHA-256 of a secret given as `<name>` (in clear) or `<name>_sha256` (hex)."""
    secret = entry.string(name, "")
    hexdigest = entry.string(f"{name}_sha256", "")
    if bool(secret) == bool(hexdigest):
        raise entry.error(name, f'give exactly one of "{name}" or "{name}_sha256"')
    if secret:
        return hashlib.sha256(secret.encode()).digest()
    try:
        digest = bytes.fromhex(hexdigest)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise entry.error(f"{name}_sha256", "must be 64 hexadecimal characters (a SHA-256 digest)")
    return digest


def _parse_api(t: Table) -> ApiConfig:
    d = ApiConfig()
    cfg = ApiConfig(
        keys=_parse_api_keys(t),
        max_body_size=t.integer("max_body_size", d.max_body_size, minimum=64),
    )
    t.done()
    return cfg


def _parse_api_keys(t: Table) -> tuple[ApiKey, ...]:
    keys = []
    for entry in t.tables("keys"):
        name = entry.string("name", "")
        if not name:
            raise entry.error("name", "is required (it names the key in logs)")
        keys.append(ApiKey(name=name, sha256=_secret_digest(entry, "key")))
        entry.done()
    return tuple(keys)


def _parse_admin(t: Table, base: Path) -> AdminConfig:
    d = AdminConfig()
    configured = t.has("socket")
    text = t.string("socket", DEFAULT_ADMIN_SOCKET)
    socket = (base / text).absolute() if text else None
    if socket is not None and len(str(socket).encode()) > MAX_UNIX_PATH:
        raise t.error("socket", f"the path is longer than {MAX_UNIX_PATH} bytes: {socket}")
    mode = t.integer("mode", d.mode, minimum=0)
    if mode > 0o777:
        raise t.error("mode", "must be at most 0o777 (write it in octal, e.g. 0o600)")
    t.done()
    return AdminConfig(socket=socket, mode=mode, configured=configured)


_JOIN_WORDS = {"anyone", "authenticated", "self", "hook"}
_UNHANDLED = {"error", "ignore", "crash"}
_STATUS_FIELDS = ("users", "user_count", "hits", "msgs")


def _parse_topic(t: Table) -> TopicRule:
    pattern_text = t.string("pattern", "")
    if not pattern_text:
        raise t.error("pattern", 'is required (e.g. "all", "room:*" or "users:{user}")')
    try:
        pattern = parse_pattern(pattern_text)
    except ValueError as exc:
        raise t.error("pattern", str(exc)) from None

    join_raw = t.raw("join")
    if join_raw is None:
        join = JoinPolicy(kind="authenticated")
    elif isinstance(join_raw, str) and join_raw in _JOIN_WORDS:
        join = JoinPolicy(kind=join_raw)
    elif isinstance(join_raw, list) and all(isinstance(u, str) for u in join_raw):
        join = JoinPolicy(kind="users", users=frozenset(join_raw))
    else:
        raise t.error(
            "join", 'expected "anyone", "authenticated", "self", "hook" or a list of users'
        )
    if join.kind == "self" and "user" not in pattern.captures:
        raise t.error("join", '"self" needs a pattern with a {user} part, e.g. "users:{user}"')

    join_reply = t.raw("join_reply")
    if join_reply is None:
        join_reply = {}
    if not isinstance(join_reply, dict):
        raise t.error("join_reply", "expected a table")

    unhandled = t.string("unhandled", "error")
    if unhandled not in _UNHANDLED:
        raise t.error("unhandled", 'expected "error", "ignore" or "crash"')

    status_fields = t.str_list("status_fields", _STATUS_FIELDS)
    for name in status_fields:
        if name not in _STATUS_FIELDS:
            raise t.error("status_fields", f"{name!r} is not one of {', '.join(_STATUS_FIELDS)}")

    rule = TopicRule(
        pattern=pattern,
        join=join,
        relay=frozenset(t.str_list("relay")),
        echo=frozenset(t.str_list("echo")),
        count=frozenset(t.str_list("count")),
        presence=t.boolean("presence", False),
        presence_meta=t.str_list("presence_meta"),
        presence_update=frozenset(t.str_list("presence_update")),
        history=t.integer("history", 0, minimum=0),
        status_event=t.string("status_event", ""),
        status_fields=status_fields,
        status_on_join=t.boolean("status_on_join", True),
        coalesce_ms=t.integer("coalesce_ms", 50, minimum=0),
        join_reply=join_reply,
        relay_user_key=t.string("relay_user_key", ""),
        relay_binary=t.boolean("relay_binary", True),
        ack=t.boolean("ack", False),
        unhandled=unhandled,
        hook_events=_hook_events(t),
    )
    if rule.presence_update and not rule.presence:
        raise t.error("presence_update", "needs presence = true")
    kinds = (rule.relay, rule.echo, rule.count, rule.presence_update)
    overlap = {e for i, a in enumerate(kinds) for b in kinds[i + 1 :] for e in a & b}
    if overlap:
        raise t.error(
            "relay",
            f"event {sorted(overlap)[0]!r} is listed under more than one of "
            "relay, echo, count and presence_update",
        )
    hooked = sorted(e for kind in kinds for e in kind if rule.hooks(e))
    if hooked:
        raise t.error(
            "hook_events",
            f"event {hooked[0]!r} is also listed under relay, echo, count or presence_update",
        )
    for event in rule.relay | rule.echo | rule.count | rule.presence_update:
        if event.startswith("phx_"):
            raise t.error("relay", f"event {event!r} is reserved by the protocol")
    t.done()
    return rule


def _hook_events(t: Table) -> tuple[str, ...]:
    names = t.str_list("hook_events")
    for name in names:
        body = name.removesuffix("*")
        if not body or "*" in body or name.startswith("phx_"):
            raise t.error(
                "hook_events",
                f'{name!r} must be an event name or a prefix ending in *, such as "lists:*"',
            )
    return names


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")


def _parse_hooks(t: Table) -> HooksConfig:
    d = HooksConfig(url="", secret=b"")
    url = t.string("url", "")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise t.error("url", "must be an http:// or https:// URL, e.g. http://127.0.0.1:8000/hooks")
    if parts.query or parts.fragment:
        raise t.error("url", "is a base URL: calls go to <url>/connect, /join, /event, /events")
    secret = read_secret(t, "secret", "the key that signs every call")
    headers = tuple(h.lower() for h in t.str_list("forward_headers"))
    for header in headers:
        if not _HEADER_NAME.fullmatch(header):
            raise t.error("forward_headers", f"{header!r} is not an HTTP header name")
    cfg = HooksConfig(
        url=url.rstrip("/"),
        secret=secret,
        timeout_ms=t.integer("timeout_ms", d.timeout_ms, minimum=50),
        max_concurrency=t.integer("max_concurrency", d.max_concurrency, minimum=1),
        max_queue=t.integer("max_queue", d.max_queue, minimum=0),
        forward_headers=headers,
        lifecycle=t.boolean("lifecycle", d.lifecycle),
        vacated_delay_ms=t.integer("vacated_delay_ms", d.vacated_delay_ms, minimum=0),
        max_answer_size=t.integer("max_answer_size", d.max_answer_size, minimum=1024),
        max_assigns_size=t.integer("max_assigns_size", d.max_assigns_size, minimum=64),
    )
    if cfg.timeout_ms > MAX_HOOK_TIMEOUT_MS:
        raise t.error(
            "timeout_ms",
            f"must be at most {MAX_HOOK_TIMEOUT_MS}: phoenix.js gives up on a push after 10 s, "
            "and its client must get the error reply before that",
        )
    t.done()
    return cfg


def _parse_log(t: Table) -> LogConfig:
    level = t.string("level", "info").lower()
    if level not in {"debug", "info", "warning", "error"}:
        raise t.error("level", 'expected "debug", "info", "warning" or "error"')
    log_format = t.string("format", "text").lower()
    if log_format not in {"text", "json"}:
        raise t.error("format", 'expected "text" or "json"')
    connections = t.boolean("connections", LogConfig().connections)
    t.done()
    return LogConfig(level=level, format=log_format, connections=connections)


def _parse_longpoll(t: Table) -> LongPollConfig:
    d = LongPollConfig()
    cfg = LongPollConfig(
        enabled=t.boolean("enabled", d.enabled),
        window_ms=t.integer("window_ms", d.window_ms, minimum=10),
        max_post_size=t.integer("max_post_size", d.max_post_size, minimum=1024),
    )
    t.done()
    return cfg


def _parse_limits(t: Table) -> LimitsConfig:
    d = LimitsConfig()
    cfg = LimitsConfig(
        max_connections=t.integer("max_connections", d.max_connections, minimum=0),
        max_connections_per_ip=t.integer(
            "max_connections_per_ip", d.max_connections_per_ip, minimum=0
        ),
        message_rate=t.number("message_rate", d.message_rate, minimum=0),
        message_burst=t.integer("message_burst", d.message_burst, minimum=1),
        rate_limit_close_after=t.integer(
            "rate_limit_close_after", d.rate_limit_close_after, minimum=0
        ),
        frame_rate=t.number("frame_rate", d.frame_rate, minimum=0),
        frame_burst=t.integer("frame_burst", d.frame_burst, minimum=1),
        max_fragments=t.integer("max_fragments", d.max_fragments, minimum=1),
    )
    t.done()
    return cfg


def _parse_metrics(t: Table) -> MetricsConfig:
    cfg = MetricsConfig(enabled=t.boolean("enabled", MetricsConfig().enabled))
    t.done()
    return cfg
