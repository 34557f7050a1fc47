"""The job queue in the database: enqueue, claim with a lease, renew, finish, recover.

The job row is the source of truth. A claim is a conditional UPDATE (state still
'queued'), which is safe on SQLite and PostgreSQL and with several worker processes.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import uuid
from dataclasses import dataclass

from sqlalchemy import ColumnElement, case, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from ketanode.db.models import (
    ACTIVE_JOB_STATES,
    Job,
    JobLane,
    JobState,
    Series,
    SeriesState,
    utcnow,
)
from ketanode.db.session import rowcount

logger = logging.getLogger(__name__)


def new_owner() -> str:
    """A lease owner id: host, pid and a random part (a restarted pid is a new owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_is_dead(owner: str | None) -> bool:
    if not owner:
        return True
    try:
        host, pid_text, _ = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False  # another machine: only its lease expiry tells
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def enqueue(
    session: Session, series: Series, max_attempts: int, lane: JobLane = JobLane.LIVE
) -> Job:
    """A queued job for ``series`` (its id flushed), in the caller's transaction."""
    job = Job(
        series_id=series.id,
        series_generation=series.generation,
        state=JobState.QUEUED,
        attempt=0,
        max_attempts=max_attempts,
        lane=lane,
    )
    session.add(job)
    session.flush()
    return job


def claim_next(
    sessions: sessionmaker[Session], owner: str, lease_seconds: float
) -> tuple[int, int] | None:
    """Take the oldest queued job (live before batch); returns (its id, the attempt this
    claim started) or None. The attempt is what the claimant names when it ends the job."""
    for _ in range(5):
        with sessions() as session:
            job_id = session.scalar(
                select(Job.id)
                .where(Job.state == JobState.QUEUED)
                .order_by((Job.lane == JobLane.BATCH).asc(), Job.id)
                .limit(1)
            )
        if job_id is None:
            return None
        attempt = claim_job_attempt(sessions, job_id, owner, lease_seconds)
        if attempt is not None:
            return job_id, attempt
    return None


def claim_job_attempt(
    sessions: sessionmaker[Session], job_id: int, owner: str, lease_seconds: float
) -> int | None:
    """Take one job by id, if it is still queued: the conditional UPDATE that makes a
    message delivered twice, or a job published twice, run once. Returns the attempt this
    claim started (what the claimant names when it ends the job), or None: not claimed."""
    with sessions.begin() as session:
        now = utcnow()
        taken = rowcount(
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.QUEUED)
                .values(
                    state=JobState.RUNNING,
                    lease_owner=owner,
                    lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                    attempt=Job.attempt + 1,
                    started_at=now,
                    error=None,
                    failed_step=None,
                )
            )
        )
        if not taken:
            return None
        job = session.get(Job, job_id)
        assert job is not None
        session.execute(
            update(Series)
            .where(
                Series.id == job.series_id,
                Series.generation == job.series_generation,
                Series.state == SeriesState.QUEUED,
            )
            .values(state=SeriesState.PROCESSING)
        )
        return job.attempt


def _running_under(job_id: int, owner: str, attempt: int | None) -> list[ColumnElement[bool]]:
    """The row a lease holder believes is its own: still running, under this owner, and
    under this attempt when the holder knows it (the conditions of every write that ends or
    extends a claim)."""
    conditions = [Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == owner]
    if attempt is not None:
        conditions.append(Job.attempt == attempt)
    return conditions


class LeaseLost(RuntimeError):
    """A job's lease is no longer this worker's (it expired and the job was claimed again):
    what the worker was about to write is not written."""


def hold_lease(
    session: Session, job_id: int, owner: str, attempt: int, lease_seconds: float
) -> None:
    """In the caller's transaction, before it writes what a job produced: the claim's
    conditional UPDATE again (this owner, this attempt, still running). It renews the lease
    and locks the job's row until the commit (no claim can take the job in between), or
    raises :class:`LeaseLost` when another worker holds the job now."""
    held = rowcount(
        session.execute(
            update(Job)
            .where(*_running_under(job_id, owner, attempt))
            .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False)
        )
    )
    if not held:
        raise LeaseLost(
            f"job {job_id}: attempt {attempt} no longer holds the lease (another worker has "
            "the job); nothing written"
        )


def to_publish(
    session: Session, now: dt.datetime, republish_after_seconds: float, limit: int = 500
) -> list[tuple[int, str]]:
    """(job id, lane) of queued jobs never published, or published longer ago than
    ``republish_after_seconds`` and still not claimed (live first, then oldest)."""
    cutoff = now - dt.timedelta(seconds=republish_after_seconds)
    rows = session.execute(
        select(Job.id, Job.lane)
        .where(
            Job.state == JobState.QUEUED,
            or_(Job.published_at.is_(None), Job.published_at < cutoff),
        )
        .order_by((Job.lane == JobLane.BATCH).asc(), Job.id)
        .limit(limit)
    ).all()
    return [(int(r[0]), str(r[1])) for r in rows]


def mark_published(sessions: sessionmaker[Session], job_ids: list[int]) -> None:
    """Record that these jobs' ids went to the broker (only while they are still queued)."""
    if not job_ids:
        return
    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.state == JobState.QUEUED)
            .values(published_at=utcnow(), publish_count=Job.publish_count + 1)
        )


def renew(sessions: sessionmaker[Session], owner: str, lease_seconds: float) -> int:
    """Extend the leases of every job this owner is running."""
    with sessions.begin() as session:
        return rowcount(
            session.execute(
                update(Job)
                .where(Job.lease_owner == owner, Job.state == JobState.RUNNING)
                .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds))
            )
        )


def finish(
    sessions: sessionmaker[Session],
    job_id: int,
    owner: str,
    ok: bool,
    failed_step: str | None = None,
    error: str | None = None,
    attempt: int | None = None,
) -> bool:
    """Record the end of a job; False when the lease was lost (the recovery sweep took the
    job back, or another claim holds it now): then nothing is written.

    One conditional UPDATE on what this worker believes the row to be (still running, this
    owner, and this attempt when the caller knows it), like the claim: a recovery sweep or
    another claim that got there first makes it match no row, and the loser learns it."""
    with sessions.begin() as session:
        now = utcnow()
        ended = rowcount(
            session.execute(
                update(Job)
                .where(*_running_under(job_id, owner, attempt))
                .values(
                    state=JobState.DONE if ok else JobState.FAILED,
                    finished_at=now,
                    failed_step=failed_step,
                    error=error,
                    lease_expires_at=None,
                )
                .execution_options(synchronize_session=False)
            )
        )
        if not ended:
            logger.warning("job %s: lease lost before it finished; result not recorded", job_id)
            return False
        _set_series(
            session,
            job_id,
            SeriesState.DONE if ok else SeriesState.FAILED,
            only_from=_IN_WORK,
            reason=None if ok else f"{failed_step}: {error}",
        )
        return True


# The states of a series whose (live) job is queued or running: only those follow the job.
_IN_WORK = (SeriesState.QUEUED, SeriesState.PROCESSING)


def _set_series(
    session: Session,
    job_id: int,
    state: SeriesState,
    only_from: tuple[SeriesState, ...] | None,
    reason: str | None = None,
) -> None:
    """The job's series to ``state``, if the job still belongs to its current generation
    (and the series is in one of ``only_from``): one conditional UPDATE, in the transaction
    whose conditional UPDATE of the job just matched (the job's row is this writer's)."""
    row = session.execute(
        select(Job.series_id, Job.series_generation).where(Job.id == job_id)
    ).one()
    conditions = [Series.id == row[0], Series.generation == row[1]]
    if only_from is not None:
        conditions.append(Series.state.in_(only_from))
    values: dict[str, object] = {"state": state}
    if reason is not None:
        values["reason"] = reason
    session.execute(
        update(Series)
        .where(*conditions)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def release(
    sessions: sessionmaker[Session],
    job_id: int,
    owner: str,
    reason: str,
    attempt: int | None = None,
) -> bool:
    """Give a running job back to the queue (the node is stopping); the try is not counted.
    A conditional UPDATE like :func:`finish`: False (nothing written) when the job is no
    longer this owner's running job."""
    with sessions.begin() as session:
        released = rowcount(
            session.execute(
                update(Job)
                .where(*_running_under(job_id, owner, attempt))
                .values(
                    state=JobState.QUEUED,
                    attempt=case((Job.attempt > 0, Job.attempt - 1), else_=0),
                    lease_owner=None,
                    lease_expires_at=None,
                    published_at=None,
                    error=reason,
                )
                .execution_options(synchronize_session=False)
            )
        )
        if not released:
            return False
        _set_series(session, job_id, SeriesState.QUEUED, only_from=(SeriesState.PROCESSING,))
        return True


@dataclass(frozen=True)
class _Stale:
    """A running job as the recovery sweep read it."""

    job_id: int
    owner: str | None
    attempt: int
    max_attempts: int
    expired: bool


def recover(sessions: sessionmaker[Session]) -> int:
    """Re-queue running jobs whose owner died or whose lease expired; fail those out of tries.

    The sweep reads the running jobs, then takes each back with one conditional UPDATE on
    what it read (still running, the same owner and attempt, and the lease still expired
    when that was the reason): a job that finished, renewed its lease or was taken back by
    another sweep (two schedulers) in between matches no row and is skipped. Returns how
    many jobs this sweep re-queued or failed."""
    now = utcnow()
    with sessions() as session:
        rows = session.execute(
            select(
                Job.id, Job.lease_owner, Job.attempt, Job.max_attempts, Job.lease_expires_at
            ).where(Job.state == JobState.RUNNING)
        ).all()
    stale: list[_Stale] = []
    for job_id, owner, attempt, max_attempts, expires in rows:
        expired = expires is not None and expires < now
        if expired or _owner_is_dead(owner):
            stale.append(_Stale(int(job_id), owner, int(attempt), int(max_attempts), expired))
    if not stale:
        return 0
    recovered = 0
    with sessions.begin() as session:
        for job in stale:
            if _take_back(session, job, now):
                recovered += 1
    return recovered


def _take_back(session: Session, job: _Stale, now: dt.datetime) -> bool:
    conditions = [
        Job.id == job.job_id,
        Job.state == JobState.RUNNING,
        Job.lease_owner.is_(None) if job.owner is None else Job.lease_owner == job.owner,
        Job.attempt == job.attempt,
    ]
    if job.expired:
        conditions.append(Job.lease_expires_at < now)
    failed = job.attempt >= job.max_attempts
    if failed:
        error = f"worker died during attempt {job.attempt} of {job.max_attempts}"
        values: dict[str, object] = {
            "state": JobState.FAILED,
            "error": error,
            "failed_step": "recovery",
            "finished_at": now,
        }
    else:
        error = f"re-queued after attempt {job.attempt}: worker died or lease expired"
        values = {"state": JobState.QUEUED, "error": error, "published_at": None}
    taken = rowcount(
        session.execute(
            update(Job)
            .where(*conditions)
            .values(lease_owner=None, lease_expires_at=None, **values)
            .execution_options(synchronize_session=False)
        )
    )
    if not taken:
        logger.info(
            "job %s: changed since the recovery sweep read it (finished, renewed or taken back "
            "by another sweep); skipped",
            job.job_id,
        )
        return False
    # Only a series this job was processing follows it: a batch (reprocessing) job leaves
    # its series done or failed, with its current result, as the job itself would.
    if failed:
        _set_series(
            session, job.job_id, SeriesState.FAILED, only_from=_IN_WORK, reason=f"recovery: {error}"
        )
    else:
        _set_series(session, job.job_id, SeriesState.QUEUED, only_from=_IN_WORK)
    logger.warning(
        "job %s recovered (%s)", job.job_id, JobState.FAILED if failed else JobState.QUEUED
    )
    return True


def enqueue_batch(
    sessions: sessionmaker[Session],
    series_ids: list[int],
    max_attempts: int,
    limit: int | None = None,
) -> list[int]:
    """Queue existing series again as batch work (reprocessing): a new job per series in
    the ``batch`` lane, which every worker takes after the live scans. The series keeps its
    state (its current result stays current until the new job writes one); a series with
    a queued or running job, or whose files retention removed, is left out. At most
    ``limit`` new jobs (in the order of ``series_ids``). Returns the new jobs' ids."""
    created: list[int] = []
    with sessions.begin() as session:
        for series_id in series_ids:
            if limit is not None and len(created) >= limit:
                break
            series = session.get(Series, series_id)
            if series is None or series.state not in (SeriesState.DONE, SeriesState.FAILED):
                continue
            if series.purged_at is not None:
                continue
            busy = session.scalar(
                select(Job.id).where(
                    Job.series_id == series_id,
                    Job.state.in_(ACTIVE_JOB_STATES),
                )
            )
            if busy is not None:
                continue
            created.append(enqueue(session, series, max_attempts, JobLane.BATCH).id)
    return created


def stop_batch(sessions: sessionmaker[Session], reason: str = "batch stopped") -> int:
    """Take every queued batch job out of the queue (running ones finish); returns how many.
    Their messages, if published, find nothing to claim."""
    with sessions.begin() as session:
        return rowcount(
            session.execute(
                update(Job)
                .where(Job.lane == JobLane.BATCH, Job.state == JobState.QUEUED)
                .values(state=JobState.SUPERSEDED, error=reason, finished_at=utcnow())
            )
        )
