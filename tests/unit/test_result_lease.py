"""A job's result is written only while its worker holds the job's lease (issue 16): a
worker that was paused while the recovery sweep gave its job to another worker writes no
prediction, no result, no object, no outbox row and no file; the new owner reports once.
On SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ketanode.config import Settings
from ketanode.db.jobqueue import LeaseLost, enqueue, finish, recover
from ketanode.db.migrate import upgrade
from ketanode.db.models import (
    EmittedObject,
    Instance,
    Job,
    JobState,
    OutboxItem,
    Prediction,
    Result,
    Series,
    SeriesState,
    Study,
)
from ketanode.db.session import make_engine, make_session_factory
from ketanode.process import emit
from ketanode.process.context import JobContext
from ketanode.process.predict import NoModel
from ketanode.roots import reports_root
from tests.support import claim_job

LEASE = 0.3  # seconds
UID = "1.2.826.0.1.3680043.8.498.7"


@dataclass
class Box:
    settings: Settings
    sessions: sessionmaker[Session]
    series_id: int
    job_id: int

    def context(self, owner: str, attempt: int) -> JobContext:
        return JobContext(
            self.job_id,
            attempt,
            self.series_id,
            self.settings.pipeline.work_dir / f"job-{self.job_id}",
            # no readable source header: the report is the minimal SR built from the rows
            [self.settings.spool.path / "gone.dcm"],
            self.settings,
            sessions=self.sessions,
            owner=owner,
        )

    def count(self, model: type) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)

    def report_files(self) -> list[Path]:
        return sorted(p for p in self.settings.reports.path.rglob("*") if p.is_file())


@pytest.fixture
def box(db_url: str, tmp_path: Path) -> Iterator[Box]:
    settings = Settings.model_validate(
        {
            "database": {"url": db_url},
            "spool": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
            "reports": {"path": str(tmp_path / "reports"), "png": False},
            "pipeline": {"work_dir": str(tmp_path / "work"), "lease_seconds": LEASE},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
            ],
        }
    )
    engine = make_engine(db_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as s:
        study = Study(study_uid=f"{UID}.1")
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid=f"{UID}.2", state=SeriesState.QUEUED)
        s.add(series)
        s.flush()
        s.add(
            Instance(
                series_id=series.id,
                sop_instance_uid=f"{UID}.3",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                instance_number=1,
                spool_path=f"{UID}.1/{UID}.2/{UID}.3.dcm",
                size_bytes=1,
                sha256="0" * 64,
            )
        )
        job = enqueue(s, series, 3)
        ids = (series.id, job.id)
    yield Box(settings, sessions, *ids)
    engine.dispose()


def _taken_over(box: Box) -> None:
    """Worker A claims the job and stalls past its lease; the recovery sweep re-queues the
    job and worker B claims it (attempt 2)."""
    assert claim_job(box.sessions, box.job_id, "host-a:1:w", LEASE)
    time.sleep(LEASE + 0.2)
    assert recover(box.sessions) == 1
    assert claim_job(box.sessions, box.job_id, "host-b:2:w", LEASE)


def test_a_worker_whose_lease_was_taken_over_writes_no_result(box: Box) -> None:
    _taken_over(box)
    stale = box.context("host-a:1:w", attempt=1)
    with pytest.raises(LeaseLost):
        emit.report_not_scored(stale, "predict", NoModel("no active model"))
    # nothing of the stale worker's report: no row, and the files it wrote are removed
    assert [box.count(m) for m in (Result, EmittedObject, OutboxItem)] == [0, 0, 0]
    assert box.report_files() == []
    # nor its prediction (the same check guards the predict step's write)
    with pytest.raises(LeaseLost), box.sessions.begin() as s:
        stale.hold_lease(s)
        s.add(
            Prediction(
                job_id=box.job_id,
                series_id=box.series_id,
                model_sha256="0" * 64,
                predicted_class="responder",
                probability=0.5,
                decision_value=0.0,
                contributions={},
                label="x",
            )
        )
    assert box.count(Prediction) == 0
    # ... and it cannot end the job either: the job is still B's
    assert not finish(box.sessions, box.job_id, "host-a:1:w", ok=False, error="stale")

    # the new owner reports once; its object's path is stored relative to the reports folder
    out = emit.report_not_scored(box.context("host-b:2:w", attempt=2), "predict", NoModel("x"))
    assert [box.count(m) for m in (Result, EmittedObject, OutboxItem)] == [1, 1, 1]
    with box.sessions() as s:
        (stored,) = s.scalars(select(EmittedObject.path)).all()
        job = s.get(Job, box.job_id)
        assert job is not None and (job.state, job.lease_owner) == (
            JobState.RUNNING,
            "host-b:2:w",
        )
    assert not stored.startswith("/") and stored.endswith(".dcm"), stored
    assert box.report_files() == [reports_root(box.settings).resolve(stored)]
    assert out.result_id > 0

    # the stale worker coming back later finds the result and writes nothing
    again = emit.report_not_scored(stale, "predict", NoModel("no active model"))
    assert again.result_id == out.result_id
    assert [box.count(m) for m in (Result, EmittedObject, OutboxItem)] == [1, 1, 1]
    assert len(box.report_files()) == 1


def test_the_same_attempt_of_the_same_owner_reports(box: Box) -> None:
    """The check is on the claim (owner and attempt): a worker that still holds its lease
    writes its result, and the write renews the lease."""
    assert claim_job(box.sessions, box.job_id, "host-a:1:w", LEASE)
    with box.sessions() as s:
        job = s.get(Job, box.job_id)
        assert job is not None and job.lease_expires_at is not None
        before = job.lease_expires_at
    time.sleep(0.05)
    emit.report_not_scored(box.context("host-a:1:w", attempt=1), "predict", NoModel("x"))
    assert box.count(Result) == 1
    with box.sessions() as s:
        job = s.get(Job, box.job_id)
        assert job is not None and job.lease_expires_at is not None
        assert job.lease_expires_at > before
    # another attempt number of the same owner (re-claimed after a recovery) is not it
    with pytest.raises(LeaseLost), box.sessions.begin() as s:
        box.context("host-a:1:w", attempt=2).hold_lease(s)
