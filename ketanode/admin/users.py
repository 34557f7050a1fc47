"""Dashboard users: argon2 password hashes, roles, logins; every change is audited.

Functions work in the caller's session (the caller commits), so a change and its audit row
commit together. Passwords are never stored, logged or put in an audit row. A refused login
looks the same whether the user is unknown, disabled or gave a wrong password: same return
value, same audit row, and about the same time (an unknown user is checked against a dummy
hash).

Dashboard sessions live here too (:func:`start_session`, :func:`session_user`,
:func:`end_session`): the database holds the SHA-256 of each session's random id, so a
logout, a disabled user or a new password ends the session on the server, whatever copy of
the cookie is kept.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import secrets
import threading
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ketanode.admin.audit import AuditKind, record
from ketanode.db.models import User, UserRole, WebSession, utcnow

logger = logging.getLogger(__name__)

MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")

_hasher = PasswordHasher()
_dummy_lock = threading.Lock()
_dummy_hash: str | None = None


def _dummy() -> str:
    """A hash to verify against when there is no usable user (same cost as a real check)."""
    global _dummy_hash
    with _dummy_lock:
        if _dummy_hash is None:
            _dummy_hash = _hasher.hash(secrets.token_hex(16))
        return _dummy_hash


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_username(username: str) -> str:
    if not USERNAME_RE.match(username):
        raise ValueError(
            "a username is 1-64 characters: letters, digits and _ . @ - "
            "(starting with a letter or digit)"
        )
    return username


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"a password has at most {MAX_PASSWORD_LENGTH} characters")
    if not password.strip():
        raise ValueError("a password cannot be only spaces")
    return password


def check_role(role: str) -> UserRole:
    try:
        return UserRole(role)
    except ValueError:
        roles = ", ".join(r.value for r in UserRole)
        raise ValueError(f"unknown role {role!r} (one of: {roles})") from None


def find_user(session: Session, username: str) -> User | None:
    return session.scalar(select(User).where(User.username == username))


def _existing(session: Session, username: str) -> User:
    user = find_user(session, username)
    if user is None:
        raise ValueError(f"no user {username!r}")
    return user


def _audit(session: Session, user: User, actor: str, action: str, **extra: str) -> None:
    """The USER audit row of a change to ``user``, in the caller's transaction."""
    detail = {"action": action, "username": user.username, **extra}
    record(session, AuditKind.USER, actor, subject=f"user:{user.id}", detail=detail)


def add_user(
    session: Session,
    username: str,
    password: str,
    role: str = UserRole.VIEWER,
    *,
    actor: str = "system",
) -> User:
    """Add a user (in ``session``; the caller commits). ValueError says what is wrong."""
    check_username(username)
    check_password(password)
    user_role = check_role(role)
    if find_user(session, username) is not None:
        raise ValueError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=user_role)
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:  # added by someone else in the meantime
        raise ValueError(f"user {username!r} already exists") from exc
    _audit(session, user, actor, "add", role=str(user_role))
    logger.info("user %s added (role %s) by %s", user.id, user_role, actor)
    return user


def set_password(session: Session, username: str, password: str, *, actor: str = "system") -> User:
    check_password(password)
    user = _existing(session, username)
    user.password_hash = hash_password(password)
    end_sessions_of(session, user.id)
    _audit(session, user, actor, "password")
    logger.info("password of user %s changed by %s", user.id, actor)
    return user


def disable_user(session: Session, username: str, *, actor: str = "system") -> User:
    """Disable a user: logins are refused (rows and audit history are kept)."""
    user = _existing(session, username)
    user.disabled = True
    end_sessions_of(session, user.id)
    _audit(session, user, actor, "disable")
    logger.info("user %s disabled by %s", user.id, actor)
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def user_row(user: User) -> dict[str, Any]:
    """A JSON-ready row (never the hash)."""
    return {
        "id": user.id,
        "username": user.username,
        "role": user.role,
        "disabled": user.disabled,
        "created_at": user.created_at.isoformat(timespec="seconds"),
        "last_login_at": (
            user.last_login_at.isoformat(timespec="seconds") if user.last_login_at else None
        ),
    }


def authenticate(
    session: Session, username: str, password: str, address: str | None = None
) -> User | None:
    """The user, if ``password`` is theirs and they are not disabled; else None.

    Records a LOGIN audit row (ok / refused) in ``session``; the caller commits. A refused
    row is the same for an unknown user, a disabled one and a wrong password.
    """
    user = find_user(session, username)
    usable = user is not None and not user.disabled
    stored = user.password_hash if usable and user is not None else _dummy()
    ok: bool
    try:
        ok = _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        ok = False
    if not (ok and usable and user is not None):
        record(session, AuditKind.LOGIN, username, outcome="refused", address=address)
        logger.info("login refused (from %s)", address or "unknown address")
        return None
    user.last_login_at = utcnow()
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    record(
        session, AuditKind.LOGIN, username, subject=f"user:{user.id}", outcome="ok", address=address
    )
    logger.info("user %s logged in (from %s)", user.id, address or "unknown address")
    return user


# --- dashboard sessions -------------------------------------------------------------------
#
# The session cookie carries a random id; the database keeps its SHA-256 (a copy of the
# table does not log anyone in), the user and the expiry. A session ends at logout (its row
# is deleted), at its expiry, or when the user is disabled or their password changes (all
# of the user's rows are deleted).


def session_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def start_session(session: Session, user: User, hours: float, address: str | None = None) -> str:
    """A new dashboard session for ``user`` (in ``session``; the caller commits): the random
    id for the cookie. Expired sessions of any user are removed on the way."""
    now = utcnow()
    session.execute(delete(WebSession).where(WebSession.expires_at < now))
    token = secrets.token_urlsafe(32)
    session.add(
        WebSession(
            token_sha256=session_token_hash(token),
            user_id=user.id,
            created_at=now,
            expires_at=now + dt.timedelta(hours=hours),
            address=address,
        )
    )
    return token


def session_user(session: Session, token: str) -> User | None:
    """The user of a live session (not ended, not expired, user not disabled), or None."""
    row = session.scalar(
        select(WebSession).where(WebSession.token_sha256 == session_token_hash(token))
    )
    if row is None or row.expires_at <= utcnow():
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        return None
    return user


def end_session(session: Session, token: str) -> bool:
    """End one session (logout); False when it had already ended."""
    gone = session.execute(
        delete(WebSession).where(WebSession.token_sha256 == session_token_hash(token))
    )
    return bool(getattr(gone, "rowcount", 0))


def end_sessions_of(session: Session, user_id: int) -> int:
    """End every session of a user (disabled, new password); how many there were."""
    gone = session.execute(delete(WebSession).where(WebSession.user_id == user_id))
    return int(getattr(gone, "rowcount", 0) or 0)
