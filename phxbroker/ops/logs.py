"""Log output: one line per event, levels journald understands, secrets never written.

Three shapes, chosen by `[log] format` and by where stderr goes:

- text on a terminal or in a file: `2025-01-31T12:00:00.123Z INFO phxbroker: message`;
- text under systemd (stderr is the journal, as $JOURNAL_STREAM says): `<6>message`, the
  syslog priority prefix journald turns into the entry's level, and no timestamp (journald
  keeps its own);
- JSON: one object per line, `{"time", "level", "logger", "message"}` (plus `"exc"`), with
  the same `<N>` prefix under journald.

A worker (`[server] workers`) tags each of its lines with its node name, so that the lines
of workers sharing one stderr tell who wrote them: `phxbroker.activity[web1-w0]: ...` in
text, `[web1-w0] ...` under journald, `"worker": "web1-w0"` in JSON.

Every line passes through `Redactor` first: whatever a message carries from the outside
(a request line in an HTTP error, a query string) has secret-looking values replaced, and
control characters are escaped so that one event is always one line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from typing import TextIO

import orjson

from phxbroker.broker.activity import ACTIVITY_LOGGER, FILTERED, SECRET_PARAMS
from phxbroker.config.settings import LogConfig

REDACTED = "[redacted]"
FILTERED_PATTERN = re.escape(FILTERED)

# syslog priorities (sd-daemon(3)): what journald files each line under.
PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}
_CONTROL.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"})


def escape_control(text: str) -> str:
    """Control characters as escapes, so a value from outside cannot start a new log line."""
    return text.translate(_CONTROL)


class Redactor:
    """Replaces secret values in text: `name=value` and `"name": "value"` for secret
    parameter names, bearer credentials, phoenix.js auth-token subprotocols, JWTs and
    Phoenix.Token strings."""

    def __init__(self, extra_params: Iterable[str] = ()) -> None:
        names = sorted({*SECRET_PARAMS, *(p.lower() for p in extra_params if p)}, key=len)
        alternatives = "|".join(re.escape(n) for n in reversed(names))
        name = rf"(?<![\w-])(?:{alternatives})(?![\w-])"
        self._patterns = [
            # "token": "abc", 'pass': 'x', token = "abc" (JSON, Python reprs, TOML); a value
            # the activity log filtered already ("[FILTERED]", as Phoenix writes it) stays.
            (
                re.compile(
                    rf"""((["']?){name}\2\s*[:=]\s*(["']))(?!{FILTERED_PATTERN}\3)(?:\\.|(?!\3).)*""",
                    re.I,
                ),
                r"\1",
            ),
            # token=abc (query strings, key=value text)
            (re.compile(rf"({name}=)(?![\[\"'])[^\s&;,'\"<>\])}}]+", re.I), r"\1"),
            (re.compile(r"(base64url\.bearer\.phx\.)[A-Za-z0-9+/=_%-]+"), r"\1"),
            (re.compile(r"\b((?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{6,}", re.I), r"\1"),
        ]
        # Self-describing token formats, redacted whatever surrounds them.
        self._whole = re.compile(
            r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"  # JWT: base64url('{"')
            r"|\b(?:SFMyNTY|SFMzODQ|SFM1MTI|QTEyOEdDTQ|QTI1NkdDTQ)\.[A-Za-z0-9_.-]+"  # Phoenix
        )

    def __call__(self, text: str) -> str:
        for pattern, keep in self._patterns:
            text = pattern.sub(keep + REDACTED, text)
        return self._whole.sub(REDACTED, text)


class EventFormatter(logging.Formatter):
    """Formats one record as one line (text or JSON), redacted, journald-aware."""

    def __init__(self, *, json: bool, journald: bool, redactor: Redactor, tag: str = "") -> None:
        super().__init__()
        self.json = json
        self.journald = journald
        self.redactor = redactor
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        message = escape_control(self.redactor(record.getMessage()))
        exc = self.redactor(self.formatException(record.exc_info)) if record.exc_info else ""
        prefix = f"<{priority(record.levelno)}>" if self.journald else ""
        if self.json:
            event = {
                "time": _timestamp(record.created),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": message,
            }
            if self.tag:
                event["worker"] = self.tag
            if exc:
                event["exc"] = exc
            return prefix + orjson.dumps(event).decode()
        if self.journald:
            # journald makes every line its own entry: a traceback keeps the record's level.
            if self.tag:
                prefix += f"[{self.tag}] "
            return "\n".join(prefix + line for line in [message, *exc.splitlines()])
        name = f"{record.name}[{self.tag}]" if self.tag else record.name
        line = f"{_timestamp(record.created)} {record.levelname} {name}: {message}"
        return f"{line}\n{exc}" if exc else line


def priority(levelno: int) -> int:
    """The syslog priority of a logging level."""
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return PRIORITY[level]
    return PRIORITY[logging.DEBUG]


def writes_to_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `stream` is the journald stream systemd connected (sd_journal_stream_fd
    semantics: $JOURNAL_STREAM names its device and inode; a redirected stream differs)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The daemon's one handler on the root logger (a marker type, so setup can find it)."""

    tag = ""  # the worker's name, kept across reloads


def setup(
    config: LogConfig,
    *,
    secret_params: Iterable[str] = (),
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
    tag: str | None = None,
) -> None:
    """Send every log record to `stream` (stderr) in the configured shape and level, each
    line tagged with `tag` when given (a worker's name).

    Calling it again (on reload) swaps level, format and redacted names in place.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _Handler)), None)
    if handler is None or (stream is not None and handler.stream is not stream):
        for old in list(root.handlers):
            root.removeHandler(old)
        handler = _Handler(stream or sys.stderr)
        root.addHandler(handler)
    if tag is not None:
        handler.tag = tag
    handler.setFormatter(
        EventFormatter(
            json=config.format == "json",
            journald=writes_to_journal(handler.stream, environ),
            redactor=Redactor(secret_params),
            tag=handler.tag,
        )
    )
    root.setLevel(getattr(logging, config.level.upper()))
    # [log] connections = false silences the connect, join and leave lines alone.
    logging.getLogger(ACTIVITY_LOGGER).setLevel(
        logging.NOTSET if config.connections else logging.WARNING
    )


def reconfigure(config: LogConfig, *, secret_params: Iterable[str] = ()) -> None:
    """Apply a reloaded [log] section, if `setup` installed the daemon's handler."""
    if any(isinstance(h, _Handler) for h in logging.getLogger().handlers):
        setup(config, secret_params=secret_params)


def stderr_line(message: str, level: int = logging.ERROR) -> str:
    """A line for stderr outside logging (the CLI's one-sentence errors): redacted, and
    with a priority prefix when stderr is the journal (e.g. under ExecStartPre=)."""
    line = escape_control(Redactor()(message))
    if writes_to_journal(sys.stderr):
        return f"<{priority(level)}>{line}"
    return line


def _timestamp(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
