"""The dispatcher: sends the outbox's due rows to their destinations (C-STORE SCU).

It reads only the ``outbox`` table (docs/architecture.md, rules that protect data, 5):
every row is one object (SR or report image) for one configured destination. A row moves
``pending -> sent``, or on failure to ``retrying`` with ``next_at`` pushed back
exponentially (``backoff_initial_seconds * 2**(attempts - 1)``, at most
``backoff_max_seconds``), and to ``dead`` after ``max_attempts`` tries; an operator
re-queues dead rows with ``ketanode dispatch retry``.

Exactly once, as the PACS sees it: an object's SOP Instance UID is fixed when its file is
written, so a row sent again after a crash between the peer's acknowledgement and our commit
carries the same UIDs, and the PACS keeps one copy. APScheduler runs :meth:`Dispatcher.run`
every ``dispatch.interval_seconds``, and the node wakes it when a job finishes.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ketanode.admin.audit import AuditKind, record
from ketanode.config import Destination, DispatchSettings, Settings
from ketanode.db.models import UNSENT_STATES, DispatchState, EmittedObject, OutboxItem, utcnow
from ketanode.roots import reports_root
from ketanode.send.sender import (
    AssociationFailed,
    StoreOutcome,
    client_tls_context,
    store_uncompressed,
)

logger = logging.getLogger(__name__)


def _audit(session: Session, row: OutboxItem, outcome: str, dest: str, **extra: object) -> None:
    """The DISPATCH audit row (sent / dead), in the transaction that updates the outbox row."""
    detail = {"destination": dest, "sop_instance_uid": row.object.sop_instance_uid, **extra}
    record(
        session,
        AuditKind.DISPATCH,
        "node",
        subject=f"outbox:{row.id}",
        outcome=outcome,
        detail=detail,
    )


def backoff_seconds(attempts: int, cfg: DispatchSettings) -> float:
    """Wait before the next try after ``attempts`` failed tries (>= 1)."""
    return float(min(cfg.backoff_max_seconds, cfg.backoff_initial_seconds * 2 ** (attempts - 1)))


@dataclass
class DispatchRun:
    """What one run did (for logs, tests and the bench)."""

    sent: int = 0
    failed: int = 0
    dead: int = 0
    by_destination: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, destination: str, what: str) -> None:
        per = self.by_destination.setdefault(destination, {"sent": 0, "failed": 0, "dead": 0})
        per[what] += 1
        setattr(self, what, getattr(self, what) + 1)


def due_rows(session: Session, now: dt.datetime, limit: int) -> list[tuple[int, str, str, str]]:
    """(outbox id, destination, stored file path, SOP Instance UID) of rows due now, oldest
    first."""
    rows = session.execute(
        select(
            OutboxItem.id,
            OutboxItem.destination,
            EmittedObject.path,
            EmittedObject.sop_instance_uid,
        )
        .join(EmittedObject, EmittedObject.id == OutboxItem.object_id)
        .where(OutboxItem.state.in_(UNSENT_STATES), OutboxItem.next_at <= now)
        .order_by(OutboxItem.next_at, OutboxItem.id)
        .limit(limit)
    ).all()
    return [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]


class Dispatcher:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings
        self.destinations = {d.name: d for d in settings.destinations}
        self.reports = reports_root(settings)  # the objects' stored paths are relative to it
        self._lock = threading.Lock()  # one run at a time (timer and wake-ups)

    def run(self) -> DispatchRun:
        """Send every due row (by destination, ``batch_size`` per association). Never raises
        for a peer's failure: each row records its outcome."""
        report = DispatchRun()
        if not self._lock.acquire(blocking=False):
            return report
        try:
            cfg = self.settings.dispatch
            with self.sessions() as session:
                rows = due_rows(session, utcnow(), 10 * cfg.batch_size)
            by_dest: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
            for row_id, dest, path, uid in rows:
                by_dest[dest].append((row_id, path, uid))
            for dest_name, items in by_dest.items():
                for start in range(0, len(items), cfg.batch_size):
                    self._send_batch(dest_name, items[start : start + cfg.batch_size], report)
        finally:
            self._lock.release()
        if report.sent or report.failed:
            logger.info(
                "dispatch: %d sent, %d failed (%d now dead)",
                report.sent,
                report.failed,
                report.dead,
            )
        return report

    def _send_batch(
        self, dest_name: str, items: list[tuple[int, str, str]], report: DispatchRun
    ) -> None:
        dest = self.destinations.get(dest_name)
        if dest is None:
            for row_id, _, _ in items:
                self._failed(row_id, dest_name, None, "destination is not configured", report)
            return
        try:
            outcomes = self._store(dest, [self.reports.resolve(p) for _, p, _ in items])
        except AssociationFailed as exc:
            for row_id, _, _ in items:
                self._failed(row_id, dest_name, None, f"{dest.host}:{dest.port}: {exc}", report)
            return
        except Exception as exc:  # network errors, TLS errors: the rows retry
            msg = f"{dest.host}:{dest.port}: {type(exc).__name__}: {exc}"
            logger.warning("dispatch to %s failed: %s", dest_name, msg)
            for row_id, _, _ in items:
                self._failed(row_id, dest_name, None, msg, report)
            return
        for (row_id, _, uid), outcome in zip(items, outcomes, strict=True):
            if outcome.stored:
                self._sent(row_id, outcome, dest_name, report)
                logger.info("dispatch: %s sent to %s (row %s)", uid, dest_name, row_id)
            else:
                why = outcome.error or "refused"
                if outcome.status is not None:
                    why = f"status 0x{outcome.status:04X}" + (
                        f": {outcome.error}" if outcome.error else ""
                    )
                self._failed(row_id, dest_name, outcome.status, why, report)

    def _store(self, dest: Destination, paths: list[Path]) -> list[StoreOutcome]:
        tls = (
            client_tls_context(dest.ca_certificates, dest.certificate, dest.private_key)
            if dest.tls
            else None
        )
        return store_uncompressed(
            dest.host,
            dest.port,
            dest.ae_title,
            paths,
            calling_ae=dest.calling_ae_title or self.settings.node.ae_title,
            tls=tls,
            timeout=self.settings.dispatch.timeout_seconds,
        )

    def _sent(self, row_id: int, outcome: StoreOutcome, dest: str, report: DispatchRun) -> None:
        with self.sessions.begin() as session:
            row = session.get(OutboxItem, row_id)
            if row is None:
                return
            now = utcnow()
            row.state = DispatchState.SENT
            row.attempts += 1
            row.last_status = outcome.status
            row.sent_at = now
            row.updated_at = now
            _audit(session, row, "sent", dest)
        report.count(dest, "sent")

    def _failed(
        self, row_id: int, dest: str, status: int | None, error: str, report: DispatchRun
    ) -> None:
        cfg = self.settings.dispatch
        with self.sessions.begin() as session:
            row = session.get(OutboxItem, row_id)
            if row is None or row.state not in UNSENT_STATES:
                return
            now = utcnow()
            row.attempts += 1
            row.last_status = status
            row.last_error = error[:2000]
            row.updated_at = now
            if row.attempts >= cfg.max_attempts:
                row.state = DispatchState.DEAD
                _audit(session, row, "dead", dest, attempts=row.attempts, error=error[:500])
                logger.error(
                    "dispatch: outbox row %s to %s is dead after %d tries: %s",
                    row_id,
                    dest,
                    row.attempts,
                    error,
                )
                report.count(dest, "dead")
            else:
                row.state = DispatchState.RETRYING
                row.next_at = now + dt.timedelta(seconds=backoff_seconds(row.attempts, cfg))
                logger.warning(
                    "dispatch: outbox row %s to %s failed (try %d of %d), next try at %s: %s",
                    row_id,
                    dest,
                    row.attempts,
                    cfg.max_attempts,
                    row.next_at.isoformat(timespec="seconds"),
                    error,
                )
        report.count(dest, "failed")
