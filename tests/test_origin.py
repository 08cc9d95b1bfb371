"""check_origin as Phoenix.Socket.Transport has it, sans-io."""

from __future__ import annotations

import pytest

from phxbroker.auth.origin import (
    ALLOW_ALL,
    CHECK_HOST,
    AllowedOrigin,
    LoggedOnce,
    OriginPolicy,
    allowing_change,
    origin_problem,
    parse_allowed,
    parse_policy,
)
from phxbroker.config.settings import parse_config
from phxbroker.config.table import ConfigError

LIST = parse_policy(["https://example.com", "//*.example.org", "//other.com:888"])


def allowed(origin: str | None, policy=LIST, host: str = "example.com", **request) -> bool:
    return origin_problem(origin, policy, host=host, **request) is None


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("https://example.com", AllowedOrigin("https", "example.com", 443)),
        ("http://example.com", AllowedOrigin("http", "example.com", 80)),
        ("https://example.com:8443", AllowedOrigin("https", "example.com", 8443)),
        ("//*.example.org", AllowedOrigin(None, "*.example.org", None)),
        ("//other.com:888", AllowedOrigin(None, "other.com", 888)),
        ("//Example.COM", AllowedOrigin(None, "example.com", None)),
    ],
)
def test_allowed_origins_parse_as_phoenix_parses_them(text: str, parsed: AllowedOrigin) -> None:
    assert parse_allowed(text) == parsed


@pytest.mark.parametrize("text", ["example.com", "https://", "//", "https://x.com:99999"])
def test_an_allowed_origin_without_a_host_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match=r"at server\.check_origin: "):
        parse_config({"server": {"check_origin": [text]}})


def test_check_origin_values() -> None:
    assert parse_config({}).server.check_origin == CHECK_HOST  # Phoenix's default: true
    assert parse_config({"server": {"check_origin": False}}).server.check_origin == ALLOW_ALL
    assert parse_config({"server": {"check_origin": "conn"}}).server.check_origin.kind == "conn"
    for bad in ("yes", 1, [1], {"a": 1}):
        with pytest.raises(ConfigError, match=r"at server\.check_origin: expected true, false"):
            parse_config({"server": {"check_origin": bad}})


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        (None, True),  # no Origin header: not a browser, allowed
        ("https://example.com", True),
        ("https://example.com:443", True),
        ("http://example.com", False),  # scheme differs (and so does the default port)
        ("https://example.com:8443", False),
        ("https://sub.example.com", False),  # no wildcard for example.com
        ("https://example.org", True),  # *.example.org covers the bare domain
        ("http://a.b.example.org:1234", True),  # any scheme, any port
        ("https://badexample.org", False),
        ("https://example.org.evil.net", False),
        ("http://other.com:888", True),
        ("https://other.com:888", True),
        ("http://other.com", False),
        ("null", False),  # sandboxed iframes, file:// pages
        ("", False),
        ("https://example.com:notaport", False),
        ("HTTPS://EXAMPLE.COM", True),
    ],
)
def test_origin_lists(origin: str | None, ok: bool) -> None:
    assert allowed(origin) is ok


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        ("https://example.com", True),
        ("http://example.com:4000", True),  # true compares hosts only
        ("https://www.example.com", False),
        ("https://evil.com", False),
        ("null", False),
    ],
)
def test_true_means_the_configured_host(origin: str, ok: bool) -> None:
    assert allowed(origin, CHECK_HOST, host="example.com") is ok


def test_false_allows_everything() -> None:
    assert allowed("null", ALLOW_ALL) and allowed("https://evil.com", ALLOW_ALL)


@pytest.mark.parametrize(
    ("origin", "scheme", "host_header", "ok"),
    [
        ("https://chat.example.com", "https", "chat.example.com", True),
        ("https://chat.example.com", "https", "chat.example.com:443", True),
        ("http://chat.example.com", "https", "chat.example.com", False),
        ("http://localhost:4000", "http", "localhost:4000", True),
        ("http://localhost:4001", "http", "localhost:4000", False),
        ("http://localhost:4000", "http", "127.0.0.1:4000", False),
    ],
)
def test_conn_means_the_address_the_request_was_sent_to(
    origin: str, scheme: str, host_header: str, ok: bool
) -> None:
    policy = parse_policy("conn")
    assert allowed(origin, policy, request_scheme=scheme, request_host=host_header) is ok


def test_the_refusal_sentence_quotes_a_hostile_origin_safely() -> None:
    hostile = "https://evil.com/\r\n2026-01-01 INFO forged line" + "x" * 500
    problem = origin_problem(hostile, CHECK_HOST, host="example.com")
    assert problem is not None
    assert "\n" not in problem and "\r" not in problem
    assert len(problem) < 250
    assert problem.startswith("origin 'https://evil.com/\\r\\n")


@pytest.mark.parametrize(
    ("origin", "policy", "change"),
    [
        ("https://App.Example.com", LIST, 'add "https://app.example.com" to [server] check_origin'),
        ("https://app.example.com:443", LIST,
         'add "https://app.example.com" to [server] check_origin'),
        ("http://localhost:8080", LIST, 'add "http://localhost:8080" to [server] check_origin'),
        ("http://[::1]:3000", LIST, 'add "http://[::1]:3000" to [server] check_origin'),
        ("https://app.example.com", CHECK_HOST,
         'set [server] host = "app.example.com" or check_origin = ["https://app.example.com"]'),
        ("https://app.example.com", OriginPolicy("conn"),
         'set [server] check_origin = ["https://app.example.com"]'),
        ("null", LIST, None),
        ("file://", LIST, None),
        ('https://x.com"\n[auth]', LIST, None),
        ("chrome-extension://abcdef", LIST, None),
    ],
)  # fmt: skip
def test_a_refused_origin_comes_with_the_change_that_allows_it(
    origin: str, policy: OriginPolicy, change: str | None
) -> None:
    assert allowing_change(origin, policy) == change


def test_the_true_policy_names_the_configured_host() -> None:
    problem = origin_problem("https://app.example.com", CHECK_HOST, host="localhost")
    assert problem == (
        "origin 'https://app.example.com' is not allowed "
        '(check_origin = true: its host must be [server] host, "localhost")'
    )


def test_logged_once_remembers_keys_within_a_bound() -> None:
    once = LoggedOnce(limit=2)
    assert [once.first(k) for k in ("a", "a", "b", "a")] == [True, False, True, False]
    assert once.first("c")  # the third key: the memory starts again
    assert once.first("a")
