"""TOML configuration -> frozen dataclasses.

Every error a user can make is reported as a ConfigError whose message is one sentence
naming the file, the key and the reason. Unknown keys are errors too, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phxbroker.topics import JoinPolicy, TopicRule, parse_pattern

DEFAULT_LISTEN = "127.0.0.1:4000"


class ConfigError(Exception):
    """A configuration problem, worded as one sentence for the operator."""

    def __init__(self, file: str | Path, key: str, reason: str) -> None:
        self.file = str(file)
        self.key = key
        self.reason = reason
        where = f" at {key}" if key else ""
        super().__init__(f"config error in {self.file}{where}: {reason}")


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

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """A static connect token; only its SHA-256 is kept in memory."""

    user: str  # "*" accepts any name given in the user param
    sha256: bytes


@dataclass(frozen=True, slots=True)
class AuthConfig:
    token_param: str = "token"
    user_param: str = ""
    allow_anonymous: bool = False
    tokens: tuple[TokenEntry, ...] = ()


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


@dataclass(frozen=True, slots=True)
class Config:
    path: Path | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    topics: tuple[TopicRule, ...] = ()
    log: LogConfig = field(default_factory=LogConfig)
    longpoll: LongPollConfig = field(default_factory=LongPollConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


class Table:
    """Typed, key-checked access to one TOML table; errors name file and dotted key."""

    def __init__(self, data: dict[str, Any], file: str | Path, prefix: str) -> None:
        self._data = data
        self._file = file
        self._prefix = prefix
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self._file, self.key(name), reason)

    def _get(self, name: str) -> Any:
        self._seen.add(name)
        return self._data.get(name)

    def has(self, name: str) -> bool:
        return name in self._data

    def str(self, name: str, default: str) -> str:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {_describe(value)}")
        return value

    def int(self, name: str, default: int, *, minimum: int | None = None) -> int:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {_describe(value)}")
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}, got {value}")
        return value

    def number(self, name: str, default: float, *, minimum: float | None = None) -> float:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"expected a number, got {_describe(value)}")
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}, got {value}")
        return float(value)

    def bool(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {_describe(value)}")
        return value

    def str_list(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, f"expected a list of strings, got {_describe(value)}")
        return tuple(value)

    def raw(self, name: str) -> Any:
        return self._get(name)

    def table(self, name: str) -> Table:
        value = self._get(name)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table, got {_describe(value)}")
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


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def load_config(path: str | Path) -> Config:
    """Read and validate the config file; raise ConfigError with one clear sentence."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, "", "the file does not exist") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot be read ({exc.strerror})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(path, "", "the file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML ({exc})") from None
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: str | Path = "<config>") -> Config:
    """Validate an already-parsed TOML document."""
    root = Table(data, path, "")
    server = _parse_server(root.table("server"))
    auth = _parse_auth(root.table("auth"))
    topics = tuple(_parse_topic(t) for t in root.tables("topics"))
    log = _parse_log(root.table("log"))
    longpoll = _parse_longpoll(root.table("longpoll"))
    metrics = _parse_metrics(root.table("metrics"))
    root.done()
    return Config(
        path=Path(path),
        server=server,
        auth=auth,
        topics=topics,
        log=log,
        longpoll=longpoll,
        metrics=metrics,
    )


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
    listen = t.str("listen", DEFAULT_LISTEN)
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
        max_frame_size=t.int("max_frame_size", d.max_frame_size, minimum=256),
        idle_timeout=t.number("idle_timeout", d.idle_timeout, minimum=0.1),
        outbox_limit=t.int("outbox_limit", d.outbox_limit, minimum=4096),
        max_channels=t.int("max_channels", d.max_channels, minimum=1),
        handshake_timeout=t.number("handshake_timeout", d.handshake_timeout, minimum=0.1),
        max_header_size=t.int("max_header_size", d.max_header_size, minimum=1024),
    )
    t.done()
    return cfg


def _parse_auth(t: Table) -> AuthConfig:
    d = AuthConfig()
    tokens = []
    for entry in t.tables("tokens"):
        user = entry.str("user", "")
        if not user:
            raise entry.error("user", 'is required (a user name, or "*" for a shared secret)')
        tokens.append(TokenEntry(user=user, sha256=_token_digest(entry)))
        entry.done()
    cfg = AuthConfig(
        token_param=t.str("token_param", d.token_param),
        user_param=t.str("user_param", d.user_param),
        allow_anonymous=t.bool("allow_anonymous", d.allow_anonymous),
        tokens=tuple(tokens),
    )
    if any(e.user == "*" for e in cfg.tokens) and not cfg.user_param:
        raise t.error("user_param", 'must name a connect param when a token has user = "*"')
    t.done()
    return cfg


def _token_digest(entry: Table) -> bytes:
    token = entry.str("token", "")
    hexdigest = entry.str("token_sha256", "")
    if bool(token) == bool(hexdigest):
        raise entry.error("token", 'give exactly one of "token" or "token_sha256"')
    if token:
        return hashlib.sha256(token.encode()).digest()
    try:
        digest = bytes.fromhex(hexdigest)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise entry.error("token_sha256", "must be 64 hexadecimal characters (a SHA-256 digest)")
    return digest


_JOIN_WORDS = {"anyone", "authenticated", "self"}
_UNHANDLED = {"error", "ignore", "crash"}
_STATUS_FIELDS = ("users", "user_count", "hits", "msgs")


def _parse_topic(t: Table) -> TopicRule:
    pattern_text = t.str("pattern", "")
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
        raise t.error("join", 'expected "anyone", "authenticated", "self" or a list of users')
    if join.kind == "self" and "user" not in pattern.captures:
        raise t.error("join", '"self" needs a pattern with a {user} part, e.g. "users:{user}"')

    join_reply = t.raw("join_reply")
    if join_reply is None:
        join_reply = {}
    if not isinstance(join_reply, dict):
        raise t.error("join_reply", "expected a table")

    unhandled = t.str("unhandled", "error")
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
        presence=t.bool("presence", False),
        presence_meta=t.str_list("presence_meta"),
        presence_update=frozenset(t.str_list("presence_update")),
        history=t.int("history", 0, minimum=0),
        status_event=t.str("status_event", ""),
        status_fields=status_fields,
        status_on_join=t.bool("status_on_join", True),
        coalesce_ms=t.int("coalesce_ms", 50, minimum=0),
        join_reply=join_reply,
        relay_user_key=t.str("relay_user_key", ""),
        relay_binary=t.bool("relay_binary", True),
        ack=t.bool("ack", False),
        unhandled=unhandled,
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
    for event in rule.relay | rule.echo | rule.count | rule.presence_update:
        if event.startswith("phx_"):
            raise t.error("relay", f"event {event!r} is reserved by the protocol")
    t.done()
    return rule


def _parse_log(t: Table) -> LogConfig:
    level = t.str("level", "info").lower()
    if level not in {"debug", "info", "warning", "error"}:
        raise t.error("level", 'expected "debug", "info", "warning" or "error"')
    t.done()
    return LogConfig(level=level)


def _parse_longpoll(t: Table) -> LongPollConfig:
    d = LongPollConfig()
    cfg = LongPollConfig(
        enabled=t.bool("enabled", d.enabled),
        window_ms=t.int("window_ms", d.window_ms, minimum=10),
        max_post_size=t.int("max_post_size", d.max_post_size, minimum=1024),
    )
    t.done()
    return cfg


def _parse_metrics(t: Table) -> MetricsConfig:
    cfg = MetricsConfig(enabled=t.bool("enabled", MetricsConfig().enabled))
    t.done()
    return cfg
