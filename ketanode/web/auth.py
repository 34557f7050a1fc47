"""Logins and sessions: users from the database (argon2 hashes), a signed session cookie.

The cookie (Starlette's SessionMiddleware, signed with ``web.session_secret`` or a random
secret per start) holds the user's row id, the login time and a CSRF token; it is HttpOnly,
SameSite=Lax, and Secure when the dashboard is served over HTTPS. A session ends after
``web.session_hours`` from the login (not from the last request), at logout, or when the
user is disabled. Login and logout are the only routes that change anything; both are
POST forms that carry the session's CSRF token, and both are recorded in the audit trail
(the password check itself records LOGIN ok / refused).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from ketanode import users
from ketanode.audit import AuditKind, record_now
from ketanode.db.models import User, UserRole
from ketanode.web.context import context_of, render

logger = logging.getLogger(__name__)

router = APIRouter()

SESSION_COOKIE = "ketanode_session"
# Refuse logins from an address after this many failures within the window.
MAX_FAILURES = 10
FAILURE_WINDOW_SECONDS = 600.0


class NotLoggedIn(Exception):
    """No valid session: a page redirects to /login, anything else answers 401."""

    def __init__(self, redirect: bool) -> None:
        super().__init__("login required")
        self.redirect = redirect


class Forbidden(Exception):
    """Logged in, but the page is for admins only (403)."""


@dataclass(frozen=True)
class WebUser:
    id: int
    username: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == UserRole.ADMIN


# --- the password check -------------------------------------------------------------------


def authenticate(
    session: Session, username: str, password: str, address: str | None
) -> User | None:
    """The user whose password this is, or None (``ketanode.users.authenticate``: argon2,
    records the LOGIN audit row ok / refused in ``session``; the caller commits)."""
    return users.authenticate(session, username, password, address=address)


class LoginThrottle:
    """Refuses logins from an address with too many recent failures (in memory, per app)."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._failures[address]
        while times and now - times[0] > FAILURE_WINDOW_SECONDS:
            times.popleft()
        return times

    def blocked(self, address: str) -> bool:
        with self._lock:
            return len(self._recent(address, time.monotonic())) >= MAX_FAILURES

    def failed(self, address: str) -> None:
        with self._lock:
            now = time.monotonic()
            self._recent(address, now).append(now)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)


def _throttle(request: Request) -> LoginThrottle:
    found = request.app.state.login_throttle
    assert isinstance(found, LoginThrottle)
    return found


# --- sessions -----------------------------------------------------------------------------


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(24)
        request.session["csrf"] = token
    return token


def _csrf_ok(request: Request, sent: str) -> bool:
    token = request.session.get("csrf")
    return isinstance(token, str) and secrets.compare_digest(token, sent)


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None


def current_user(request: Request) -> WebUser | None:
    """The logged-in user of this request (None: no session, expired, user gone/disabled)."""
    if hasattr(request.state, "user"):
        cached: WebUser | None = request.state.user
        return cached
    found: WebUser | None = None
    uid = request.session.get("uid")
    login_at = request.session.get("login_at")
    ctx = context_of(request)
    if isinstance(uid, int) and isinstance(login_at, (int, float)):
        if time.time() - login_at <= ctx.settings.web.session_hours * 3600:
            with ctx.sessions() as session:
                user = session.get(User, uid)
                if user is not None and not user.disabled:
                    found = WebUser(user.id, user.username, user.role)
        if found is None:
            request.session.clear()
    request.state.user = found
    return found


def page_user(request: Request) -> WebUser:
    """Dependency of a page: the user, or a redirect to /login."""
    user = current_user(request)
    if user is None:
        raise NotLoggedIn(redirect=True)
    return user


def api_user(request: Request) -> WebUser:
    """Dependency of data (images, plots, JSON): the user, or 401."""
    user = current_user(request)
    if user is None:
        raise NotLoggedIn(redirect=False)
    return user


def admin_user(request: Request) -> WebUser:
    """Dependency of an admin page: the user if an admin, else 403."""
    user = page_user(request)
    if not user.is_admin:
        raise Forbidden()
    return user


def safe_next(value: str | None) -> str:
    """Where to go after login: a path on this site only (no //host, no scheme)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/results"
    return value


def login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)


# --- routes -------------------------------------------------------------------------------


@router.get("/login", include_in_schema=False)
def login_page(request: Request, next: str | None = None) -> Response:
    if current_user(request) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return render(request, "login.html", next=safe_next(next), error=None)


@router.post("/login", include_in_schema=False)
def login(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    csrf: Annotated[str, Form(max_length=128)] = "",
    next: Annotated[str, Form(max_length=2048)] = "/results",
) -> Response:
    ctx = context_of(request)
    throttle = _throttle(request)
    address = client_address(request) or "unknown"
    target = safe_next(next)
    if not _csrf_ok(request, csrf):
        return render(
            request,
            "login.html",
            status_code=400,
            next=target,
            error="The login form expired. Please try again.",
        )
    if throttle.blocked(address):
        logger.warning("login refused: too many failures from %s", address)
        record_now(
            ctx.sessions,
            AuditKind.LOGIN,
            username,
            outcome="throttled",
            address=address,
        )
        return render(
            request,
            "login.html",
            status_code=429,
            next=target,
            error="Too many failed logins. Try again later.",
        )
    with ctx.sessions.begin() as session:
        user = authenticate(session, username, password, address)
        found = WebUser(user.id, user.username, user.role) if user is not None else None
    if found is None:
        throttle.failed(address)
        return render(
            request,
            "login.html",
            status_code=401,
            next=target,
            error="Wrong user name or password.",
        )
    throttle.succeeded(address)
    request.session.clear()  # a new session (and CSRF token) for the logged-in user
    request.session.update(
        {"uid": found.id, "login_at": time.time(), "csrf": secrets.token_urlsafe(24)}
    )
    request.state.user = found
    return RedirectResponse(target, status_code=303)


@router.post("/logout", include_in_schema=False)
def logout(request: Request, csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
    user = current_user(request)
    if user is not None and _csrf_ok(request, csrf):
        record_now(
            context_of(request).sessions,
            AuditKind.LOGOUT,
            user.username,
            address=client_address(request),
        )
        logger.info("user %s logged out", user.id)
        request.session.clear()
    return RedirectResponse("/login", status_code=303)
