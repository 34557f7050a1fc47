"""End to end from DICOM to the prediction row: two synthetic subjects the demonstration
model never saw (a responder-like and a non-responder-like phantom), sent with DCMTK
storescu, are measured and predicted correctly, and every trace of the output says it came
from the demonstration model trained on synthetic data (DEMO in the SR's and page's series
descriptions and in the SR content) - when an admin switched the demonstration model on.
By default (``model.demo_when_none_active = false``) a node without an active model sends
no demonstration result anywhere: the series gets a NOT SCORED "no active model" result."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from ketanode.db.models import EmittedObject, Job, ModelRecord, OutboxItem, Prediction, Result
from ketanode.model.files import DEMO_MODEL, file_sha256
from ketanode.report.sr import read_sr
from ketanode.synthetic.demo_model import held_out_cohort
from ketanode.synthetic.phantom import PhantomSpec, make_phantom
from ketanode.synthetic.series_writer import SeriesSpec
from ketanode.texts import DEMO_LABEL
from tests.integration.conftest import NodeFactory
from tests.support import storescu


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_demo_model_predicts_held_out_subjects_from_dicom(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory(
        {
            "pipeline": {"measure": True},
            "model": {"predict": True, "demo_when_none_active": True},  # switched on
            "destinations": [DESTINATION],
        }
    )
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
        # the class follows the probability (the threshold, the training cohort's rate)
        assert detail["predicted_class"] in (expected, "indeterminate"), detail
        assert (detail["probability"] >= detail["decision_rule"]["threshold"]) == (
            expected == "responder"
        ), detail
        assert detail["demo"] is True
        assert detail["model"]["sha256"] == demo_sha
        assert detail["model"]["synthetic"] is True
        assert detail["model"]["label"] == DEMO_LABEL
        with node.session() as s:
            (row,) = s.scalars(select(Prediction).where(Prediction.job_id == job.id)).all()
        assert row.series_id == series_row.id
        assert row.predicted_class == detail["predicted_class"]
        assert row.model_sha256 == demo_sha
        assert row.synthetic is True and "DEMONSTRATION MODEL" in row.label
        assert 0.0 <= row.probability <= 1.0
        assert (row.decision_value > 0) == (expected == "responder")
        assert set(row.contributions) and all(k.startswith("gm_") for k in row.contributions)
        # what goes to the destination says DEMO: series descriptions and SR content
        (result,) = node.all(Result, Result.job_id == job.id)
        assert result.status == "scored" and result.model_synthetic
        objects = node.all(EmittedObject, EmittedObject.result_id == result.id)
        assert len(node.all(OutboxItem)) >= len(objects) == 2
        for obj in objects:
            ds = dcmread(node.report_file(obj.path))
            assert str(ds.SeriesDescription).startswith("DEMO "), ds.SeriesDescription
            if obj.kind == "sr":
                values = read_sr(ds)
                assert values.model_synthetic and values.demo
                assert values.decision_threshold == pytest.approx(
                    detail["decision_rule"]["threshold"]
                )
    # the shipped model is in the registry (not made active behind the admin's back)
    with node.session() as s:
        (model,) = s.scalars(select(ModelRecord)).all()
    assert (model.sha256, model.synthetic, model.active) == (demo_sha, True, False)


DESTINATION = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_no_active_model_sends_no_demonstration_result(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """``serve``'s default: no active model and the demonstration model not switched on. The
    series is measured and checked, then reported NOT SCORED ("no active model"); nothing
    scored, nothing from the demonstration model, reaches the destination's outbox."""
    node = node_factory(
        {
            "pipeline": {"measure": True},
            "series": {"selection": {"max_voxel_mm": 6.0}},  # a 2 mm phantom, to be quick
            "destinations": [DESTINATION],
        }  # model: the defaults
    )
    assert node.settings.model.demo_when_none_active is False
    series = SeriesSpec(patient_id="SYN-NOMODEL", series_description="T1 MPRAGE")
    files = make_phantom(PhantomSpec(seed=3, voxel_mm=(2.0, 2.0, 2.0))).write_dicom(
        tmp_path / "s", series
    )
    storescu(node.port, files)
    row = node.wait_state(series.series_uid, ("done", "failed", "ignored"), timeout=300)
    (job,) = node.all(Job, Job.series_id == row.id)
    # a clear stored reason on the series and the job ...
    assert (row.state, job.failed_step) == ("failed", "predict"), (row.reason, job.error)
    assert job.error is not None and "no active model" in job.error
    assert row.reason is not None and "no active model" in row.reason
    # ... and an honest answer in the study: NOT SCORED, no class, no probability, no model
    (result,) = node.all(Result, Result.job_id == job.id)
    assert (result.status, result.predicted_class, result.probability) == (
        "not_scored",
        None,
        None,
    )
    assert result.model_sha256 is None and not result.model_synthetic
    assert result.qc_outcome in ("pass", "warn") and "no active model" in str(result.reason)
    assert node.all(Prediction) == [] and node.all(ModelRecord) == []  # demo never loaded
    objects = node.all(EmittedObject)
    assert {o.result_id for o in objects} == {result.id}  # the only objects queued
    assert len(node.all(OutboxItem)) == 2
    for obj in objects:
        ds = dcmread(node.report_file(obj.path))
        assert "DEMO" not in str(ds.SeriesDescription)
        if obj.kind == "sr":
            values = read_sr(ds)
            assert not values.scored and not values.demo
            assert values.not_scored_reason is not None
            assert values.not_scored_reason.startswith("no active model")
