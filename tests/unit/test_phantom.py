"""The MNI152 phantom: truth, region factors, seeds, DICOM round trip and QC variants."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ketanode.imaging.convert import convert_series
from ketanode.synthetic.phantom import (
    INTENSITY,
    WM_SIGNAL,
    Phantom,
    PhantomSpec,
    make_phantom,
    noise_volume,
    simple_head,
    slab_spec,
)
from ketanode.synthetic.series_writer import SeriesSpec

COARSE = (3.0, 3.0, 3.0)


@pytest.fixture(scope="module")
def base() -> Phantom:
    return make_phantom(PhantomSpec(seed=3, voxel_mm=COARSE))


@pytest.fixture(scope="module")
def frontal() -> Phantom:
    return make_phantom(PhantomSpec(seed=3, voxel_mm=COARSE, gm_factors={"left_frontal": 1.08}))


def test_simple_head_unchanged() -> None:
    vol = simple_head((8, 16, 16), seed=1)
    assert vol.shape == (8, 16, 16) and vol.dtype == np.float32


def test_truth_is_self_consistent(base: Phantom) -> None:
    t = base.truth
    check = t["template_check"]
    for key in ("gm_ml", "wm_ml", "csf_ml", "tiv_ml"):
        assert t[key] == pytest.approx(check[key], rel=0.02), key
    assert t["gm_ml"] + t["wm_ml"] + t["csf_ml"] == pytest.approx(t["tiv_ml"], rel=0.005)
    for name, region in t["regions"].items():
        assert region["gm_ml"] == pytest.approx(check["regions"][name]["gm_ml"], rel=0.03), name
    # an adult-sized head, plausible tissue fractions
    assert 1000 < t["tiv_ml"] < 2100
    assert 0.4 < t["gm_ml"] / t["tiv_ml"] < 0.6
    for name in ("left_frontal", "right_frontal", "left_cerebellum", "right_cerebellum"):
        assert t["regions"][name]["gm_ml"] > 20
    json.dumps(t)


def test_region_factor_raises_only_that_region(base: Phantom, frontal: Phantom) -> None:
    before, after = base.truth["regions"], frontal.truth["regions"]
    ratio = after["left_frontal"]["gm_ml"] / before["left_frontal"]["gm_ml"]
    assert ratio == pytest.approx(1.08, abs=0.01)
    for name in before:
        if name != "left_frontal":
            assert after[name]["gm_ml"] == pytest.approx(before[name]["gm_ml"], rel=0.01), name
    assert frontal.truth["tiv_ml"] == pytest.approx(base.truth["tiv_ml"], rel=0.001)


def test_seeds(base: Phantom) -> None:
    again = make_phantom(PhantomSpec(seed=3, voxel_mm=COARSE))
    assert np.array_equal(again.data, base.data)
    assert again.truth == base.truth
    other = make_phantom(PhantomSpec(seed=4, voxel_mm=COARSE))
    assert not np.array_equal(other.data, base.data)
    assert other.truth["tiv_ml"] != base.truth["tiv_ml"]
    assert other.truth["pose"] != base.truth["pose"]


def test_rescan_keeps_anatomy_and_changes_the_scan(base: Phantom) -> None:
    """scan_seed: the same subject scanned again (new pose, bias field, noise)."""
    rescan = make_phantom(PhantomSpec(seed=3, scan_seed=1, voxel_mm=COARSE))
    assert rescan.truth["region_factors"] == base.truth["region_factors"]
    assert rescan.truth["pose"]["scales"] == base.truth["pose"]["scales"]
    assert rescan.truth["warp"] == base.truth["warp"]
    assert rescan.truth["pose"]["rotation_deg"] != base.truth["pose"]["rotation_deg"]
    assert rescan.truth["bias"] != base.truth["bias"]
    assert not np.array_equal(rescan.data, base.data)
    # the same brain: regional truth agrees up to resampling onto another grid
    for name, region in base.truth["regions"].items():
        got = rescan.truth["regions"][name]["gm_ml"]
        assert got == pytest.approx(region["gm_ml"], rel=0.03), name
    assert rescan.truth["tiv_ml"] == pytest.approx(base.truth["tiv_ml"], rel=0.01)


def test_image_is_ras_float32(base: Phantom) -> None:
    img = base.image
    assert img.get_data_dtype() == np.float32
    assert "".join(nib.aff2axcodes(img.affine)) == "RAS"
    assert np.allclose(img.header.get_zooms()[:3], COARSE)


def test_intensity_order_in_tissue_masks(base: Phantom) -> None:
    # tissue masks on the output grid, from the truth machinery of a noise- and bias-free twin
    spec = PhantomSpec(seed=3, voxel_mm=(2.0, 2.0, 2.0), snr=0.0, bias=0.0)
    clean = make_phantom(spec)
    noisy = make_phantom(PhantomSpec(seed=3, voxel_mm=(2.0, 2.0, 2.0)))
    values = np.sort(np.unique(clean.data[clean.data > 0]))
    assert values.size > 10
    it = clean.truth["intensity"]
    wm = np.abs(clean.data - it["wm"] * WM_SIGNAL) < 20
    gm = np.abs(clean.data - it["gm"] * WM_SIGNAL) < 20
    csf = np.abs(clean.data - it["csf"] * WM_SIGNAL) < 20
    assert wm.sum() > 1000 and gm.sum() > 1000 and csf.sum() > 50
    m_wm, m_gm, m_csf = (float(noisy.data[m].mean()) for m in (wm, gm, csf))
    assert m_wm > m_gm > m_csf
    assert INTENSITY["scalp"] > INTENSITY["wm"] > INTENSITY["skull"]


def test_dicom_round_trip(base: Phantom, tmp_path: Path) -> None:
    for orientation in ("sagittal", "axial"):
        phantom = make_phantom(
            PhantomSpec(seed=5, voxel_mm=(3.0, 2.5, 2.5), orientation=orientation)
        )
        files = phantom.write_dicom(tmp_path / orientation, SeriesSpec(vendor="ge"))
        assert len(files) == phantom.data.shape[0]
        out = tmp_path / f"{orientation}.nii.gz"
        convert_series(files, out)
        back = nib.as_closest_canonical(nib.load(str(out)))
        mine = phantom.image
        assert back.shape == mine.shape
        assert np.allclose(back.affine, mine.affine, atol=1e-3)
        assert np.max(np.abs(np.asarray(back.dataobj, dtype=np.float64) - mine.get_fdata())) <= 1.0
        # NIfTI file of the phantom itself
        nifti = phantom.write_nifti(tmp_path / f"{orientation}-phantom.nii.gz")
        assert np.allclose(nib.load(str(nifti)).affine, mine.affine)
    truth = base.write_truth(tmp_path / "truth.json")
    assert json.loads(truth.read_text())["tiv_ml"] == pytest.approx(base.truth["tiv_ml"])


def test_fov_shift_cuts_the_brain(base: Phantom) -> None:
    shifted = make_phantom(PhantomSpec(seed=3, voxel_mm=COARSE, fov_shift_mm=(0.0, 0.0, 120.0)))
    # the truth is the whole head, whatever the field of view
    assert shifted.truth["tiv_ml"] == pytest.approx(base.truth["tiv_ml"], rel=0.01)
    assert shifted.truth["truth_grid"] == "native"
    # but about half of the head is missing from the image (grid edge at the brain's centre)
    bright = 0.4 * WM_SIGNAL
    assert (shifted.data > bright).sum() < 0.65 * (base.data > bright).sum()
    # the brain is cut at the bottom face of the grid in RAS (inferior edge)
    img = shifted.image.get_fdata()
    assert img[:, :, 0].mean() > 3 * img[:, :, -1].mean()


def test_noise_and_slab_variants() -> None:
    noise = noise_volume(PhantomSpec(seed=1, voxel_mm=COARSE))
    assert noise.truth["kind"] == "noise" and noise.data.std() > 0
    slab = make_phantom(slab_spec(seed=1, slice_mm=5.0, n_slices=4, voxel_mm=(2.0, 2.0, 2.0)))
    assert slab.data.shape[0] == 4
    assert slab.image.header.get_zooms()[:3] == pytest.approx((5.0, 2.0, 2.0))
    assert slab.truth["truth_grid"] == "native"
    assert slab.data.max() > 0
