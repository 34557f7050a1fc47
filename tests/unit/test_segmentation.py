"""The pieces of the measurement that real heads needed (issue 11): the working grid, the
EM segmentation with its partial-volume model, and temporary files kept in the job's folder.
Small synthetic volumes with known truth; the whole pipeline is tested on phantoms in
test_measure.py and on the real head in tests/e2e."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import ants
import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from ketanode.imaging import preprocess, segment
from ketanode.imaging.scratch import scratch_dir
from ketanode.synthetic.phantom import PhantomSpec, make_phantom

MEANS = {"csf": 80.0, "gm": 180.0, "wm": 280.0}


def _shells(n: int = 64, sub: int = 4) -> tuple[NDArray[np.float32], ...]:
    """CSF, GM, WM fractions of nested spheres (WM core, GM shell, CSF shell) on an n^3 grid
    of 1 mm voxels, each voxel's fractions from a sub^3 supersampling (true partial volume)."""
    axis = (np.arange(n * sub) + 0.5) / sub - n / 2
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij", sparse=True)
    # an ellipsoid with a wavy surface, so that shells have varied thickness
    r = np.sqrt((x / 1.0) ** 2 + (y / 0.85) ** 2 + (z / 0.9) ** 2) + 1.5 * np.sin(x / 4) * np.cos(
        y / 5
    )
    wm = (r < 14).astype(np.float32)
    gm = ((r >= 14) & (r < 20)).astype(np.float32)
    csf = ((r >= 20) & (r < 26)).astype(np.float32)

    def down(a: NDArray[np.float32]) -> NDArray[np.float32]:
        return a.reshape(n, sub, n, sub, n, sub).mean(axis=(1, 3, 5)).astype(np.float32)

    return down(csf), down(gm), down(wm)


def _image(seed: int = 0, noise: float = 8.0) -> tuple[ants.ANTsImage, ants.ANTsImage, list]:
    csf, gm, wm = _shells()
    rng = np.random.default_rng(seed)
    arr = csf * MEANS["csf"] + gm * MEANS["gm"] + wm * MEANS["wm"]
    arr = (arr + rng.normal(0, noise, arr.shape)).astype(np.float32)
    img = ants.from_numpy(arr, spacing=(1.0, 1.0, 1.0))
    mask = img.new_image_like(((csf + gm + wm) > 0.5).astype(np.float32))
    # priors: the truth blurred by 3 mm (an affine registration's priors are not exact)
    priors = [img.new_image_like(ndimage.gaussian_filter(t, 3.0)) for t in (csf, gm, wm)]
    return img, mask, [(csf, gm, wm), priors]


def test_em_measures_tissue_volumes_with_partial_volume() -> None:
    img, mask, (truth, priors) = _image()
    m = mask.numpy() > 0
    probs = segment.em(img, mask, priors)
    for name, t, p in zip(segment.CLASSES, truth, probs, strict=True):
        got, want = float(p.numpy()[m].sum()), float(t[m].sum())
        assert got == pytest.approx(want, rel=0.04), name
    total = sum(p.numpy() for p in probs)
    assert np.allclose(total[m], 1.0, atol=1e-4) and np.all(total[~m] == 0)
    # deterministic: the same input gives the same numbers
    again = segment.em(img, mask, priors)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(probs, again, strict=True))


def test_em_tracks_a_change_of_grey_matter() -> None:
    """GM grown into WM by a known amount is measured at close to that amount (the mixel
    model counts boundary voxels by their fractions)."""
    img, mask, (truth, priors) = _image()
    csf, gm, wm = truth
    grown = np.clip(ndimage.grey_dilation(gm, size=(2, 2, 2)) * (wm > 0), 0, 1) * 0.9 * wm
    gm2, wm2 = gm + grown, wm - grown
    arr2 = csf * MEANS["csf"] + gm2 * MEANS["gm"] + wm2 * MEANS["wm"]
    rng = np.random.default_rng(0)
    img2 = img.new_image_like((arr2 + rng.normal(0, 8.0, arr2.shape)).astype(np.float32))
    m = mask.numpy() > 0
    true_change = float(gm2[m].sum()) / float(gm[m].sum()) - 1
    assert 0.05 < true_change < 0.20
    gm_a = float(segment.em(img, mask, priors)[1].numpy()[m].sum())
    gm_b = float(segment.em(img2, mask, priors)[1].numpy()[m].sum())
    assert gm_b / gm_a - 1 == pytest.approx(true_change, abs=0.25 * true_change)


def test_em_refuses_an_image_that_is_not_t1_weighted() -> None:
    img, mask, (_, priors) = _image()
    inverted = img.new_image_like((400.0 - img.numpy()).astype(np.float32))
    with pytest.raises(segment.SegmentationError, match="T1 order"):
        segment.em(inverted, mask, priors)


def _sphere_image(
    spacing: tuple[float, float, float], shape: tuple[int, int, int]
) -> ants.ANTsImage:
    """A bright ball of radius 40 mm at a known world position, on an oblique grid."""
    a = np.deg2rad(20.0)
    direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    origin = np.array([-50.0, -60.0, -45.0])
    idx = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    world = origin + (idx * spacing) @ direction.T
    centre = origin + (np.asarray(shape) - 1) / 2 * spacing @ direction.T + [3.0, -2.0, 1.0]
    inside = (np.linalg.norm(world - centre, axis=1) < 40.0).reshape(shape)
    return ants.from_numpy(
        (inside * 1000.0).astype(np.float32),
        origin=tuple(origin),
        spacing=spacing,
        direction=direction,
    )


def _volume_and_centre(img: ants.ANTsImage) -> tuple[float, NDArray[np.float64]]:
    arr = img.numpy().astype(np.float64)
    idx = np.indices(arr.shape).reshape(3, -1).T
    world = np.asarray(img.origin) + (idx * np.asarray(img.spacing)) @ np.asarray(img.direction).T
    w = arr.ravel()
    return float(w.sum() * np.prod(img.spacing) / 1000.0), (world * w[:, None]).sum(0) / w.sum()


@pytest.mark.parametrize(
    ("spacing", "shape", "expected"),
    [
        ((0.5, 0.5, 1.0), (220, 220, 110), (1.0, 1.0, 1.0)),  # block averaging
        ((0.7, 0.7, 0.7), (150, 150, 150), (1.0, 1.0, 1.0)),  # smoothed and resampled
        ((1.2, 1.0, 1.0), (80, 110, 110), (1.2, 1.0, 1.0)),  # nothing to do
    ],
)
def test_working_grid_keeps_volumes_and_position(
    spacing: tuple[float, float, float],
    shape: tuple[int, int, int],
    expected: tuple[float, float, float],
) -> None:
    img = _sphere_image(spacing, shape)
    grid = preprocess.working_grid(img, 1.0)
    assert np.allclose(grid.spacing, expected, atol=1e-5)
    assert np.allclose(np.asarray(grid.direction), np.asarray(img.direction), atol=1e-6)
    vol_a, centre_a = _volume_and_centre(img)
    vol_b, centre_b = _volume_and_centre(grid)
    assert vol_b == pytest.approx(vol_a, rel=0.01)  # mL in the subject's space
    assert np.linalg.norm(centre_b - centre_a) < 0.3  # the same place, to a third of a mm


def test_scratch_dir_keeps_library_temporaries_and_removes_them(tmp_path: Path) -> None:
    system = tempfile.gettempdir()
    with scratch_dir(tmp_path / "job" / "tmp") as folder:
        made = Path(tempfile.mktemp(prefix="antsr", suffix="prob01.nii.gz"))
        made.write_bytes(b"x")
        assert made.parent == folder
        fixed = ants.from_numpy(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32))
        out = ants.registration(fixed, fixed, type_of_transform="Translation")
        assert all(Path(p).parent == folder for p in out["fwdtransforms"])
    assert not folder.exists()
    assert tempfile.gettempdir() == system


_JOB = """
import sys
from pathlib import Path
from ketanode.config import PipelineSettings
from ketanode.imaging.analysis import analyse
nifti, out = Path(sys.argv[1]), Path(sys.argv[2])
for method in ("em", "atropos"):
    settings = PipelineSettings(segmentation=method, atropos_iterations=1)
    result = analyse(nifti, out / method, settings)
    assert "features" in result, result.get("error")
    assert not (out / method / "tmp").exists()
"""


def test_a_measured_job_leaves_nothing_in_the_system_temporary_folder(tmp_path: Path) -> None:
    """Every temporary file of a job lives under its work folder (issue 11: ANTs left three
    prior images and a transform per job in /tmp). The job runs in its own process whose
    system temporary folder (TMPDIR) is a fresh folder, so other tests running beside it
    cannot be counted; with Atropos (which writes its prior images to temporary files) as
    well as the default EM. Without ketanode.imaging.scratch the folder fills."""
    ph = make_phantom(PhantomSpec(seed=2, voxel_mm=(3.0, 3.0, 3.0)))
    nifti = ph.write_nifti(tmp_path / "t1.nii.gz")
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(system_tmp)}
    proc = subprocess.run(
        [sys.executable, "-c", _JOB, str(nifti), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in system_tmp.rglob("*")) == []
