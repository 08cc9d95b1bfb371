"""The board app's back end: phxbroker's hook endpoints, the seed's JSON API, the page.

Routes:

- ``POST /hooks/connect``, ``/hooks/join``, ``/hooks/event``, ``/hooks/events``: phxbroker's
  calls, each verified with :mod:`phxbroker.hooks.backend` (401 and a log line when the
  signature or timestamp is refused, 400 when the body cannot be read);
- ``POST /api/v1/sessions`` (also ``/api/sessions``), ``DELETE /api/v1/sessions``,
  ``GET /api/v1/current_user``, ``GET`` and ``POST /api/v1/boards``: the seed's API, with
  its JWT in the ``Authorization`` header;
- ``/``: a small page that uses phoenix.js as the seed's front end does, and
  ``/js/phoenix.mjs``.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from examples.board.channels import BoardHooks, Broadcast, mint_token, user_id_from_token
from examples.board.db import Database, DataError, JSONObject
from phxbroker.hooks import backend as hooks

log = logging.getLogger("board")

STATIC = Path(__file__).with_name("static")
MAX_BODY = 1 << 20
BROKER_API_TIMEOUT = 3.0


@dataclass(frozen=True)
class Settings:
    """What the back end needs to run; see ``python -m examples.board --help``."""

    db_path: Path
    hook_secrets: tuple[str, ...]
    jwt_secret: str
    tolerance: float = hooks.DEFAULT_TOLERANCE
    broker_api: str | None = None
    broker_api_key: str | None = None
    phoenix_js: Path | None = None


def create_app(settings: Settings, db: Database) -> Starlette:
    """The Starlette app over an open, seeded database."""
    board = BoardHooks(db, settings.jwt_secret)
    answers: dict[str, Callable[[JSONObject], JSONObject]] = {
        "connect": board.connect,
        "join": board.join,
        "event": board.handle_in,
    }

    async def hook(request: Request) -> Response:
        kind = request.url.path.rsplit("/", 1)[-1]
        body = await request.body()
        request_id = request.headers.get(hooks.REQUEST_ID_HEADER, "-")
        try:
            call = hooks.verify(
                settings.hook_secrets, request.headers, body, tolerance=settings.tolerance
            )
            if kind == "events":
                new, broadcasts = board.lifecycle(call)
                log.info("events batch %s: %d new of %d", request_id, new, len(call["events"]))
                task = None
                if broadcasts and settings.broker_api and settings.broker_api_key:
                    task = BackgroundTask(
                        send_broadcasts, settings.broker_api, settings.broker_api_key, broadcasts
                    )
                return JSONResponse({"received": new}, background=task)
            answer = answers[kind](call)
        except hooks.HookRequestError as exc:
            client = request.client.host if request.client else "?"
            log.warning(
                "refused a %s hook call from %s (request id %s): %s", kind, client, request_id, exc
            )
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        log.info("%s %s: %s", kind, request_id, _outcome(answer))
        return JSONResponse(answer)

    def current_user(request: Request) -> JSONObject | None:
        token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        user_id = user_id_from_token(settings.jwt_secret, token)
        return db.user(user_id) if user_id is not None else None

    def not_authenticated() -> JSONResponse:
        return JSONResponse({"error": "Not Authenticated"}, status_code=403)

    async def create_session(request: Request) -> Response:
        params = await _json(request)
        session = params.get("session", params)
        email, password = session.get("email"), session.get("password")
        user = None
        if isinstance(email, str) and isinstance(password, str):
            user = db.authenticate(email, password)
        if user is None:
            return JSONResponse({"error": "Invalid email or password"}, status_code=422)
        jwt = mint_token(settings.jwt_secret, user["id"])
        return JSONResponse({"jwt": jwt, "user": user}, status_code=201)

    async def delete_session(request: Request) -> Response:
        # A JWT cannot be taken back; the client forgets it, as the seed's front end does.
        if current_user(request) is None:
            return not_authenticated()
        return JSONResponse({"ok": True})

    async def show_current_user(request: Request) -> Response:
        user = current_user(request)
        return JSONResponse(user) if user else not_authenticated()

    async def boards(request: Request) -> Response:
        user = current_user(request)
        if user is None:
            return not_authenticated()
        if request.method == "GET":
            return JSONResponse(db.boards_of(user["id"]))
        params = (await _json(request)).get("board")
        name = params.get("name") if isinstance(params, dict) else None
        try:
            with db.transaction():
                board_id = db.create_board(user["id"], name)  # type: ignore[arg-type]
        except DataError as exc:
            return JSONResponse({"errors": [{"name": str(exc)}]}, status_code=422)
        return JSONResponse(db.board_summary(board_id), status_code=201)

    async def phoenix_js(_request: Request) -> Response:
        if settings.phoenix_js is None:
            return PlainTextResponse(
                "phoenix.mjs not found: run `npm install` in examples/board", status_code=404
            )
        return FileResponse(settings.phoenix_js, media_type="text/javascript")

    routes = [
        *(Route(f"/hooks/{kind}", hook, methods=["POST"]) for kind in (*answers, "events")),
        Route("/api/v1/sessions", create_session, methods=["POST"]),
        Route("/api/sessions", create_session, methods=["POST"]),
        Route("/api/v1/sessions", delete_session, methods=["DELETE"]),
        Route("/api/v1/current_user", show_current_user, methods=["GET"]),
        Route("/api/v1/boards", boards, methods=["GET", "POST"]),
        Route("/js/phoenix.mjs", phoenix_js, methods=["GET"]),
        Mount("/", StaticFiles(directory=STATIC, html=True)),
    ]
    return Starlette(routes=routes, max_body_size=MAX_BODY)


async def _json(request: Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.body() or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _outcome(answer: JSONObject) -> str:
    """A few words on an answer for the log: never the payloads."""
    if "reply" in answer:
        reply = answer["reply"]
        said = "noreply" if reply is None else f"reply {reply['status']}"
        events = [message["event"] for message in answer.get("broadcast", [])]
        return f"{said}, broadcast {events}" if events else said
    return str(answer.get("status"))


def send_broadcasts(api_url: str, api_key: str, broadcasts: list[Broadcast]) -> None:
    """Send messages through phxbroker's HTTP API (``POST /api/broadcast``): what the
    back end says on its own, outside any hook answer."""
    for message in broadcasts:
        body = json.dumps(
            {"topic": message.topic, "event": message.event, "payload": message.payload}
        ).encode()
        request = urllib.request.Request(
            api_url.rstrip("/") + "/api/broadcast",
            data=body,
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=BROKER_API_TIMEOUT) as answer:
                answer.read()
        except (urllib.error.URLError, OSError) as exc:
            log.warning("could not broadcast %s to %s: %s", message.event, message.topic, exc)
        else:
            log.info("broadcast %s to %s", message.event, message.topic)
