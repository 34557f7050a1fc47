"""A real head, end to end (issue 11): the UIH uMR 770 3 T series of the shared data
(whole head with neck, face and fat, 0.5 x 0.5 x 1 mm, oblique sagittal, gradient echo;
dates anonymised to "***") is sent with DCMTK storescu to ``ketanode serve``, which measures
it, passes QC, scores it and sends a scored SR and a report image to Orthanc, into the same
study. And the same head seen by other acquisitions (1 mm axial; rotated 15 degrees and
shifted 20 mm; cropped to remove the neck), written back as DICOM series, measures the same.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from ketanode.imaging.analysis import analyse
from ketanode.imaging.convert import convert_series
from ketanode.report.sr import read_sr
from tests.e2e.conftest import Db, wait_series_final
from tests.ohiftools import (
    drivers_by_contribution,
    screenshot,
    study_page,
    track_sr,
    view_sr,
    with_valid_dates,
)
from tests.peers import OhifViewer, Orthanc
from tests.realhead import VARIANTS, convert_uih, reports_in_pacs, uih_files, write_variant
from tests.support import NodeProcess, chromium, storescu
from tests.unit._report_case import DSRDUMP

KEY_REGIONS = ("left_frontal", "right_frontal", "left_cerebellum", "right_cerebellum")


@pytest.mark.timeout(900)  # a real head, then a browser on it: minutes on a busy 2-core host
# One database: the measurement does not depend on it, and the real head crosses the node on
# PostgreSQL in test_real_head_refused.py (the suite's time is better spent elsewhere).
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_real_head_is_scored_and_reported_in_the_pacs(
    tmp_path: Path, db_url: str, db_reader: Db, node_process: list[NodeProcess]
) -> None:
    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True)
    node = NodeProcess(
        tmp_path / "node",
        db_url,
        overrides={
            "pipeline": {"measure": True},
            # no site model here: the demonstration model, switched on on purpose
            "model": {"demo_when_none_active": True},
            "destinations": [  # type: ignore[dict-item]
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}
            ],
            "dispatch": {"interval_seconds": 0.5},
        },
    )
    pacs.node_port = node.port
    node_process.append(node)
    pacs.start()
    try:
        node.start()
        storescu(node.port, uih_files())
        (series,) = wait_series_final(node, db_reader, 1, timeout=900)
        assert series["state"] == "done", series

        (job,) = db_reader.rows("SELECT id, state, error FROM job")
        assert job["state"] == "done", job["error"]
        steps = {
            r["name"]: r
            for r in db_reader.rows(
                "SELECT name, ok, detail FROM job_step WHERE job_id = :j", j=job["id"]
            )
        }
        assert all(s["ok"] for s in steps.values()), steps.keys()
        qc = _detail(steps["qc"])
        checks = {c["name"]: c for c in qc["checks"]}
        assert qc["outcome"] in ("pass", "warn"), qc
        assert checks["registration"]["outcome"] == "pass", checks["registration"]
        assert checks["brain_in_fov"]["outcome"] == "pass", checks["brain_in_fov"]

        (result,) = db_reader.rows(
            "SELECT id, status, predicted_class, probability, volumes, model_sha256 FROM result"
        )
        assert result["status"] == "scored", result
        volumes = _detail({"detail": result["volumes"]})
        tiv, gm = volumes["tiv"], volumes["gm_total"]
        assert 1200.0 <= tiv <= 1900.0, tiv  # plausible adult TIV (the shared data's README)
        assert 0.35 <= gm / tiv <= 0.55, gm / tiv

        # -- the PACS holds a scored SR and a report image in the source study ---------------
        source = pydicom.dcmread(uih_files()[0], stop_before_pixels=True)
        study = str(source.StudyInstanceUID)
        reports_in_pacs(pacs, db_reader, study, tmp_path)
        dump = subprocess.run([DSRDUMP, str(tmp_path / "sr.dcm")], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr
        values = read_sr(pydicom.dcmread(tmp_path / "sr.dcm"))
        assert values.predicted_class == result["predicted_class"]
        assert values.probability == pytest.approx(result["probability"], abs=1e-6)
        assert values.model_sha256 == result["model_sha256"]
        assert values.volumes["tiv"] == pytest.approx(tiv, rel=1e-4)
        assert node.stop() == 0

        # -- and a web viewer draws it on the head (issue 15) ----------------------------------
        for f in uih_files():  # the scanner sends the study to the PACS too
            pacs.post_bytes("/instances", with_valid_dates(f))
        drivers = drivers_by_contribution(values.contributions)
        viewer = OhifViewer(pacs).start()
        try:
            with chromium() as browser, study_page(browser, viewer.url, study) as page:
                view = view_sr(page, len(drivers) + 2, screenshot("ohif-real-head"))
            with chromium() as browser, study_page(browser, viewer.url, study) as page:
                panel = track_sr(page, screenshot("ohif-real-head-panel", steps=(0,)))
        finally:
            viewer.stop()
        assert not view.errors and view.overall_drawn, view.labels
        missing = [f for f in drivers if not view.region_drawn(values.volumes[f])]
        assert not missing, (missing, view.labels)
        assert panel.lists_overall, panel.titles
        unlisted = [f for f in drivers if not panel.lists_region(f, values.volumes[f])]
        assert not unlisted, (unlisted, panel.titles)
    finally:
        pacs.stop()


def _detail(row: dict[str, Any]) -> dict[str, Any]:
    value = row["detail"]
    return json.loads(value) if isinstance(value, str) else dict(value)


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The original and each acquisition variant, converted and measured."""
    base = tmp_path_factory.mktemp("realhead")
    source = convert_uih(base / "original" / "t1.nii.gz")
    out = {"original": analyse(source, base / "original")}
    assert "features" in out["original"], out["original"].get("error")
    mask = base / "original" / "brain_mask.nii.gz"
    for variant in VARIANTS:
        files = write_variant(source, variant, base / variant.name / "dicom", mask)
        volume = convert_series(files, base / variant.name / "t1.nii.gz")
        out[variant.name] = analyse(volume.path, base / variant.name) | {"volume": volume}
    return out


# the module fixture measures four heads (~3 min on an idle 2-core host, twice that beside
# another test worker): its setup runs under the first test's timeout
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("name", [v.name for v in VARIANTS])
def test_real_head_measures_the_same_in_other_acquisitions(
    variants: dict[str, dict[str, Any]], name: str
) -> None:
    """1 mm axial, rotated 15 degrees and shifted 20 mm, neck cropped: frontal and
    cerebellar GM within 3 % of the original's, TIV within 2 % (issue 11)."""
    original = variants["original"]["features"]["measurement"]
    result = variants[name]
    assert result["qc"]["outcome"] in ("pass", "warn"), result.get("error")
    measured = result["features"]["measurement"]
    for region in KEY_REGIONS:
        a, b = original["regions"][region]["gm_ml"], measured["regions"][region]["gm_ml"]
        assert b / a - 1 == pytest.approx(0.0, abs=0.03), (region, a, b)
    assert measured["tiv_ml"] / original["tiv_ml"] - 1 == pytest.approx(0.0, abs=0.02)
