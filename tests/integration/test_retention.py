"""Retention (ketanode/admin/retention.py) on real files and rows, on SQLite and PostgreSQL.

Series side by side, each with instance files in the spool: done long ago (its objects
sent / dead long ago), failed long ago, done long ago but its SR still retrying, in flight
(job running), done with a job queued again, receiving, ignored long ago, done recently.
Shown: exactly the files retention allows go (spool files of finished series past
``spool_hours``; SR / report-image files and PNGs of objects whose every outbox row is sent
or dead since ``reports_hours``); ``purged_at`` is set on those rows only, and the purged
series lose their instance rows and counters (nothing else); a dry run (also through
``ketanode retention run --dry-run --json``) removes nothing and names the same set; a
second sweep removes nothing; a series received again is swept again; emptied directories
are pruned by default.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from ketanode.admin.retention import sweep
from ketanode.cli.main import app
from ketanode.config import Settings
from ketanode.db.migrate import upgrade
from ketanode.db.models import (
    AuditEvent,
    EmittedObject,
    Instance,
    Job,
    OutboxItem,
    Result,
    Series,
    Study,
    utcnow,
)
from ketanode.db.session import make_engine, make_session_factory
from tests.integration.conftest import NodeFactory
from tests.support import write_config

NOW = utcnow()
LONG_AGO = NOW - dt.timedelta(days=10)  # past spool_hours (7 days), inside reports_hours
VERY_LONG_AGO = NOW - dt.timedelta(days=40)  # past reports_hours (30 days)
RECENT = NOW - dt.timedelta(hours=1)

Outbox = list[tuple[str, str, dt.datetime]]  # (destination, state, updated_at)


class World:
    """A database with the node's schema, and a spool and reports folder under tmp_path."""

    def __init__(self, tmp_path: Path, db_url: str) -> None:
        self.settings = Settings.model_validate(
            {
                "database": {"url": db_url},
                "spool": {"path": str(tmp_path / "spool")},
                "reports": {"path": str(tmp_path / "reports")},
            }
        )
        self.engine = make_engine(db_url)
        upgrade(self.engine)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        self.spool = self.settings.spool.path
        self.reports = self.settings.reports.path
        self._uid = itertools.count(1)
        self.spool_files: dict[str, list[Path]] = {}
        self.object_files: dict[int, list[Path]] = {}

    def uid(self) -> str:
        return f"1.2.826.0.1.3680043.10.999.{next(self._uid)}"

    def series(
        self,
        name: str,
        state: str,
        jobs: list[tuple[str, dt.datetime | None]] | None = None,
        completed_at: dt.datetime | None = None,
        n: int = 3,
        received_at: dt.datetime = LONG_AGO,
    ) -> tuple[int, list[int]]:
        """A series with ``n`` instance files and its jobs (state, finished_at), oldest first."""
        study_uid, series_uid = self.uid(), self.uid()
        paths = []
        with self.sessions.begin() as s:
            study = Study(study_uid=study_uid)
            s.add(study)
            s.flush()
            row = Series(
                study_id=study.id,
                series_uid=series_uid,
                state=state,
                description=name,
                completed_at=completed_at,
                n_instances=n,
                n_frames=n,
                first_received_at=received_at,
                last_received_at=received_at,
            )
            s.add(row)
            s.flush()
            for _ in range(n):
                sop = self.uid()
                path = self.spool / study_uid / series_uid / f"{sop}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"DICM" + sop.encode() * 50)
                paths.append(path)
                s.add(
                    Instance(
                        series_id=row.id,
                        sop_instance_uid=sop,
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        spool_path=str(path),
                        size_bytes=path.stat().st_size,
                        sha256="0" * 64,
                        received_at=received_at,
                    )
                )
            job_ids = []
            for job_state, finished in jobs or []:
                job = Job(series_id=row.id, state=job_state, finished_at=finished)
                s.add(job)
                s.flush()
                job_ids.append(job.id)
            series_id = row.id
        self.spool_files[name] = paths
        return series_id, job_ids

    def result(
        self, series_id: int, job_id: int, objects: list[tuple[str, Outbox, dt.datetime]]
    ) -> list[int]:
        """A result with objects (kind, outbox rows, created_at); files under reports/."""
        ids = []
        with self.sessions.begin() as s:
            result = Result(
                job_id=job_id,
                series_id=series_id,
                status="scored",
                qc_outcome="pass",
                qc_checks=[],
                volumes={},
                contributions={},
                software_version="test",
            )
            s.add(result)
            s.flush()
            for kind, rows, created in objects:
                study_uid, series_uid, sop = self.uid(), self.uid(), self.uid()
                path = self.reports / study_uid / series_uid / f"{sop}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"DICM" + kind.encode() * 100)
                files = [path]
                if kind == "report_image":
                    files.append(path.with_suffix(".png"))
                    files[-1].write_bytes(b"\x89PNG" + b"0" * 100)
                obj = EmittedObject(
                    result_id=result.id,
                    kind=kind,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                    sop_instance_uid=sop,
                    series_uid=series_uid,
                    study_uid=study_uid,
                    path=str(path),
                    size_bytes=path.stat().st_size,
                    sha256="0" * 64,
                    created_at=created,
                )
                s.add(obj)
                s.flush()
                for dest, state, updated in rows:
                    s.add(
                        OutboxItem(
                            object_id=obj.id,
                            destination=dest,
                            state=state,
                            created_at=created,
                            updated_at=updated,
                            sent_at=updated if state == "sent" else None,
                        )
                    )
                self.object_files[obj.id] = files
                ids.append(obj.id)
        return ids

    def files(self) -> set[Path]:
        return {p for root in (self.spool, self.reports) for p in root.rglob("*") if p.is_file()}

    def purged(self, model: Any) -> set[int]:
        with self.sessions() as s:
            return set(s.scalars(select(model.id).where(model.purged_at.is_not(None))))

    def retention_events(self) -> list[AuditEvent]:
        with self.sessions() as s:
            return list(s.scalars(select(AuditEvent).where(AuditEvent.kind == "retention")))


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = World(tmp_path, db_url)
    yield w
    w.engine.dispose()


def test_sweep_removes_exactly_what_retention_allows(world: World, tmp_path: Path) -> None:
    sent_long_ago: Outbox = [("pacs", "sent", VERY_LONG_AGO)]
    # done long ago; its objects sent (or dead) long ago; an older result sent again recently
    a, (a_old_job, a_job) = world.series(
        "done-old", "done", [("done", LONG_AGO), ("done", LONG_AGO)]
    )
    a_sr, a_sc = world.result(
        a,
        a_job,
        [
            ("sr", [*sent_long_ago, ("archive", "dead", VERY_LONG_AGO)], VERY_LONG_AGO),
            ("report_image", [*sent_long_ago, ("archive", "sent", VERY_LONG_AGO)], VERY_LONG_AGO),
        ],
    )
    (a_resent,) = world.result(
        a, a_old_job, [("sr", [*sent_long_ago, ("archive", "sent", RECENT)], VERY_LONG_AGO)]
    )
    # failed long ago (QC): "not scored" objects, no destination configured (no outbox rows)
    b, (b_job,) = world.series("failed-old", "failed", [("failed", LONG_AGO)])
    b_objects = world.result(
        b, b_job, [("sr", [], VERY_LONG_AGO), ("report_image", [], VERY_LONG_AGO)]
    )
    # done long ago, but the SR is still retrying: spool and SR stay, the sent image goes
    c, (c_job,) = world.series("pending-dispatch", "done", [("done", LONG_AGO)])
    c_sr, c_sc = world.result(
        c,
        c_job,
        [
            ("sr", [("pacs", "retrying", VERY_LONG_AGO)], VERY_LONG_AGO),
            ("report_image", sent_long_ago, VERY_LONG_AGO),
        ],
    )
    # in flight: an old job done, the current one running
    world.series("in-flight", "processing", [("done", LONG_AGO), ("running", None)])
    # done long ago, but processed again: a job is queued
    world.series("queued-again", "done", [("done", LONG_AGO), ("queued", None)])
    world.series("receiving", "receiving")
    i, _ = world.series("ignored-old", "ignored", completed_at=LONG_AGO)
    world.spool_files["ignored-old"][0].unlink()  # already gone: fine
    # done recently: inside both windows
    n, (n_job,) = world.series("recent", "done", [("done", RECENT)])
    n_objects = world.result(
        n,
        n_job,
        [
            ("sr", [("pacs", "sent", RECENT)], RECENT),
            ("report_image", [("pacs", "sent", RECENT)], RECENT),
        ],
    )

    due_series = {a, b, i}
    due_objects = {a_sr, a_sc, *b_objects, c_sc}
    removed = {
        *world.spool_files["done-old"],
        *world.spool_files["failed-old"],
        *world.spool_files["ignored-old"][1:],
        *(f for o in due_objects for f in world.object_files[o]),
    }
    before = world.files()
    assert removed <= before
    removed_bytes = sum(p.stat().st_size for p in removed)

    # dry run: the same set, nothing removed or marked
    dry = sweep(world.sessions, world.settings, dry_run=True)
    assert {p.id for p in dry.series} == due_series
    assert {p.id for p in dry.objects} == due_objects
    assert dry.spool_files + dry.report_files == len(removed)
    assert world.files() == before
    assert world.purged(Series) == set() and world.purged(EmittedObject) == set()
    assert world.retention_events() == []

    # the same through the CLI
    config = write_config(
        tmp_path / "k.toml",
        {
            "database": {"url": world.settings.database.url},
            "spool": {"path": str(world.spool)},
            "reports": {"path": str(world.reports)},
        },
    )
    res = CliRunner().invoke(app, ["-c", str(config), "retention", "run", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    cli = json.loads(res.output)
    assert cli["dry_run"] and {p["id"] for p in cli["purged_series"]} == due_series
    assert {p["id"] for p in cli["purged_objects"]} == due_objects
    assert world.files() == before

    # the sweep
    done = sweep(world.sessions, world.settings)
    assert before - world.files() == removed
    assert {p.id for p in done.series} == due_series
    assert {p.id for p in done.objects} == due_objects
    assert {p.id: p.files for p in done.series} == {a: 3, b: 3, i: 2}
    assert done.bytes == removed_bytes
    assert world.purged(Series) == due_series
    assert world.purged(EmittedObject) == due_objects
    # the purged series lose their instance rows and counters; every other row stays
    with world.sessions() as s:
        instances = s.scalars(select(Instance)).all()
        assert len(instances) == 5 * 3 and not {i.series_id for i in instances} & due_series
        counts = {r.id: (r.n_instances, r.n_frames) for r in s.scalars(select(Series))}
        assert len(counts) == 8 and {counts[x] for x in due_series} == {(0, 0)}
        assert {c for x, c in counts.items() if x not in due_series} == {(3, 3)}
        assert len(s.scalars(select(Job)).all()) == 9
        assert len(s.scalars(select(Result)).all()) == 5
        assert {o.id for o in s.scalars(select(EmittedObject))} >= due_objects | {
            a_resent,
            c_sr,
            *n_objects,
        }
    (event,) = world.retention_events()
    assert event.actor == "node" and event.detail == {
        "series": 3,
        "spool_files": 8,
        "objects": 5,
        "report_files": 8,
        "rejected_files": 0,
        "bytes": done.bytes,
    }

    # again: nothing more goes, no second audit row
    again = sweep(world.sessions, world.settings)
    assert (again.series, again.objects) == ([], [])
    assert before - world.files() == removed
    assert len(world.retention_events()) == 1


def test_series_received_again_is_swept_again_and_empty_dirs_pruned(world: World) -> None:
    month_ago = NOW - dt.timedelta(days=30)
    i, _ = world.series("ignored-old", "ignored", completed_at=month_ago, received_at=month_ago)
    first = sweep(world.sessions, world.settings, now=NOW - dt.timedelta(days=20), prune_dirs=False)
    assert [(p.id, p.files) for p in first.series] == [(i, 3)]
    series_dir = world.spool_files["ignored-old"][0].parent
    assert series_dir.is_dir() and not any(series_dir.iterdir())  # kept: prune_dirs=False
    with world.sessions() as s:
        assert s.scalars(select(Instance).where(Instance.series_id == i)).all() == []
    # a late instance arrives after the purge (and the series is decided again)
    late = series_dir / "late.dcm"
    late.write_bytes(b"DICM late")
    with world.sessions.begin() as s:
        s.add(
            Instance(
                series_id=i,
                sop_instance_uid=world.uid(),
                sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                spool_path=str(late),
                size_bytes=9,
                sha256="0" * 64,
                received_at=NOW - dt.timedelta(days=9),
            )
        )
        series = s.get(Series, i)
        assert series is not None
        series.completed_at = NOW - dt.timedelta(days=9)
    again = sweep(world.sessions, world.settings)
    assert [(p.id, p.files) for p in again.series] == [(i, 1)]
    assert not late.exists()
    # the series and study directories went (by default); the spool root stays
    assert not series_dir.exists() and not series_dir.parent.exists()
    assert world.spool.is_dir()
    assert sweep(world.sessions, world.settings).series == []


def test_node_runs_retention_on_a_timer(node_factory: NodeFactory) -> None:
    on = node_factory({"retention": {"interval_minutes": 0.5}})
    job = on.node.timers.scheduler.get_job("retention")
    assert job is not None and job.trigger.interval == dt.timedelta(seconds=30)
    off = node_factory({"retention": {"enabled": False}}, name="off")
    assert off.node.timers.scheduler.get_job("retention") is None
