"""Topic patterns, join policies and templates."""

from __future__ import annotations

import pytest

from phxbroker.broker.topics import JoinPolicy, TopicRule, find_rule, parse_pattern, render_template


def test_exact_pattern_matches_only_itself() -> None:
    p = parse_pattern("all")
    assert p.match("all") == {}
    assert p.match("all:1") is None
    assert p.match("al") is None


def test_wildcard_pattern_matches_the_prefix_like_phoenix() -> None:
    p = parse_pattern("room:*")
    assert p.match("room:lobby") == {"suffix": "lobby"}
    assert p.match("room:") == {"suffix": ""}
    assert p.match("room:a:b") == {"suffix": "a:b"}
    assert p.match("rooms:x") is None


def test_placeholder_captures_one_segment() -> None:
    p = parse_pattern("users:{user}")
    assert p.match("users:bob") == {"user": "bob"}
    assert p.match("users:") is None
    assert p.match("users:bob:inbox") is None
    assert parse_pattern("users:{user}:inbox").match("users:bob:inbox") == {"user": "bob"}


def test_pattern_special_characters_are_literal() -> None:
    assert parse_pattern("a.b").match("axb") is None
    assert parse_pattern("a.b").match("a.b") == {}


@pytest.mark.parametrize("text", ["ro*om", "x:{user", "x:{1abc}", "phoenix", "a:{x}:{x}"])
def test_bad_patterns_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_pattern(text)


def test_join_policies() -> None:
    anyone = JoinPolicy("anyone")
    assert anyone.allows(None, {}) and anyone.allows("a", {})
    authenticated = JoinPolicy("authenticated")
    assert authenticated.allows("a", {}) and not authenticated.allows(None, {})
    self_only = JoinPolicy("self")
    assert self_only.allows("bob", {"user": "bob"})
    assert not self_only.allows("alice", {"user": "bob"})
    assert not self_only.allows(None, {"user": "bob"})
    listed = JoinPolicy("users", frozenset({"alice"}))
    assert listed.allows("alice", {}) and not listed.allows("bob", {})


def test_first_declared_rule_wins() -> None:
    specific = TopicRule(pattern=parse_pattern("room:admin"))
    general = TopicRule(pattern=parse_pattern("room:*"))
    assert find_rule((specific, general), "room:admin")[0] is specific
    assert find_rule((specific, general), "room:x")[0] is general
    assert find_rule((specific, general), "other") is None


def test_templates_fill_known_names_and_leave_others() -> None:
    template = {"joined": "{suffix}", "who": ["{user}"], "n": 1, "raw": "{unknown}"}
    assert render_template(template, {"suffix": "lobby", "user": "bob"}) == {
        "joined": "lobby",
        "who": ["bob"],
        "n": 1,
        "raw": "{unknown}",
    }
