"""Association life cycle: the calling-AE allow-list and the association rows."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable

from pynetdicom.events import Event
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from ketanode.admin.audit import AuditKind, record
from ketanode.config import NodeSettings
from ketanode.db.models import Association, AssociationOutcome, Instance, utcnow
from ketanode.db.session import rowcount
from ketanode.logs import exception_summary, safe

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected-permanent, by the DUL service user
REJECT_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
DIAG_CALLING_AE_NOT_RECOGNISED = 0x03
DIAG_CALLED_AE_NOT_RECOGNISED = 0x07
# A-ASSOCIATE-RJ source "DUL service provider (presentation related)", diagnostic
# "local limit exceeded": pynetdicom's answer when max_associations are open.
SOURCE_PRESENTATION = 0x03
DIAG_LOCAL_LIMIT = 0x02
# How long a connection closed after the association's last answer waits for the
# association thread to record how it ended (it is a matter of microseconds).
_END_ANNOUNCED_SECONDS = 0.5


def _same_address(allowed: str, peer: str) -> bool:
    try:
        if "/" in allowed:
            return ipaddress.ip_address(peer) in ipaddress.ip_network(allowed, strict=False)
        return ipaddress.ip_address(allowed) == ipaddress.ip_address(peer)
    except ValueError:
        return allowed == peer


def caller_allowed(settings: NodeSettings, calling_ae: str, peer: str) -> bool:
    if not settings.require_allowed_caller:
        return True
    for caller in settings.allowed_callers:
        if caller.ae_title == calling_ae and (
            caller.address is None or _same_address(caller.address, peer)
        ):
            return True
    return False


def _stored_count(row_id: int) -> object:
    """Instances stored are counted from their rows at the end, not updated per C-STORE."""
    return (
        select(func.count())
        .select_from(Instance)
        .where(Instance.association_id == row_id)
        .scalar_subquery()
    )


def _stored_count_correlated() -> object:
    return (
        select(func.count())
        .select_from(Instance)
        .where(Instance.association_id == Association.id)
        .scalar_subquery()
    )


def _audit(session: Session, row: Association) -> None:
    """One audit row per association, in the transaction that ends (or rejects) it."""
    detail: dict[str, object] = {
        "called_ae": row.called_ae,
        "tls": row.tls,
        "stored": row.n_stored,
        "duplicate": row.n_duplicate,
        "failed": row.n_failed,
    }
    if row.reason:
        detail["reason"] = row.reason
    record(
        session,
        AuditKind.ASSOCIATION,
        row.calling_ae or "(none)",
        subject=f"association:{row.id}",
        outcome=row.outcome,
        address=row.peer_address,
        detail=detail,
    )


class AssociationLog:
    """Keeps one row per association and maps live pynetdicom associations to row ids."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: NodeSettings,
        node_name: str,
        tls: bool,
        on_ended: Callable[[int], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.node_name = node_name
        self.tls = tls
        self.on_ended = on_ended
        self._ids: dict[object, int] = {}
        self._lock = threading.Lock()

    def row_id(self, assoc: object) -> int | None:
        return self.key_row_id(id(assoc))

    def open_count(self) -> int:
        with self._lock:
            return len(self._ids)

    def _insert(self, event: Event, outcome: AssociationOutcome, reason: str | None) -> int:
        rq = event.assoc.requestor
        # The AE title the peer called (not ours): a wrong one is why a row was rejected.
        called = getattr(rq.primitive, "called_ae_title", None) or event.assoc.acceptor.ae_title
        return self._insert_row(
            str(rq.ae_title or ""),
            str(called or ""),
            str(rq.address),
            int(rq.port or 0),
            outcome,
            reason,
        )

    def _insert_row(
        self,
        calling: str,
        called: str,
        address: str,
        port: int,
        outcome: AssociationOutcome,
        reason: str | None,
    ) -> int:
        with self.sessions.begin() as session:
            row = Association(
                node_name=self.node_name,
                calling_ae=safe(calling.strip(), 16)[:16],
                called_ae=safe(called.strip(), 16)[:16],
                peer_address=safe(address, 64)[:64],
                peer_port=port,
                tls=self.tls,
                outcome=outcome,
                reason=reason,
                ended_at=utcnow() if outcome == AssociationOutcome.REJECTED else None,
            )
            session.add(row)
            session.flush()
            if outcome == AssociationOutcome.REJECTED:
                _audit(session, row)
            return row.id

    def handle_requested(self, event: Event) -> None:
        """EVT_REQUESTED: reject unknown callers and a wrong called AE before negotiation."""
        try:
            primitive = event.assoc.requestor.primitive
            if primitive is None:
                return
            calling = str(primitive.calling_ae_title or "").strip()
            called = str(primitive.called_ae_title or "").strip()
            peer = str(event.assoc.requestor.address)
            event.assoc.requestor.ae_title = calling
            reason = None
            diagnostic = 0
            if called != self.settings.ae_title:
                reason = (
                    f"called AE title '{safe(called, 32)}' is not this node's "
                    f"('{self.settings.ae_title}')"
                )
                diagnostic = DIAG_CALLED_AE_NOT_RECOGNISED
            elif not caller_allowed(self.settings, calling, peer):
                reason = (
                    f"calling AE title '{safe(calling, 32)}' from {safe(peer, 64)} "
                    "is not on the allow-list"
                )
                diagnostic = DIAG_CALLING_AE_NOT_RECOGNISED
            if reason is None:
                return
            logger.warning("association rejected: %s", reason)
            event.assoc.acse.send_reject(REJECT_PERMANENT, SOURCE_SERVICE_USER, diagnostic)
            try:
                self._insert(event, AssociationOutcome.REJECTED, reason)
            finally:
                # As pynetdicom does after its own rejections: wait until the DUL has sent
                # the A-ASSOCIATE-RJ, or the server closes the socket first and the peer
                # sees an abort instead of the rejection and its reason.
                event.assoc.kill()
        except Exception as exc:
            logger.error("association request check failed: %s", exception_summary(exc))

    def handle_rejected(self, event: Event) -> None:
        """EVT_REJECTED: pynetdicom's own rejections (the association limit, ACSE checks),
        recorded like the node's: a row, an audit event, a log line."""
        try:
            answer = event.assoc.acceptor.primitive
            source = getattr(answer, "result_source", None)
            diagnostic = getattr(answer, "diagnostic", None)
            if (source, diagnostic) == (SOURCE_PRESENTATION, DIAG_LOCAL_LIMIT):
                reason = (
                    f"association limit reached ({self.settings.max_associations} "
                    "associations open; node.max_associations)"
                )
            else:
                reason = (
                    f"rejected by the DICOM layer (result {getattr(answer, 'result', None)}, "
                    f"source {source}, diagnostic {diagnostic})"
                )
            logger.warning(
                "association from %s (%s) rejected: %s",
                safe(event.assoc.requestor.ae_title, 16),
                safe(event.assoc.requestor.address, 64),
                reason,
            )
            self._insert(event, AssociationOutcome.REJECTED, reason)
        except Exception as exc:
            logger.error("could not record a rejected association: %s", exception_summary(exc))

    def handle_accepted(self, event: Event) -> None:
        try:
            row_id = self._insert(event, AssociationOutcome.OPEN, None)
            with self._lock:
                self._ids[id(event.assoc)] = row_id
            logger.info(
                "association %s accepted from %s (%s)",
                row_id,
                safe(event.assoc.requestor.ae_title, 16),
                safe(event.assoc.requestor.address, 64),
            )
        except Exception as exc:
            logger.error("could not record an accepted association: %s", exception_summary(exc))

    # The same records for associations that another program (the native front end,
    # receive/frontend.py) accepted, rejected or ended: ``key`` names one of them.

    def opened(self, key: object, calling: str, called: str, address: str, port: int) -> None:
        """An association the front end accepted: its row, mapped from ``key``."""
        try:
            row_id = self._insert_row(calling, called, address, port, AssociationOutcome.OPEN, None)
            with self._lock:
                self._ids[key] = row_id
            logger.info(
                "association %s accepted from %s (%s)", row_id, safe(calling, 16), safe(address, 64)
            )
        except Exception as exc:
            logger.error("could not record an accepted association: %s", exception_summary(exc))

    def refused(self, calling: str, called: str, address: str, port: int, reason: str) -> None:
        """An association the front end rejected."""
        logger.warning("association rejected: %s", safe(reason, 300))
        try:
            self._insert_row(
                calling, called, address, port, AssociationOutcome.REJECTED, safe(reason, 300)
            )
        except Exception as exc:
            logger.error("could not record a rejected association: %s", exception_summary(exc))

    def key_row_id(self, key: object) -> int | None:
        with self._lock:
            return self._ids.get(key)

    def ended(self, key: object, aborted: bool) -> None:
        self._end_key(key, AssociationOutcome.ABORTED if aborted else AssociationOutcome.RELEASED)

    def _end(self, event: Event, outcome: AssociationOutcome) -> None:
        self._end_key(id(event.assoc), outcome)

    def _end_key(self, key: object, outcome: AssociationOutcome) -> None:
        with self._lock:
            row_id = self._ids.pop(key, None)
        if row_id is None:
            return
        try:
            with self.sessions.begin() as session:
                ended = session.execute(
                    update(Association)
                    .where(Association.id == row_id, Association.ended_at.is_(None))
                    .values(ended_at=utcnow(), outcome=outcome, n_stored=_stored_count(row_id))
                )
                row = session.get(Association, row_id) if rowcount(ended) == 1 else None
                if row is not None:
                    _audit(session, row)
            logger.info("association %s %s", row_id, outcome)
        except Exception as exc:
            logger.error(
                "could not record the end of association %s: %s", row_id, exception_summary(exc)
            )
        if self.on_ended is not None:
            try:
                self.on_ended(row_id)
            except Exception as exc:
                logger.error("association end notification failed: %s", exception_summary(exc))

    def handle_released(self, event: Event) -> None:
        self._end(event, AssociationOutcome.RELEASED)

    def handle_aborted(self, event: Event) -> None:
        self._end(event, AssociationOutcome.ABORTED)

    def handle_conn_closed(self, event: Event) -> None:
        # A peer that drops the connection without A-RELEASE or A-ABORT.
        assoc = event.assoc
        if getattr(getattr(assoc.dul, "state_machine", None), "current_state", None) == "Sta13":
            # Closed after the A-RELEASE-RP (or an A-ABORT) went out: the peer may close
            # before the association thread, which queued that answer, has announced the
            # end (EVT_RELEASED); it does so at once, without waiting for this thread.
            deadline = time.monotonic() + _END_ANNOUNCED_SECONDS
            while self.row_id(assoc) is not None and time.monotonic() < deadline:
                time.sleep(0.001)
        self._end(event, AssociationOutcome.ABORTED)
        if assoc.is_acceptor and assoc.requestor.primitive is None and not assoc.is_established:
            # Closed before its A-ASSOCIATE-RQ: pynetdicom's acceptor would wait for one until
            # the ACSE timeout, holding a slot of max_associations. An empty item wakes it as
            # that timeout would; it then closes the association at once.
            try:
                # pynetdicom types the queue for primitives only; its own ACSE timeout
                # path reads None the same way.
                assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]
            except Exception as exc:  # pragma: no cover (a queue put does not fail)
                logger.error("could not free a closed connection: %s", exception_summary(exc))

    def close_stale(self) -> int:
        """At start: associations this node left open when it died are aborted."""
        with self.sessions.begin() as session:
            stale = select(Association.id).where(
                Association.node_name == self.node_name, Association.ended_at.is_(None)
            )
            stale_ids = list(session.scalars(stale))
            result = session.execute(
                update(Association)
                .where(Association.node_name == self.node_name, Association.ended_at.is_(None))
                .values(
                    ended_at=utcnow(),
                    outcome=AssociationOutcome.ABORTED,
                    n_stored=_stored_count_correlated(),
                    reason="node stopped while the association was open",
                )
                .execution_options(synchronize_session=False)
            )
            for stale_id in stale_ids:
                row = session.get(Association, stale_id)
                if row is not None:
                    _audit(session, row)
            return rowcount(result)
