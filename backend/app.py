"""The secure-api application: login, a user's files and trash, health, the page."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from .config import Settings
from .cookies import COOKIE_NAME, new_session_id, sign, unsign
from .errors import (
    BackendError,
    BadRequest,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from .files import FileRecord, now_iso, record_from_upload, valid_file_id
from .identity import login_identity, normalize_user_id
from .log import SERVER, SESSION
from .store import SessionData, Store, open_store

server_logger = logging.getLogger(SERVER)
session_logger = logging.getLogger(SESSION)

#: Largest request body, in bytes; inline content is limited separately.
MAX_BODY = 128 * 1024

INSTANCE_HEADER = "X-Instance-Id"
STATIC = Path(__file__).resolve().parent / "static"

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The session a request proved it holds, with the user id normalised."""

    session_id: str
    user_id: str
    tenant_id: str


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AuthHandler = Callable[[web.Request, Authenticated], Awaitable[web.StreamResponse]]


def _reply(
    request: web.Request, fields: dict[str, object], code: int = 200
) -> web.Response:
    """Answer with a JSON object that also names the instance."""
    body = {**fields, "instance": request.app[SETTINGS].instance_id}
    return web.json_response(body, status=code)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def read_json(request: web.Request) -> dict[str, object]:
    """Return the request's JSON object body, refusing other types and sizes."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType()
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"request body must be at most {MAX_BODY} bytes")

    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


async def authenticate(request: web.Request) -> Authenticated:
    """Return the request's session, or raise Unauthorized (StoreUnavailable if down).

    The user id is normalised here as well as at login, so a session written
    with any spelling of a person's id still maps to that one person.
    """
    value = request.cookies.get(COOKIE_NAME)
    if value is None:
        raise Unauthorized()

    session_id = unsign(value, request.app[SETTINGS].session_secret)
    if session_id is None:
        raise Unauthorized("invalid session cookie")

    data = await request.app[STORE].get_session(session_id)
    if data is None:
        raise Unauthorized("unknown or expired session")
    return Authenticated(session_id, normalize_user_id(data.user_id), data.tenant_id)


def authenticated(handler: AuthHandler) -> Handler:
    """Wrap a handler so that it runs only for a request with a live session."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        return await handler(request, await authenticate(request))

    return wrapper


def _debug_session(auth: Authenticated) -> None:
    session_logger.info(
        "[SESSION DEBUG] UserID: %s | SessionID: %s | TenantID: %s",
        auth.user_id,
        auth.session_id,
        auth.tenant_id,
    )


def _file_id(request: web.Request) -> str:
    file_id = request.match_info["file_id"]
    if not valid_file_id(file_id):
        raise NotFound("no such file")
    return file_id


async def index(request: web.Request) -> web.StreamResponse:
    """Serve the page that lets a person watch which instance answers."""
    return web.FileResponse(
        STATIC / "index.html", headers={"Cache-Control": "no-store"}
    )


async def health(request: web.Request) -> web.Response:
    """Report the instance, its store kind and whether the store answers."""
    store = request.app[STORE]
    reachable = await store.reachable()
    fields: dict[str, object] = {
        "status": "ok" if reachable else "degraded",
        "store": store.kind,
        "storeReachable": reachable,
    }
    return _reply(request, fields)


async def login(request: web.Request) -> web.Response:
    """Start a session under a new id; any session the client came with is ended."""
    user_id, tenant_id = login_identity(await read_json(request))
    settings = request.app[SETTINGS]
    store = request.app[STORE]

    # a fresh id at every login refuses session fixation: an id planted in the
    # browser before login never becomes an authenticated one
    old = request.cookies.get(COOKIE_NAME)
    old_id = unsign(old, settings.session_secret) if old is not None else None
    if old_id is not None:
        await store.delete_session(old_id)

    session_id = new_session_id()
    await store.create_session(session_id, SessionData(user_id, tenant_id, now_iso()))
    session_logger.info("[SESSION] login %s tenant %s", user_id, tenant_id)

    response = _reply(request, {"userId": user_id, "tenantId": tenant_id})
    response.set_cookie(
        COOKIE_NAME,
        sign(session_id, settings.session_secret),
        path="/",
        httponly=True,
        samesite="Lax",
    )
    return response


@authenticated
async def logout(request: web.Request, auth: Authenticated) -> web.StreamResponse:
    """End the session and clear its cookie."""
    await request.app[STORE].delete_session(auth.session_id)
    response = _reply(request, {"loggedOut": True})
    response.del_cookie(COOKIE_NAME, path="/")
    return response


@authenticated
async def me(request: web.Request, auth: Authenticated) -> web.StreamResponse:
    """Tell who the session belongs to."""
    return _reply(request, {"userId": auth.user_id, "tenantId": auth.tenant_id})


@authenticated
async def list_files(request: web.Request, auth: Authenticated) -> web.StreamResponse:
    """List the user's files."""
    _debug_session(auth)
    files = await request.app[STORE].list_files(auth.user_id)
    return _reply(request, {"files": files})


@authenticated
async def upload(request: web.Request, auth: Authenticated) -> web.StreamResponse:
    """Store a new file record for the user."""
    record = record_from_upload(await read_json(request))
    await request.app[STORE].add_file(auth.user_id, record)
    return _reply(request, {"file": record}, 201)


@authenticated
async def delete_file(request: web.Request, auth: Authenticated) -> web.StreamResponse:
    """Move one of the user's files to the trash."""
    store = request.app[STORE]
    record = await store.trash_file(auth.user_id, _file_id(request), now_iso())
    return _found(request, record)


@authenticated
async def list_trash(request: web.Request, auth: Authenticated) -> web.StreamResponse:
    """List the user's trashed files."""
    _debug_session(auth)
    files = await request.app[STORE].list_trash(auth.user_id)
    return _reply(request, {"files": files})


@authenticated
async def restore(request: web.Request, auth: Authenticated) -> web.StreamResponse:
    """Move one of the user's trashed files back to the list."""
    record = await request.app[STORE].restore_file(auth.user_id, _file_id(request))
    return _found(request, record)


def _found(request: web.Request, record: FileRecord | None) -> web.Response:
    if record is None:
        raise NotFound("no such file")
    return _reply(request, {"file": record})


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every failure with a JSON body ``{"error": ...}``."""
    try:
        return await handler(request)
    except BackendError as exc:
        return _error(exc.status, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(exc.status, exc.reason.lower())
        # keep what the client needs to retry correctly, such as Allow on a 405
        for name in ("Allow", "Retry-After"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Exception:
        server_logger.exception(
            "unexpected failure on %s %s", request.method, request.path
        )
        return _error(500, "internal error")


async def _mark_response(request: web.Request, response: web.StreamResponse) -> None:
    """Name the instance on every response and keep session answers out of caches."""
    response.headers[INSTANCE_HEADER] = request.app[SETTINGS].instance_id
    response.headers["X-Content-Type-Options"] = "nosniff"
    if request.path.startswith("/api/"):
        response.headers["Cache-Control"] = "no-store"


async def _store_context(app: web.Application) -> AsyncIterator[None]:
    """Open the session store for the application's lifetime."""
    settings = app[SETTINGS]
    if settings.default_secret:
        session_logger.warning(
            "[SESSION] SESSION_SECRET is not set; signing cookies with the "
            "development default, which anyone can forge"
        )

    store = await open_store(settings)
    app[STORE] = store
    yield
    await store.close()


def make_app(settings: Settings) -> web.Application:
    """Build the application; its store opens when the application starts."""
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_store_context)
    app.on_response_prepare.append(_mark_response)
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_post("/api/login", login)
    app.router.add_post("/api/logout", logout)
    app.router.add_get("/api/me", me)
    app.router.add_get("/api/files", list_files)
    app.router.add_post("/api/files", upload)
    app.router.add_get("/api/files/trash", list_trash)
    app.router.add_delete("/api/files/{file_id}", delete_file)
    app.router.add_post("/api/files/{file_id}/restore", restore)
    return app
