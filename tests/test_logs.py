"""Log lines: one per event, journald priorities, JSON, and no secret ever written."""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Iterator

import orjson
import pytest

from phxbroker.config.settings import LogConfig
from phxbroker.ops.logs import EventFormatter, Redactor, setup, writes_to_journal

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
PHOENIX_TOKEN = "SFMyNTY.g2gDYQFuBgBXo1XljgFiAAFRgA.mHfSy-k7PmiXqvAmaJ6LeyHzH3OYBAHR0U3I2vd9hHc"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("GET /socket/websocket?vsn=2.0.0&token=s3cr3t-value HTTP/1.1", "s3cr3t-value"),
        ("GET /socket/websocket?user=al&pass=hunter2&vsn=2.0.0", "hunter2"),
        ("GET /x?Token=UPPER-case", "UPPER-case"),
        ("params {'token': 'py-repr-secret', 'user': 'alice'}", "py-repr-secret"),
        ('payload {"password": "json-secret"}', "json-secret"),
        ('token = "toml-secret"', "toml-secret"),
        ("sec-websocket-protocol: phoenix, base64url.bearer.phx.c2VjcmV0LXRva2Vu", "c2VjcmV0"),
        ("illegal header line: b'Authorization : Bearer abc.def-ghi'", "abc.def-ghi"),
        (f"unexpected value {JWT} in path", "eyJzdWIiOiJhbGljZSJ9"),
        (f"/socket/websocket/{PHOENIX_TOKEN}", "g2gDYQFuBgBXo1XljgFiAAFRgA"),
        ("ticket=abc&my_pass=x&api_key=k3y", "k3y"),
    ],
)
def test_the_redactor_removes_secrets(text: str, secret: str) -> None:
    redacted = Redactor()(text)
    assert secret not in redacted
    assert "[redacted]" in redacted


def test_values_filtered_as_phoenix_does_stay_as_they_are() -> None:
    line = 'parameters {"token":"[FILTERED]","vsn":"2.0.0"}'
    assert Redactor()(line) == line
    assert Redactor()('{"token":"[FILTERED]x"}') == '{"token":"[redacted]"}'


def test_configured_token_params_are_redacted_too() -> None:
    assert "abc123" not in Redactor(["sesame"])("GET /socket/websocket?sesame=abc123")
    assert "abc123" in Redactor()("GET /socket/websocket?sesame=abc123")


@pytest.mark.parametrize(
    "text",
    [
        "listening on http://127.0.0.1:4000",
        "refused connect from 10.0.0.1:5555 on /socket/websocket: token not recognised",
        "config error in /etc/phxbroker/phxbroker.toml at auth.tokens[0].token: give exactly "
        'one of "token" or "token_sha256"',
        "reloaded config from /etc/phxbroker/phxbroker.toml: 3 topic patterns, 2 static tokens",
        "closing <websocket 3 alice@127.0.0.1:4242>: nothing received for 60 s",
    ],
)
def test_the_redactor_leaves_ordinary_lines_alone(text: str) -> None:
    assert Redactor()(text) == text


def record(message: str, level: int = logging.INFO, *args: object) -> logging.LogRecord:
    return logging.LogRecord("phxbroker.http", level, __file__, 1, message, args, None)


def test_text_lines_have_time_level_and_logger() -> None:
    formatter = EventFormatter(json=False, journald=False, redactor=Redactor())
    line = formatter.format(record("bad HTTP request from %s", logging.INFO, "1.2.3.4:5"))
    assert line.endswith(" INFO phxbroker.http: bad HTTP request from 1.2.3.4:5")
    assert line[:4].isdigit() and "T" in line.split()[0]


def test_journald_lines_carry_the_syslog_priority_and_no_timestamp() -> None:
    formatter = EventFormatter(json=False, journald=True, redactor=Redactor())
    assert formatter.format(record("drained", logging.INFO)) == "<6>drained"
    assert formatter.format(record("slow", logging.WARNING)) == "<4>slow"
    assert formatter.format(record("refused", logging.ERROR)) == "<3>refused"
    assert formatter.format(record("fatal", logging.CRITICAL)) == "<2>fatal"
    assert formatter.format(record("detail", logging.DEBUG)) == "<7>detail"


def test_a_traceback_keeps_its_priority_on_every_journald_line() -> None:
    formatter = EventFormatter(json=False, journald=True, redactor=Redactor())
    try:
        raise ValueError("token=leaky-secret")
    except ValueError:
        rec = logging.LogRecord("phxbroker", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    lines = formatter.format(rec).split("\n")
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)
    assert "leaky-secret" not in "\n".join(lines)


def test_json_lines() -> None:
    formatter = EventFormatter(json=True, journald=False, redactor=Redactor())
    event = orjson.loads(formatter.format(record("refused %s", logging.WARNING, "a?token=x1")))
    assert event["level"] == "warning"
    assert event["logger"] == "phxbroker.http"
    assert event["message"] == "refused a?token=[redacted]"
    assert event["time"].endswith("Z")
    journald = EventFormatter(json=True, journald=True, redactor=Redactor())
    line = journald.format(record("x", logging.ERROR))
    assert line.startswith("<3>{") and orjson.loads(line[3:])["message"] == "x"


def test_values_from_outside_cannot_start_a_new_line() -> None:
    formatter = EventFormatter(json=False, journald=True, redactor=Redactor())
    line = formatter.format(record("user %s", logging.INFO, "eve\n<3>forged entry\r\x1b[31m"))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line == "<6>user eve\\n<3>forged entry\\r\\x1b[31m"


def test_the_journal_is_recognised_by_device_and_inode(tmp_path: os.PathLike[str]) -> None:
    with open(f"{tmp_path}/stderr", "w") as stream, open(f"{tmp_path}/other", "w") as other:
        st = os.fstat(stream.fileno())
        assert writes_to_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        # Inherited from a service but redirected elsewhere: not the journal.
        assert not writes_to_journal(other, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not writes_to_journal(stream, {})
        assert not writes_to_journal(stream, {"JOURNAL_STREAM": "garbage"})


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_setup_applies_level_format_and_configured_secret_params(
    restore_root_logger: None,
) -> None:
    stream = io.StringIO()
    setup(LogConfig(level="warning", format="text"), secret_params=["sesame"], stream=stream)
    log = logging.getLogger("phxbroker.test")
    log.info("not shown")
    log.warning("refused /socket/websocket?sesame=open-up")
    setup(LogConfig(level="info", format="json"), secret_params=["sesame"], stream=stream)
    log.info("now in json")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("WARNING phxbroker.test: refused /socket/websocket?sesame=[redacted]")
    assert orjson.loads(lines[1])["message"] == "now in json"


def test_a_worker_tags_each_line_with_its_name_in_every_shape(restore_root_logger: None) -> None:
    text = EventFormatter(json=False, journald=False, redactor=Redactor(), tag="web1-w0")
    assert text.format(record("hi", logging.INFO)).endswith(" INFO phxbroker.http[web1-w0]: hi")
    journald = EventFormatter(json=False, journald=True, redactor=Redactor(), tag="web1-w0")
    assert journald.format(record("hi", logging.WARNING)) == "<4>[web1-w0] hi"
    as_json = EventFormatter(json=True, journald=False, redactor=Redactor(), tag="web1-w0")
    assert orjson.loads(as_json.format(record("hi", logging.INFO)))["worker"] == "web1-w0"
    # A reload reconfigures the log; the worker's tag stays.
    stream = io.StringIO()
    setup(LogConfig(), stream=stream, tag="web1-w1")
    setup(LogConfig(level="info", format="json"))
    logging.getLogger("phxbroker.test").info("after the reload")
    assert orjson.loads(stream.getvalue().splitlines()[-1])["worker"] == "web1-w1"
