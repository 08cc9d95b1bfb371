"""The LongPoll transport over real HTTP against an in-process server.

The golden transcripts (test_golden.py) pin the exchange to what Phoenix answers; these
tests cover what they do not: headers, the token clash, held polls and what wakes them,
expiry, kicks, slow clients, limits and shutdown.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
import trio
from support.daemon import serve
from support.http_client import HttpClient, Response, fetch
from trio_websocket import open_websocket_url

from phxbroker.transport.admission import Refusal

CONFIG = """
[server]
listen = "127.0.0.1:0"
outbox_limit = {outbox_limit}
max_frame_size = 2048
handshake_timeout = 1

[longpoll]
window_ms = {window_ms}
max_post_size = 65536

[auth]
[[auth.tokens]]
user = "alice"
token = "alice-token"
[[auth.tokens]]
user = "bob"
token = "bob-token"

[[topics]]
pattern = "room:*"
relay = ["new_msg"]
echo = ["ping"]
presence = true
coalesce_ms = 0
"""

LP = "/socket/longpoll"
CONNECT = f"{LP}?token=alice-token&vsn=2.0.0&"  # what phoenix.js sends before a session
TIMEOUT = 5


def config(window_ms: int = 200, outbox_limit: int = 65536) -> str:
    return CONFIG.format(window_ms=window_ms, outbox_limit=outbox_limit)


def session_url(token: str, params: str = "token=alice-token&vsn=2.0.0") -> str:
    return f"{LP}?{params}&token={token}"


def messages(response: Response) -> list[Any]:
    body = response.json()
    return [json.loads(m) for m in body["messages"]]


async def open_session(client: HttpClient, target: str = CONNECT) -> str:
    response = await client.request("GET", target)
    body = response.json()
    assert body["status"] == 410 and body["messages"] == [], body
    return body["token"]


async def post(client: HttpClient, token: str, *frames: Any, ndjson: bool = True) -> Any:
    lines = [f if isinstance(f, str) else json.dumps(f) for f in frames]
    headers = {"content-type": "application/x-ndjson"} if ndjson else {}
    response = await client.request("POST", session_url(token), "\n".join(lines).encode(), headers)
    assert response.status == 200
    return response.json()


async def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Wait (checking at every scheduler tick, up to `timeout`) for a server-side condition."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_a_session_opens_with_410_and_every_answer_is_open_json_never_cached() -> None:
    async with serve(config()) as (server, port), await HttpClient.open(port) as client:
        opened = await client.request("GET", CONNECT)
        token = opened.json()["token"]
        assert token.startswith("phxlp.")
        # The session token was appended as a second `token` param; the app's one still
        # authenticated the connect, and the session token now selects the session.
        assert await post(client, token, ["1", "1", "room:a", "phx_join", {}]) == {"status": 200}
        polled = await client.request("GET", session_url(token))
        body = polled.json()
        assert (body["status"], body["token"]) == (200, token)
        assert messages(polled)[0] == [
            "1",
            "1",
            "room:a",
            "phx_reply",
            {"status": "ok", "response": {}},
        ]
        for response in (opened, polled):
            assert response.status == 200
            assert response.headers["content-type"] == "application/json; charset=utf-8"
            assert response.headers["access-control-allow-origin"] == "*"
            assert response.headers["cache-control"] == "no-store"
        assert server.stats.longpoll_open == server.stats.connections_open == 1


async def test_the_auth_token_header_authenticates_and_a_missing_token_is_refused() -> None:
    async with serve(config()) as (server, port):
        refused = await fetch(port, "GET", f"{LP}?vsn=2.0.0&")
        assert refused.json() == {"status": 403}
        assert server.stats.refusals == {"missing_token": 1}
        header = {"x-phoenix-authtoken": "bob-token"}
        opened = await fetch(port, "GET", f"{LP}?vsn=2.0.0&", headers=header)
        assert opened.json()["status"] == 410
        (session,) = server.longpoll_sessions.sessions.values()
        assert session.user == "bob"


async def test_the_session_token_header_selects_the_session() -> None:
    async with serve(config()) as (_server, port), await HttpClient.open(port) as client:
        token = await open_session(client)
        response = await client.request(
            "POST",
            f"{LP}?vsn=2.0.0",
            b'[null,"7","phoenix","heartbeat",{}]',
            {"x-phoenix-longpoll-token": token},
        )
        assert response.json() == {"status": 200}
        polled = await client.request("GET", session_url(token))
        assert messages(polled)[0][1] == "7"


async def test_a_forged_or_unknown_session_token_never_reaches_a_session() -> None:
    async with serve(config()) as (server, port), await HttpClient.open(port) as client:
        token = await open_session(client)
        session_id = token.split(".")[1]
        forged = f"phxlp.{session_id}.{'A' * 43}"
        # POST: no such session. GET: it falls through to a new session, authenticated
        # with the app's own `token` param.
        gone = await client.request("POST", session_url(forged), b"[]")
        assert gone.json() == {"status": 410}
        fresh = await open_session(client, session_url(forged))
        assert fresh != token
        assert len(server.longpoll_sessions.sessions) == 2


async def test_preflight_and_unknown_methods() -> None:
    async with serve(config()) as (_server, port):
        requested = "x-phoenix-authtoken, content-type"
        preflight = await fetch(
            port, "OPTIONS", LP, headers={"access-control-request-headers": requested}
        )
        assert preflight.status == 200 and preflight.body == b""
        assert preflight.headers["access-control-allow-origin"] == "*"
        assert preflight.headers["access-control-allow-headers"] == requested
        assert preflight.headers["access-control-allow-methods"] == "get, post, options"
        assert preflight.headers["access-control-max-age"] == "3600"
        put = await fetch(port, "PUT", LP)
        assert (put.status, put.body) == (400, b"")
        assert put.headers["access-control-allow-origin"] == "*"


async def test_an_unsupported_vsn_or_a_refused_origin_is_403() -> None:
    async with serve(config()) as (server, port), await HttpClient.open(port) as client:
        token = await open_session(client)
        bad_vsn = await client.request("GET", f"{LP}?token=alice-token&vsn=3.0.0&")
        assert bad_vsn.json() == {"status": 403}

        asked = []

        def check_origin(request):
            asked.append(request.method)
            if request.header("origin") == "https://evil.test":
                return Refusal(403, "origin", "not allowed")
            return None

        server.admission.check_origin = check_origin
        evil = {"origin": "https://evil.test"}
        assert (await client.request("GET", CONNECT, headers=evil)).json() == {"status": 403}
        refused_post = await client.request("POST", session_url(token), b"[]", evil)
        assert refused_post.json() == {"status": 403}
        assert asked == ["GET", "POST"]
        assert server.stats.refusals == {"bad_vsn": 1, "origin": 2}
        fine = {"origin": "https://app.test"}
        assert (await client.request("GET", CONNECT, headers=fine)).json()["status"] == 410


async def test_a_batch_is_read_up_to_100_lines_in_order_and_binary_replies_are_skipped() -> None:
    async with serve(config()) as (server, port), await HttpClient.open(port) as client:
        token = await open_session(client)
        await post(client, token, ["1", "1", "room:a", "phx_join", {}])
        await client.request("GET", session_url(token))
        # A binary push (base64 line) to the echo event: its reply would be a binary frame,
        # which cannot travel over long-poll.
        binary = bytes([0, 1, 1, 6, 4]) + b"12room:aping" + b"\x01\x02"
        heartbeats = [[None, str(n), "phoenix", "heartbeat", {}] for n in range(3, 103)]
        lines = [base64.b64encode(binary).decode(), *heartbeats]
        assert len(lines) == 101
        await post(client, token, *lines)
        polled = await client.request("GET", session_url(token))
        refs = [m[1] for m in messages(polled)]
        assert refs == [str(n) for n in range(3, 102)]  # the 101st line was not read
        assert server.stats.longpoll_binary_dropped == 1


async def test_a_held_poll_is_answered_by_a_broadcast_from_a_websocket_client() -> None:
    async with (
        serve(config(window_ms=30_000)) as (_server, port),
        await HttpClient.open(port) as client,
    ):
        token = await open_session(client)
        await post(client, token, ["1", "1", "room:a", "phx_join", {}])
        joined = await client.request("GET", session_url(token))
        assert [m[3] for m in messages(joined)] == [
            "phx_reply",
            "presence_diff",
            "presence_state",
        ]
        await client.send_request("GET", session_url(token))  # held: nothing queued

        url = f"ws://127.0.0.1:{port}/socket/websocket?token=bob-token&vsn=2.0.0"
        async with open_websocket_url(url) as ws:
            await ws.send_message('["1","1","room:a","phx_join",{}]')
            await ws.send_message('["1","2","room:a","new_msg",{"body":"hi"}]')
            woken = await client.read_response()
            got = messages(woken)
            while not any(m[3] == "new_msg" for m in got):
                got += messages(await client.request("GET", session_url(token)))
            assert [None, None, "room:a", "new_msg", {"body": "hi"}] in got

            # And back: the long-poll client's relay reaches the websocket.
            await post(client, token, ["1", "2", "room:a", "new_msg", {"body": "yo"}])
            with trio.fail_after(TIMEOUT):
                while True:
                    frame = json.loads(await ws.get_message())
                    if frame[3] == "new_msg" and frame[4] == {"body": "yo"}:
                        break


async def test_a_newer_poll_supersedes_a_held_one() -> None:
    async with (
        serve(config(window_ms=30_000)) as (_server, port),
        await HttpClient.open(port) as first,
        await HttpClient.open(port) as second,
    ):
        token = await open_session(first)
        await first.send_request("GET", session_url(token))
        await second.send_request("GET", session_url(token))
        superseded = await first.read_response()
        assert superseded.json() == {"status": 204, "token": token, "messages": []}
        await post(first, token, [None, "9", "phoenix", "heartbeat", {}])
        answered = await second.read_response()
        assert [m[1] for m in messages(answered)] == ["9"]


async def test_messages_wait_for_the_next_poll_when_a_client_leaves_mid_poll() -> None:
    async with serve(config(window_ms=30_000)) as (server, port):
        async with await HttpClient.open(port) as leaving:
            token = await open_session(leaving)
            (session,) = server.longpoll_sessions.sessions.values()
            await leaving.send_request("GET", session_url(token))
            await wait_until(lambda: session.polling == 1)
        # The held poll notices its client is gone and gives the session back.
        await wait_until(lambda: session.polling == 0)
        async with await HttpClient.open(port) as client:
            await post(client, token, [None, "5", "phoenix", "heartbeat", {}])
            polled = await client.request("GET", session_url(token))
            assert [m[1] for m in messages(polled)] == ["5"]


async def test_a_session_without_polls_expires_and_its_presence_leaves() -> None:
    url = "ws://127.0.0.1:{}/socket/websocket?token=bob-token&vsn=2.0.0"
    async with serve(config(window_ms=500)) as (server, port):
        async with open_websocket_url(url.format(port)) as ws:
            await ws.send_message('["1","1","room:a","phx_join",{}]')
            async with await HttpClient.open(port) as client:
                token = await open_session(client)
                await post(client, token, ["1", "1", "room:a", "phx_join", {}])
                joined = await client.request("GET", session_url(token))
                assert messages(joined)[0][3] == "phx_reply"
            # No more polls: 0.75 s later the session ends and alice leaves the room.
            with trio.fail_after(TIMEOUT):
                while True:
                    frame = json.loads(await ws.get_message())
                    if frame[3] == "presence_diff" and "alice" in frame[4]["leaves"]:
                        break
        assert server.stats.longpoll_open == 0
        assert not server.longpoll_sessions.sessions
        async with await HttpClient.open(port) as client:
            assert await open_session(client, session_url(token)) != token


async def test_a_disconnected_user_gets_410_on_its_held_poll_then_a_new_session() -> None:
    async with (
        serve(config(window_ms=30_000)) as (server, port),
        await HttpClient.open(port) as client,
    ):
        token = await open_session(client)
        await client.send_request("GET", session_url(token))
        (session,) = server.longpoll_sessions.sessions.values()
        await wait_until(lambda: session.polling == 1)
        await server.broker_task.tell(server.broker.disconnect_user, "alice")
        gone = await client.read_response()
        assert gone.json() == {"status": 410, "token": token, "messages": []}
        assert server.stats.longpoll_open == 0
        # phoenix.js 1.8.3+ reconnects from scratch; an older client polls again with
        # the old token and gets a new session, as from Phoenix.
        fresh = await open_session(client, session_url(token))
        assert fresh != token and server.stats.longpoll_open == 1


async def test_a_session_ended_between_polls_answers_the_next_one_with_410() -> None:
    async with (
        serve(config(window_ms=30_000)) as (server, port),
        await HttpClient.open(port) as client,
    ):
        token = await open_session(client)
        await server.broker_task.tell(server.broker.disconnect_user, "alice")
        await wait_until(lambda: server.stats.longpoll_open == 0)
        gone = await client.request("GET", session_url(token))
        assert gone.json() == {"status": 410, "token": token, "messages": []}
        assert await open_session(client, session_url(token)) != token


async def test_a_session_whose_queue_overflows_is_dropped_as_a_slow_client() -> None:
    async with (
        serve(config(window_ms=30_000, outbox_limit=8192)) as (server, port),
        await HttpClient.open(port) as client,
    ):
        token = await open_session(client)
        await post(client, token, ["1", "1", "room:a", "phx_join", {}])
        url = f"ws://127.0.0.1:{port}/socket/websocket?token=bob-token&vsn=2.0.0"
        async with open_websocket_url(url) as ws:
            await ws.send_message('["1","1","room:a","phx_join",{}]')
            sent = 0
            with trio.fail_after(TIMEOUT):
                while server.stats.slow_client_drops == 0:
                    sent += 1
                    body = {"n": sent, "pad": "x" * 500}
                    await ws.send_message(json.dumps(["1", None, "room:a", "new_msg", body]))
                    while True:  # the websocket client itself keeps up and loses nothing
                        frame = json.loads(await ws.get_message())
                        if frame[3] == "new_msg":
                            assert frame[4]["n"] == sent
                            break
        assert sent > 10  # it took about 8 KiB of queued messages
        gone = await client.request("GET", session_url(token))
        assert gone.json() == {"status": 410, "token": token, "messages": []}


async def test_a_line_that_is_not_a_phoenix_message_ends_the_session() -> None:
    async with serve(config()) as (server, port), await HttpClient.open(port) as client:
        token = await open_session(client)
        answer = await client.request(
            "POST", session_url(token), b"[1,2]", {"content-type": "application/x-ndjson"}
        )
        # Phoenix's session crashes on it and never acknowledges the POST: 408.
        assert answer.json() == {"status": 408}
        assert server.stats.protocol_errors == 1
        after = await client.request("POST", session_url(token), b"[]")
        assert after.json() == {"status": 410}
        poll = await client.request("GET", session_url(token))
        assert poll.json() == {"status": 403}


@pytest.mark.parametrize("body", [b"x" * 70_000])
async def test_a_post_over_max_post_size_is_413(body: bytes) -> None:
    async with serve(config()) as (_server, port), await HttpClient.open(port) as client:
        token = await open_session(client)
        too_big = await client.request("POST", session_url(token), body)
        assert too_big.status == 413


async def test_shutdown_answers_held_polls_and_refuses_new_sessions() -> None:
    async with (
        serve(config(window_ms=30_000)) as (server, port),
        await HttpClient.open(port) as client,
        await HttpClient.open(port) as other,
    ):
        token = await open_session(client)
        await client.send_request("GET", session_url(token))
        (session,) = server.longpoll_sessions.sessions.values()
        await wait_until(lambda: session.polling == 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.shutdown)
            gone = await client.read_response()
            assert gone.json()["status"] == 410
        refused = await other.request("GET", CONNECT)
        assert refused.status == 503 and refused.body == b""


async def test_longpoll_can_be_switched_off() -> None:
    off = config().replace("[longpoll]\n", "[longpoll]\nenabled = false\n")
    async with serve(off) as (_server, port):
        assert (await fetch(port, "GET", CONNECT)).status == 404
