"""``ketanode demo``: the node on its embedded defaults, receiving a generated study end to end.

A localizer and a synthetic 3D T1 (a phantom with known volumes) go in over DICOM; the node
ignores the localizer, measures and scores the T1 with the demonstration model, writes the
SR and the report image (and a PNG of the page), and sends both to every configured
destination (``[[destinations]]`` of the settings given with ``ketanode -c FILE demo``).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from ketanode.config import Destination, Settings
from ketanode.db import queries
from ketanode.db.models import FINAL_SERIES_STATES, DispatchState, OutboxItem, Result, Series
from ketanode.node import Node
from ketanode.roots import reports_root
from ketanode.send.sender import store_uncompressed
from ketanode.synthetic.phantom import PhantomSpec, make_phantom, simple_head
from ketanode.synthetic.series_writer import SeriesSpec, write_series


@dataclass
class DemoResult:
    data_dir: Path
    port: int
    sent: dict[str, Any]
    series: list[dict[str, Any]]
    truth: dict[str, Any]  # the phantom's true volumes, to compare with what was measured
    results: list[dict[str, Any]]  # result rows with their objects (paths) and dispatch states


def demo_settings(data_dir: Path, destinations: list[Destination] | None = None) -> Settings:
    settings = Settings(destinations=list(destinations or []))
    settings.node.port = 0
    settings.spool.path = data_dir / "spool"
    settings.spool.min_free_mb = 64
    settings.pipeline.work_dir = data_dir / "work"
    settings.database.url = f"sqlite:///{data_dir / 'ketanode.db'}"
    settings.reports.path = data_dir / "reports"
    settings.model.demo_when_none_active = True  # the demo scores its phantom with it
    settings.dispatch.interval_seconds = 1.0
    settings.dispatch.backoff_initial_seconds = 2.0
    return settings


def result_rows(node: Node) -> list[dict[str, Any]]:
    """Each result with its objects' files and their dispatch state per destination."""
    out = []
    reports = reports_root(node.settings)
    with node.sessions() as session:
        for r in session.scalars(select(Result).order_by(Result.id)):
            out.append(
                {
                    "id": r.id,
                    "series_id": r.series_id,
                    "status": r.status,
                    "predicted_class": r.predicted_class,
                    "probability": r.probability,
                    "model_sha256": r.model_sha256,
                    "model_label": r.model_label,
                    "reason": r.reason,
                    "objects": [
                        {
                            "kind": o.kind,
                            "path": str(reports.resolve(o.path)),
                            "sop_instance_uid": o.sop_instance_uid,
                            "png": str(reports.resolve(o.path).with_suffix(".png"))
                            if reports.resolve(o.path).with_suffix(".png").is_file()
                            else None,
                            "dispatch": {
                                row.destination: row.state
                                for row in session.scalars(
                                    select(OutboxItem).where(OutboxItem.object_id == o.id)
                                )
                            },
                        }
                        for o in r.objects
                    ],
                }
            )
    return out


def _dispatch_settled(node: Node) -> bool:
    with node.sessions() as session:
        states = set(session.scalars(select(OutboxItem.state)))
    return not states or states <= {DispatchState.SENT, DispatchState.DEAD}


DEMO_VOXEL_MM = (1.2, 1.2, 1.2)


def run_demo(
    data_dir: Path,
    timeout: float = 600.0,
    destinations: list[Destination] | None = None,
    dispatch_timeout: float = 60.0,
) -> DemoResult:
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    node = Node(demo_settings(data_dir, destinations))
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
            outcomes = store_uncompressed(
                "127.0.0.1", port, node.settings.node.ae_title, localizer + t1
            )
        statuses: dict[str, int] = {}
        for outcome in outcomes:
            key = "not sent" if outcome.status is None else f"0x{outcome.status:04X}"
            statuses[key] = statuses.get(key, 0) + 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with node.sessions() as session:
                rows = session.query(Series).all()
                if len(rows) == 2 and all(s.state in FINAL_SERIES_STATES for s in rows):
                    break
            time.sleep(0.25)
        if destinations:  # give the dispatcher its chance (a PACS that is down: retrying)
            node.dispatcher.run()
            end = time.monotonic() + dispatch_timeout
            while not _dispatch_settled(node) and time.monotonic() < end:
                time.sleep(0.25)
        with node.sessions() as session:
            series = [
                queries.series_detail(session, s) for s in session.query(Series).order_by(Series.id)
            ]
        return DemoResult(
            data_dir,
            port,
            {"sent": sum(o.stored for o in outcomes), "statuses": statuses},
            series,
            {
                k: v
                for k, v in phantom.truth.items()
                if k in ("gm_ml", "wm_ml", "tiv_ml", "regions")
            },
            result_rows(node),
        )
    finally:
        node.stop()
