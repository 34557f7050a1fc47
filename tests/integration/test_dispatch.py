"""The outbox and the dispatcher against real peers: Orthanc as the PACS, DCMTK storescp as a
second destination. Objects are made by the report step's writer (``emit._emit``) from
a small phantom case, so rows, files and UIDs are the ones the node makes.

Shown: the SR and the report image land in the source study; with the PACS down the rows
retry with backoff and are delivered once it is back; after the retry limit they are dead
until re-queued; a row sent again (a crash between the peer's acknowledgement and our
commit) leaves one copy in the PACS; a destination that refuses the association retries
with the reason; two destinations each get every object.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from ketanode.cli.main import app
from ketanode.config import Settings
from ketanode.db.migrate import upgrade
from ketanode.db.models import Job, JobState, OutboxItem, Series, Study, utcnow
from ketanode.db.session import make_engine, make_session_factory
from ketanode.process.context import JobContext
from ketanode.process.emit import _emit
from ketanode.send.dispatcher import Dispatcher, backoff_seconds
from tests.peers import Orthanc, StoreSCP
from tests.support import write_config
from tests.unit._report_case import make_case

BACKOFF = {"backoff_initial_seconds": 0.3, "backoff_max_seconds": 0.6}


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc", node_port=1, node_ae="KETANODE").start()
    yield pacs
    pacs.stop()


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Any]:
    root = tmp_path_factory.mktemp("case")
    _, result = make_case(root)
    return sorted((root / "dicom").glob("*.dcm")), result


def _settings(
    tmp_path: Path, db_url: str, destinations: list[dict[str, Any]], **dispatch: Any
) -> Settings:
    return Settings.model_validate(
        {
            "database": {"url": db_url},
            "spool": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
            "reports": {"path": str(tmp_path / "reports")},
            "destinations": destinations,
            "dispatch": {"max_attempts": 3, **BACKOFF, **dispatch},
        }
    )


def _pacs(orthanc: Orthanc) -> dict[str, Any]:
    return {
        "name": "pacs",
        "ae_title": orthanc.aet,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
    }


class Outbox:
    """A database with the node's schema, and a way to make a job's report objects."""

    def __init__(self, settings: Settings, files: list[Path], result: Any, tmp: Path) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database.url)
        upgrade(self.engine)
        self.sessions = make_session_factory(self.engine)
        self.files, self.result, self.tmp = files, result, tmp
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        with self.sessions.begin() as s:
            study = Study(study_uid=str(first.StudyInstanceUID))
            s.add(study)
            s.flush()
            series = Series(study_id=study.id, series_uid=str(first.SeriesInstanceUID))
            s.add(series)
            s.flush()
            self.series_id = series.id
        self.study_uid = str(first.StudyInstanceUID)

    def report(self) -> dict[str, Any]:
        """One job's report: result row, SR + report image on disk, outbox rows."""
        with self.sessions.begin() as s:
            job = Job(series_id=self.series_id, state=JobState.RUNNING, started_at=utcnow())
            s.add(job)
            s.flush()
            job_id = job.id
        ctx = JobContext(
            job_id,
            1,
            self.series_id,
            self.tmp / f"job-{job_id}",
            self.files,
            self.settings,
            sessions=self.sessions,
        )
        return _emit(ctx, self.result, None).as_dict()

    def rows(self) -> list[OutboxItem]:
        with self.sessions() as s:
            return list(s.scalars(select(OutboxItem).order_by(OutboxItem.id)))

    def set(self, ids: list[int], **values: Any) -> None:
        with self.sessions.begin() as s:
            for row in s.scalars(select(OutboxItem).where(OutboxItem.id.in_(ids))):
                for k, v in values.items():
                    setattr(row, k, v)

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture
def outbox_factory(tmp_path: Path, db_url: str, case: tuple[list[Path], Any]) -> Iterator[Any]:
    made: list[Outbox] = []

    def make(destinations: list[dict[str, Any]], **dispatch: Any) -> Outbox:
        box = Outbox(
            _settings(tmp_path, db_url, destinations, **dispatch), case[0], case[1], tmp_path
        )
        made.append(box)
        return box

    yield make
    for box in made:
        box.close()


def _in_pacs(orthanc: Orthanc, study_uid: str, modality: str) -> list[str]:
    return orthanc.find("Instance", StudyInstanceUID=study_uid, Modality=modality)


def _wait_due(box: Outbox) -> None:
    due = max(r.next_at for r in box.rows() if r.state in ("pending", "retrying"))
    time.sleep(max(0.0, (due - dt.datetime.now(dt.UTC)).total_seconds()) + 0.05)


def test_report_objects_reach_the_pacs_in_the_source_study(
    orthanc: Orthanc, outbox_factory: Any
) -> None:
    box = outbox_factory([_pacs(orthanc)])
    out = box.report()
    assert {o["kind"] for o in out["objects"]} == {"sr", "report_image"}
    assert out["destinations"] == ["pacs"]
    rows = box.rows()
    assert [r.state for r in rows] == ["pending", "pending"]
    run = Dispatcher(box.sessions, box.settings).run()
    assert (run.sent, run.failed) == (2, 0)
    assert {r.state for r in box.rows()} == {"sent"}
    assert all(r.sent_at is not None and r.last_status == 0 for r in box.rows())
    # the PACS holds one SR and one report image, in the study of the source series
    (sr_id,) = _in_pacs(orthanc, box.study_uid, "SR")
    (sc_id,) = _in_pacs(orthanc, box.study_uid, "OT")
    sr_tags = orthanc.get(f"/instances/{sr_id}/simplified-tags")
    uids = {o["kind"]: o["sop_instance_uid"] for o in out["objects"]}
    assert sr_tags["SOPInstanceUID"] == uids["sr"]
    assert "RESEARCH USE ONLY" in sr_tags["SeriesDescription"]
    assert (
        orthanc.get(f"/instances/{sc_id}/simplified-tags")["SOPInstanceUID"] == uids["report_image"]
    )
    # nothing left to do: a second run sends nothing
    assert Dispatcher(box.sessions, box.settings).run().sent == 0


def test_pacs_down_retries_with_backoff_then_delivers_and_resend_keeps_one_copy(
    orthanc: Orthanc, outbox_factory: Any
) -> None:
    # backoff long enough that "right away" stays before the first retry on a busy machine
    box = outbox_factory(
        [_pacs(orthanc)], max_attempts=5, backoff_initial_seconds=1.5, backoff_max_seconds=3.0
    )
    box.report()
    dispatcher = Dispatcher(box.sessions, box.settings)
    orthanc.stop()
    t0 = utcnow()
    run = dispatcher.run()
    assert (run.sent, run.failed, run.dead) == (0, 2, 0)
    rows = box.rows()
    assert {r.state for r in rows} == {"retrying"} and {r.attempts for r in rows} == {1}
    assert all("no association" in (r.last_error or "") for r in rows), rows[0].last_error
    wait = backoff_seconds(1, box.settings.dispatch)
    assert all(r.next_at >= t0 + dt.timedelta(seconds=wait) for r in rows)
    # not due yet: a run right away leaves them alone
    assert dispatcher.run().failed == 0 and {r.attempts for r in box.rows()} == {1}
    _wait_due(box)
    dispatcher.run()
    rows = box.rows()
    assert {r.attempts for r in rows} == {2}
    second_wait = backoff_seconds(2, box.settings.dispatch)
    assert second_wait == 2 * wait
    assert all(r.next_at >= r.updated_at + dt.timedelta(seconds=second_wait - 0.01) for r in rows)
    # the PACS is back: the next due run delivers both
    orthanc.start()
    _wait_due(box)
    run = dispatcher.run()
    assert run.sent == 2, box.rows()
    assert {r.state for r in box.rows()} == {"sent"}
    assert len(_in_pacs(orthanc, box.study_uid, "SR")) == 1
    # a crash after the PACS acknowledged but before we committed 'sent': the row is sent
    # again with the same UIDs, and the PACS still holds one copy of each object
    before = orthanc.count_instances()
    box.set([r.id for r in box.rows()], state="pending", next_at=utcnow())
    assert dispatcher.run().sent == 2
    assert orthanc.count_instances() == before == 2
    assert len(_in_pacs(orthanc, box.study_uid, "SR")) == 1


def test_retry_limit_marks_rows_dead_until_requeued(
    orthanc: Orthanc, outbox_factory: Any, tmp_path: Path, db_url: str
) -> None:
    box = outbox_factory([_pacs(orthanc)], max_attempts=2)
    box.report()
    dispatcher = Dispatcher(box.sessions, box.settings)
    orthanc.stop()
    dispatcher.run()
    _wait_due(box)
    run = dispatcher.run()
    assert run.dead == 2
    rows = box.rows()
    assert {(r.state, r.attempts) for r in rows} == {("dead", 2)}
    orthanc.start()
    time.sleep(0.7)
    assert dispatcher.run().sent == 0  # dead rows are not tried again on their own
    # the admin sees them and re-queues them with the CLI
    config = write_config(tmp_path / "admin.toml", {"database": {"url": db_url}})
    listed = CliRunner().invoke(app, ["-c", str(config), "dispatch", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert {(r["state"], r["destination"]) for r in json.loads(listed.stdout)} == {("dead", "pacs")}
    retried = CliRunner().invoke(app, ["-c", str(config), "dispatch", "retry", "--dead"])
    assert retried.exit_code == 0, retried.output
    assert "2" in retried.output
    assert {(r.state, r.attempts) for r in box.rows()} == {("pending", 0)}
    assert dispatcher.run().sent == 2
    assert len(_in_pacs(orthanc, box.study_uid, "SR")) == 1
    assert len(_in_pacs(orthanc, box.study_uid, "OT")) == 1


def test_two_destinations_and_one_that_refuses(
    orthanc: Orthanc, outbox_factory: Any, tmp_path: Path
) -> None:
    scp = StoreSCP(tmp_path / "storescp", aet="ARCHIVE").start()
    try:
        box = outbox_factory(
            [
                _pacs(orthanc),
                {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": scp.port},
                # Orthanc checks the called AE title: this one is refused at association time
                {
                    "name": "wrong-ae",
                    "ae_title": "NOTPACS",
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                },
            ]
        )
        out = box.report()
        assert out["destinations"] == ["archive", "pacs", "wrong-ae"]
        run = Dispatcher(box.sessions, box.settings).run()
        assert run.by_destination["pacs"]["sent"] == 2
        assert run.by_destination["archive"]["sent"] == 2
        assert run.by_destination["wrong-ae"]["failed"] == 2
        refused = [r for r in box.rows() if r.destination == "wrong-ae"]
        assert all(r.state == "retrying" and "rejected" in (r.last_error or "") for r in refused)
        received = sorted(
            p.name for p in (tmp_path / "storescp").iterdir() if p.name[:2] in ("SR", "SC")
        )
        assert len(received) == 2, received
        uids = {o["sop_instance_uid"] for o in out["objects"]}
        got = {str(pydicom.dcmread(tmp_path / "storescp" / n).SOPInstanceUID) for n in received}
        assert got == uids
    finally:
        scp.stop()


def test_series_reported_again_keeps_both_results_newest_current(outbox_factory: Any) -> None:
    """A series processed again (a new job): both results are kept, the newest is current,
    and each job's objects have their own UIDs; a job that reports twice (run again after a
    crash past its commit) returns its stored result and makes no new objects."""
    from ketanode.db.models import EmittedObject, Result

    box = outbox_factory([])
    first, second = box.report(), box.report()
    with box.sessions() as s:
        rows = {r.id: r.current for r in s.scalars(select(Result))}
        n_objects = len(s.scalars(select(EmittedObject)).all())
    assert rows == {first["result_id"]: False, second["result_id"]: True}
    assert n_objects == 4
    uids = {o["sop_instance_uid"] for o in first["objects"] + second["objects"]}
    assert len(uids) == 4
    assert box.rows() == []  # no destination configured: nothing to send
    # the same job again: its stored result, nothing new
    with box.sessions() as s:
        job_id = s.get(Result, second["result_id"]).job_id  # type: ignore[union-attr]
    ctx = JobContext(
        job_id, 1, box.series_id, box.tmp / "again", box.files, box.settings, sessions=box.sessions
    )
    again = _emit(ctx, box.result, None).as_dict()
    assert again["result_id"] == second["result_id"]
    assert again["objects"] == second["objects"]
    with box.sessions() as s:
        assert len(s.scalars(select(EmittedObject)).all()) == 4
