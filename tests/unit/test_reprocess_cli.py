"""``ketanode reprocess`` end to end through its command line (issue 16), on SQLite (the
embedded node) and PostgreSQL: which series it queues (the active model's SHA, --since /
--until, --series), as batch work (lane and broker priority), that running it again queues
nothing twice, and that a batch queued in parts (--limit) or stopped part-way (--stop, one
job already done by the model) and then resumed queues each remaining series exactly once.

A worker's finished job is written as the pipeline's report step leaves it (the job done,
its result current with the model's SHA): what the command reads, without the imaging."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from ketanode.cli.main import app
from ketanode.cluster.engine import priority_of
from ketanode.config import load_settings
from ketanode.db.jobqueue import finish, to_publish
from ketanode.db.migrate import upgrade
from ketanode.db.models import (
    Job,
    JobLane,
    JobState,
    ModelRecord,
    Result,
    Series,
    SeriesState,
    Study,
)
from ketanode.db.session import make_engine, make_session_factory
from tests.support import claim, write_config

OLD, NEW = "a" * 64, "b" * 64
#: the series' completion days: 1 Nov .. 6 Nov 2026
DAYS = [dt.datetime(2026, 11, d, 12, tzinfo=dt.UTC) for d in range(1, 7)]


def _result(session: Session, job: Job, model: str) -> None:
    """The result the report step writes for a job: current, older ones no longer."""
    session.execute(update(Result).where(Result.series_id == job.series_id).values(current=False))
    session.add(
        Result(
            job_id=job.id,
            series_id=job.series_id,
            status="scored",
            model_sha256=model,
            qc_outcome="pass",
            qc_checks=[],
            volumes={},
            contributions={},
            software_version="test",
            current=True,
        )
    )


def _database(sessions: sessionmaker[Session]) -> list[str]:
    """Six processed series, one a day; the first already scored by NEW, the others by
    OLD; NEW is the active model. Returns the Series Instance UIDs."""
    uids = []
    with sessions.begin() as s:
        for sha, active in ((OLD, False), (NEW, True)):
            s.add(
                ModelRecord(
                    sha256=sha,
                    path=f"/models/{sha[:4]}.skops",
                    name=sha[:4],
                    spec_name="spec",
                    spec_sha256="c" * 64,
                    label="test",
                    model_metadata={},
                    active=active,
                )
            )
        study = Study(study_uid="1.2.3")
        s.add(study)
        s.flush()
        for i, day in enumerate(DAYS):
            series = Series(
                study_id=study.id,
                series_uid=f"1.2.3.{i + 1}",
                state=SeriesState.DONE,
                completed_at=day,
            )
            s.add(series)
            s.flush()
            job = Job(
                series_id=series.id,
                state=JobState.DONE,
                attempt=1,
                lane=JobLane.LIVE,
                finished_at=day,
            )
            s.add(job)
            s.flush()
            _result(s, job, NEW if i == 0 else OLD)
            uids.append(series.series_uid)
    return uids


@pytest.fixture
def cli(db_url: str, tmp_path: Path) -> tuple[Path, sessionmaker[Session], list[str]]:
    config = write_config(
        tmp_path / "ketanode.toml",
        {
            "database": {"url": db_url},
            "spool": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
            "pipeline": {"work_dir": str(tmp_path / "work"), "max_attempts": 2},
            "reports": {"path": str(tmp_path / "reports")},
        },
    )
    engine = make_engine(db_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    return config, sessions, _database(sessions)


def _run(config: Path, *args: str) -> str:
    out = CliRunner().invoke(app, ["-c", str(config), "reprocess", "--no-wait", *args])
    assert out.exit_code == 0, out.output
    return " ".join(out.output.split())  # as one line (the console wraps it)


def _batch(sessions: sessionmaker[Session]) -> list[Job]:
    with sessions() as s:
        return list(s.scalars(select(Job).where(Job.lane == JobLane.BATCH).order_by(Job.id)))


def _uids_of(sessions: sessionmaker[Session], jobs: list[Job]) -> list[str]:
    with sessions() as s:
        return [str(s.get(Series, j.series_id).series_uid) for j in jobs]  # type: ignore[union-attr]


def test_reprocess_queues_batch_work_once_and_resumes_after_a_limit_and_a_stop(
    cli: tuple[Path, sessionmaker[Session], list[str]],
) -> None:
    config, sessions, uids = cli
    settings = load_settings(config, environ={})

    # a model that is not the active one: refused, nothing queued
    refused = CliRunner().invoke(app, ["-c", str(config), "reprocess", "--model", OLD[:12]])
    assert refused.exit_code == 2 and "not the active one" in " ".join(refused.output.split())
    assert _batch(sessions) == []

    # 2..5 Nov, at most 2 new jobs: the first two of the series there, by row id
    args = ["--model", NEW[:12], "--since", "2026-11-02", "--until", "2026-11-05"]
    out = _run(config, *args, "--limit", "2")
    assert "4 series selected" in out and "2 queued as batch work" in out, out
    assert "2 left for the next run" in out, out
    first = _batch(sessions)
    assert _uids_of(sessions, first) == uids[1:3]
    assert all(j.state == JobState.QUEUED and j.max_attempts == 2 for j in first)
    with sessions() as s:  # published as batch work: the lowest priority on the broker
        published = to_publish(s, dt.datetime.now(dt.UTC), 600)
    assert published == [(j.id, JobLane.BATCH) for j in first]
    assert priority_of(settings, JobLane.BATCH) == settings.cluster.batch_priority
    assert settings.cluster.batch_priority < settings.cluster.live_priority

    # the same command again (no limit): the rest of the range, none twice
    out = _run(config, *args)
    assert "2 queued as batch work, 2 busy or purged" in out, out
    assert _uids_of(sessions, _batch(sessions)) == uids[1:5]
    out = _run(config, *args)
    assert "0 queued as batch work, 4 busy or purged" in out, out
    assert len(_batch(sessions)) == 4

    # a worker finishes one job with the active model; then the batch is stopped part-way
    owner = "host:1:w"
    job_id = claim(sessions, owner, 60)
    assert job_id == _batch(sessions)[0].id
    with sessions.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None
        _result(s, job, NEW)
    assert finish(sessions, job_id, owner, ok=True)
    stopped = CliRunner().invoke(app, ["-c", str(config), "reprocess", "--stop"])
    assert stopped.exit_code == 0 and "3 queued jobs taken out" in " ".join(stopped.output.split())
    assert Counter(j.state for j in _batch(sessions)) == {
        JobState.DONE: 1,
        JobState.SUPERSEDED: 3,
    }

    # resumed: the three stopped series are queued again, once each; the one the model
    # scored and the one outside the range are not
    out = _run(config, *args)
    assert "4 series selected: 1 already by model" in out and "3 queued" in out, out
    queued = [j for j in _batch(sessions) if j.state == JobState.QUEUED]
    assert sorted(_uids_of(sessions, queued)) == sorted(uids[2:5])
    out = _run(config, *args)
    assert "0 queued as batch work" in out, out

    # by series list: the 6 Nov series (outside the range) and the 1 Nov one, which the
    # model scored already: only the first is queued
    out = _run(config, "--series", uids[5], "--series", uids[0])
    assert "2 series selected: 1 already by model" in out and "1 queued" in out, out
    per_series = Counter(
        _uids_of(sessions, [j for j in _batch(sessions) if j.state == JobState.QUEUED])
    )
    assert per_series == {uids[2]: 1, uids[3]: 1, uids[4]: 1, uids[5]: 1}
    assert uids[0] not in _uids_of(sessions, _batch(sessions))
