"""The audit trail: one ``audit_event`` row per thing someone (or the node) did that an
auditor may ask about: associations, logins, result views, exports, dispatches, users.

:func:`record` adds a row in the caller's transaction (so the event and what it records
commit together); :func:`record_now` commits its own. Neither puts patient identifiers in a
row: subjects are row ids and UIDs. Recording never breaks the action it records:
:func:`record_now` logs and swallows database errors.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

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
