"""The audit trail: one ``audit_event`` row per thing someone (or the node) did that an
auditor may ask about: associations, logins, result views, exports, dispatches, users.

:func:`record` adds a row in the caller's transaction (so the event and what it records
commit together); :func:`record_now` commits its own. Neither puts patient identifiers in a
row: subjects are row ids and UIDs. Recording never breaks the action it records:
:func:`record_now` logs and swallows database errors. :func:`list_events` reads the trail
(``ketanode audit list``, the dashboard's audit page).
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ketanode.db.models import AuditEvent

logger = logging.getLogger(__name__)


class AuditKind(enum.StrEnum):
    ASSOCIATION = "association"  # a DICOM association ended (or was rejected)
    LOGIN = "login"  # outcome ok / refused
    LOGOUT = "logout"
    RESULT_VIEW = "result_view"  # a result (page, report image) was shown to a user
    EXPORT = "export"  # results exported (CLI or dashboard)
    DISPATCH = "dispatch"  # an object was sent to a destination, or gave up (dead)
    REQUEUE = "requeue"  # an operator re-queued outbox rows
    USER = "user"  # a user was added, changed or disabled
    RETENTION = "retention"  # files removed by retention


def record(
    session: Session,
    kind: AuditKind | str,
    actor: str,
    *,
    subject: str | None = None,
    outcome: str = "ok",
    address: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add an audit row to ``session`` (committed with the caller's transaction)."""
    event = AuditEvent(
        kind=str(kind),
        actor=actor[:128],
        subject=subject[:128] if subject else None,
        outcome=outcome[:16],
        address=address[:64] if address else None,
        detail=detail,
    )
    session.add(event)
    return event


def record_now(
    sessions: sessionmaker[Session],
    kind: AuditKind | str,
    actor: str,
    **kwargs: Any,
) -> None:
    """Record in a transaction of its own; a failure is logged, never raised."""
    try:
        with sessions.begin() as session:
            record(session, kind, actor, **kwargs)
    except Exception:
        logger.exception("could not record an audit event (%s by %s)", kind, actor)


def list_events(
    session: Session,
    *,
    kind: str | None = None,
    actor: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = 100,
) -> list[AuditEvent]:
    """Audit events, newest first; ``since`` inclusive, ``until`` exclusive."""
    stmt = select(AuditEvent)
    if kind:
        stmt = stmt.where(AuditEvent.kind == kind)
    if actor:
        stmt = stmt.where(AuditEvent.actor == actor)
    if since is not None:
        stmt = stmt.where(AuditEvent.at >= since)
    if until is not None:
        stmt = stmt.where(AuditEvent.at < until)
    stmt = stmt.order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    return list(session.scalars(stmt))


def event_row(event: AuditEvent) -> dict[str, Any]:
    """An audit event as a JSON-ready row."""
    return {
        "id": event.id,
        "at": event.at.isoformat(timespec="seconds"),
        "kind": event.kind,
        "actor": event.actor,
        "address": event.address,
        "subject": event.subject,
        "outcome": event.outcome,
        "detail": event.detail,
    }


def event_kinds(session: Session) -> list[str]:
    """The kinds of event the trail holds, sorted."""
    return sorted(str(k) for k in session.scalars(select(AuditEvent.kind).distinct()))
