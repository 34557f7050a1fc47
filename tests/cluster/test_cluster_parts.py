"""The parts of cluster mode, each on its own (PostgreSQL; RabbitMQ where a test says so):
the claim by id, what the publisher sends and sends again, the scheduler lock and its
takeover, the membership rows and ``cluster status``, the refusal of SQLite, and ``ketanode
db upgrade`` waiting for the schema lock the roles take at start."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from ketanode.cluster.engine import make_celery, queue_depth
from ketanode.cluster.leader import LeaderLock
from ketanode.cluster.members import Membership, cluster_state
from ketanode.cluster.publisher import Publisher
from ketanode.config import Settings
from ketanode.db.jobqueue import enqueue, finish, mark_published, recover, to_publish
from ketanode.db.migrate import SCHEMA_LOCK_KEY, ensure_current, head_revision
from ketanode.db.models import Job, JobLane, JobState, Series, SeriesState, Study, utcnow
from ketanode.db.session import make_engine, make_session_factory
from ketanode.node import ClusterConfigError, check_cluster
from tests.cluster.conftest import BROKER_URL, delete_queue, rabbitmq_up
from tests.support import REPO, claim_job, postgres_database, wait_for, write_config

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture
def sessions(pg_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(pg_url)
    ensure_current(engine, True)
    yield make_session_factory(engine)
    engine.dispose()


def _jobs(sessions: sessionmaker[Session], n: int, lane: str = JobLane.LIVE) -> list[int]:
    ids = []
    with sessions.begin() as session:
        study = Study(study_uid=f"1.2.3.{uuid.uuid4().int % 10**12}")
        session.add(study)
        session.flush()
        for _ in range(n):
            series = Series(
                study_id=study.id,
                series_uid=f"1.2.4.{uuid.uuid4().int % 10**12}",
                state=SeriesState.QUEUED,
            )
            session.add(series)
            session.flush()
            job = enqueue(session, series, 3)
            job.lane = lane
            ids.append(job.id)
    return ids


def test_a_job_is_claimed_once_however_often_its_id_arrives(
    sessions: sessionmaker[Session],
) -> None:
    (job_id,) = _jobs(sessions, 1)
    assert claim_job(sessions, job_id, "h:1:a", 60)
    assert not claim_job(sessions, job_id, "h:2:b", 60)  # a duplicate message
    assert finish(sessions, job_id, "h:1:a", ok=True)
    assert not claim_job(sessions, job_id, "h:3:c", 60)  # a late redelivery
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.state, job.attempt, job.lease_owner) == (JobState.DONE, 1, "h:1:a")


def test_publishing_live_first_then_again_only_when_unclaimed(
    sessions: sessionmaker[Session],
) -> None:
    batch = _jobs(sessions, 2, JobLane.BATCH)
    live = _jobs(sessions, 2, JobLane.LIVE)
    now = utcnow()
    with sessions() as session:
        due = to_publish(session, now, 30)
    assert [j for j, _ in due] == live + batch
    mark_published(sessions, [j for j, _ in due])
    with sessions() as session:
        assert to_publish(session, now + dt.timedelta(seconds=10), 30) == []
        # not claimed in time: published again
        again = to_publish(session, now + dt.timedelta(seconds=31), 30)
    assert {j for j, _ in again} == set(live + batch)
    assert claim_job(sessions, live[0], "h:1:a", 60)
    mark_published(sessions, [j for j, _ in again])
    with sessions() as session:
        counts = {j.id: (j.publish_count, j.state) for j in session.query(Job).all()}
    assert counts[live[0]] == (1, JobState.RUNNING)  # claimed: its row is left alone
    assert counts[live[1]] == (2, JobState.QUEUED)


def test_a_recovered_job_is_published_again_at_once(sessions: sessionmaker[Session]) -> None:
    (job_id,) = _jobs(sessions, 1)
    mark_published(sessions, [job_id])
    assert claim_job(sessions, job_id, "elsewhere:1:w", 0.01)  # another host; lease expires
    time.sleep(0.05)
    assert recover(sessions) == 1
    with sessions() as session:
        assert [j for j, _ in to_publish(session, utcnow(), 3600)] == [job_id]


def test_one_active_scheduler_and_the_standby_takes_over(pg_url: str) -> None:
    active, standby = LeaderLock(pg_url), LeaderLock(pg_url)
    try:
        assert active.try_acquire()
        assert not standby.try_acquire()
        assert active.check() and not standby.check()
        # the active scheduler's session ends (its process died): the lock is free at once
        assert active._conn is not None
        pid = active._conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with LeaderLock(pg_url).engine.connect() as other:
            other.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
        assert not active.check()  # it notices, and stops being active
        assert standby.try_acquire() and standby.check()
        assert not active.try_acquire()
    finally:
        active.release()
        standby.release()


def test_a_lock_is_per_database(pg_url: str) -> None:
    with postgres_database() as other_url:
        a, b = LeaderLock(pg_url), LeaderLock(other_url)
        try:
            assert a.try_acquire() and b.try_acquire()
        finally:
            a.release()
            b.release()


def test_membership_rows_and_the_jobs_each_worker_runs(
    pg_url: str, sessions: sessionmaker[Session]
) -> None:
    worker = Membership(pg_url, "worker", 0.2, detail=lambda: {"queue": "q"})
    scheduler = Membership(pg_url, "scheduler", 0.2, detail=lambda: {"active": True})
    worker.start()
    scheduler.start()
    try:
        a, b, c = _jobs(sessions, 3)
        assert claim_job(sessions, a, f"h:123:{worker.token}", 60)
        assert claim_job(sessions, b, "h:456:gone", 60)
        with sessions() as session:
            state = cluster_state(session, 0.2)
        assert state["alive"] == {"listener": 0, "scheduler": 1, "worker": 1, "web": 0}
        assert state["active_scheduler"] == scheduler.name
        (w,) = [m for m in state["members"] if m["role"] == "worker"]
        assert w["running_jobs"] == [a] and w["detail"]["queue"] == "q"
        assert state["running_not_by_a_live_worker"] == [b]
        assert state["jobs"] == {"running": {"live": 2}, "queued": {"live": 1}}
        assert c
    finally:
        worker.stop()
        scheduler.stop()
    with sessions() as session:
        state = cluster_state(session, 0.2)
    assert state["alive"]["worker"] == 0 and state["active_scheduler"] is None


def test_cluster_roles_refuse_sqlite_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ClusterConfigError, match="'database.url'"):
        check_cluster(Settings.model_validate({"cluster": {"enabled": True}}))
    with pytest.raises(ClusterConfigError, match="cluster.enabled"):
        check_cluster(Settings())
    cfg = write_config(
        tmp_path / "k.toml",
        {"database": {"url": f"sqlite:///{tmp_path / 'k.db'}"}, "cluster": {"enabled": True}},
    )
    for args in (["serve", "--role", "listener"], ["worker"], ["serve"], ["cluster", "status"]):
        proc = subprocess.run(
            [sys.executable, "-m", "ketanode", "--config", str(cfg), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "database.url" in proc.stderr and "postgresql://" in proc.stderr, proc.stderr
    assert not (tmp_path / "k.db").exists()


@pytest.mark.skipif(not rabbitmq_up(), reason="RabbitMQ is not running")
def test_publisher_sends_ids_live_first_and_resends_what_the_broker_dropped(
    pg_url: str, sessions: sessionmaker[Session]
) -> None:
    queue = f"ketanode.test.{uuid.uuid4().hex[:12]}"
    settings = Settings.model_validate(
        {
            "database": {"url": pg_url},
            "cluster": {
                "enabled": True,
                "broker_url": BROKER_URL,
                "queue": queue,
                "republish_idle_seconds": 0.2,
            },
        }
    )
    app = make_celery(settings)
    try:
        batch = _jobs(sessions, 2, JobLane.BATCH)
        live = _jobs(sessions, 1, JobLane.LIVE)
        publisher = Publisher(sessions, settings, app)
        assert publisher.run() == 3
        assert publisher.run() == 0  # in the queue: not sent again
        assert queue_depth(app, settings).messages == 3
        # the broker hands out the live scan first, whatever the order of publication
        order = []
        with app.connection_for_read() as conn:
            channel = conn.channel()
            for _ in range(3):
                msg = channel.basic_get(queue, no_ack=True)
                order.append(json.loads(msg.body)[0][0])
        assert order[0] == live[0] and sorted(order[1:]) == batch
        # the queue is empty but the jobs were never claimed: their messages were lost
        time.sleep(0.3)
        assert publisher.run() == 3
        assert queue_depth(app, settings).messages == 3
    finally:
        delete_queue(queue)


def test_batch_work_waits_for_live_scans_and_can_be_stopped(
    sessions: sessionmaker[Session],
) -> None:
    from ketanode.cli.reprocess import progress_counts
    from ketanode.db.jobqueue import enqueue_batch, stop_batch
    from tests.support import claim

    old = _jobs(sessions, 3)
    for job_id in old:
        assert claim_job(sessions, job_id, "h:1:a", 60)
        assert finish(sessions, job_id, "h:1:a", ok=True)
    with sessions() as session:
        series_ids = [session.get(Job, j).series_id for j in old]  # type: ignore[union-attr]
    batch = enqueue_batch(sessions, series_ids, 3)
    assert len(batch) == 3
    assert enqueue_batch(sessions, series_ids, 3) == []  # queued already: resumed, not doubled
    (live,) = _jobs(sessions, 1)
    assert claim(sessions, "h:2:b", 60) == live  # the live scan first
    assert claim(sessions, "h:2:b", 60) == batch[0]
    assert finish(sessions, batch[0], "h:2:b", ok=True)
    with sessions() as session:
        assert progress_counts(session, series_ids) == (1, 2, 0)
        assert session.get(Series, series_ids[0]).state == SeriesState.DONE  # type: ignore[union-attr]
    assert stop_batch(sessions) == 2
    with sessions() as session:
        assert progress_counts(session, series_ids) == (1, 0, 0)
    # resumed: the two that were stopped are queued again
    assert len(enqueue_batch(sessions, series_ids, 3)) == 3


def test_the_task_runs_the_job_in_a_child_and_records_how_it_ended(
    pg_url: str, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """run_one claims, forks the job's process, waits while renewing the lease; a job whose
    process fails records its reason; a second delivery of the same id is skipped."""
    from ketanode.cluster.tasks import run_one

    settings = Settings.model_validate(
        {
            "database": {"url": pg_url},
            "pipeline": {"work_dir": str(tmp_path / "work"), "lease_seconds": 0.6},
            "reports": {"path": str(tmp_path / "reports")},
        }
    )
    (job_id,) = _jobs(sessions, 1)  # a series without files: conversion fails
    assert run_one(settings, job_id, "h:1:w") == "failed"
    assert run_one(settings, job_id, "h:2:w") == "skipped"
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.state, job.attempt, job.lease_owner) == (JobState.FAILED, 1, "h:1:w")
        assert job.failed_step in ("prepare", "convert"), job.failed_step


def test_db_upgrade_waits_for_the_schema_lock_of_the_roles(pg_url: str, tmp_path: Path) -> None:
    """``ketanode db upgrade`` on a second host while another upgrade (a role starting, or
    the same command elsewhere) holds the schema lock: it waits, touches nothing, and
    upgrades once the lock is free."""
    import psycopg

    cfg = write_config(tmp_path / "k.toml", {"database": {"url": pg_url}})
    waiting = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND ((classid::bigint << 32) | objid::bigint) = %s"
    )
    with psycopg.connect(pg_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK_KEY,))
        proc = subprocess.Popen(
            [sys.executable, "-m", "ketanode", "--config", str(cfg), "db", "upgrade"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        try:

            def blocked() -> bool:
                assert proc.poll() is None, f"db upgrade did not wait: {proc.communicate()}"
                row = holder.execute(waiting, (SCHEMA_LOCK_KEY,)).fetchone()
                return bool(row and row[0] == 1)

            wait_for(blocked, 120, interval=0.2, what="db upgrade to wait for the schema lock")
            tables = holder.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
            ).fetchone()
            assert tables == (0,)  # nothing done while the lock is held
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK_KEY,))
        out, errors = proc.communicate(timeout=120)
    assert proc.returncode == 0, errors
    engine = make_engine(pg_url)
    try:
        head = head_revision(engine)
        assert f"database at revision {head}" in out
    finally:
        engine.dispose()
