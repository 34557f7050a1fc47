"""Enhanced MR (issue 13, item 2): the voxel size is read from the functional groups (shared
or per frame, or the frames' positions), and a multi-frame instance converts to the same
volume as the same data written as single frames, whatever the order of its frames:
dicom2nifti when its result agrees with the frames' positions, else the node's own
conversion."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread

from ketanode.dicom.facts import series_facts
from ketanode.imaging.convert import convert_series
from ketanode.receive.store import _parse
from ketanode.synthetic.phantom import simple_head
from ketanode.synthetic.series_writer import SeriesSpec, write_series

VOXEL = (1.2, 0.9, 0.8)  # slice, row, column (mm)
EXPLICIT = "1.2.840.10008.1.2.1"


def _volume() -> np.ndarray:
    return simple_head((14, 24, 20), seed=3)


@pytest.mark.parametrize("groups", ["shared", "per_frame"])
def test_voxel_size_is_read_from_the_functional_groups(tmp_path: Path, groups: str) -> None:
    (path,) = write_series(
        _volume(), VOXEL, tmp_path, SeriesSpec(enhanced=True, enhanced_groups=groups)
    )
    facts = series_facts(_parse(path.read_bytes(), EXPLICIT))  # as the node reads it
    assert (facts.pixel_spacing_row, facts.pixel_spacing_col) == (0.9, 0.8)
    assert facts.slice_thickness == facts.spacing_between_slices == 1.2
    assert facts.mr_acquisition_type == "3D" and facts.expected_instances == 1
    assert facts.image_type == "ORIGINAL\\PRIMARY\\M\\NONE"


def test_slice_spacing_from_the_frame_positions(tmp_path: Path) -> None:
    (path,) = write_series(_volume(), VOXEL, tmp_path, SeriesSpec(enhanced=True))
    ds = dcmread(path)
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    del measures.SliceThickness
    del measures.SpacingBetweenSlices
    stripped = tmp_path / "stripped.dcm"
    ds.save_as(stripped, enforce_file_format=True)
    facts = series_facts(_parse(stripped.read_bytes(), EXPLICIT))
    assert facts.slice_thickness is None
    assert facts.spacing_between_slices == pytest.approx(1.2)


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
@pytest.mark.parametrize("groups", ["shared", "per_frame"])
def test_enhanced_converts_like_single_frames(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, order: str, groups: str
) -> None:
    volume = _volume()
    singles = write_series(volume, VOXEL, tmp_path / "single", SeriesSpec())
    (enhanced,) = write_series(
        volume,
        VOXEL,
        tmp_path / "enhanced",
        SeriesSpec(enhanced=True, enhanced_groups=groups, enhanced_frame_order=order),
    )
    reference = nib.as_closest_canonical(
        nib.load(convert_series(singles, tmp_path / "single.nii.gz").path)
    )
    caplog.set_level(logging.INFO, logger="ketanode.imaging.convert")
    result = convert_series([enhanced], tmp_path / "enhanced.nii.gz")
    image = nib.as_closest_canonical(nib.load(result.path))
    assert image.shape == reference.shape
    np.testing.assert_allclose(image.affine, reference.affine, atol=1e-4)
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(reference.dataobj))
    own = any("node's own conversion" in r.getMessage() for r in caplog.records)
    # dicom2nifti refuses shuffled frames and flips descending ones: the node's own
    # conversion then makes the volume
    assert own == (order != "ascending"), [r.getMessage() for r in caplog.records]
