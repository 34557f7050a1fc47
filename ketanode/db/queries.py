"""Read-side queries for the CLI and the dashboard: plain dicts, JSON-ready. The helpers
that make a row (:func:`iso_time`, :func:`patient_of`) serve ``db/results.py`` too."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from ketanode.db.models import Association, Instance, Job, JobStep, Series, StoreFailure, Study
from ketanode.roots import Root


def iso_time(value: dt.datetime | None) -> str | None:
    """A timestamp of a row as ISO 8601 text to the millisecond; ``None`` stays ``None``."""
    return value.isoformat(timespec="milliseconds") if value else None


def patient_of(study: Study) -> dict[str, str | None]:
    """The patient identifiers of a study (only for a caller that asked for them)."""
    return {
        "name": study.patient_name,
        "id": study.patient_id,
        "birth_date": study.patient_birth_date,
        "accession": study.accession_number,
    }


def counts_by(session: Session, column: Any) -> dict[str, int]:
    return {
        str(k): int(v) for k, v in session.execute(select(column, func.count()).group_by(column))
    }


def status(session: Session) -> dict[str, Any]:
    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=24)
    return {
        "series_by_state": counts_by(session, Series.state),
        "jobs_by_state": counts_by(session, Job.state),
        "instances": int(session.scalar(select(func.count()).select_from(Instance)) or 0),
        "associations_24h": {
            str(k): int(v)
            for k, v in session.execute(
                select(Association.outcome, func.count())
                .where(Association.started_at >= since)
                .group_by(Association.outcome)
            )
        },
        "store_failures_24h": int(
            session.scalar(
                select(func.count())
                .select_from(StoreFailure)
                .where(StoreFailure.received_at >= since)
            )
            or 0
        ),
        "last_instance_at": iso_time(session.scalar(select(func.max(Instance.received_at)))),
    }


def series_row(series: Series) -> dict[str, Any]:
    return {
        "id": series.id,
        "series_uid": series.series_uid,
        "study_uid": series.study.study_uid,
        "modality": series.modality,
        "description": series.description,
        "state": series.state,
        "reason": series.reason,
        "n_instances": series.n_instances,
        "expected_instances": series.expected_instances,
        "generation": series.generation,
        "first_received_at": iso_time(series.first_received_at),
        "last_received_at": iso_time(series.last_received_at),
        "completed_at": iso_time(series.completed_at),
        "completion_trigger": series.completion_trigger,
    }


def list_series(
    session: Session, state: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    query = select(Series).order_by(Series.id.desc()).limit(limit)
    if state:
        query = query.where(Series.state == state)
    return [series_row(s) for s in session.scalars(query)]


def find_series(session: Session, key: str) -> Series | None:
    if key.isdigit():
        found = session.get(Series, int(key))
        if found is not None:
            return found
    return session.scalar(select(Series).where(or_(Series.series_uid == key)))


def job_row(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "series_id": job.series_id,
        "state": job.state,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "created_at": iso_time(job.created_at),
        "started_at": iso_time(job.started_at),
        "finished_at": iso_time(job.finished_at),
        "failed_step": job.failed_step,
        "error": job.error,
        "steps": [step_row(s) for s in job.steps],
    }


def step_row(step: JobStep) -> dict[str, Any]:
    return {
        "name": step.name,
        "attempt": step.attempt,
        "ok": step.ok,
        "seconds": step.seconds,
        "detail": step.detail,
        "error": step.error,
    }


def series_detail(session: Session, series: Series, with_patient: bool = False) -> dict[str, Any]:
    out = series_row(series)
    out.update(
        {
            "sop_class_uid": series.sop_class_uid,
            "protocol_name": series.protocol_name,
            "manufacturer": series.manufacturer,
            "image_type": series.image_type,
            "mr_acquisition_type": series.mr_acquisition_type,
            "voxel_mm": [
                series.pixel_spacing_row,
                series.pixel_spacing_col,
                series.spacing_between_slices or series.slice_thickness,
            ],
            "selection": series.selection,
            "jobs": [job_row(j) for j in sorted(series.jobs, key=lambda j: j.id)],
        }
    )
    if with_patient:
        out["patient"] = patient_of(series.study)
    return out


def list_jobs(session: Session, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if state:
        query = query.where(Job.state == state)
    return [job_row(j) for j in session.scalars(query)]


def list_failures(
    session: Session, limit: int = 50, *, spool: Root | None = None
) -> list[dict[str, Any]]:
    """Refused C-STOREs, newest first; with ``spool`` (the spool's root) the kept dataset's
    path is its file on this host, else the stored path (relative to the spool)."""
    query = select(StoreFailure).order_by(StoreFailure.id.desc()).limit(limit)
    return [
        {
            "id": f.id,
            "association_id": f.association_id,
            "status": f"0x{f.status:04X}",
            "reason": f.reason,
            "sop_instance_uid": f.sop_instance_uid,
            "quarantine_path": (
                str(spool.resolve(f.quarantine_path))
                if spool and f.quarantine_path
                else f.quarantine_path
            ),
            "received_at": iso_time(f.received_at),
        }
        for f in session.scalars(query)
    ]


def list_associations(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    query = select(Association).order_by(Association.id.desc()).limit(limit)
    return [
        {
            "id": a.id,
            "calling_ae": a.calling_ae,
            "called_ae": a.called_ae,
            "peer": f"{a.peer_address}:{a.peer_port}",
            "tls": a.tls,
            "outcome": a.outcome,
            "reason": a.reason,
            "stored": a.n_stored,
            "duplicates": a.n_duplicate,
            "failed": a.n_failed,
            "started_at": iso_time(a.started_at),
            "ended_at": iso_time(a.ended_at),
        }
        for a in session.scalars(query)
    ]


def study_count(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Study)) or 0)
