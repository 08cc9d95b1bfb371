"""Health endpoints for supervisors and load balancers.

`GET /healthz`: the process is alive and serving HTTP. `GET /readyz`: it accepts new
clients, i.e. it is not draining for shutdown and its broker task answers a no-op command
promptly (a broker stuck behind a full queue is not ready for more clients).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from phxbroker.transport.http import HttpConnection, Request

if TYPE_CHECKING:
    from phxbroker.daemon.server import Server

BROKER_ANSWER_TIMEOUT = 2.0
NO_STORE = [("cache-control", "no-store")]


def install_health(server: Server) -> None:
    """Serve /healthz and /readyz on the server's front door."""

    async def healthz(conn: HttpConnection, request: Request) -> None:
        await conn.read_body(request, 0)
        await conn.respond(200, b"ok\n", content_type="text/plain", headers=NO_STORE)

    async def readyz(conn: HttpConnection, request: Request) -> None:
        await conn.read_body(request, 0)
        problem = await readiness_problem(server)
        if problem is None:
            await conn.respond(200, b"ready\n", content_type="text/plain", headers=NO_STORE)
        else:
            body = f"not ready: {problem}\n".encode()
            await conn.respond(503, body, content_type="text/plain", headers=NO_STORE)

    server.frontdoor.route("GET", "/healthz", healthz)
    server.frontdoor.route("GET", "/readyz", readyz)


async def readiness_problem(server: Server) -> str | None:
    """Why the server should get no new clients now, or None when it should."""
    if server.draining:
        return "draining for shutdown"
    answered = trio.Event()
    with trio.move_on_after(BROKER_ANSWER_TIMEOUT):
        await server.commands.send((answered.set, ()))
        await answered.wait()
    if not answered.is_set():
        return f"the broker did not answer within {BROKER_ANSWER_TIMEOUT:g} s"
    if server.draining:
        return "draining for shutdown"
    return None
