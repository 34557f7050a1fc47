"""An Enhanced MR T1 through the node (issue 13, item 2): one multi-frame instance with its
pixel measures in the Shared Functional Groups, made by the series writer and sent with
DCMTK storescu. At 1 mm it is selected, converted and measured (every step, a scored
result); at 2 mm it is ignored with a reason that names its 2 mm voxels."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pytest
from pydicom import dcmread

from ketanode.config import ENHANCED_MR_IMAGE_STORAGE
from ketanode.db.models import Result
from ketanode.process import pipeline
from ketanode.synthetic.phantom import PhantomSpec, make_phantom
from ketanode.synthetic.series_writer import SeriesSpec
from tests.integration.conftest import NodeFactory
from tests.support import storescu


@pytest.mark.timeout(1800)  # a 1 mm measurement: under a minute idle, minutes on a busy machine
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_enhanced_mr_t1_is_selected_converted_and_measured(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    # the demonstration model scores it (no model is active in a test database)
    node = node_factory({"pipeline": {"measure": True}, "model": {"demo_when_none_active": True}})
    phantoms = {
        "1mm": make_phantom(PhantomSpec(seed=21, voxel_mm=(1.0, 1.0, 1.0))),
        "2mm": make_phantom(PhantomSpec(seed=22, voxel_mm=(2.0, 2.0, 2.0))),
    }
    uids = {}
    for name, phantom in phantoms.items():
        spec = SeriesSpec(enhanced=True, series_description=f"t1_mprage_sag enhanced {name}")
        (path,) = phantom.write_dicom(tmp_path / name, spec)
        ds = dcmread(path, stop_before_pixels=True)
        assert ds.SOPClassUID == ENHANCED_MR_IMAGE_STORAGE
        assert "PixelSpacing" not in ds and "SharedFunctionalGroupsSequence" in ds
        uids[name] = spec.series_uid
        storescu(node.port, [path])

    # 2 mm: ignored, and the reason names the voxel size it read from the functional groups
    coarse = node.wait_state(uids["2mm"], ("ignored", "queued", "processing", "done"))
    assert coarse.state == "ignored", coarse.reason
    assert coarse.reason is not None and "voxel 2x2x2 mm" in coarse.reason, coarse.reason
    assert (coarse.pixel_spacing_row, coarse.spacing_between_slices) == (2.0, 2.0)

    # 1 mm: selected (one instance = the whole series), converted, measured, scored
    series, job = node.wait_job_done(uids["1mm"], timeout=1500)
    assert series.completion_trigger == "expected_count"
    assert series.selection is not None and series.selection["selected"]
    assert "voxel 1x1x1 mm" in series.reason
    assert (series.n_instances, series.n_frames) == (1, phantoms["1mm"].data.shape[0])
    steps = {s.name: s for s in node.steps(job.id)}
    assert list(steps) == [name for name, _ in pipeline.STEPS]
    assert all(s.ok for s in steps.values())
    converted = steps["convert"].detail
    assert converted is not None and converted["n_files"] == 1
    image = nib.load(converted["path"])
    assert sorted(image.shape) == sorted(phantoms["1mm"].data.shape)
    assert [round(z, 3) for z in image.header.get_zooms()[:3]] == [1.0, 1.0, 1.0]
    (result,) = node.all(Result, Result.job_id == job.id)
    assert result.status == "scored", result.reason
    truth = phantoms["1mm"].truth
    assert result.volumes["tiv"] == pytest.approx(truth["tiv_ml"], rel=0.06)
