"""Series tracking and selection with a real SCU: a whole-study push in one association
(3D T1, localizer, DWI-like series, a CT image), and a series split over two associations."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.integration.conftest import NodeFactory, RunningNode
from tests.integration.dicomtools import (
    CT_IMAGE_STORAGE,
    association,
    send,
    small_series,
    t1_series,
)


def _series_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _checks(series: object) -> dict[str, dict[str, object]]:
    selection = series.selection  # type: ignore[attr-defined]
    assert selection is not None, "the selection decision is not stored"
    return {c["rule"]: c for c in selection["checks"]}


def test_study_push_selects_the_t1_and_ignores_the_rest_with_reasons(
    node: RunningNode, tmp_path: Path
) -> None:
    study = "1.2.826.0.1.3680043.8.498.424242"
    t1 = t1_series(tmp_path / "t1", n_slices=40, study_uid=study, series_number=3)
    localizer = small_series(
        tmp_path / "loc",
        3,
        voxel_mm=(6.0, 1.0, 1.0),
        study_uid=study,
        series_number=1,
        mr_acquisition_type="2D",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        series_description="localizer",
        protocol_name="AAHead_Scout",
    )
    dwi = small_series(
        tmp_path / "dwi",
        30,
        voxel_mm=(2.0, 2.0, 2.0),
        study_uid=study,
        series_number=5,
        mr_acquisition_type="2D",
        image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"),
        series_description="ep2d_diff DWI",
        protocol_name="ep2d_diff",
    )
    ct_src = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    ct = Path(shutil.copy(ct_src, tmp_path / "ct.dcm"))

    push = [*localizer, t1[0], ct, *t1[1:20], *dwi, *t1[20:]]  # interleaved, as PACS do
    statuses = send(node.port, push)
    assert statuses == [0] * len(push)  # the CT is acknowledged like the rest

    # The CT: recorded (instance row, file in the spool), its series ignored, modality named.
    ct_series = node.wait_state(_series_uid(ct), ("ignored",))
    (ct_row,) = node.instances(_series_uid(ct))
    assert ct_row.sop_class_uid == CT_IMAGE_STORAGE and node.spool_file(ct_row.spool_path).is_file()
    assert ct_series.modality == "CT"
    assert "modality CT" in ct_series.reason and "not one of MR" in ct_series.reason
    assert ct_series.completion_trigger == "association_released"

    # The localizer: 2D, 3 slices, LOCALIZER image type.
    loc = node.wait_state(_series_uid(localizer[0]), ("ignored",))
    assert loc.n_instances == 3
    assert loc.reason.startswith("not a structural 3D T1: 2D acquisition with 3 slices")
    checks = _checks(loc)
    assert not checks["image_type"]["ok"] and "LOCALIZER" in checks["image_type"]["detail"]
    assert not checks["exclude_pattern"]["ok"]
    assert not checks["voxel_size"]["ok"]  # 6 mm slices

    # The DWI-like series: 2D, 30 slices of 2 mm, DIFFUSION, "ep2d_diff DWI".
    dwi_series = node.wait_state(_series_uid(dwi[0]), ("ignored",))
    assert dwi_series.n_instances == 30
    assert dwi_series.reason.startswith("not a structural 3D T1: 2D acquisition with 30 slices")
    checks = _checks(dwi_series)
    assert not checks["voxel_size"]["ok"] and "2x2x2" in checks["voxel_size"]["detail"]
    assert not checks["image_type"]["ok"] and "DIFFUSION" in checks["image_type"]["detail"]
    assert not checks["exclude_pattern"]["ok"] and "DWI" in checks["exclude_pattern"]["detail"]
    assert not checks["include_pattern"]["ok"]

    # The 3D T1: selected and converted; the NIfTI is recorded in the job step.
    series, job = node.wait_job_done(_series_uid(t1[0]))
    assert series.n_instances == 40 and series.generation == 1
    assert series.reason.startswith("structural 3D T1")
    assert all(c["ok"] for c in series.selection["checks"])
    (step,) = node.steps(job.id)
    assert step.name == "convert" and step.ok and step.seconds > 0
    nifti = Path(step.detail["path"])
    assert nifti.is_file() and nifti.name.endswith(".nii.gz")
    assert sorted(nib.load(nifti).shape) == sorted(step.detail["shape"]) == [40, 64, 64]
    assert step.detail["n_files"] == 40
    assert step.detail["zooms_mm"] == [1.0, 1.0, 1.0]

    # Four series of one study, every pushed object stored once, no refusals.
    assert len(node.series()) == 4
    assert len({s.study_id for s in node.series() if s.modality == "MR"}) == 1
    assert len(node.instances()) == len(push)
    assert node.failures() == []
    (assoc,) = node.wait_association_ended(1)
    assert (assoc.outcome, assoc.n_stored, assoc.n_failed) == ("released", len(push), 0)


def test_series_over_two_back_to_back_associations_is_one_series(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """The sender splits a series over two associations with no pause: one series row,
    never completed in between, one job on generation 1."""
    node = node_factory({"series": {"grace_seconds": 2.0}})
    files = t1_series(tmp_path / "t1", n_slices=40, images_in_acquisition=False)
    uid = _series_uid(files[0])
    with association(node.port, files[:20]) as scu:
        assert scu.store_all(files[:20]) == [0] * 20
    with association(node.port, files[20:]) as scu:
        assert node.one_series(uid).state == "receiving"  # not completed in between
        assert scu.store_all(files[20:]) == [0] * 20

    series, job = node.wait_job_done(uid)
    assert len(node.series()) == 1
    assert series.n_instances == 40 and series.generation == 1
    assert series.completion_trigger == "association_released"
    assert series.expected_instances is None
    first, second = node.wait_association_ended(2)
    by_assoc = sorted(i.association_id for i in node.instances(uid))
    assert by_assoc == [first.id] * 20 + [second.id] * 20
    assert series.last_association_id == second.id
    assert len(node.jobs(series.id)) == 1
    (step,) = node.steps(job.id)
    assert step.detail["n_files"] == 40 and sorted(step.detail["shape"]) == [40, 64, 64]


def test_late_second_association_reopens_the_same_series(node: RunningNode, tmp_path: Path) -> None:
    """The second half arrives after the first half was completed and processed: the same
    series row is reopened (generation 2), and the new job converts all the instances."""
    files = t1_series(tmp_path / "t1", n_slices=40)
    uid = _series_uid(files[0])
    assert send(node.port, files[:20]) == [0] * 20
    first, first_job = node.wait_job_done(uid)
    assert first.generation == 1 and first.n_instances == 20
    assert first.completion_trigger == "association_released"
    assert node.steps(first_job.id)[0].detail["n_files"] == 20

    assert send(node.port, files[20:]) == [0] * 20
    node.wait(lambda: node.one_series(uid).generation == 2, 30, "the series to be reopened")
    series, job = node.wait_job_done(uid)
    assert len(node.series()) == 1 and series.id == first.id
    assert series.generation == 2 and series.n_instances == 40
    assert series.state == "done"
    assert series.completion_trigger == "expected_count"  # ImagesInAcquisition 40 reached
    assert job.id != first_job.id and job.series_generation == 2
    jobs = {j.id: j for j in node.jobs(series.id)}
    assert jobs[first_job.id].state == "done" and jobs[first_job.id].series_generation == 1
    (step,) = node.steps(job.id)
    assert step.detail["n_files"] == 40 and sorted(step.detail["shape"]) == [40, 64, 64]
    assert len(node.instances(uid)) == 40
