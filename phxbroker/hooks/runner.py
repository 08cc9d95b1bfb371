"""The app's back end, asked over HTTP: connects, joins, client events and lifecycle.

`HookRunner` is the broker's `Outside`: a question (a join, a client event) becomes a
task that makes one signed call and tells the broker task the answer, so a slow back end
delays only the channel that asked. The transports ask it about connects directly, from
the connection's own task.

Every call is signed (see backend.py), bounded in time (`timeout_ms`, retries included)
and in number (`max_concurrency` at once, `max_queue` waiting; past that a call fails at
once), and fails fast while a circuit breaker is open. Only connect and join calls are
retried, and only when the back end refused the connection or answered 503. A failure
is logged (at most once a second per kind and reason) and the client gets an answer all
the same: `{"reason": "unavailable"}` for a join or an event, 503 for a connect.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import trio

from phxbroker.broker.core import Peer, Question
from phxbroker.broker.gateway import BrokerGateway
from phxbroker.broker.outside import EventAnswer, JoinAnswer
from phxbroker.broker.stats import Stats
from phxbroker.config.settings import HooksConfig
from phxbroker.hooks import contract
from phxbroker.hooks.backend import sign
from phxbroker.hooks.breaker import CircuitBreaker
from phxbroker.hooks.contract import ConnectAnswer, ContractError
from phxbroker.hooks.http_client import HttpCallError, HttpClient
from phxbroker.hooks.lifecycle import LifecycleEvents
from phxbroker.protocol.messages import dumps

log = logging.getLogger("phxbroker.hooks")

RETRY_BACKOFF = (0.05, 0.1, 0.2, 0.4, 0.8)  # seconds between tries of a connect or join
LOG_EVERY = 1.0  # seconds between two log lines about the same kind of failure


class HookUnavailable(Exception):
    """No usable answer came (down, slow, refused, or not the contract); str() says why."""


class Answering(Protocol):
    """Where answers go (`Broker.answer`, run in the broker task)."""

    def answer(self, question: Question, answer: JoinAnswer | EventAnswer | None) -> None: ...


class HookRunner:
    """Makes the hook calls and hands their answers back."""

    def __init__(
        self, config: HooksConfig, gateway: BrokerGateway, broker: Answering, stats: Stats
    ) -> None:
        self.gateway = gateway
        self.broker = broker
        self.stats = stats
        self.instance = os.urandom(4).hex()  # socket ids stay unique across restarts
        self.breaker = CircuitBreaker()
        self.events = LifecycleEvents()
        self._nursery: trio.Nursery | None = None
        self._busy = 0  # calls under way or waiting for a place
        self._limiter: trio.CapacityLimiter | None = None
        self._logged: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}
        self.client: HttpClient | None = None
        self.configure(config)

    def configure(self, config: HooksConfig) -> None:
        """Use a (reloaded) [hooks] config; calls under way finish with the old one."""
        old = getattr(self, "config", None)
        self.config = config
        self.events.vacated_delay = config.vacated_delay_ms / 1000
        if old is None or (old.url, old.max_answer_size) != (config.url, config.max_answer_size):
            self.client = HttpClient(
                config.url,
                max_connections=config.max_concurrency,
                max_answer_size=config.max_answer_size,
            )
        if self._limiter is not None:
            self._limiter.total_tokens = config.max_concurrency

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve questions and deliver lifecycle events until cancelled."""
        self._limiter = trio.CapacityLimiter(self.config.max_concurrency)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.events.run, self._send_events)
            task_status.started()

    def socket_id(self, peer: Peer) -> str:
        """The connection's id in hook calls: unique while it lives, and across restarts."""
        return f"{self.instance}.{peer.id}"

    # -- the broker's Outside -----------------------------------------------------------------

    def ask(self, question: Question) -> None:
        """Start the call a question needs; its answer comes back through the broker task."""
        if self._nursery is None:
            self.gateway.tell_soon(self.broker.answer, question, None)
            return
        self._nursery.start_soon(self._answer, question)

    def lifecycle(self, kind: str, topic: str | None, peer: Peer) -> None:
        if self.config.lifecycle:
            user = None if kind in ("occupied", "vacated") else peer.user
            socket = None if kind in ("occupied", "vacated") else self.socket_id(peer)
            self.events.add(kind, topic, user, socket, trio.current_time())
            self.stats.hook_backlog = self.events.backlog

    async def _answer(self, question: Question) -> None:
        peer, msg = question.peer, question.msg
        socket = contract.socket_view(self.socket_id(peer), peer.user, peer.assigns)
        answer: JoinAnswer | EventAnswer | None = None
        try:
            if question.kind == "join":
                body = {
                    "socket": socket,
                    "topic": msg.topic,
                    "payload": msg.payload,
                    "join_ref": msg.join_ref,
                }
                answer = await self.call(
                    "join", body, contract.parse_join, retry=True, about=msg.topic
                )
            else:
                assert question.channel is not None
                body = {
                    "socket": socket,
                    "topic": msg.topic,
                    "event": msg.event,
                    "payload": msg.payload,
                    "ref": msg.ref,
                    "assigns": question.channel.assigns or {},
                }
                answer = await self.call(
                    "event", body, contract.parse_event, retry=False, about=msg.topic
                )
        except HookUnavailable:
            answer = None
        await self.gateway.tell(self.broker.answer, question, answer)

    # -- connects -----------------------------------------------------------------------------

    async def connect(
        self,
        params: dict[str, str],
        headers: dict[str, str],
        remote: str,
        transport: str,
        user: str | None,
    ) -> ConnectAnswer:
        """The back end's answer to a connect (`UserSocket.connect/3`); HookUnavailable when
        there is none to be had."""
        forwarded = {name: headers[name] for name in self.config.forward_headers if name in headers}
        body = {
            "params": params,
            "headers": forwarded,
            "remote": remote,
            "transport": transport,
            "user": user,
        }
        answer: ConnectAnswer = await self.call("connect", body, contract.parse_connect, retry=True)
        return answer

    # -- one call -----------------------------------------------------------------------------

    async def call(
        self,
        kind: str,
        document: dict[str, Any],
        parse: Callable[[bytes, int], Any],
        *,
        retry: bool,
        about: str = "",
    ) -> Any:
        """POST `document` to `<url>/<kind>`, signed, and return the answer as `parse`
        reads it. Raises HookUnavailable (counted and logged) when no 2xx answer of the
        contract's shape came in time."""
        config = self.config
        if self._busy >= config.max_concurrency + config.max_queue:
            self._count(kind, "overloaded")
            self._log_failure(kind, "overloaded", f"{self._busy} {kind} calls already waiting")
            raise HookUnavailable("too many calls waiting")
        if not self.breaker.allow(trio.current_time()):
            self._count(kind, "breaker_open")
            raise HookUnavailable("the back end is failing: calls are held off for a while")
        body = dumps(document)
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        stats = self.stats
        self._busy += 1
        outcome = "failed"
        try:
            with trio.move_on_after(config.timeout_ms / 1000):
                assert self._limiter is not None, "run() first"
                async with self._limiter:
                    stats.hook_in_flight += 1
                    try:
                        data = await self._post_with_retries(kind, body, request_id, retry)
                    finally:
                        stats.hook_in_flight -= 1
                try:
                    answer = parse(data, config.max_assigns_size)
                except ContractError as exc:
                    outcome = "bad_answer"
                    raise HookUnavailable(f"{exc}") from None
                outcome = "ok"
                return answer
            outcome = "timeout"
            raise HookUnavailable(f"no answer within {config.timeout_ms} ms")
        except HookUnavailable as exc:
            where = f" for {about!r}" if about else ""
            self._log_failure(kind, outcome, f"the {kind} hook{where} failed: {exc}")
            raise
        finally:
            self._busy -= 1
            self.breaker.record(trio.current_time(), outcome == "ok")
            stats.hook_breaker = self.breaker.state
            self._count(kind, outcome)
            stats.hook_latency.observe(time.perf_counter() - started)

    async def _post_with_retries(
        self, kind: str, body: bytes, request_id: str, retry: bool
    ) -> bytes:
        client = self.client
        assert client is not None
        for attempt in range(len(RETRY_BACKOFF) + 1):
            headers = list(sign(self.config.secret, None, body, request_id=request_id).items())
            try:
                status, data = await client.post(f"/{kind}", body, headers)
            except HttpCallError as exc:
                if retry and exc.refused and attempt < len(RETRY_BACKOFF):
                    await trio.sleep(RETRY_BACKOFF[attempt])
                    continue
                raise HookUnavailable(str(exc)) from None
            if status == 503 and retry and attempt < len(RETRY_BACKOFF):
                await trio.sleep(RETRY_BACKOFF[attempt])
                continue
            if not 200 <= status < 300:
                raise HookUnavailable(f"the back end answered HTTP {status}")
            return data
        raise HookUnavailable("unreachable")  # the loop always returns or raises

    async def _send_events(self, batch: list[dict[str, Any]]) -> bool:
        try:
            await self.call("events", {"events": batch}, _ignore_body, retry=False)
        except HookUnavailable:
            return False
        finally:
            self.stats.hook_backlog = self.events.backlog
        return True

    # -- accounting ---------------------------------------------------------------------------

    def _count(self, kind: str, outcome: str) -> None:
        key = f"{kind}:{outcome}"
        calls = self.stats.hook_calls
        calls[key] = calls.get(key, 0) + 1

    def _log_failure(self, kind: str, reason: str, message: str) -> None:
        """Log a failure, but not more than once a second for each kind and reason: a
        back end that is down fails every call."""
        key = (kind, reason)
        now = time.monotonic()
        if now - self._logged.get(key, -math.inf) < LOG_EVERY:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._logged[key] = now
        more = self._suppressed.pop(key, 0)
        log.warning("%s%s", message, f" (and {more} more like it)" if more else "")


def _ignore_body(data: bytes, max_assigns: int) -> None:
    """Any 2xx answer delivers a batch of lifecycle events."""
