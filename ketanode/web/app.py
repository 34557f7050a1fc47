"""The dashboard application: FastAPI with server-rendered pages, read-only.

``create_app`` wires the routers (auth, pages, cluster, health, metrics), the static files,
the session cookie and three guards:

- only GET and HEAD are served, plus POST to /login and /logout; any other method on any
  path answers 405 before routing, so no route can change state by accident;
- pages without a session redirect to /login, everything else (images, plots, JSON,
  /metrics unless public) answers 401; admin pages answer 403 to viewers;
- every response carries a strict Content-Security-Policy (no scripts at all, everything
  from this origin), no-sniff, no-referrer and frame-ancestors 'none', and HSTS when served
  over HTTPS: error responses too (404, 405, 422, 503, and a 500 made here, whose exception
  is logged by type and frames only, never its text); pages are not cached.

An id in a path that no id column can hold (``/results/99999999999999999999``, anything
beyond PostgreSQL's 32-bit INTEGER) answers 404 before any query; a non-numeric one 422.

No OpenAPI / Swagger pages: they would load JavaScript from a CDN.
"""

from __future__ import annotations

import logging
import re
import secrets
import traceback

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ketanode.config import Settings
from ketanode.scheduler import Timers
from ketanode.web import auth, cluster, health, metrics, pages
from ketanode.web.context import STATIC_DIR, WebContext, make_templates, render

logger = logging.getLogger(__name__)

READ_METHODS = frozenset({"GET", "HEAD"})
WRITE_ROUTES = frozenset({("POST", "/login"), ("POST", "/logout")})
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
HSTS = ("strict-transport-security", "max-age=31536000")
# the largest id the id columns hold (INTEGER: 32 bits on PostgreSQL, 64 on SQLite)
MAX_ID = 2**31 - 1
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _printable(text: str, limit: int = 200) -> str:
    """A value from the request, safe for a log line (no control characters, capped)."""
    return text[:limit].encode("unicode_escape").decode("ascii")


def _frames(exc: BaseException) -> str:
    """Where an exception was raised: file, line and function of each frame, not its text
    (which may quote a value)."""
    return " <- ".join(
        f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
        for f in reversed(traceback.extract_tb(exc.__traceback__))
    )[:2000]


class ReadOnlyGuard:
    """ASGI middleware: 405 for every method but GET/HEAD, except the login/logout forms;
    the security headers (and HSTS over HTTPS) on every response; a 500 of its own, with
    them, for an exception nothing else handled."""

    def __init__(self, app: ASGIApp, hsts: bool = False) -> None:
        self.app = app
        self.headers = dict(SECURITY_HEADERS)
        if hsts:
            self.headers[HSTS[0]] = HSTS[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = str(scope["method"]).upper()
        path = str(scope["path"])
        if method not in READ_METHODS and (method, path) not in WRITE_ROUTES:
            allow = "GET, HEAD, POST" if path in ("/login", "/logout") else "GET, HEAD"
            response = JSONResponse(
                {"detail": "the dashboard is read-only"},
                status_code=405,
                headers={"Allow": allow, **self.headers},
            )
            await response(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                present = {bytes(k).lower() for k, _ in headers}
                for name, value in self.headers.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                if not path.startswith("/static/") and b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            logger.error(
                "dashboard: internal error on %s %s (%s at %s)",
                method,
                _printable(path),
                type(exc).__name__,
                _frames(exc),
            )
            if started:  # the answer is under way: nothing better to do than cut it
                raise
            response = JSONResponse({"detail": "internal error"}, status_code=500)
            await response(scope, receive, send_with_headers)


def ids_in_range(request: Request) -> None:
    """Dependency of every route: a path parameter written as an integer that no id column
    can hold is no id of anything (404), rather than an overflow or a database error."""
    for value in request.path_params.values():
        if isinstance(value, str) and _INTEGER.fullmatch(value) and abs(int(value)) > MAX_ID:
            raise HTTPException(status_code=404, detail="no such id")


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def create_app(
    settings: Settings,
    sessions: sessionmaker[Session] | None = None,
    timers: Timers | None = None,
) -> FastAPI:
    """The dashboard for ``settings``' database (``sessions``: the node's session factory;
    ``timers``: the node's scheduler, reported by /health). With ``cluster.enabled`` (the
    web role) it shows the cluster too: /cluster, its metrics, and /health judges the
    cluster's active scheduler instead of ``timers``."""
    if sessions is None:
        from ketanode.db.session import make_engine, make_session_factory

        sessions = make_session_factory(make_engine(settings.database.url))
    web = settings.web
    tls = web.certificate is not None
    app = FastAPI(
        title="ketanode dashboard (research use only)",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(ids_in_range)],
    )
    reader = cluster.make_reader(settings, sessions)
    app.state.ketanode = WebContext(settings, sessions, timers, make_templates(), tls, reader)
    app.state.metrics_registry = metrics.make_registry(sessions, reader, settings.spool.path)
    app.state.login_throttle = auth.LoginThrottle()
    secret = web.session_secret or secrets.token_urlsafe(32)
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret,
        session_cookie=auth.SESSION_COOKIE,
        max_age=max(60, int(web.session_hours * 3600)),
        same_site="lax",
        https_only=tls,
    )
    app.add_middleware(ReadOnlyGuard, hsts=tls)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    app.include_router(auth.router)
    app.include_router(pages.router)
    app.include_router(cluster.router)
    app.include_router(health.router)
    app.include_router(metrics.router)

    @app.exception_handler(auth.NotLoggedIn)
    async def _not_logged_in(request: Request, exc: auth.NotLoggedIn) -> Response:
        if exc.redirect:
            return auth.login_redirect(request)
        return JSONResponse({"detail": "login required"}, status_code=401)

    @app.exception_handler(auth.Forbidden)
    async def _forbidden(request: Request, exc: auth.Forbidden) -> Response:
        return render(
            request,
            "error.html",
            status_code=403,
            code=403,
            message="This page is for administrators only.",
        )

    @app.exception_handler(SQLAlchemyError)
    async def _database_down(request: Request, exc: SQLAlchemyError) -> Response:
        logger.warning("dashboard: database error on %s (%s)", request.url.path, type(exc).__name__)
        message = "The database is not available; the node may be starting or degraded."
        if _wants_html(request):
            return render(request, "error.html", status_code=503, code=503, message=message)
        return JSONResponse({"detail": message}, status_code=503)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if _wants_html(request):
            return render(
                request,
                "error.html",
                status_code=exc.status_code,
                code=exc.status_code,
                message=str(exc.detail),
            )
        return JSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    return app
