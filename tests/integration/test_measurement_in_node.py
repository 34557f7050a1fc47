"""The node measures what it receives: a phantom sent with DCMTK storescu is measured, and
broken inputs (half the brain outside the field of view, pure noise, a 5 mm slab) fail QC
with their reason while the node goes on to measure the next series.

Coarse voxels (2-3 mm) keep this to about a minute; accuracy is tested in
tests/unit/test_measure.py and benchmarked at 1 mm by bench/pipeline.py.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ketanode.db.models import EmittedObject, Job, Result, Series
from ketanode.imaging.atlas import region_names_of_default_atlas
from ketanode.imaging.features import default_spec
from ketanode.process import pipeline
from ketanode.synthetic.phantom import PhantomSpec, make_phantom, noise_volume, slab_spec
from ketanode.synthetic.series_writer import SeriesSpec
from tests.integration.conftest import NodeFactory, RunningNode
from tests.support import storescu

COARSE = (2.0, 2.0, 2.0)


def _final(node: RunningNode, uid: str) -> tuple[Series, Job]:
    series = node.wait_state(uid, ("done", "failed", "ignored"), timeout=240)
    jobs = [j for j in node.jobs(series.id) if j.series_generation == series.generation]
    assert len(jobs) == 1, jobs
    return series, jobs[0]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_node_measures_good_series_and_fails_broken_ones_with_reasons(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    # selection lets coarse and thin series through, so that QC (not selection) judges them
    node = node_factory(
        {
            "pipeline": {"measure": True},
            # the good phantom is scored by the demonstration model: switched on on purpose
            "model": {"demo_when_none_active": True},
            "series": {"selection": {"max_voxel_mm": 6.0, "min_slices": 4}},
        }
    )
    inputs = {
        # the grid's centre 90 mm above the head's: the top half of the brain is cut off
        "half_out_of_fov": make_phantom(
            PhantomSpec(seed=4, voxel_mm=COARSE, fov_shift_mm=(0.0, 0.0, 90.0))
        ),
        "noise": noise_volume(PhantomSpec(seed=5, voxel_mm=(3.0, 3.0, 3.0))),
        "slab": make_phantom(slab_spec(seed=6, slice_mm=5.0, n_slices=8)),
        "good": make_phantom(PhantomSpec(seed=3, voxel_mm=COARSE)),
    }
    uids = {}
    for name, phantom in inputs.items():
        spec = SeriesSpec(series_description=f"T1 MPRAGE {name}")
        files = phantom.write_dicom(tmp_path / name, spec)
        uids[name] = spec.series_uid
        storescu(node.port, files)

    # -- broken inputs: failed at QC, each with its reason ----------------------------------
    expected = {
        "half_out_of_fov": ("qc_registration", "brain_in_fov = "),
        "noise": ("preprocess", "brain_volume = "),
        "slab": ("qc_input", "voxel_size = 5 mm"),
    }
    for name, (step, reason) in expected.items():
        series, job = _final(node, uids[name])
        assert series.state == "failed", (name, series.state)
        assert (job.state, job.failed_step) == ("failed", step), (name, job.failed_step, job.error)
        assert job.error is not None and "QC failed:" in job.error, (name, job.error)
        assert reason in job.error, (name, job.error)
        assert series.reason is not None and reason in series.reason, (name, series.reason)
        # stopped before anything was measured: no features for an image nobody should trust
        assert "measure" not in {s.name for s in node.steps(job.id)}, name
        # ... and reported as not scored, with the reason, so the radiologist sees why
        (result,) = node.all(Result, Result.job_id == job.id)
        assert (result.status, result.predicted_class, result.qc_outcome) == (
            "not_scored",
            None,
            "fail",
        )
        assert result.reason == job.error and result.model_sha256 is None
        objects = node.all(EmittedObject, EmittedObject.result_id == result.id)
        assert {o.kind for o in objects} == {"sr", "report_image"}
        assert all(node.report_file(o.path).is_file() for o in objects)

    # -- and the node went on: the good phantom is measured ----------------------------------
    series, job = _final(node, uids["good"])
    assert series.state == "done", (series.reason, job.error)
    steps = {s.name: s for s in node.steps(job.id)}
    assert list(steps) == [name for name, _ in pipeline.STEPS]  # every step, predict too
    assert all(s.ok and s.seconds > 0 for s in steps.values())
    (result,) = node.all(Result, Result.job_id == job.id)
    assert result.status == "scored" and result.current
    assert result.predicted_class == steps["predict"].detail["predicted_class"]  # type: ignore[index]
    assert result.volumes == dict(
        zip(steps["measure"].detail["names"], steps["measure"].detail["vector"], strict=True)  # type: ignore[index]
    )
    measured = steps["measure"].detail
    assert measured is not None
    spec = default_spec()
    assert measured["spec"] == {"name": spec.name, "version": spec.version, "sha256": spec.sha256}
    assert measured["names"] == list(spec.features)
    # the native territory map the report page outlines the driving regions with
    territories = nib.load(measured["territories_path"])
    gm_map = nib.load(steps["segment"].detail["gm_path"])  # type: ignore[index]
    assert territories.shape == gm_map.shape
    n_regions = len(region_names_of_default_atlas())
    labels = set(np.unique(np.asarray(territories.dataobj)).astype(int))
    assert labels == set(range(n_regions + 1)), labels  # background and every region
    values = dict(zip(measured["names"], measured["vector"], strict=True))
    truth = inputs["good"].truth
    assert values["tiv"] == pytest.approx(truth["tiv_ml"], rel=0.05)
    assert values["gm_left_frontal"] == pytest.approx(
        truth["regions"]["left_frontal"]["gm_ml"], rel=0.10
    )
    qc = steps["qc"].detail
    assert qc is not None and qc["outcome"] in ("pass", "warn")
    assert {c["name"] for c in qc["checks"]} >= {
        "voxel_size",
        "coverage",
        "brain_in_fov",
        "registration",
        "snr",
        "gm_wm_contrast",
        "gm_fraction",
        "tiv",
    }
