"""The listen port's route table: which handler answers which request.

Built once, by the daemon's assembly. Under every socket path (`[server] socket_paths`)
a request is first checked against the connection limits (429 per client address, 503 in
total), then handed to the client transport its sub-path names (`/websocket`,
`/longpoll`). Other paths are exact routes (`/healthz`, `/api/broadcast`, ...) or fall to
a prefix handler that answers its own 404 and 405 (`/api/`).

Empty path segments are ignored everywhere, as Plug ignores them: `/socket//websocket` and
`/socket/websocket/` are `/socket/websocket` (phoenix.js builds `${endPoint}/websocket`, so
an app that writes `new Socket("/socket/")` asks for the doubled slash).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from phxbroker.transport.admission import Admission
from phxbroker.transport.http import HttpConnection, Request

# What a handler that took the connection over (a websocket upgrade) returns: the
# connection's life after HTTP as a coroutine not yet started, which the listener awaits
# once the HTTP phase has ended, so that nothing of it (parser, request, buffers) is kept
# for as long as the client stays.
Takeover = Coroutine[Any, Any, None]

# A handler reads the request's body and responds itself; it returns a Takeover only when
# it took the connection over, else None.
Handler = Callable[[HttpConnection, Request], Awaitable[Takeover | None]]


class Router:
    """Routes requests to handlers; `dispatch` serves one request."""

    def __init__(self, admission: Admission, socket_paths: tuple[str, ...]) -> None:
        self.admission = admission
        self.socket_paths = socket_paths
        self._routes: dict[str, dict[str, Handler]] = {}
        self._transports: dict[str, Handler] = {}
        self._prefixes: list[tuple[str, Handler]] = []

    def route(self, method: str, path: str, handler: Handler) -> None:
        """Serve `method path` with `handler`."""
        self._routes.setdefault(normal_path(path), {})[method] = handler

    def transport(self, subpath: str, handler: Handler) -> None:
        """Serve `<socket path><subpath>` for every socket path, whatever the method."""
        self._transports[subpath] = handler

    def prefix(self, prefix: str, handler: Handler) -> None:
        """Serve requests under `prefix` that no route takes."""
        self._prefixes.append((prefix, handler))

    def methods(self, path: str) -> list[str]:
        """The methods routed at `path` (for a 405's Allow header)."""
        return sorted(self._routes.get(normal_path(path), ()))

    async def dispatch(self, conn: HttpConnection, request: Request) -> Takeover | None:
        """Answer one request; what the connection becomes when it was taken over
        (upgraded), else None."""
        # Handlers (and their log lines and error messages) see the path as routed.
        path = request.path = normal_path(request.path)
        for configured in self.socket_paths:
            base = normal_path(configured)
            if not path.startswith(base + "/"):
                continue
            refusal = self.admission.over_limit(request)
            if refusal is not None:
                self.admission.refused(refusal, request)
                await conn.respond(refusal.status, close=True)
                return None
            transport = self._transports.get(path[len(base) :])
            if transport is not None:
                return await transport(conn, request)
        handlers = self._routes.get(path)
        if handlers is None or request.method not in handlers:
            for prefix, fallback in self._prefixes:
                if (path + "/").startswith(prefix):
                    await fallback(conn, request)
                    return None
        if handlers is None:
            await conn.respond(404, b"not found\n", content_type="text/plain")
        elif request.method not in handlers:
            await conn.respond(
                405,
                b"method not allowed\n",
                content_type="text/plain",
                headers=[("allow", ", ".join(sorted(handlers)))],
            )
        else:
            await handlers[request.method](conn, request)
        return None


def normal_path(path: str) -> str:
    """`path` without empty segments, as Plug reads it: `//a//b/` is `/a/b`, `` is `/`."""
    if "//" not in path and (len(path) < 2 or not path.endswith("/")) and path.startswith("/"):
        return path  # the common case, without building a list
    return "/" + "/".join(segment for segment in path.split("/") if segment)
