"""Golden transcripts from a real Phoenix server, replayed against phxbroker.

The config below expresses the reference app the transcripts were captured from (see the
transcripts' README): room:* replies {joined: <room>}, relays new_msg stamped with the
sender, echoes ping, crashes on anything else, tracks presence; users:<id> is for that
user only; `all` counts hits and broadcasts status_users {hits}.
"""

from __future__ import annotations

import pytest
from golden_replay import TRANSCRIPTS, Replay, load, serve

REFERENCE_APP = """
[server]
listen = "127.0.0.1:0"
idle_timeout = {idle_timeout}

[longpoll]
window_ms = {window_ms}

[auth]
[[auth.tokens]]
user = "alice"
token = "alice-token"
[[auth.tokens]]
user = "bob"
token = "bob-token"

[[topics]]
pattern = "room:*"
join = "authenticated"
join_reply = {{ joined = "{{suffix}}" }}
relay = ["new_msg"]
relay_user_key = "user"
relay_binary = false
echo = ["ping"]
presence = true
coalesce_ms = 0
unhandled = "crash"

[[topics]]
pattern = "users:{{user}}"
join = "self"

[[topics]]
pattern = "all"
count = ["hit"]
status_event = "status_users"
status_fields = ["hits"]
status_on_join = false
coalesce_ms = 0
"""

SCENARIOS = [
    "heartbeat.v1",
    "heartbeat.v2",
    "join_ok.v1",
    "join_ok.v2",
    "join_user_channel.v1",
    "join_user_channel.v2",
    "join_unmatched_topic.v1",
    "join_unmatched_topic.v2",
    "duplicate_join.v1",
    "duplicate_join.v2",
    "ping_reply.v1",
    "ping_reply.v2",
    "push_not_joined.v1",
    "push_not_joined.v2",
    "new_msg_broadcast.v1",
    "new_msg_broadcast.v2",
    "boom_phx_error.v1",
    "boom_phx_error.v2",
    "leave.v1",
    "leave.v2",
    "binary_ping.v2",
    "binary_frame_v1.v1",
    "malformed_frames.v1",
    "malformed_frames.v2",
    "all_hits.v1",
    "all_hits.v2",
    "connect_variants.v2",
]


def _require_transcripts() -> None:
    if not TRANSCRIPTS.is_dir():
        pytest.fail(f"golden transcripts not found at {TRANSCRIPTS} (set PHXBROKER_TRANSCRIPTS)")


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_transcript(scenario: str) -> None:
    _require_transcripts()
    async with serve(REFERENCE_APP.format(idle_timeout=60, window_ms=10_000)) as (_, port):
        await Replay(port, scenario).run(load(scenario))


@pytest.mark.parametrize("scenario", ["connect_rejected.v1", "connect_rejected.v2"])
async def test_connect_rejected(scenario: str) -> None:
    _require_transcripts()
    async with serve(REFERENCE_APP.format(idle_timeout=60, window_ms=10_000)) as (_, port):
        await Replay(port, scenario).run(load(scenario))


@pytest.mark.parametrize("scenario", ["longpoll.v1", "longpoll.v2"])
async def test_longpoll(scenario: str) -> None:
    """The full long-poll exchange; the empty polls are held 0.3 s here instead of 10 s."""
    _require_transcripts()
    async with serve(REFERENCE_APP.format(idle_timeout=60, window_ms=300)) as (_, port):
        await Replay(port, scenario).run(load(scenario))


@pytest.mark.parametrize("scenario", ["idle_timeout.v1", "idle_timeout.v2"])
async def test_idle_timeout(scenario: str) -> None:
    """The server closes a silent connection with 1002 (here after 1 s instead of 60 s).

    The capture's presence frames include a second connection that is not part of the
    scenario, so presence frames are not compared here (the other transcripts cover them).
    """
    _require_transcripts()
    replay = Replay(9, scenario, skip_events=frozenset({"presence_diff", "presence_state"}))
    async with serve(REFERENCE_APP.format(idle_timeout=1, window_ms=10_000)) as (_, port):
        replay.port = port
        await replay.run(load(scenario))
