"""Issue 13, item 1: every completed T1 series gets an answer in its study. What the report
step sends when the SR or the report image cannot be built (a minimal "NOT SCORED: report
could not be built" SR with the source's UIDs, status report_failed, counted by /metrics),
what it records of the header values it left empty, and that highdicom's person-name
warning never shows a name."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pydicom
import pytest
from prometheus_client import generate_latest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ketanode.config import Settings
from ketanode.db.migrate import upgrade
from ketanode.db.models import (
    EmittedObject,
    Instance,
    Job,
    JobState,
    OutboxItem,
    Result,
    Series,
    Study,
    utcnow,
)
from ketanode.db.session import make_engine, make_session_factory
from ketanode.process.context import JobContext
from ketanode.process.emit import _emit
from ketanode.report.content import ResultForReport
from ketanode.report.secondary_capture import build_report_image
from ketanode.report.sr import build_sr
from ketanode.roots import reports_root
from ketanode.web.metrics import make_registry
from tests.unit._report_case import make_case, not_scored

SECRET = "SECRETNAME"


@dataclass
class Node:
    settings: Settings
    sessions: sessionmaker[Session]
    files: list[Path]
    result: ResultForReport
    series_id: int
    study_uid: str
    tmp: Path

    def context(self, files: list[Path] | None = None) -> JobContext:
        with self.sessions.begin() as s:
            job = Job(series_id=self.series_id, state=JobState.RUNNING, started_at=utcnow())
            s.add(job)
            s.flush()
            job_id = job.id
        return JobContext(
            job_id,
            1,
            self.series_id,
            self.tmp / f"job-{job_id}",
            self.files if files is None else files,
            self.settings,
            sessions=self.sessions,
        )


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], ResultForReport]:
    root = tmp_path_factory.mktemp("fallback_case")
    _, result = make_case(root)
    files = sorted((root / "dicom").glob("*.dcm"))[:4]
    # the real head's anonymiser: '***' dates, a single-component name
    for f in files:
        ds = pydicom.dcmread(f)
        ds.StudyDate = ds.PatientBirthDate = "***"
        ds.PatientName = SECRET
        ds.save_as(f)
    return files, result


@pytest.fixture
def node(tmp_path: Path, case: tuple[list[Path], ResultForReport]) -> Iterator[Node]:
    files, result = case
    settings = Settings.model_validate(
        {
            "database": {"url": f"sqlite:///{tmp_path / 'k.db'}"},
            "spool": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
            "reports": {"path": str(tmp_path / "reports")},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112},
                {"name": "archive", "ae_title": "ARCH", "host": "127.0.0.1", "port": 11113},
            ],
        }
    )
    engine = make_engine(settings.database.url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    with sessions.begin() as s:
        study = Study(study_uid=str(headers[0].StudyInstanceUID))
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid=str(headers[0].SeriesInstanceUID))
        s.add(series)
        s.flush()
        for f, h in zip(files, headers, strict=True):
            s.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=str(h.SOPInstanceUID),
                    sop_class_uid=str(h.SOPClassUID),
                    transfer_syntax_uid=str(h.file_meta.TransferSyntaxUID),
                    instance_number=int(h.InstanceNumber),
                    spool_path=str(f),
                    size_bytes=f.stat().st_size,
                    sha256="0" * 64,
                )
            )
        series_id = series.id
    yield Node(
        settings, sessions, files, result, series_id, str(headers[0].StudyInstanceUID), tmp_path
    )
    engine.dispose()


def _objects(node: Node, result_id: int) -> list[EmittedObject]:
    with node.sessions() as s:
        return list(s.scalars(select(EmittedObject).where(EmittedObject.result_id == result_id)))


def _first_file(node: Node, result_id: int) -> Path:
    """The file of the result's first object (its stored path under the reports folder)."""
    return reports_root(node.settings).resolve(_objects(node, result_id)[0].path)


def _metric(node: Node, status: str) -> float:
    text = generate_latest(make_registry(node.sessions)).decode()
    for line in text.splitlines():
        if line.startswith(f'ketanode_results_total{{status="{status}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_header_the_builders_cannot_take_gets_a_minimal_not_scored_sr(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"Unable to convert '{SECRET}' to 'PN' object")

    caplog.set_level(logging.DEBUG)
    with mock.patch("ketanode.report.sr.build_sr", refuse):
        out = _emit(node.context(), not_scored(node.result), None).as_dict()
    assert out["status"] == "report_failed"
    assert out["source_header_dropped"] == ["*"]
    with node.sessions() as s:
        result = s.get(Result, out["result_id"])
        assert result is not None
        assert result.reason and result.reason.startswith("report could not be built (ValueError)")
        assert result.predicted_class is None and result.probability is None
        rows = s.scalars(select(OutboxItem.destination)).all()
    objects = _objects(node, out["result_id"])
    assert [o.kind for o in objects] == ["sr"]  # the SR alone
    assert sorted(rows) == ["archive", "pacs"]  # one outbox row per destination
    ds = pydicom.dcmread(reports_root(node.settings).resolve(objects[0].path))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11"
    assert ds.StudyInstanceUID == node.study_uid == objects[0].study_uid
    assert ds.ContentSequence[0].TextValue.startswith(
        "NOT SCORED: report could not be built (ValueError)."
    )
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert len(evidence.ReferencedSOPSequence) == len(node.files)
    assert _metric(node, "report_failed") == 1.0
    assert SECRET not in caplog.text
    assert "ValueError" in caplog.text and "minimal NOT SCORED SR" in caplog.text


def test_a_scored_report_that_cannot_be_built_is_sent_as_not_scored(node: Node) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("matplotlib gave up")

    with mock.patch("ketanode.report.secondary_capture.build_report_image", refuse):
        out = _emit(node.context(), node.result, None).as_dict()
    assert out["status"] == "report_failed"
    with node.sessions() as s:
        result = s.get(Result, out["result_id"])
        assert result is not None and result.predicted_class is None  # what the PACS got
        assert result.reason == "report could not be built (RuntimeError)"
    ds = pydicom.dcmread(_first_file(node, out["result_id"]))
    assert ds.PatientID == pydicom.dcmread(node.files[0]).PatientID  # copied, valid
    assert ds.StudyDate == ""  # '***': left empty


def test_unreadable_source_headers_still_get_a_minimal_sr_from_the_database(
    node: Node, tmp_path: Path
) -> None:
    gone = [tmp_path / "gone" / f.name for f in node.files]
    out = _emit(node.context(files=gone), not_scored(node.result), None).as_dict()
    assert out["status"] == "report_failed"
    ds = pydicom.dcmread(_first_file(node, out["result_id"]))
    assert ds.StudyInstanceUID == node.study_uid
    assert ds.PatientID == "" and ds.PatientName == ""  # nothing to copy: nothing invented
    refs = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert {r.ReferencedSOPInstanceUID for r in refs.ReferencedSOPSequence} == {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in node.files
    }


def test_the_full_report_records_what_it_left_empty(node: Node) -> None:
    out = _emit(node.context(), not_scored(node.result), None).as_dict()
    assert out["status"] == "not_scored"
    assert {"StudyDate", "PatientBirthDate"} <= set(out["source_header_dropped"])
    assert [o["kind"] for o in out["objects"]] == ["sr", "report_image"]
    assert _metric(node, "report_failed") == 0.0


def test_no_person_name_reaches_a_warning_or_the_log(
    case: tuple[list[Path], ResultForReport], caplog: pytest.LogCaptureFixture
) -> None:
    files, result = case
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert str(header.PatientName) == SECRET  # no '^': highdicom would warn, quoting it
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.DEBUG):
            build_sr([copy.deepcopy(header)], not_scored(result))
            build_report_image([copy.deepcopy(header)], not_scored(result))
    finally:
        logging.captureWarnings(False)
    assert not [w for w in seen if SECRET in str(w.message)]
    assert SECRET not in caplog.text
