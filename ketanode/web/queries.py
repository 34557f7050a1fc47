"""Read queries of the dashboard that the shared query modules (``ketanode/db/queries.py``,
``ketanode/db/results.py``, ``ketanode/admin/audit.py``) do not have: the data behind the
plots, the jobs page's series descriptions, a result's patient ID.

Times are grouped by UTC hour or day in SQL (``strftime`` on SQLite, ``to_char`` on
PostgreSQL), so an ingest plot does not load every instance row.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from ketanode.db.models import (
    Instance,
    Job,
    JobStep,
    Result,
    ResultStatus,
    Series,
    Study,
)

Unit = Literal["hour", "day"]


def _bucket(session: Session, column: Any, unit: Unit) -> ColumnElement[str]:
    """``column`` (a UTC timestamp) as text: 'YYYY-MM-DD' or 'YYYY-MM-DD HH:00'."""
    if session.get_bind().dialect.name == "postgresql":
        fmt = "YYYY-MM-DD HH24:00" if unit == "hour" else "YYYY-MM-DD"
        return func.to_char(func.timezone("UTC", column), fmt)
    return func.strftime("%Y-%m-%d %H:00" if unit == "hour" else "%Y-%m-%d", column)


def _since(days: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(days=days)


def results_per_day(session: Session, days: int = 30) -> list[tuple[str, str, int]]:
    """(day, outcome, count): outcome is the predicted class, or 'not scored'."""
    day = _bucket(session, Result.created_at, "day")
    rows = session.execute(
        select(day, Result.status, Result.predicted_class, func.count())
        .where(Result.created_at >= _since(days))
        .group_by(day, Result.status, Result.predicted_class)
        .order_by(day)
    ).all()
    out = []
    for d, status, cls, n in rows:
        outcome = str(cls) if status == ResultStatus.SCORED and cls else "not scored"
        out.append((str(d), outcome, int(n)))
    return out


def probabilities(session: Session, limit: int = 5000) -> list[tuple[float, str]]:
    """(probability, predicted class) of the newest scored results."""
    rows = session.execute(
        select(Result.probability, Result.predicted_class)
        .where(Result.status == ResultStatus.SCORED, Result.probability.is_not(None))
        .order_by(Result.id.desc())
        .limit(limit)
    ).all()
    return [(float(p), str(c)) for p, c in rows if p is not None]


def step_times(
    session: Session, days: int = 30, limit: int = 20000
) -> list[tuple[dt.datetime, str, float]]:
    """(started at, step name, seconds) of the job steps of the last ``days``."""
    rows = session.execute(
        select(JobStep.started_at, JobStep.name, JobStep.seconds)
        .where(JobStep.started_at >= _since(days))
        .order_by(JobStep.started_at.desc())
        .limit(limit)
    ).all()
    return [(t, str(n), float(s)) for t, n, s in rows]


def ingest(session: Session, unit: Unit, days: float) -> list[tuple[str, int]]:
    """(hour or day, instances received) over the last ``days``."""
    bucket = _bucket(session, Instance.received_at, unit)
    rows = session.execute(
        select(bucket, func.count())
        .where(Instance.received_at >= _since(days))
        .group_by(bucket)
        .order_by(bucket)
    ).all()
    return [(str(b), int(n)) for b, n in rows]


def job_series(session: Session, job_ids: list[int]) -> dict[int, str | None]:
    """Series description per job id (for the jobs page)."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(Job.id, Series.description)
        .join(Series, Series.id == Job.series_id)
        .where(Job.id.in_(job_ids))
    ).all()
    return {int(j): d for j, d in rows}


def patient_id_of_result(session: Session, result_id: int) -> str | None:
    """The patient ID of a result's study (shown on the result page only)."""
    found = session.scalar(
        select(Study.patient_id)
        .join(Series, Series.study_id == Study.id)
        .join(Result, Result.series_id == Series.id)
        .where(Result.id == result_id)
    )
    return str(found) if found else None
