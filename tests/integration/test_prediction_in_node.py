"""End to end from DICOM to the prediction row: two synthetic subjects the demonstration
model never saw (a responder-like and a non-responder-like phantom), sent with DCMTK
storescu, are measured and predicted correctly, and every trace of the output says it came
from the demonstration model trained on synthetic data."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from ketanode.db.models import ModelRecord, Prediction
from ketanode.imaging.phantom import make_phantom
from ketanode.imaging.series_writer import SeriesSpec
from ketanode.model.demo_model import DEMO_MODEL, held_out_cohort
from ketanode.model.files import DEMO_LABEL, file_sha256
from tests.integration.conftest import NodeFactory
from tests.support import storescu


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_demo_model_predicts_held_out_subjects_from_dicom(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory({"pipeline": {"measure": True}, "model": {"predict": True}})
    cohort = held_out_cohort(voxel_mm=1.5)
    subjects = {"responder": cohort.phantom_spec(2, 1), "non-responder": cohort.phantom_spec(3, 0)}
    uids = {}
    for expected, spec in subjects.items():
        series = SeriesSpec(patient_id=f"SYN-{expected}", series_description="T1 MPRAGE")
        files = make_phantom(spec).write_dicom(tmp_path / expected, series)
        storescu(node.port, files)
        uids[expected] = series.series_uid

    demo_sha = file_sha256(DEMO_MODEL)
    for expected, uid in uids.items():
        series_row, job = node.wait_job_done(uid, timeout=300)
        steps = {s.name: s for s in node.steps(job.id)}
        assert list(steps)[-3:] == ["qc", "predict", "report"], list(steps)
        detail = steps["predict"].detail
        assert detail is not None
        assert detail["predicted_class"] == expected, detail
        assert detail["model"]["sha256"] == demo_sha
        assert detail["model"]["synthetic"] is True
        assert detail["model"]["label"] == DEMO_LABEL
        with node.session() as s:
            (row,) = s.scalars(select(Prediction).where(Prediction.job_id == job.id)).all()
        assert row.series_id == series_row.id
        assert row.predicted_class == expected
        assert row.model_sha256 == demo_sha
        assert row.synthetic is True and "DEMONSTRATION MODEL" in row.label
        assert 0.0 <= row.probability <= 1.0
        assert (row.decision_value > 0) == (expected == "responder")
        assert set(row.contributions) and all(k.startswith("gm_") for k in row.contributions)
    # the shipped model is in the registry (not made active behind the admin's back)
    with node.session() as s:
        (model,) = s.scalars(select(ModelRecord)).all()
    assert (model.sha256, model.synthetic, model.active) == (demo_sha, True, False)
