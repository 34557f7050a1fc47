"""Results and the outbox for the CLI and the dashboard: plain dicts, JSON-ready.

Patient identifiers (name, ID, birth date, accession number) are in a row only when the
caller asks with ``with_patient=True``; filtering by patient ID or accession
(:class:`ResultFilter`) never puts them in the output. Dates filter on the result's creation
time, in UTC, both ends inclusive.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from ketanode.db.models import (
    DispatchState,
    EmittedObject,
    ModelRecord,
    ObjectKind,
    OutboxItem,
    Result,
    Series,
    Study,
    utcnow,
)
from ketanode.db.queries import iso_time, patient_of
from ketanode.db.session import rowcount
from ketanode.roots import Root

PATIENT_FIELDS = ("patient_name", "patient_id", "patient_birth_date", "accession_number")
# the columns of an exported row before the volumes (and the patient identifiers, if asked)
EXPORT_COLUMNS = (
    "id",
    "created_at",
    "series_id",
    "series_uid",
    "study_uid",
    "status",
    "predicted_class",
    "probability",
    "decision_value",
    "model_sha256",
    "model_name",
    "synthetic",
    "model_label",
    "qc_outcome",
    "reason",
    "current",
    "processing_seconds",
    "sr_uid",
    "report_uid",
    "dispatch",
)


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


@dataclass(frozen=True, kw_only=True)
class ResultFilter:
    """Which results a list or an export holds (every field set narrows it; the default:
    the current results). ``since`` and ``until`` are days of the result's creation, in UTC,
    both inclusive; ``model`` is a SHA-256 prefix; ``current_only=False`` adds the superseded
    results (the series was received again and scored anew)."""

    since: dt.date | None = None
    until: dt.date | None = None
    status: str | None = None
    model: str | None = None
    patient_id: str | None = None
    accession: str | None = None
    predicted_class: str | None = None
    current_only: bool = True


def _found(
    session: Session, filters: ResultFilter | None, limit: int | None
) -> list[tuple[Result, Series, Study]]:
    """The results ``filters`` selects, with their series and study, newest first."""
    f = filters or ResultFilter()
    query = (
        select(Result, Series, Study)
        .join(Series, Series.id == Result.series_id)
        .join(Study, Study.id == Series.study_id)
        .order_by(Result.created_at.desc(), Result.id.desc())
    )
    if f.since is not None:
        query = query.where(Result.created_at >= _day_start(f.since))
    if f.until is not None:
        query = query.where(Result.created_at < _day_start(f.until) + dt.timedelta(days=1))
    if f.status:
        query = query.where(Result.status == f.status)
    if f.model:
        query = query.where(Result.model_sha256.startswith(f.model.lower(), autoescape=True))
    if f.patient_id:
        query = query.where(Study.patient_id == f.patient_id)
    if f.accession:
        query = query.where(Study.accession_number == f.accession)
    if f.predicted_class:
        query = query.where(Result.predicted_class == f.predicted_class)
    if f.current_only:
        query = query.where(Result.current.is_(True))
    if limit is not None:
        query = query.limit(limit)
    return [(r, se, st) for r, se, st in session.execute(query)]


def _dispatch_text(states: dict[str, int]) -> str:
    total = sum(states.values())
    if total == 0:
        return "not queued"
    text = f"{states.get(DispatchState.SENT, 0)}/{total} sent"
    for state in (DispatchState.DEAD, DispatchState.RETRYING, DispatchState.PENDING):
        if states.get(state):
            text += f", {states[state]} {state}"
    return text


def _objects_of(
    session: Session, result_ids: list[int]
) -> tuple[dict[int, dict[str, str]], dict[int, dict[str, int]]]:
    """Per result: {kind: SOP Instance UID} and {outbox state: count}."""
    uids: dict[int, dict[str, str]] = defaultdict(dict)
    states: dict[int, dict[str, int]] = defaultdict(dict)
    if not result_ids:
        return uids, states
    for result_id, kind, uid in session.execute(
        select(EmittedObject.result_id, EmittedObject.kind, EmittedObject.sop_instance_uid)
        .where(EmittedObject.result_id.in_(result_ids))
        .order_by(EmittedObject.id)
    ):
        uids[int(result_id)].setdefault(str(kind), str(uid))
    for result_id, state, n in session.execute(
        select(EmittedObject.result_id, OutboxItem.state, func.count())
        .join(OutboxItem, OutboxItem.object_id == EmittedObject.id)
        .where(EmittedObject.result_id.in_(result_ids))
        .group_by(EmittedObject.result_id, OutboxItem.state)
    ):
        states[int(result_id)][str(state)] = int(n)
    return uids, states


def _row(
    result: Result,
    series: Series,
    study: Study,
    uids: dict[str, str],
    states: dict[str, int],
    with_patient: bool,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": result.id,
        "created_at": iso_time(result.created_at),
        "series_id": series.id,
        "series_uid": series.series_uid,
        "study_uid": study.study_uid,
        "status": result.status,
        "predicted_class": result.predicted_class,
        "probability": result.probability,
        "decision_value": result.decision_value,
        "model_sha256": result.model_sha256,
        "model_name": result.model_name,
        "synthetic": result.model_synthetic,
        "model_label": result.model_label,
        "qc_outcome": result.qc_outcome,
        "reason": result.reason,
        "current": result.current,
        "processing_seconds": result.processing_seconds,
        "sr_uid": uids.get(ObjectKind.SR),
        "report_uid": uids.get(ObjectKind.REPORT_IMAGE),
        "dispatch": _dispatch_text(states),
    }
    if with_patient:
        row.update(
            {
                "patient_name": study.patient_name,
                "patient_id": study.patient_id,
                "patient_birth_date": study.patient_birth_date,
                "accession_number": study.accession_number,
            }
        )
    return row


def _rows(
    session: Session, found: list[tuple[Result, Series, Study]], with_patient: bool
) -> list[dict[str, Any]]:
    uids, states = _objects_of(session, [r.id for r, _, _ in found])
    return [_row(r, se, st, uids[r.id], states[r.id], with_patient) for r, se, st in found]


def list_results(
    session: Session,
    filters: ResultFilter | None = None,
    *,
    limit: int | None = 50,
    with_patient: bool = False,
) -> list[dict[str, Any]]:
    """The results ``filters`` selects (default: the current ones), newest first."""
    return _rows(session, _found(session, filters, limit), with_patient)


def export_rows(
    session: Session,
    filters: ResultFilter | None = None,
    *,
    limit: int | None = None,
    with_patient: bool = False,
) -> list[dict[str, Any]]:
    """The rows of :func:`list_results` made flat for CSV: every row has the same keys, one
    ``vol_<feature>`` column per volume any row has (empty where a result has none)."""
    found = _found(session, filters, limit)
    rows = _rows(session, found, with_patient)
    features = sorted({str(k) for r, _, _ in found for k in (r.volumes or {})})
    columns = list(EXPORT_COLUMNS) + (list(PATIENT_FIELDS) if with_patient else [])
    out = []
    for row, (result, _, _) in zip(rows, found, strict=True):
        flat = {c: row.get(c) for c in columns}
        volumes = result.volumes or {}
        flat.update({f"vol_{f}": volumes.get(f) for f in features})
        out.append(flat)
    return out


def find_result(session: Session, key: str) -> Result | None:
    """A result by row id, by the SOP Instance UID of an object it produced (the SR or the
    report image), or by Series Instance UID (that series' current result, else its newest)."""
    key = key.strip()
    if key.isdigit():
        found = session.get(Result, int(key))
        if found is not None:
            return found
    by_object = session.scalar(
        select(Result)
        .join(EmittedObject, EmittedObject.result_id == Result.id)
        .where(EmittedObject.sop_instance_uid == key)
    )
    if by_object is not None:
        return by_object
    return session.scalar(
        select(Result)
        .join(Series, Series.id == Result.series_id)
        .where(Series.series_uid == key)
        .order_by(Result.current.desc(), Result.created_at.desc(), Result.id.desc())
        .limit(1)
    )


def _outbox_row(item: OutboxItem, obj: EmittedObject, synthetic: bool) -> dict[str, Any]:
    return {
        "id": item.id,
        "kind": obj.kind,
        "sop_instance_uid": obj.sop_instance_uid,
        "study_uid": obj.study_uid,
        "destination": item.destination,
        "state": item.state,
        "attempts": item.attempts,
        "next_at": iso_time(item.next_at),
        "last_status": item.last_status,
        "last_error": item.last_error,
        "sent_at": iso_time(item.sent_at),
        "result_id": obj.result_id,
        "synthetic": synthetic,
    }


def decision_rule(session: Session, model_sha256: str | None) -> dict[str, Any] | None:
    """The decision rule of a registered model (threshold, margin, the training cohort's
    response rate), as its sealed metadata records it; None for an unknown model."""
    if not model_sha256:
        return None
    meta = session.scalar(
        select(ModelRecord.model_metadata).where(ModelRecord.sha256 == model_sha256)
    )
    rule = (meta or {}).get("decision_rule")
    if not isinstance(rule, dict):
        return None
    return {k: rule.get(k) for k in ("threshold", "margin", "training_response_rate")}


def result_detail(
    session: Session,
    result: Result,
    with_patient: bool = False,
    *,
    reports: Root | None = None,
) -> dict[str, Any]:
    """Everything about one result: its row, model, QC checks, volumes, contributions, the
    objects it produced (files, outbox rows) and the other results of the same series.
    With ``reports`` (the reports folder), each object's path is its file on this host; else
    the stored path (relative to the reports folder)."""
    series = session.get(Series, result.series_id)
    assert series is not None
    study = series.study
    uids, states = _objects_of(session, [result.id])
    out = _row(result, series, study, uids[result.id], states[result.id], with_patient)
    out.update(
        {
            "job_id": result.job_id,
            "prediction_id": result.prediction_id,
            "software_version": result.software_version,
            "job_started_at": iso_time(result.job_started_at),
            "series_description": series.description,
            "modality": series.modality,
            "qc_checks": result.qc_checks,
            "volumes": result.volumes,
            "contributions": result.contributions,
            "objects": [
                {
                    "id": obj.id,
                    "kind": obj.kind,
                    "sop_class_uid": obj.sop_class_uid,
                    "sop_instance_uid": obj.sop_instance_uid,
                    "series_uid": obj.series_uid,
                    "study_uid": obj.study_uid,
                    "path": str(reports.resolve(obj.path)) if reports else obj.path,
                    "size_bytes": obj.size_bytes,
                    "sha256": obj.sha256,
                    "created_at": iso_time(obj.created_at),
                    "purged_at": iso_time(obj.purged_at),
                    "outbox": [
                        _outbox_row(item, obj, result.model_synthetic)
                        for item in sorted(obj.outbox, key=lambda i: i.id)
                    ],
                }
                for obj in result.objects
            ],
        }
    )
    others = [
        (r, series, study)
        for r in session.scalars(
            select(Result)
            .where(Result.series_id == result.series_id, Result.id != result.id)
            .order_by(Result.created_at.desc(), Result.id.desc())
        )
    ]
    out["other_results"] = _rows(session, others, with_patient=False)
    out["decision_rule"] = decision_rule(session, result.model_sha256)
    if with_patient:
        out["patient"] = patient_of(study)
    return out


def list_outbox(
    session: Session,
    state: str | None = None,
    destination: str | None = None,
    limit: int | None = 50,
) -> list[dict[str, Any]]:
    """Outbox rows (object x destination), newest first."""
    query = (
        select(OutboxItem, EmittedObject, Result.model_synthetic)
        .join(EmittedObject, EmittedObject.id == OutboxItem.object_id)
        .join(Result, Result.id == EmittedObject.result_id)
        .order_by(OutboxItem.id.desc())
    )
    if state:
        query = query.where(OutboxItem.state == state)
    if destination:
        query = query.where(OutboxItem.destination == destination)
    if limit is not None:
        query = query.limit(limit)
    return [_outbox_row(item, obj, bool(syn)) for item, obj, syn in session.execute(query)]


@dataclass(frozen=True)
class Requeued:
    """What :func:`requeue` did: rows put back to ``pending``, and matching rows it left as
    they were because their object's file was purged by retention (a send could only fail)."""

    requeued: int
    skipped_purged: int = 0


def requeue(
    session: Session,
    *,
    ids: list[int] | None = None,
    dead: bool = False,
    destination: str | None = None,
    resend: bool = False,
) -> Requeued:
    """Put outbox rows back to ``pending`` (attempts 0, due now; ``last_error`` kept) so the
    dispatcher sends them again; returns how many rows changed and how many were skipped.

    The rows: those named by ``ids`` (every row when none are named) that are dead or
    retrying (with ``dead``: dead only), narrowed to ``destination`` if given. Pending rows
    are left alone; a sent row is sent again only when ``ids`` names it and ``resend`` is set.
    A row whose object's file retention removed (``EmittedObject.purged_at`` set) is refused:
    it is left as it is and counted in ``skipped_purged``. In the caller's transaction
    (commit it). Raises ValueError when neither ``ids`` nor ``dead`` is given, or ``resend``
    without ``ids``.
    """
    if not ids and not dead:
        raise ValueError("nothing to re-queue: name outbox row ids, or ask for the dead rows")
    if resend and not ids:
        raise ValueError("a sent row is sent again only when named by its id")
    states: list[str] = (
        [DispatchState.DEAD] if dead else [DispatchState.DEAD, DispatchState.RETRYING]
    )
    if resend:
        states.append(DispatchState.SENT)
    matching: list[ColumnElement[bool]] = [OutboxItem.state.in_(states)]
    if ids:
        matching.append(OutboxItem.id.in_(ids))
    if destination:
        matching.append(OutboxItem.destination == destination)
    purged_objects = select(EmittedObject.id).where(EmittedObject.purged_at.is_not(None))
    skipped = session.scalar(
        select(func.count())
        .select_from(OutboxItem)
        .where(*matching, OutboxItem.object_id.in_(purged_objects))
    )
    now = utcnow()
    stmt = (
        update(OutboxItem)
        .where(*matching, OutboxItem.object_id.not_in(purged_objects))
        .values(state=DispatchState.PENDING, attempts=0, next_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return Requeued(rowcount(session.execute(stmt)), int(skipped or 0))
