"""The SR in a web viewer (issue 15): a phantom study goes through the node to Orthanc (with
its DICOMweb plugin); the published OHIF build (npm, installed by scripts/setup.sh) opens the
study in headless Chromium, loads the SR, draws each driving region's outline on the T1 with
its grey-matter volume, and the overall result with the probability; once the user accepts to
track the SR's measurements, OHIF's measurement panel lists the overall result and every
driving region with its volume; the report image opens.

``KETANODE_SCREENSHOTS=docs/screenshots python -m pytest tests/web/test_ohif.py`` saves
screenshots of the study, the SR and the report image (the ones in README.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from playwright.sync_api import Browser, Page
from sqlalchemy import select

from ketanode.db.models import EmittedObject, OutboxItem
from ketanode.node import Node
from ketanode.report.sr import read_sr
from ketanode.roots import reports_root
from ketanode.synthetic.demo_model import held_out_cohort
from ketanode.synthetic.phantom import make_phantom
from ketanode.synthetic.series_writer import SeriesSpec
from tests.integration.conftest import build_settings
from tests.ohiftools import (
    REPORT_SERIES,
    SR_SERIES,
    drivers_by_contribution,
    screenshot,
    study_page,
    track_sr,
    view_sr,
)
from tests.peers import OhifViewer, Orthanc
from tests.support import REPO, chromium, storescu, wait_for

SHOTS = os.environ.get("KETANODE_SCREENSHOTS")
PATIENT = SeriesSpec(
    patient_name="SYNTHETIC^VIEWER",
    patient_id="SYN-OHIF-0007",
    series_description="T1 MPRAGE",
)
COMPREHENSIVE_3D = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass
class Study:
    study_uid: str
    viewer: OhifViewer
    sr_volumes: dict[str, float]
    sr_probability: float
    drivers: list[str]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    root = tmp_path_factory.mktemp("ohif")
    orthanc = Orthanc(root / "orthanc", node_port=1, dicomweb=True).start()
    destinations = [
        {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    ]
    settings = build_settings(
        root / "node",
        f"sqlite:///{root / 'ketanode.db'}",
        {
            "pipeline": {"measure": True},
            "model": {"predict": True, "demo_when_none_active": True},
            "destinations": destinations,
        },
    )
    node = Node(settings)
    node.start()
    viewer = OhifViewer(orthanc)
    try:
        t1 = make_phantom(held_out_cohort(voxel_mm=1.5).phantom_spec(3, 1))
        files = t1.write_dicom(root / "t1", PATIENT)
        storescu(node.address[1] if node.address else 0, files)
        for f in files:  # the scanner sends the study to the PACS too
            orthanc.post_bytes("/instances", Path(f).read_bytes())

        def sent() -> bool:
            with node.sessions() as s:
                states = s.scalars(select(OutboxItem.state)).all()
            return len(states) == 2 and set(states) == {"sent"}

        wait_for(sent, 300, 0.5, "the SR and report image to reach Orthanc")
        with node.sessions() as s:
            sr_path = s.scalars(
                select(EmittedObject.path).where(EmittedObject.sop_class_uid == COMPREHENSIVE_3D)
            ).one()
        values = read_sr(pydicom.dcmread(reports_root(node.settings).resolve(sr_path)))
        assert values.probability is not None
        regions = list(drivers_by_contribution(values.contributions))
        viewer.start()
        yield Study(
            study_uid=str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID),
            viewer=viewer,
            sr_volumes=values.volumes,
            sr_probability=values.probability,
            drivers=regions,
        )
    finally:
        viewer.stop()
        node.stop()
        orthanc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Browser, study: Study) -> Iterator[Page]:
    with study_page(browser, study.viewer.url, study.study_uid) as tab:
        yield tab


def _shot(page: Page, name: str) -> None:
    if SHOTS:
        out = Path(SHOTS) if Path(SHOTS).is_absolute() else REPO / SHOTS
        out.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out / f"{name}.png"))


def test_the_study_shows_the_t1_the_sr_and_the_report_image(page: Page) -> None:
    browser_text = page.inner_text("[data-cy='studyBrowser-panel']")
    assert SR_SERIES in browser_text
    assert REPORT_SERIES in browser_text
    assert "T1 MPRAGE" in browser_text
    assert "Something went wrong" not in page.inner_text("body")
    _shot(page, "ohif-study")


def test_the_sr_draws_each_driving_region_with_its_volume(page: Page, study: Study) -> None:
    view = view_sr(page, len(study.drivers) + 2, screenshot("ohif-sr"))
    assert not view.errors, view.errors
    assert view.overall_drawn, view.labels
    missing = [f for f in study.drivers if not view.region_drawn(study.sr_volumes[f])]
    assert not missing, f"regions not drawn with their volume: {missing} in {view.labels}"
    assert view.outlines >= 1


def test_the_measurement_panel_lists_each_driving_region(page: Page, study: Study) -> None:
    panel = track_sr(page, screenshot("ohif-panel", steps=(0,)))
    assert panel.lists_overall, panel.titles
    missing = [f for f in study.drivers if not panel.lists_region(f, study.sr_volumes[f])]
    assert not missing, f"regions not listed with their volume: {missing} in {panel.titles}"
    assert len(panel.rows) == len(study.drivers) + 1, panel.rows


def test_the_report_image_opens(page: Page) -> None:
    report = page.get_by_text(REPORT_SERIES, exact=False)
    assert report.count() == 1
    report.dblclick()
    page.wait_for_timeout(4000)
    overlay = page.inner_text("[data-cy='viewport-overlay-top-left']")
    assert "RESEARCH USE ONLY" in overlay
    assert "Something went wrong" not in page.inner_text("body")
    _shot(page, "ohif-report-image")
