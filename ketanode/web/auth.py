"""Logins and sessions: users from the database (argon2 hashes), sessions on the server.

The cookie (Starlette's SessionMiddleware, signed with ``web.session_secret`` or a random
secret per start) holds a random session id and a CSRF token; it is HttpOnly, SameSite=Lax,
and Secure when the dashboard is served over HTTPS. The database holds the id's SHA-256, the
user and the expiry (``ketanode.admin.users.start_session``), so a session ends on the server: after
``web.session_hours`` from the login (not from the last request), at logout (its row is
deleted: a copy of the cookie saved before no longer logs in), or when the user is disabled
or given a new password. Login and logout are the only routes that change anything; both are
POST forms that carry the session's CSRF token, and both are recorded in the audit trail
(the password check itself records LOGIN ok / refused).

Failed logins are throttled in memory (per process, cleared by a restart) twice over, so a
successful login of one account does not hide guesses at another:

- per address: ``MAX_FAILURES`` failures within ``FAILURE_WINDOW_SECONDS`` refuse every
  login from it (429) until the oldest failure leaves the window; a success never clears it;
- per account: ``MAX_ACCOUNT_FAILURES`` failures within the window lock the account for
  ``LOCKOUT_SECONDS`` (429, whatever the address and even with the right password); only a
  success of that account, before the lock, clears its count. An unknown user name is
  counted like a known one, so the answers do not tell which accounts exist.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from ketanode.admin import users
from ketanode.admin.audit import AuditKind, record_now
from ketanode.db.models import User, UserRole
from ketanode.web.context import context_of, render

logger = logging.getLogger(__name__)

router = APIRouter()

SESSION_COOKIE = "ketanode_session"
# Refuse logins from an address after this many failures within the window.
MAX_FAILURES = 10
FAILURE_WINDOW_SECONDS = 600.0
# Lock an account after this many failures within the window, for this long.
MAX_ACCOUNT_FAILURES = 5
LOCKOUT_SECONDS = 900.0
# Keys (addresses, user names) remembered at most; the stalest are forgotten first.
MAX_TRACKED = 10_000


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
    """The user whose password this is, or None (``ketanode.admin.users.authenticate``: argon2,
    records the LOGIN audit row ok / refused in ``session``; the caller commits)."""
    return users.authenticate(session, username, password, address=address)


class LoginThrottle:
    """Failed logins per address and per account (in memory, per app; thread-safe).

    ``clock`` (seconds, monotonic) is for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_address: dict[str, deque[float]] = {}
        self._by_account: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _recent(table: dict[str, deque[float]], key: str, now: float) -> deque[float]:
        times = table.get(key)
        if times is None:
            times = table[key] = deque()
        while times and now - times[0] > FAILURE_WINDOW_SECONDS:
            times.popleft()
        return times

    def _forget_stale(self, now: float) -> None:
        for table in (self._by_address, self._by_account):
            if len(table) <= MAX_TRACKED:
                continue
            for key in [
                k for k, t in table.items() if not t or now - t[-1] > FAILURE_WINDOW_SECONDS
            ]:
                del table[key]
            while len(table) > MAX_TRACKED:  # still too many: the stalest go
                del table[min(table, key=lambda k: table[k][-1] if table[k] else 0.0)]
        if len(self._locked_until) > MAX_TRACKED:
            for key in [k for k, t in self._locked_until.items() if t <= now]:
                del self._locked_until[key]

    def blocked(self, address: str, username: str) -> str | None:
        """Why a login is refused before its password is checked: "address", "account"
        (locked) or None."""
        with self._lock:
            now = self._clock()
            if len(self._recent(self._by_address, address, now)) >= MAX_FAILURES:
                return "address"
            until = self._locked_until.get(username)
            if until is not None:
                if now < until:
                    return "account"
                del self._locked_until[username]
            return None

    def failed(self, address: str, username: str) -> bool:
        """Count a failure; True when it locked the account."""
        with self._lock:
            now = self._clock()
            self._recent(self._by_address, address, now).append(now)
            account = self._recent(self._by_account, username, now)
            account.append(now)
            locked = len(account) >= MAX_ACCOUNT_FAILURES
            if locked:
                self._locked_until[username] = now + LOCKOUT_SECONDS
                account.clear()
            self._forget_stale(now)
            return locked

    def succeeded(self, address: str, username: str) -> None:
        """A login of ``username`` succeeded: its own failures are forgotten; the address's
        are not (they may be guesses at other accounts)."""
        with self._lock:
            self._by_account.pop(username, None)


def _throttle(request: Request) -> LoginThrottle:
    found = request.app.state.login_throttle
    assert isinstance(found, LoginThrottle)
    return found


# --- sessions -----------------------------------------------------------------------------


def _csrf_ok(request: Request, sent: str) -> bool:
    token = request.session.get("csrf")
    return isinstance(token, str) and secrets.compare_digest(token, sent)


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None


def current_user(request: Request) -> WebUser | None:
    """The logged-in user of this request (None: no session id, or its session ended,
    expired, or the user is gone or disabled)."""
    if hasattr(request.state, "user"):
        cached: WebUser | None = request.state.user
        return cached
    found: WebUser | None = None
    token = request.session.get("sid")
    if isinstance(token, str) and token:
        with context_of(request).sessions() as session:
            user = users.session_user(session, token)
            if user is not None:
                found = WebUser(user.id, user.username, user.role)
    if found is None and "sid" in request.session:
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
    why = throttle.blocked(address, username)
    if why is not None:
        logger.warning("login refused: too many failures (%s) from %s", why, address)
        record_now(
            ctx.sessions,
            AuditKind.LOGIN,
            username,
            outcome="throttled",
            address=address,
            detail={"by": why},
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
        token = (
            users.start_session(session, user, ctx.settings.web.session_hours, address)
            if user is not None
            else None
        )
    if found is None or token is None:
        if throttle.failed(address, username):
            logger.warning("login: an account is locked for %d s after failures", LOCKOUT_SECONDS)
        return render(
            request,
            "login.html",
            status_code=401,
            next=target,
            error="Wrong user name or password.",
        )
    throttle.succeeded(address, username)
    request.session.clear()  # a new session (and CSRF token) for the logged-in user
    request.session.update({"sid": token, "csrf": secrets.token_urlsafe(24)})
    request.state.user = found
    return RedirectResponse(target, status_code=303)


@router.post("/logout", include_in_schema=False)
def logout(request: Request, csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
    """End the session on the server (its row is deleted) and clear the cookie."""
    user = current_user(request)
    token = request.session.get("sid")
    if user is not None and isinstance(token, str) and _csrf_ok(request, csrf):
        ctx = context_of(request)
        with ctx.sessions.begin() as session:
            users.end_session(session, token)
        record_now(ctx.sessions, AuditKind.LOGOUT, user.username, address=client_address(request))
        logger.info("user %s logged out", user.id)
        request.session.clear()
    return RedirectResponse("/login", status_code=303)
