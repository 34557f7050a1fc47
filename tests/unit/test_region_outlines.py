"""Region outlines on the source instances (issue 15): a ball of known centre and radius in a
label map, seen through series of different orientations and resolutions; its outline must
lie on the slice through the centre and enclose the area of the ball's great circle."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom import Dataset
from scipy.spatial.transform import Rotation

from ketanode.report.region_outlines import MAX_POINTS, region_outlines

CENTRE_RAS = np.array([12.0, -20.0, 31.0])
RADIUS = 18.0


def _label_map(path: Path) -> Path:
    # a 1 mm map with a rotated, shifted affine: label 2 is the ball, label 1 a slab elsewhere
    rot = Rotation.from_euler("xyz", [8, -5, 12], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rot
    shape = (84, 84, 84)
    affine[:3, 3] = CENTRE_RAS - rot @ np.array([42.0, 42.0, 42.0])
    ijk = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    ras = ijk @ rot.T + affine[:3, 3]
    labels = np.zeros(len(ijk), dtype=np.int16)
    labels[np.linalg.norm(ras - CENTRE_RAS, axis=1) <= RADIUS] = 2
    labels[(ras[:, 2] > CENTRE_RAS[2] + 30) & (ras[:, 2] < CENTRE_RAS[2] + 35)] = 1
    nib.save(nib.Nifti1Image(labels.reshape(shape), affine), str(path))
    return path


def _series(
    normal_lps: np.ndarray, row_dir: np.ndarray, spacing: float, thickness: float, size: int
) -> list[Dataset]:
    """Slices along ``normal_lps`` through a box centred on the ball (no pixel data)."""
    normal = normal_lps / np.linalg.norm(normal_lps)
    row_dir = row_dir - normal * (row_dir @ normal)
    row_dir /= np.linalg.norm(row_dir)
    col_dir = np.cross(normal, row_dir)
    centre_lps = CENTRE_RAS * np.array([-1, -1, 1])
    out = []
    n = 61
    for s in range(n):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.SOPInstanceUID = f"1.2.3.{s + 1}"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [spacing, spacing]
        ds.ImageOrientationPatient = [*row_dir.tolist(), *col_dir.tolist()]
        offset = (s - (n - 1) / 2) * thickness
        corner = centre_lps - (size - 1) / 2 * spacing * (row_dir + col_dir) + offset * normal
        ds.ImagePositionPatient = corner.tolist()
        out.append(ds)
    return out


@pytest.mark.parametrize(
    ("name", "normal", "row_dir", "spacing", "thickness", "size"),
    [
        ("axial 1 mm", np.array([0, 0, 1.0]), np.array([1.0, 0, 0]), 1.0, 1.0, 256),
        ("sagittal 0.5 mm", np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), 0.5, 1.0, 400),
        ("oblique coronal", np.array([0.1, 1.0, 0.25]), np.array([1.0, 0, 0]), 0.8, 1.2, 300),
    ],
)
def test_ball_outline_on_its_centre_slice(
    tmp_path: Path,
    name: str,
    normal: np.ndarray,
    row_dir: np.ndarray,
    spacing: float,
    thickness: float,
    size: int,
) -> None:
    labels = _label_map(tmp_path / "territories.nii.gz")
    series = _series(normal, row_dir, spacing, thickness, size)
    outlines = region_outlines(series, labels, ["slab", "ball"], ["ball", "absent"])
    assert set(outlines) == {"ball"}, name
    ball = outlines["ball"]
    # the centre slice (index 30) or its neighbour: the cross-section there is largest
    assert ball.sop_instance_uid in {"1.2.3.30", "1.2.3.31", "1.2.3.32"}, name
    # the great circle's area, within the voxelisation of a 1 mm map
    assert ball.area_mm2 == pytest.approx(np.pi * RADIUS**2, rel=0.06), name
    pts = ball.points
    assert pts.shape[1] == 2 and len(pts) <= MAX_POINTS + 1
    assert np.array_equal(pts[0], pts[-1]), "the polyline is closed"
    # every point lies about one radius from the centre, in the slice's pixel space
    centre_px = (size - 1) / 2 + 0.5
    dist_mm = np.linalg.norm(pts - centre_px, axis=1) * spacing
    offset = abs(int(ball.sop_instance_uid.rsplit(".", 1)[1]) - 31) * thickness
    expected = np.sqrt(RADIUS**2 - offset**2)
    assert np.median(dist_mm) == pytest.approx(expected, abs=1.5), name
    assert dist_mm.min() > expected - 2.5 and dist_mm.max() < expected + 2.5, name


def test_no_geometry_no_outline(tmp_path: Path) -> None:
    labels = _label_map(tmp_path / "territories.nii.gz")
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR: geometry per frame
    ds.SOPInstanceUID = "1.2.3.4"
    ds.NumberOfFrames = 96
    ds.Rows = ds.Columns = 64
    assert region_outlines([ds], labels, ["slab", "ball"], ["ball"]) == {}
