"""Helpers of the dashboard tests: users, logins over HTTP, rows made directly in a
database with the node's schema (a realistic mix of results, jobs, series and outbox rows)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy.orm import Session, sessionmaker

from ketanode.admin.users import add_user
from ketanode.db.models import (
    EmittedObject,
    Instance,
    Job,
    JobStep,
    ObjectKind,
    OutboxItem,
    Result,
    Series,
    Study,
)
from ketanode.texts import DEMO_LABEL

ADMIN = ("admin", "admin-password-1")
VIEWER = ("viewer", "viewer-password-1")

# identifiers that must never show in a list page (the result page shows the ID only)
PATIENT = {
    "patient_name": "SEEDED^PATIENTNAME",
    "patient_id": "PID-7734521",
    "patient_birth_date": "19610203",
    "accession_number": "ACC99812",
}

# every page (redirect to /login without a session) and everything else (401)
PAGES = ["/", "/results", "/results/1", "/series", "/jobs", "/outbox", "/plots", "/audit"]
DATA = [
    "/api/results",
    "/results/1/report.png",
    "/plots/results-per-day.svg",
    "/plots/probability.svg",
    "/plots/step-times.svg",
    "/plots/ingest.svg",
]


def add_users(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        add_user(session, *ADMIN, role="admin")
        add_user(session, *VIEWER, role="viewer")


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


@contextmanager
def login(
    base_url: str, username: str, password: str, verify: Any = True, expect: int = 303
) -> Iterator[httpx.Client]:
    """An httpx client with the session cookie of ``username`` (after the login form)."""
    with httpx.Client(
        base_url=base_url, follow_redirects=False, verify=verify, timeout=30
    ) as client:
        yield _logged_in(client, username, password, expect)


def _logged_in(client: httpx.Client, username: str, password: str, expect: int) -> httpx.Client:
    page = client.get("/login")
    assert page.status_code == 200, page.text
    answer = client.post(
        "/login",
        data={
            "username": username,
            "password": password,
            "csrf": csrf_of(page.text),
            "next": "/results",
        },
    )
    assert answer.status_code == expect, (answer.status_code, answer.text[:500])
    return client


def write_report_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((60, 80, 3), dtype=np.uint8)
    pixels[:, :, 0] = 200
    Image.fromarray(pixels, mode="RGB").save(path)
    return path


def write_secondary_capture(path: Path) -> Path:
    """A tiny RGB Secondary Capture (the report image without its PNG copy)."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = 40, 50
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    pixels = np.zeros((40, 50, 3), dtype=np.uint8)
    pixels[:, :, 2] = 180
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass
class Seeded:
    """What :func:`seed` put in the database (ids and the counts /metrics must show)."""

    scored_result: int = 0
    not_scored_result: int = 0
    ignored_series: int = 0
    instances: int = 0
    jobs: dict[str, int] = field(default_factory=dict)
    done_job_seconds: float = 0.0
    attempts: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)


def _object(result: Result, kind: str, path: Path, study_uid: str) -> EmittedObject:
    return EmittedObject(
        result_id=result.id,
        kind=kind,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34"
        if kind == ObjectKind.SR
        else SecondaryCaptureImageStorage,
        sop_instance_uid=str(generate_uid()),
        series_uid=str(generate_uid()),
        study_uid=study_uid,
        path=str(path),
        size_bytes=1,
        sha256="0" * 64,
    )


def seed(sessions: sessionmaker[Session], root: Path) -> Seeded:
    """A scored result (PNG copy on disk) whose SR is sent and report image is retrying, a
    not-scored result of a failed job (only the .dcm: the page falls back to its pixels)
    whose objects are dead, an ignored localizer, instances over the last hours."""
    now = dt.datetime.now(dt.UTC)
    out = Seeded()
    with sessions.begin() as s:
        study = Study(study_uid=str(generate_uid()), study_description="brain", **PATIENT)
        s.add(study)
        s.flush()

        def series(desc: str, state: str, reason: str | None = None) -> Series:
            row = Series(
                study_id=study.id,
                series_uid=str(generate_uid()),
                modality="MR",
                description=desc,
                state=state,
                reason=reason,
                n_instances=3,
                completed_at=now,
                completion_trigger="association_released",
            )
            s.add(row)
            s.flush()
            return row

        t1 = series("T1 MPRAGE", "done")
        t1b = series("T1 MPRAGE repeat", "failed", "qc: QC failed: snr")
        loc = series("localizer", "ignored", "image type LOCALIZER is excluded")
        out.ignored_series = loc.id
        for i, row in enumerate((t1, t1b, loc)):
            for k in range(3):
                s.add(
                    Instance(
                        series_id=row.id,
                        sop_instance_uid=str(generate_uid()),
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                        transfer_syntax_uid=ExplicitVRLittleEndian,
                        spool_path=str(root / f"{i}-{k}.dcm"),
                        size_bytes=100,
                        sha256="0" * 64,
                        received_at=now - dt.timedelta(hours=i * 5, minutes=k),
                    )
                )
                out.instances += 1

        steps = {"convert": 1.5, "preprocess": 12.0, "segment": 21.0, "qc": 0.4, "report": 1.1}
        done = Job(series_id=t1.id, state="done", attempt=1, started_at=now, finished_at=now)
        failed = Job(
            series_id=t1b.id,
            state="failed",
            attempt=1,
            started_at=now,
            finished_at=now,
            failed_step="qc",
            error="QC failed: snr = 2.1 (signal to noise; fail < 4)",
        )
        queued = Job(series_id=t1b.id, state="queued")
        s.add_all([done, failed, queued])
        s.flush()
        for name, seconds in steps.items():
            s.add(
                JobStep(
                    job_id=done.id,
                    attempt=1,
                    name=name,
                    ok=True,
                    seconds=seconds,
                    started_at=now - dt.timedelta(hours=1),
                )
            )
        s.add(JobStep(job_id=failed.id, attempt=1, name="convert", ok=True, seconds=1.0))
        s.add(JobStep(job_id=failed.id, attempt=1, name="qc", ok=False, seconds=0.3))
        out.jobs = {"done": 1, "failed": 1, "queued": 1}
        out.done_job_seconds = sum(steps.values())

        common: dict[str, Any] = {
            "qc_checks": [
                {
                    "name": "snr",
                    "value": 12.5,
                    "warn": 8,
                    "fail": 4,
                    "outcome": "pass",
                    "unit": "",
                    "description": "signal to noise",
                }
            ],
            "software_version": "0.1.0",
        }
        scored = Result(
            job_id=done.id,
            series_id=t1.id,
            status="scored",
            predicted_class="responder",
            probability=0.8123,
            decision_value=0.61,
            model_sha256="a" * 64,
            model_name="ketanode-demo",
            model_synthetic=True,
            model_label=DEMO_LABEL,
            qc_outcome="pass",
            volumes={"gm_left_frontal": 88.2, "tiv": 1400.0},
            contributions={"gm_left_frontal": 0.4, "gm_left_cerebellum": -0.2},
            current=True,
            processing_seconds=36.0,
            **common,
        )
        not_scored = Result(
            job_id=failed.id,
            series_id=t1b.id,
            status="not_scored",
            qc_outcome="fail",
            reason="QC failed: snr = 2.1",
            volumes={},
            contributions={},
            current=True,
            **common,
        )
        s.add_all([scored, not_scored])
        s.flush()
        out.scored_result, out.not_scored_result = scored.id, not_scored.id

        png_dcm = root / "reports" / "scored.dcm"  # only its .png copy exists
        write_report_png(png_dcm.with_suffix(".png"))
        sc_only = write_secondary_capture(root / "reports" / "not-scored.dcm")
        objects = [
            _object(scored, ObjectKind.SR, root / "reports" / "scored-sr.dcm", study.study_uid),
            _object(scored, ObjectKind.REPORT_IMAGE, png_dcm, study.study_uid),
            _object(not_scored, ObjectKind.SR, root / "reports" / "ns-sr.dcm", study.study_uid),
            _object(not_scored, ObjectKind.REPORT_IMAGE, sc_only, study.study_uid),
        ]
        s.add_all(objects)
        s.flush()
        rows = [
            OutboxItem(object_id=objects[0].id, destination="pacs", state="sent", attempts=1,
                       sent_at=now, last_status=0),
            OutboxItem(object_id=objects[1].id, destination="pacs", state="retrying",
                       attempts=2, last_error="127.0.0.1:11112: association rejected"),
            OutboxItem(object_id=objects[2].id, destination="pacs", state="dead", attempts=3,
                       last_error="connection refused"),
            OutboxItem(object_id=objects[3].id, destination="archive", state="pending"),
        ]  # fmt: skip
        s.add_all(rows)
        out.attempts = {"pacs": 6, "archive": 0}
        out.sent = {"pacs": 1, "archive": 0}
    return out
