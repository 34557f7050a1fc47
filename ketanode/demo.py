"""``ketanode demo``: the node on its embedded defaults, receiving a generated series end to end."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ketanode.config import Settings
from ketanode.db import queries
from ketanode.db.models import Series, SeriesState
from ketanode.dicom.sender import send_files
from ketanode.imaging.phantom import PhantomSpec, make_phantom, simple_head
from ketanode.imaging.series_writer import SeriesSpec, write_series
from ketanode.node import Node

FINAL = {SeriesState.DONE, SeriesState.FAILED, SeriesState.IGNORED}


@dataclass
class DemoResult:
    data_dir: Path
    port: int
    sent: dict[str, Any]
    series: list[dict[str, Any]]
    truth: dict[str, Any]  # the phantom's true volumes, to compare with what was measured


def demo_settings(data_dir: Path) -> Settings:
    settings = Settings()
    settings.node.port = 0
    settings.spool.path = data_dir / "spool"
    settings.spool.min_free_mb = 64
    settings.pipeline.work_dir = data_dir / "work"
    settings.database.url = f"sqlite:///{data_dir / 'ketanode.db'}"
    return settings


DEMO_VOXEL_MM = (1.2, 1.2, 1.2)


def run_demo(data_dir: Path, timeout: float = 600.0) -> DemoResult:
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    node = Node(demo_settings(data_dir))
    _, port = node.start()
    try:
        study = SeriesSpec().study_uid
        with tempfile.TemporaryDirectory() as tmp:
            # a realistic synthetic head (MNI152-based phantom with known regional volumes)
            phantom = make_phantom(PhantomSpec(seed=1, voxel_mm=DEMO_VOXEL_MM))
            t1 = phantom.write_dicom(Path(tmp) / "t1", SeriesSpec(study_uid=study, series_number=3))
            localizer = write_series(
                simple_head((3, 160, 160), seed=2),
                (8.0, 1.6, 1.6),
                Path(tmp) / "loc",
                SeriesSpec(
                    study_uid=study,
                    series_number=1,
                    series_description="localizer",
                    protocol_name="localizer",
                    mr_acquisition_type="2D",
                    image_type=("ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"),
                ),
            )
            report = send_files("127.0.0.1", port, node.settings.node.ae_title, localizer + t1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with node.sessions() as session:
                rows = session.query(Series).all()
                if len(rows) == 2 and all(s.state in FINAL for s in rows):
                    break
            time.sleep(0.25)
        with node.sessions() as session:
            series = [
                queries.series_detail(session, s) for s in session.query(Series).order_by(Series.id)
            ]
        return DemoResult(
            data_dir,
            port,
            {"sent": report.sent, "statuses": report.statuses},
            series,
            {
                k: v
                for k, v in phantom.truth.items()
                if k in ("gm_ml", "wm_ml", "tiv_ml", "regions")
            },
        )
    finally:
        node.stop()
