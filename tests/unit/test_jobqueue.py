"""The job queue on SQLite and PostgreSQL: one claimer per job, leases, crash recovery."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from ketanode.db.jobqueue import (
    enqueue,
    enqueue_batch,
    finish,
    new_owner,
    recover,
    renew,
)
from ketanode.db.migrate import upgrade
from ketanode.db.models import Job, JobState, Series, SeriesState, Study, utcnow
from ketanode.db.session import make_engine, make_session_factory
from tests.support import claim


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


# Races between the end of a job and the recovery sweep: every transition is one conditional
# UPDATE on what its writer read, so the one that comes second changes nothing and learns it.
# The interleavings are made deterministic by running the other writer from inside the
# sweep, after it has read the running jobs and before it writes (its owner check).


def _dead_owner() -> str:
    """The lease owner of a process of this host that has exited."""
    import socket

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return f"{socket.gethostname()}:{int(dead.stdout)}:deadbeef"


def _expire_leases(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        session.execute(update(Job).values(lease_expires_at=utcnow() - dt.timedelta(seconds=1)))


def _job_and_series(sessions: sessionmaker[Session], job_id: int) -> tuple[Job, SeriesState]:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job, job.series.state


def test_a_finish_after_recovery_and_a_new_claim_by_the_same_owner_is_lost(
    sessions: sessionmaker[Session],
) -> None:
    """The worker pool's threads share one owner: attempt 1's finish, arriving after its
    expired lease was taken back and the job claimed again (attempt 2), writes nothing."""
    (job_id,) = _queued_series(sessions)
    owner = new_owner()
    assert claim(sessions, owner, 60) == job_id
    _expire_leases(sessions)
    assert recover(sessions) == 1
    assert claim(sessions, owner, 60) == job_id  # attempt 2, same owner
    lost = finish(sessions, job_id, owner, ok=False, failed_step="convert", error="x", attempt=1)
    assert not lost
    job, series_state = _job_and_series(sessions, job_id)
    assert (job.state, job.attempt, job.lease_owner) == (JobState.RUNNING, 2, owner)
    assert job.error is None and job.failed_step is None
    assert series_state == SeriesState.PROCESSING
    assert finish(sessions, job_id, owner, ok=True, attempt=2)
    job, series_state = _job_and_series(sessions, job_id)
    assert (job.state, series_state) == (JobState.DONE, SeriesState.DONE)


def test_a_finish_after_recovery_leaves_the_job_queued(sessions: sessionmaker[Session]) -> None:
    (job_id,) = _queued_series(sessions)
    assert claim(sessions, "elsewhere:1:a", 60) == job_id
    _expire_leases(sessions)
    assert recover(sessions) == 1
    assert not finish(sessions, job_id, "elsewhere:1:a", ok=True, attempt=1)
    job, series_state = _job_and_series(sessions, job_id)
    assert (job.state, job.lease_owner, series_state) == (
        JobState.QUEUED,
        None,
        SeriesState.QUEUED,
    )


def _meanwhile(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """Run ``action`` once between the recovery sweep's read and its writes: the sweep asks
    whether an owner is dead in between (``_owner_is_dead``), which is patched to run it."""
    from ketanode.db import jobqueue

    original = jobqueue._owner_is_dead

    def first(lease_owner: str | None) -> bool:
        monkeypatch.setattr(jobqueue, "_owner_is_dead", original)
        action()
        return original(lease_owner)

    monkeypatch.setattr(jobqueue, "_owner_is_dead", first)


def test_a_sweep_that_read_the_job_before_it_finished_changes_nothing(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    (job_id,) = _queued_series(sessions)
    owner = _dead_owner()  # the sweep will judge it dead; it finishes first
    assert claim(sessions, owner, 3600) == job_id

    def finish_first() -> None:
        assert finish(sessions, job_id, owner, ok=True, attempt=1)  # commits

    _meanwhile(monkeypatch, finish_first)
    assert recover(sessions) == 0
    job, series_state = _job_and_series(sessions, job_id)
    assert (job.state, job.attempt, series_state) == (JobState.DONE, 1, SeriesState.DONE)
    assert job.error is None and job.finished_at is not None


def test_a_sweep_whose_expired_lease_was_renewed_meanwhile_changes_nothing(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = _queued_series(sessions, 2)
    assert claim(sessions, "elsewhere:1:a", 60) == jobs[0]  # its lease: renewed in between
    owner = _dead_owner()  # the second job: the owner check runs between read and write
    assert claim(sessions, owner, 60) == jobs[1]
    with sessions.begin() as session:  # only the first job's lease expired
        session.execute(
            update(Job)
            .where(Job.id == jobs[0])
            .values(lease_expires_at=utcnow() - dt.timedelta(seconds=1))
        )

    def renew_first() -> None:
        assert renew(sessions, "elsewhere:1:a", 60) == 1

    _meanwhile(monkeypatch, renew_first)
    assert recover(sessions) == 1  # only the second job
    first, first_series = _job_and_series(sessions, jobs[0])
    assert (first.state, first.lease_owner, first_series) == (
        JobState.RUNNING,
        "elsewhere:1:a",
        SeriesState.PROCESSING,
    )
    second, _ = _job_and_series(sessions, jobs[1])
    assert second.state == JobState.QUEUED


def test_two_sweeps_at_once_take_a_job_back_once(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two schedulers' sweeps read the same dead worker's job; the first re-queues it and a
    worker claims it (attempt 2) before the second writes: the second changes nothing."""
    (job_id,) = _queued_series(sessions)
    assert claim(sessions, _dead_owner(), 3600) == job_id
    other: list[int] = []

    def other_sweep_first() -> None:
        other.append(recover(sessions))
        assert claim(sessions, "elsewhere:2:b", 60) == job_id

    _meanwhile(monkeypatch, other_sweep_first)
    assert recover(sessions) == 0
    assert other == [1]
    job, series_state = _job_and_series(sessions, job_id)
    assert (job.state, job.attempt, job.lease_owner) == (JobState.RUNNING, 2, "elsewhere:2:b")
    assert series_state == SeriesState.PROCESSING
    assert job.error is None  # the claim cleared the re-queue note


def test_two_sweeps_at_once_fail_a_job_out_of_tries_once(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    (job_id,) = _queued_series(sessions, max_attempts=1)
    assert claim(sessions, _dead_owner(), 3600) == job_id
    other: list[int] = []
    _meanwhile(monkeypatch, lambda: other.append(recover(sessions)))
    assert recover(sessions) == 0
    assert other == [1]
    job, series_state = _job_and_series(sessions, job_id)
    assert (job.state, job.attempt, job.failed_step) == (JobState.FAILED, 1, "recovery")
    assert series_state == SeriesState.FAILED


def test_a_claim_names_its_attempt(sessions: sessionmaker[Session]) -> None:
    from ketanode.db.jobqueue import claim_job_attempt, claim_next

    first, second = _queued_series(sessions, 2)
    assert claim_next(sessions, "elsewhere:1:a", 60) == (first, 1)
    assert claim_job_attempt(sessions, second, "elsewhere:1:a", 60) == 1
    assert claim_job_attempt(sessions, second, "elsewhere:2:b", 60) is None  # running
    _expire_leases(sessions)
    assert recover(sessions) == 2
    assert claim_next(sessions, "elsewhere:1:a", 60) == (first, 2)
    assert not finish(sessions, first, "elsewhere:1:a", ok=True, attempt=1)
    assert finish(sessions, first, "elsewhere:1:a", ok=True, attempt=2)


@pytest.mark.parametrize("max_attempts", [2, 1])
def test_recovering_a_batch_job_leaves_its_series_as_it_was(
    sessions: sessionmaker[Session], max_attempts: int
) -> None:
    """A reprocessing job whose worker died is re-queued (or failed, out of tries) without
    touching its series: the series keeps its state and its current result, as the batch
    job itself would leave them until it writes a new one."""
    (live,) = _queued_series(sessions, 1)
    owner = new_owner()
    assert claim(sessions, owner, 60) == live
    assert finish(sessions, live, owner, ok=True)
    _, state = _job_and_series(sessions, live)
    assert state == SeriesState.DONE
    with sessions() as session:
        series_id = session.get(Job, live).series_id  # type: ignore[union-attr]
    (batch,) = enqueue_batch(sessions, [series_id], max_attempts)
    assert claim(sessions, new_owner(), 60) == batch
    _expire_leases(sessions)
    assert recover(sessions) == 1
    job, state = _job_and_series(sessions, batch)
    assert job.state == (JobState.QUEUED if max_attempts > 1 else JobState.FAILED)
    assert state == SeriesState.DONE
