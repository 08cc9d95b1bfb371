"""Health endpoints for supervisors and load balancers.

`GET /healthz`: the process is alive and serving HTTP. `GET /readyz`: it accepts new
clients, i.e. it is not draining for shutdown and its broker task answers a no-op command
promptly (a broker stuck behind a full queue is not ready for more clients).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from phxbroker.transport.http import HttpConnection, Request

BROKER_ANSWER_TIMEOUT = 2.0
NO_STORE = [("cache-control", "no-store")]

Handler = Callable[[HttpConnection, Request], Awaitable[None]]


class Liveness(Protocol):
    """What readiness looks at."""

    @property
    def draining(self) -> bool: ...

    async def answers_within(self, seconds: float) -> bool: ...


class Health:
    """`/healthz` and `/readyz`; `routes()` lists them for the route table."""

    def __init__(self, daemon: Liveness, degraded: Callable[[], str | None] | None = None) -> None:
        self.daemon = daemon
        # Why the daemon serves with less than it should (e.g. cut off from its cluster):
        # still ready, since its own clients are served, but the body says so.
        self.degraded = degraded

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [("GET", "/healthz", self.healthz), ("GET", "/readyz", self.readyz)]

    async def healthz(self, conn: HttpConnection, request: Request) -> None:
        await conn.read_body(request, 0)
        await conn.respond(200, b"ok\n", content_type="text/plain", headers=NO_STORE)

    async def readyz(self, conn: HttpConnection, request: Request) -> None:
        await conn.read_body(request, 0)
        problem = await self.readiness_problem()
        if problem is None:
            note = self.degraded() if self.degraded is not None else None
            body = f"ready, degraded: {note}\n".encode() if note else b"ready\n"
            await conn.respond(200, body, content_type="text/plain", headers=NO_STORE)
        else:
            body = f"not ready: {problem}\n".encode()
            await conn.respond(503, body, content_type="text/plain", headers=NO_STORE)

    async def readiness_problem(self) -> str | None:
        """Why the daemon should get no new clients now, or None when it should."""
        # The drain may begin while the broker is asked, so it is looked at afterwards.
        answered = self.daemon.draining or await self.daemon.answers_within(BROKER_ANSWER_TIMEOUT)
        if self.daemon.draining:
            return "draining for shutdown"
        if not answered:
            return f"the broker did not answer within {BROKER_ANSWER_TIMEOUT:g} s"
        return None
