"""The non-circular whole-head phantom: warp, truth, individual anatomy, head, contrasts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage as ndi

from ketanode.imaging.atlas import load_atlas
from ketanode.imaging.convert import convert_series
from ketanode.synthetic import realistic_phantom as rp
from ketanode.synthetic.phantom import (
    WM_SIGNAL,
    Phantom,
    PhantomSpec,
    _template_model,
    make_phantom,
)

V2 = (2.0, 2.0, 2.0)
V4 = (4.0, 4.0, 4.0)


@pytest.fixture(scope="module")
def specs() -> list[rp.RealisticSpec]:
    return rp.realistic_specs(2.0)


@pytest.fixture(scope="module")
def mprage(specs: list[rp.RealisticSpec]) -> Phantom:
    return make_phantom(specs[0])


@pytest.fixture(scope="module")
def spgr(specs: list[rp.RealisticSpec]) -> Phantom:
    return make_phantom(specs[2])


def _individual(spec: rp.RealisticSpec) -> tuple[rp._Individual, object]:
    model = _template_model(load_atlas())
    return rp._individual(spec, model, rp._head_model(model)), model


def test_warp_is_large_smooth_and_diffeomorphic(specs: list[rp.RealisticSpec]) -> None:
    for spec in specs:
        ind, model = _individual(spec)
        stats = ind.warp_stats
        # several mm everywhere in the brain, none of it affine
        assert stats["rms_mm"] >= 4.0, stats
        assert stats["rms_after_affine_mm"] >= 4.0, stats
        assert 8.0 <= stats["max_mm"] <= 16.0, stats
        # positive Jacobian over the whole head, |du/dy| < 1 (a contraction: invertible)
        assert stats["jacobian_min_head"] > 0.3, stats
        assert stats["max_gradient_norm_head"] < 0.76, stats
        # checked again here on a denser lattice over the brain
        icv = (model.gm + model.wm + model.csf) > 0  # type: ignore[attr-defined]
        y = rp._lattice(icv, model.affine, 2)  # type: ignore[attr-defined]
        det = np.linalg.det(np.eye(3)[None] + ind.warp.jacobian(y))
        assert det.min() > 0.3 and det.max() < 3.0
        # the analytic Jacobian is the warp's derivative (central differences)
        p, e = y[:, ::997], 0.05
        numeric = np.stack(
            [
                (
                    ind.warp.value(p + e * np.eye(3)[:, [k]])
                    - ind.warp.value(p - e * np.eye(3)[:, [k]])
                )
                / (2 * e)
                for k in range(3)
            ],
            axis=-1,
        ).transpose(1, 0, 2)
        assert np.abs(numeric - ind.warp.jacobian(p)).max() < 0.01
        # native <-> template round trip
        back = ind.to_template(ind.to_native(y[:, ::50]))
        assert np.abs(back - y[:, ::50]).max() < 1e-3


def test_truth_matches_the_jacobian_weighted_template_sums(mprage: Phantom, spgr: Phantom) -> None:
    for ph in (mprage, spgr):
        t, check = ph.truth, ph.truth["template_check"]
        assert t["kind"] == "realistic_phantom"
        for key in ("gm_ml", "wm_ml", "csf_ml", "tiv_ml"):
            assert t[key] == pytest.approx(check[key], rel=0.01), key
        assert t["gm_ml"] + t["wm_ml"] + t["csf_ml"] == pytest.approx(t["tiv_ml"], rel=1e-6)
        errors = []
        for name, region in t["regions"].items():
            want = check["regions"][name]["gm_ml"]
            assert region["gm_ml"] == pytest.approx(want, rel=0.03), name
            errors.append(abs(region["gm_ml"] / want - 1))
        assert float(np.median(errors)) < 0.01
        # an adult head
        assert 1100 < t["tiv_ml"] < 2000
        assert 0.38 < t["gm_ml"] / t["tiv_ml"] < 0.6
        for name in ("left_frontal", "right_frontal", "left_cerebellum", "right_cerebellum"):
            assert t["regions"][name]["gm_ml"] > 20
        json.dumps(t)


def test_anatomy_differs_between_subjects(mprage: Phantom, spgr: Phantom) -> None:
    a, b = mprage.truth, spgr.truth
    assert a["region_factors"] != b["region_factors"]
    assert a["warp"] != b["warp"] and a["individual"] != b["individual"]
    # regional GM as a share of total GM: several regions differ by more than 5 %
    share = {
        name: (a["regions"][name]["gm_ml"] / a["gm_ml"])
        / (b["regions"][name]["gm_ml"] / b["gm_ml"])
        for name in a["regions"]
    }
    assert sum(abs(r - 1) > 0.05 for r in share.values()) >= 5, share
    # region sizes (all tissue of a territory, relative to TIV) differ too: the warp moves
    # region boundaries and changes local volume
    size = {
        name: sum(a["regions"][name].values())
        / a["tiv_ml"]
        / (sum(b["regions"][name].values()) / b["tiv_ml"])
        for name in a["regions"]
    }
    assert sum(abs(r - 1) > 0.03 for r in size.values()) >= 5, size
    assert abs(a["tiv_ml"] / b["tiv_ml"] - 1) > 0.05


def test_head_has_a_neck_and_the_brain_is_not_centred(mprage: Phantom) -> None:
    img = mprage.image  # RAS
    data = img.get_fdata()
    z_mm = nib.affines.apply_affine(
        img.affine, np.c_[np.zeros((data.shape[2], 2)), np.arange(data.shape[2])]
    )[:, 2]
    brain = mprage.truth["brain"]
    bottom = brain["bbox_ras"][0][2]
    top = brain["bbox_ras"][1][2]
    tissue = (data > 0.2 * WM_SIGNAL).sum(axis=(0, 1)) * 4.0  # mm^2 per axial slice
    below = (z_mm < bottom) & (z_mm >= bottom - 40.0)
    assert below.sum() >= 19
    assert np.all(tissue[below] > 2000), tissue[below]  # a neck of more than 20 cm^2
    # the field of view: the whole head top inside, the brain in its upper part
    fov_centre = np.array(mprage.truth["fov_centre_ras"])
    centroid = np.array(brain["centroid_ras"])
    assert centroid[2] - fov_centre[2] > 25.0
    assert top < z_mm.max() - 10.0
    assert tissue[z_mm > top + 22.0].max(initial=0) < 50  # air above the scalp
    assert tissue[z_mm < bottom - 60.0].min() > 2000  # still neck at the lower edge


def test_spgr_profile_fat_bright_and_less_grey_white_contrast() -> None:
    spec = rp.RealisticSpec(seed=9103, voxel_mm=V2, contrast="spgr", snr=0.0, bias=0.0)
    labels = rp.tissue_map(spec)
    spgr = rp.make_realistic_phantom(spec).data
    mprage = rp.make_realistic_phantom(replace(spec, contrast="mprage")).data

    def pure(code: int) -> np.ndarray:
        return np.asarray(ndi.binary_erosion(labels == code), dtype=bool)

    fat, wm, gm = pure(rp._L["fat"]), pure(rp.BRAIN_CODES["wm"]), pure(rp.BRAIN_CODES["gm"])
    marrow, vessel = pure(rp._L["marrow"]), labels == rp._L["vessel"]
    assert fat.sum() > 200 and wm.sum() > 1000 and gm.sum() > 300
    med = {k: float(np.median(spgr[m])) for k, m in (("fat", fat), ("wm", wm), ("gm", gm))}
    assert med["fat"] > 1.25 * med["wm"], med
    assert float(np.median(spgr[marrow])) > med["wm"]
    assert float(np.median(spgr[vessel])) > float(np.median(mprage[vessel]))
    ratio_spgr = med["gm"] / med["wm"]
    ratio_mprage = float(np.median(mprage[gm]) / np.median(mprage[wm]))
    assert ratio_mprage < 0.7 < ratio_spgr < 0.85, (ratio_mprage, ratio_spgr)
    assert float(np.median(mprage[fat])) < 1.15 * float(np.median(mprage[wm]))
    # the head's parts are all there
    for tissue in ("skin", "muscle", "bone", "marrow", "vitreous", "cord", "air", "vessel"):
        assert (labels == rp._L[tissue]).sum() > 5, tissue


def test_seeded_rescan_and_regional_factor() -> None:
    spec = rp.RealisticSpec(seed=9105, voxel_mm=V4, truth_step_mm=2.0)
    a, b = make_phantom(spec), make_phantom(spec)
    assert np.array_equal(a.data, b.data) and a.truth == b.truth
    rescan = make_phantom(replace(spec, scan_seed=1))
    assert rescan.truth["region_factors"] == a.truth["region_factors"]
    assert rescan.truth["warp"] == a.truth["warp"]
    assert rescan.truth["pose"]["rotation_deg"] != a.truth["pose"]["rotation_deg"]
    assert rescan.truth["tiv_ml"] == pytest.approx(a.truth["tiv_ml"], rel=0.01)
    frontal = make_phantom(replace(spec, gm_factors={"left_frontal": 1.08}))
    ratio = (
        frontal.truth["regions"]["left_frontal"]["gm_ml"]
        / a.truth["regions"]["left_frontal"]["gm_ml"]
    )
    assert ratio == pytest.approx(1.08, abs=0.01)
    assert frontal.truth["tiv_ml"] == pytest.approx(a.truth["tiv_ml"], rel=0.001)
    with pytest.raises(ValueError, match="contrast"):
        make_phantom(replace(spec, contrast="flair"))
    # the classic phantom is untouched
    assert make_phantom(PhantomSpec(seed=3, voxel_mm=V4)).truth["kind"] == "phantom"


def test_dicom_and_nifti(tmp_path: Path) -> None:
    spec = rp.RealisticSpec(
        seed=9102, voxel_mm=(4.0, 3.0, 3.0), contrast="spgr", orientation="axial"
    )
    phantom = make_phantom(spec)
    assert phantom.truth["truth_grid"] == "native"
    files = phantom.write_dicom(tmp_path / "dicom")
    assert len(files) == phantom.data.shape[0]
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert "BRAVO" in header.SeriesDescription and header.Manufacturer.startswith("GE")
    out = tmp_path / "back.nii.gz"
    convert_series(files, out)
    back = nib.as_closest_canonical(nib.load(str(out)))
    mine = phantom.image
    assert back.shape == mine.shape
    assert np.allclose(back.affine, mine.affine, atol=1e-3)
    assert np.max(np.abs(np.asarray(back.dataobj, dtype=np.float64) - mine.get_fdata())) <= 1.0
    # the true maps on any grid (here the image's): their sums are the truth
    img = phantom.image
    maps = rp.truth_maps(spec, img.affine, img.shape)
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    gm = np.bincount(maps["territory"].ravel(), weights=maps["gm"].ravel().astype(np.float64))
    frontal = gm[1 + list(phantom.truth["regions"]).index("left_frontal")] * voxel_ml
    assert frontal == pytest.approx(phantom.truth["regions"]["left_frontal"]["gm_ml"], rel=0.1)
    nifti = phantom.write_nifti(tmp_path / "phantom.nii.gz")
    written = nib.load(str(nifti))
    assert isinstance(written, nib.Nifti1Image)
    assert np.allclose(written.affine, mine.affine)
