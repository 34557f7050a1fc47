"""The job queue on SQLite and PostgreSQL: one claimer per job, leases, crash recovery."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from ketanode.db.jobqueue import claim, enqueue, finish, new_owner, recover, renew
from ketanode.db.migrate import upgrade
from ketanode.db.models import Job, JobState, Series, SeriesState, Study, utcnow
from ketanode.db.session import make_engine, make_session_factory


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def _queued_series(sessions: sessionmaker[Session], n: int = 1, max_attempts: int = 3) -> list[int]:
    ids = []
    with sessions.begin() as session:
        study = Study(study_uid="1.2.3")
        session.add(study)
        session.flush()
        for i in range(n):
            series = Series(
                study_id=study.id,
                series_uid=f"1.2.3.{i}",
                state=SeriesState.QUEUED,
                n_instances=1,
                n_frames=1,
                generation=1,
            )
            session.add(series)
            session.flush()
            ids.append(enqueue(session, series, max_attempts).id)
    return ids


def test_each_job_is_claimed_once_by_concurrent_workers(sessions: sessionmaker[Session]) -> None:
    jobs = _queued_series(sessions, 12)
    claimed: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        owner = new_owner()
        while (job_id := claim(sessions, owner, 60)) is not None:
            with lock:
                claimed.append(job_id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(jobs)
    with sessions() as session:
        states = {s.state for s in session.query(Series)}
        assert states == {SeriesState.PROCESSING}


def test_finish_marks_job_and_series(sessions: sessionmaker[Session]) -> None:
    ok_job, bad_job = _queued_series(sessions, 2)
    owner = new_owner()
    assert claim(sessions, owner, 60) == ok_job
    assert claim(sessions, owner, 60) == bad_job
    assert finish(sessions, ok_job, owner, ok=True)
    assert finish(sessions, bad_job, owner, ok=False, failed_step="convert", error="broken")
    with sessions() as session:
        good, bad = session.get(Job, ok_job), session.get(Job, bad_job)
        assert good is not None and bad is not None
        assert (good.state, bad.state) == (JobState.DONE, JobState.FAILED)
        assert bad.series.state == SeriesState.FAILED
        assert bad.series.reason == "convert: broken"
        assert good.series.state == SeriesState.DONE


def test_lost_lease_is_not_recorded(sessions: sessionmaker[Session]) -> None:
    (job_id,) = _queued_series(sessions)
    assert claim(sessions, "host:1:a", 60) == job_id
    assert not finish(sessions, job_id, "host:2:b", ok=True)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.RUNNING


def test_expired_lease_is_requeued_then_failed_after_max_attempts(
    sessions: sessionmaker[Session],
) -> None:
    (job_id,) = _queued_series(sessions, max_attempts=2)
    for attempt in (1, 2):
        owner = f"elsewhere:{attempt}:x"  # another machine: only the lease tells
        assert claim(sessions, owner, 60) == job_id
        assert renew(sessions, owner, 60) == 1
        assert recover(sessions) == 0  # lease still valid
        with sessions.begin() as session:
            session.execute(update(Job).values(lease_expires_at=utcnow() - dt.timedelta(seconds=1)))
        assert recover(sessions) == 1
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.state == JobState.FAILED and job.attempt == 2
        assert "worker died" in (job.error or "")
        assert job.series.state == SeriesState.FAILED


def test_job_of_a_dead_local_process_is_requeued_at_once(sessions: sessionmaker[Session]) -> None:
    (job_id,) = _queued_series(sessions)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    import socket

    owner = f"{socket.gethostname()}:{int(dead.stdout)}:deadbeef"
    assert claim(sessions, owner, 3600) == job_id
    assert recover(sessions) == 1
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.QUEUED and job.attempt == 1
        assert job.series.state == SeriesState.QUEUED
    assert claim(sessions, new_owner(), 60) == job_id
