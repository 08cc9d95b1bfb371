"""Topic patterns, join policies and the per-pattern rules declared in config.

A pattern is literal text with optional `{name}` parts (one topic segment, no ":") and an
optional trailing `*` (any rest, as Phoenix's `channel "room:*"`). The first declared rule
whose pattern matches a topic wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_USERS_SHOWN = 5  # names of a join list quoted in a refused join's log line


@dataclass(frozen=True, slots=True)
class Pattern:
    text: str
    regex: re.Pattern[str]
    captures: tuple[str, ...]
    literal: bool  # no placeholders and no wildcard: plain string equality

    def match(self, topic: str) -> dict[str, str] | None:
        """Return the captured parts (and "suffix" for `*`) or None if it does not match."""
        if self.literal:
            return {} if topic == self.text else None
        m = self.regex.fullmatch(topic)
        return None if m is None else m.groupdict()


def parse_pattern(text: str) -> Pattern:
    """Compile a topic pattern; raise ValueError naming what is wrong with it."""
    if text == "phoenix":
        raise ValueError('"phoenix" is reserved for heartbeats')
    body, wildcard = (text[:-1], True) if text.endswith("*") else (text, False)
    if "*" in body:
        raise ValueError(f'{text!r}: "*" is only allowed at the end, as in "room:*"')
    parts: list[str] = []
    captures: list[str] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(body):
        parts.append(re.escape(body[pos : m.start()]))
        name = m.group(1)
        if name in captures or name == "suffix":
            raise ValueError(f"{text!r}: placeholder {{{name}}} is used twice or reserved")
        captures.append(name)
        parts.append(f"(?P<{name}>[^:]+)")
        pos = m.end()
    rest = body[pos:]
    if "{" in rest or "}" in rest:
        raise ValueError(f"{text!r}: placeholders look like {{name}} with letters, digits, _")
    parts.append(re.escape(rest))
    if wildcard:
        parts.append("(?P<suffix>.*)")
    return Pattern(
        text=text,
        regex=re.compile("".join(parts)),
        captures=tuple(captures),
        literal=not captures and not wildcard,
    )


@dataclass(frozen=True, slots=True)
class JoinPolicy:
    """Who may join: anyone, any authenticated user, the user named in the topic, a list,
    or whoever the app's back end lets in (`"hook"`, asked on every join)."""

    kind: str  # "anyone" | "authenticated" | "self" | "users" | "hook"
    users: frozenset[str] = frozenset()

    def allows(self, user: str | None, captures: dict[str, str]) -> bool:
        if self.kind in ("anyone", "hook"):
            return True
        if user is None:
            return False
        if self.kind == "authenticated":
            return True
        if self.kind == "self":
            return captures.get("user") == user
        return user in self.users

    def describe(self) -> str:
        """The policy as it is written in the config, e.g. `join = "self"`."""
        if self.kind == "users":
            names = ", ".join(f'"{u}"' for u in sorted(self.users)[:MAX_USERS_SHOWN])
            more = ", ..." if len(self.users) > MAX_USERS_SHOWN else ""
            return f"join = [{names}{more}]"
        return f'join = "{self.kind}"'

    def refusal(self, user: str | None, captures: dict[str, str]) -> str:
        """Why this policy does not let `user` join a topic that captured `captures`."""
        if user is None:
            return "anonymous connections may not join"
        if self.kind == "self":
            return f"only user {captures.get('user')} may join"
        return f"user {user} is not listed"


@dataclass(frozen=True, slots=True, eq=False)
class TopicRule:
    """What a topic pattern allows and does, as declared under [[topics]]."""

    pattern: Pattern
    join: JoinPolicy = field(default_factory=lambda: JoinPolicy("authenticated"))
    relay: frozenset[str] = frozenset()
    echo: frozenset[str] = frozenset()
    count: frozenset[str] = frozenset()
    presence: bool = False
    presence_meta: tuple[str, ...] = ()
    presence_update: frozenset[str] = frozenset()
    history: int = 0
    status_event: str = ""
    status_fields: tuple[str, ...] = ("users", "user_count", "hits", "msgs")
    status_on_join: bool = True
    coalesce_ms: int = 50
    join_reply: dict[str, Any] = field(default_factory=dict)
    relay_user_key: str = ""
    relay_binary: bool = True
    ack: bool = False
    unhandled: str = "error"
    # Client events the app's back end handles: exact names, or prefixes written "lists:*".
    hook_events: tuple[str, ...] = ()

    def hooks(self, event: str) -> bool:
        """Whether `event` goes to the app's back end."""
        return any(
            event.startswith(name[:-1]) if name.endswith("*") else event == name
            for name in self.hook_events
        )

    @property
    def tracks_users(self) -> bool:
        """Whether the broker must keep the topic's user list (presence or status)."""
        return self.presence or bool(self.status_event)


def find_rule(rules: tuple[TopicRule, ...], topic: str) -> tuple[TopicRule, dict[str, str]] | None:
    """The first rule matching the topic, with the parts its pattern captured."""
    for rule in rules:
        captures = rule.pattern.match(topic)
        if captures is not None:
            return rule, captures
    return None


def render_template(value: Any, variables: dict[str, str]) -> Any:
    """Fill `{name}` in every string of a config value; unknown names are left as they are."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: variables.get(m.group(1), m.group(0)), value)
    if isinstance(value, dict):
        return {k: render_template(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [render_template(v, variables) for v in value]
    return value
