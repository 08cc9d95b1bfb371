"""Hypothesis profiles and strategies for the fuzz suite.

Two profiles: `default` (what `pytest` runs: a few hundred examples per property, a few
thousand in all) and `fuzz` (`make fuzz`: 100,000 examples per property). A property asks
for `examples(n)`: n in the default run, the profile's count when fuzzing.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ_EXAMPLES = 100_000

settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
settings.load_profile("default")


def examples(normal: int, **overrides) -> settings:
    """Settings for one property: `normal` examples, unless the fuzz profile is loaded."""
    current = settings.default
    assert current is not None
    if current.max_examples >= FUZZ_EXAMPLES:
        return settings(current, **overrides)
    return settings(current, max_examples=normal, **overrides)


# -- JSON-ish building blocks, honest and hostile -----------------------------------------

LONE_SURROGATES = ("\\ud800", "\\udbff", "\\udc00", "\\udfff")


def _quote(text: str) -> str:
    return json.dumps(text)


json_scalars = st.one_of(
    st.just("null"),
    st.sampled_from(["true", "false"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=20).map(_quote),
)

hostile_scalars = st.one_of(
    st.sampled_from(LONE_SURROGATES).map(lambda s: f'"a{s}b"'),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999"]),
    st.sampled_from([("1", 400), ("9", 5000)]).map(
        lambda digit_count: digit_count[0] * digit_count[1]
    ),
    st.sampled_from(["true", "false", "0.5", "[]", "{}", str(2**64), str(-(2**63) - 1)]),
    st.integers(min_value=1, max_value=300).map(lambda n: "[" * n + "]" * n),
    st.sampled_from([1025, 1100, 129, 128, 127]).map(lambda n: "[" * n + "]" * n),
    st.text(min_size=250, max_size=300).map(_quote),
)


def json_values(leaves=None) -> st.SearchStrategy[str]:
    """JSON text (not always valid) nesting the given leaves."""
    leaves = leaves if leaves is not None else st.one_of(json_scalars, hostile_scalars)
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4).map(lambda items: "[" + ",".join(items) + "]"),
            st.lists(st.tuples(st.text(max_size=8).map(_quote), children), max_size=4).map(
                lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"
            ),
        ),
        max_leaves=12,
    )


field_values = st.one_of(json_scalars, hostile_scalars, json_values())
topics = st.one_of(
    st.sampled_from(['"room:lobby"', '"all"', '"phoenix"', '"st:x"', '"users:alice"']),
    st.text(max_size=20).map(lambda t: _quote("room:" + t)),
    field_values,
)
events = st.one_of(
    st.sampled_from(['"phx_join"', '"phx_leave"', '"heartbeat"', '"new_msg"', '"ping"']),
    field_values,
)


@st.composite
def v2_frames(draw) -> str:
    parts = [draw(field_values), draw(field_values), draw(topics), draw(events), draw(field_values)]
    count = draw(st.sampled_from([5, 5, 5, 4, 6, 0]))
    return "[" + ",".join(parts[:count] + [draw(field_values)] * max(0, count - 5)) + "]"


@st.composite
def v1_frames(draw) -> str:
    fields = {
        '"topic"': draw(topics),
        '"event"': draw(events),
        '"payload"': draw(field_values),
        '"ref"': draw(field_values),
        '"join_ref"': draw(field_values),
    }
    keep = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, min_size=3))
    return "{" + ",".join(f"{k}:{fields[k]}" for k in keep) + "}"


@st.composite
def mutated(draw, texts: st.SearchStrategy[str]) -> bytes:
    """A text made into bytes, sometimes with a few bytes flipped, cut or inserted."""
    data = bytearray(draw(texts).encode("utf-8", "surrogatepass"))
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


def frames_for(structured: st.SearchStrategy[str]) -> st.SearchStrategy[bytes | str]:
    """Structured frames as text or bytes, mutated frames, and plain noise."""
    return st.one_of(
        structured,
        mutated(structured),
        st.binary(max_size=200),
        st.text(max_size=200),
    )
