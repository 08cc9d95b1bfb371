"""The HTTP API an app's back end calls, on the same port as the sockets.

    POST /api/broadcast   {"topic", "event", "payload"}  -> {"ok": true, "subscribers": N}
    POST /api/disconnect  {"user"}                       -> {"ok": true, "connections": N}
    GET  /api/stats                                      -> the report (see report.py)

Every request needs `Authorization: Bearer <key>` with a key from [api] keys (or the
tokens file). Keys are kept as SHA-256 digests and found by a dictionary lookup of the
digest of what was sent, so response timing tells nothing about a stored key. Without any
key configured the API is off. Every answer is JSON; an error is {"error": "<sentence>"}.
While the daemon drains for shutdown, calls that would act on clients answer 503
{"error": "draining"}: a broadcast acknowledged then would reach nobody.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from phxbroker.broker.stats import Stats
from phxbroker.config.settings import ApiConfig
from phxbroker.protocol import messages
from phxbroker.protocol.messages import describe_json
from phxbroker.transport.http import BadRequest, HttpConnection, Request

log = logging.getLogger("phxbroker.api")

PREFIX = "/api/"
JSON = "application/json"


class ApiError(Exception):
    """An answer other than 200: its status and one sentence."""

    def __init__(
        self, status: int, message: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []


Endpoint = Callable[[Request, Any, str], Awaitable[dict[str, Any]]]
Handler = Callable[[HttpConnection, Request], Awaitable[None]]


class ApiBackend(Protocol):
    """What the API does to the running broker."""

    @property
    def draining(self) -> bool: ...

    async def publish(self, topic: str, event: str, payload: dict[str, Any]) -> int: ...

    async def disconnect_user(self, user: str) -> int: ...

    async def report(self) -> dict[str, Any]: ...


class Api:
    """The API's endpoints; `routes()` lists them for the route table."""

    def __init__(
        self,
        config: ApiConfig,
        backend: ApiBackend,
        stats: Stats,
        methods_at: Callable[[str], list[str]],
    ) -> None:
        self.backend = backend
        self.stats = stats
        self.methods_at = methods_at  # the route table's methods for a path (405s)
        self._keys: dict[bytes, str] = {}
        self.configure(config)

    def configure(self, config: ApiConfig) -> None:
        """Answer with a (reloaded) `[api]` config: its keys and body limit."""
        self.config = config
        self._keys = {key.sha256: key.name for key in config.keys}

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path, handler) of every endpoint; `not_routed` takes the rest of /api/."""
        return [
            ("POST", "/api/broadcast", self.handler(self.broadcast, has_body=True)),
            ("POST", "/api/disconnect", self.handler(self.disconnect, has_body=True)),
            ("GET", "/api/stats", self.handler(self.stats_report, has_body=False)),
        ]

    # -- plumbing ------------------------------------------------------------------------

    def handler(self, endpoint: Endpoint, *, has_body: bool) -> Handler:
        async def handle(conn: HttpConnection, request: Request) -> None:
            body_read = False
            try:
                key_name = self.authorize(request)
                limit = self.config.max_body_size
                declared = request.header("content-length")
                if declared and int(declared.split(",")[0]) > limit:
                    raise ApiError(
                        413, f"the request body is larger than {limit} bytes ([api] max_body_size)"
                    )
                try:
                    raw = await conn.read_body(request, limit)
                except BadRequest as exc:
                    if exc.status == 413:
                        raise ApiError(
                            413,
                            f"the request body is larger than {limit} bytes ([api] max_body_size)",
                        ) from None
                    raise ApiError(exc.status, f"{exc}") from None
                body_read = True
                document = _parse_body(raw) if has_body else None
                result = await endpoint(request, document, key_name)
            except ApiError as exc:
                await self.answer_error(conn, exc, body_read)
                return
            await conn.respond(200, messages.dumps(result), content_type=JSON)

        return handle

    async def not_routed(self, conn: HttpConnection, request: Request) -> None:
        """404 or 405 for a path under /api/ that no route takes."""
        if not self.config.keys:
            error = _api_off()
        else:
            methods = self.methods_at(request.path)
            if methods:
                allowed = ", ".join(sorted(methods))
                error = ApiError(
                    405,
                    f"{request.path} accepts {allowed}, not {request.method}",
                    [("allow", allowed)],
                )
            else:
                error = ApiError(404, f"there is no API endpoint {request.method} {request.path}")
        await self.answer_error(conn, error, body_read=False)

    async def answer_error(self, conn: HttpConnection, error: ApiError, body_read: bool) -> None:
        body = messages.dumps({"error": str(error)})
        if body_read:
            await conn.respond(error.status, body, content_type=JSON, headers=error.headers)
        else:
            await conn.refuse_body(error.status, body, content_type=JSON, headers=error.headers)

    def authorize(self, request: Request) -> str:
        """The name of the key the request carries; ApiError 401 (or 404 if the API is off)."""
        if not self.config.keys:
            raise _api_off()
        scheme, _, key = request.header("authorization").strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise ApiError(
                401,
                "this API needs an Authorization: Bearer <key> header",
                [("www-authenticate", 'Bearer realm="phxbroker"')],
            )
        name = self._keys.get(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest())
        if name is None:
            self.stats.count_refusal("api_key")
            log.info("refused API request from %s: the API key is not recognised", request.remote)
            raise ApiError(
                401,
                "the API key is not recognised",
                [("www-authenticate", 'Bearer realm="phxbroker", error="invalid_token"')],
            )
        return name

    # -- endpoints -----------------------------------------------------------------------

    async def broadcast(self, request: Request, body: Any, key_name: str) -> dict[str, Any]:
        fields = _Fields(body)
        topic = fields.string("topic")
        event = fields.string("event")
        payload = fields.object("payload")
        fields.done()
        # Any event goes, phx_close and the other phx_ events included, as from Phoenix's
        # Endpoint.broadcast: phoenix.js closes a channel that receives phx_close, while
        # its subscription here stays, as in Phoenix (`phxbroker kick` ends that too).
        _refuse_while_draining(self.backend)
        reached = await self.backend.publish(topic, event, payload)
        log.debug("API key %s broadcast %s to %s: %d subscribers", key_name, event, topic, reached)
        return {"ok": True, "subscribers": reached}

    async def disconnect(self, request: Request, body: Any, key_name: str) -> dict[str, Any]:
        fields = _Fields(body)
        user = fields.string("user")
        fields.done()
        _refuse_while_draining(self.backend)
        closed = await self.backend.disconnect_user(user)
        log.info("API key %s disconnected user %r: %d connections", key_name, user, closed)
        return {"ok": True, "connections": closed}

    async def stats_report(self, request: Request, body: Any, key_name: str) -> dict[str, Any]:
        return await self.backend.report()


def _refuse_while_draining(backend: ApiBackend) -> None:
    if backend.draining:
        raise ApiError(503, "draining")


def _api_off() -> ApiError:
    return ApiError(404, "the HTTP API is off: no [api] keys are configured")


def _parse_body(raw: bytes) -> Any:
    if not raw.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        document = messages.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ApiError(
            400, f"the request body must be a JSON object, not {describe_json(document)}"
        )
    return document


class _Fields:
    """Typed access to a request object's fields; unknown fields are refused (typos)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.seen: set[str] = set()

    def string(self, name: str) -> str:
        self.seen.add(name)
        value = self.document.get(name)
        if value is None:
            raise ApiError(400, f'field "{name}" is required')
        if not isinstance(value, str) or not value:
            raise ApiError(
                400, f'field "{name}" must be a non-empty string, not {describe_json(value)}'
            )
        return value

    def object(self, name: str) -> dict[str, Any]:
        """An object field; absent means {} (phoenix.js needs an object payload)."""
        self.seen.add(name)
        value = self.document.get(name, {})
        if not isinstance(value, dict):
            raise ApiError(400, f'field "{name}" must be a JSON object, not {describe_json(value)}')
        return value

    def done(self) -> None:
        for name in self.document:
            if name not in self.seen:
                raise ApiError(400, f'unknown field "{name}"')
