"""The hooks' sans-io parts: the answer contract, the circuit breaker and the lifecycle
queue, without a back end."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from phxbroker.broker.outside import EventAnswer, JoinAnswer, Publish, Push
from phxbroker.hooks.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from phxbroker.hooks.contract import (
    ConnectAnswer,
    ContractError,
    parse_connect,
    parse_event,
    parse_join,
)
from phxbroker.hooks.lifecycle import LifecycleEvents


def raw(value: Any) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


# -- well-formed answers ----------------------------------------------------------------------


def test_answers_in_every_documented_shape_are_read() -> None:
    assert parse_connect(raw({"status": "error"}), 100) == ConnectAnswer(ok=False)
    assert parse_connect(raw({"status": "ok", "user": "1", "assigns": {"a": 1}}), 100) == (
        ConnectAnswer(ok=True, user="1", assigns={"a": 1})
    )
    assert parse_join(raw({"status": "error", "response": {"reason": "no"}}), 100) == (
        JoinAnswer(ok=False, response={"reason": "no"})
    )
    join = {
        "status": "ok",
        "response": {"board": 1},
        "assigns": {"b": 1},
        "push": [{"event": "hello", "payload": {"x": 1}}],
        "broadcast": [{"event": "joined", "payload": {}, "except_self": True}],
        "presence": {"meta": {"role": "admin"}},
        "unknown_key": "is ignored",
    }
    assert parse_join(raw(join), 100) == JoinAnswer(
        ok=True,
        response={"board": 1},
        assigns={"b": 1},
        pushes=(Push("hello", {"x": 1}),),
        broadcasts=(Publish("joined", {}, None, True),),
        presence_meta={"role": "admin"},
    )
    event = {
        "reply": {"status": "ok", "response": {"id": 3}},
        "broadcast": [{"event": "list:created", "payload": {"id": 3}, "topic": "users:2"}],
        "stop": "close",
    }
    assert parse_event(raw(event), 100) == EventAnswer(
        reply=("ok", {"id": 3}),
        broadcasts=(Publish("list:created", {"id": 3}, "users:2", False),),
        stop="close",
    )
    assert parse_event(raw({"reply": None, "disconnect": True}), 100) == EventAnswer(
        disconnect=True
    )


# -- every way an answer can break the contract -----------------------------------------------

MALFORMED = [
    (parse_connect, b"not json", "not JSON"),
    (parse_connect, [], "must be a JSON object, not an array"),
    (parse_connect, {"status": "yes"}, '"status" must be "ok" or "error"'),
    (parse_connect, {"status": "ok", "user": 5}, '"user" must be a short non-empty string'),
    (parse_connect, {"status": "ok", "user": ""}, '"user" must be a short non-empty string'),
    (parse_connect, {"status": "ok", "assigns": []}, '"assigns" must be an object'),
    (parse_connect, {"status": "ok", "assigns": {"k": "x" * 200}}, "larger than 100 bytes"),
    (parse_join, {"response": {}}, '"status" must be "ok" or "error", not None'),
    (parse_join, {"status": "ok", "response": "fine"}, '"response" must be an object'),
    (parse_join, {"status": "ok", "push": {}}, '"push" must be a list'),
    (parse_join, {"status": "ok", "push": [1]}, '"push"[0] must be an object'),
    (parse_join, {"status": "ok", "push": [{"payload": {}}]}, '"push"[0] needs an "event"'),
    (parse_join, {"status": "ok", "push": [{"event": "e", "payload": 1}]}, "must be an object"),
    (parse_join, {"status": "ok", "broadcast": [{"event": "e", "topic": 3}]}, '"topic" must'),
    (
        parse_join,
        {"status": "ok", "broadcast": [{"event": "e", "except_self": "yes"}]},
        '"except_self" must be true or false',
    ),
    (parse_join, {"status": "ok", "presence": {"meta": 1}}, '"presence" must be'),
    (
        parse_join,
        {"status": "ok", "push": [{"event": "e"}] * 101},
        "holds more than 100 messages",
    ),
    (parse_event, {}, 'has no "reply"'),
    (parse_event, {"reply": "ok"}, '"reply" must be an object or null'),
    (parse_event, {"reply": {"response": {}}}, 'needs a "status"'),
    (parse_event, {"reply": None, "stop": "later"}, '"stop" must be null, "close" or "error"'),
    (parse_event, {"reply": None, "disconnect": 1}, '"disconnect" must be true or false'),
]


@pytest.mark.parametrize(("parse", "answer", "sentence"), MALFORMED)
def test_a_malformed_answer_is_refused_with_one_sentence_naming_the_field(
    parse: Any, answer: Any, sentence: str
) -> None:
    with pytest.raises(ContractError, match=None) as refused:
        parse(raw(answer), 100)
    assert sentence in str(refused.value)
    assert "\n" not in str(refused.value)


# -- the circuit breaker ----------------------------------------------------------------------


def test_the_breaker_opens_on_mostly_failing_calls_and_closes_after_a_good_trial() -> None:
    breaker = CircuitBreaker(window=10, min_calls=10, threshold=0.8, open_for=5, trials=2)
    for n in range(3):
        breaker.record(n * 0.1, ok=True)
    for n in range(11):
        assert breaker.allow(1 + n * 0.1)
        breaker.record(1 + n * 0.1, ok=False)
        assert breaker.state == CLOSED  # at most 11 of 14 failed: under 80 %
    breaker.record(9.5, ok=False)
    assert breaker.state == OPEN  # 12 of 15: 80 %
    assert not breaker.allow(12)  # open for 5 s
    assert breaker.allow(15) and breaker.state == HALF_OPEN
    assert breaker.allow(15)
    assert not breaker.allow(15)  # only two trials at once
    breaker.record(15.1, ok=False)
    assert breaker.state == OPEN
    assert breaker.allow(20.2)
    breaker.record(20.3, ok=True)
    assert breaker.state == CLOSED and breaker.allow(20.4)


def test_the_breaker_forgets_outcomes_older_than_its_window() -> None:
    breaker = CircuitBreaker(window=10, min_calls=10, threshold=0.8)
    for second in range(9):
        breaker.record(second, ok=False)
    for second in range(30, 40):
        breaker.record(second, ok=second % 2 == 0)  # half fail, in a new window
    assert breaker.state == CLOSED


# -- lifecycle events -------------------------------------------------------------------------


async def test_a_vacated_topic_occupied_again_soon_sends_neither_event() -> None:
    events = LifecycleEvents(vacated_delay=5.0, window=0.0)
    now = trio.current_time()
    events.add("vacated", "room:a", None, None, now)
    events.add("occupied", "room:a", None, None, now + 1)
    events.add("vacated", "room:b", None, None, now)
    assert events.backlog == 1 and not events.queue  # room:b's waits out its delay
    sent: list[list[dict[str, Any]]] = []

    async def send(batch: list[dict[str, Any]]) -> bool:
        sent.append(batch)
        return True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(events.run, send)
        with trio.fail_after(10):
            while not sent:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert [(e["type"], e["topic"]) for e in sent[0]] == [("vacated", "room:b")]
    assert trio.current_time() - now >= 5.0


def test_the_lifecycle_backlog_is_bounded_and_counts_what_it_dropped() -> None:
    events = LifecycleEvents(max_backlog=3)
    for n in range(5):
        events.add("join", f"room:{n}", "alice", "s.1", 0.0)
    assert [e["topic"] for e in events.queue] == ["room:2", "room:3", "room:4"]
    assert events.dropped == 2
