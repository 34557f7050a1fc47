"""Measurement: feature spec hash, accuracy against known truth, QC failures, pipeline steps.

Coarse (2-3 mm) images keep the file fast; the 1 mm accuracy and timing are a benchmark.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ketanode.config import QCSettings, Settings
from ketanode.imaging import qc
from ketanode.imaging.analysis import analyse
from ketanode.imaging.atlas import TEMPLATE_T1, load_atlas
from ketanode.imaging.convert import describe
from ketanode.imaging.features import FeatureSpec, default_spec
from ketanode.imaging.measure import Measurement, RegionVolumes, template_truth
from ketanode.imaging.scratch import scratch_dir
from ketanode.process import pipeline
from ketanode.process.context import JobContext
from ketanode.synthetic.phantom import PhantomSpec, make_phantom, noise_volume, slab_spec

# --- feature spec ----------------------------------------------------------------------------


def test_spec_hash_is_stable_and_covers_the_spec() -> None:
    spec = default_spec()
    assert spec.sha256 == default_spec().sha256
    assert len(spec.sha256) == 64
    names = [r.name for r in load_atlas().regions]
    assert list(spec.features) == [f"gm_{n}" for n in names] + [
        "gm_total",
        "wm_total",
        "csf_total",
        "tiv",
    ]
    for changed in (
        replace(spec, version="999"),
        replace(spec, name="other"),
        replace(spec, features=spec.features[::-1]),
        replace(spec, features=spec.features[:-1]),
    ):
        assert changed.sha256 != spec.sha256
    # the canonical form is plain JSON with sorted keys: stable across processes
    assert spec.canonical().startswith('{"atlas":"desikan_killiany"')


def test_vector_follows_spec_order() -> None:
    atlas = load_atlas()
    regions = {r.name: RegionVolumes(float(i), 0.0, 0.0) for i, r in enumerate(atlas.regions)}
    m = Measurement(atlas.name, regions, 600.0, 450.0, 250.0, 1300.0)
    vec = default_spec().vector(m)
    assert vec[: len(regions)] == [float(i) for i in range(len(regions))]
    assert vec[-4:] == [600.0, 450.0, 250.0, 1300.0]
    with pytest.raises(ValueError):
        FeatureSpec("x", "1", "other_atlas", ("tiv",)).vector(m)


# --- QC helpers ------------------------------------------------------------------------------


def test_qc_outcomes() -> None:
    assert qc.check_min("a", 5, 4, 2, "", "").outcome == "pass"
    assert qc.check_min("a", 3, 4, 2, "", "").outcome == "warn"
    assert qc.check_min("a", 1, 4, 2, "", "").outcome == "fail"
    assert qc.check_min("a", math.nan, 4, 2, "", "").outcome == "fail"
    assert qc.check_max("a", 5, 4, 6, "", "").outcome == "warn"
    assert qc.check_range("a", 0.7, (0.3, 0.6), (0.2, 0.8), "", "").outcome == "warn"
    assert qc.check_range("a", 0.9, (0.3, 0.6), (0.2, 0.8), "", "").outcome == "fail"
    checks = [qc.check_min("snr", 1, 4, 2, "", "white-matter mean / s.d.")]
    with pytest.raises(qc.QCFailed, match=r"snr = 1 \(white-matter mean / s.d.; fail past 2\)"):
        qc.raise_on_fail(checks)


# --- known truth -----------------------------------------------------------------------------


def _template_image(path: Path, voxel_mm: float = 2.0) -> Path:
    """The template T1 at ``voxel_mm`` under a rotated, shifted affine (a known pose); its
    own GM map (by the same territories) is the truth."""
    img = nib.load(str(TEMPLATE_T1))
    assert isinstance(img, nib.Nifti1Image)
    data = ndimage.zoom(np.asarray(img.dataobj, dtype=np.float32), 1 / voxel_mm, order=1)
    affine = img.affine.copy()
    affine[:3, :3] *= voxel_mm
    a = np.deg2rad(12.0)
    rot = np.array(
        [[1, 0, 0, 0], [0, np.cos(a), -np.sin(a), 0], [0, np.sin(a), np.cos(a), 0], [0, 0, 0, 1]]
    )
    shift = np.eye(4)
    shift[:3, 3] = [6.0, -9.0, 14.0]
    rng = np.random.default_rng(0)
    data = np.clip(data + rng.normal(0, 4, data.shape), 0, None).astype(np.float32)
    nib.save(nib.Nifti1Image(data, shift @ rot @ affine), str(path))
    return path


@pytest.fixture(scope="module")
def template_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """All pipeline steps after convert, on the template-based image."""
    work = tmp_path_factory.mktemp("template")
    settings = Settings()
    ctx = JobContext(1, 1, 1, work, [], settings)
    ctx.results.convert = describe(_template_image(work / "t1.nii.gz"))
    # the measurement steps (no predict, no report), as stored with each step
    return {name: fn(ctx).as_dict() for name, fn in pipeline.MEASUREMENT}


def test_pipeline_steps_run_on_a_nifti(template_run: dict[str, Any]) -> None:
    assert [n for n, _ in pipeline.STEPS] == [
        "convert",
        "qc_input",
        "preprocess",
        "qc_registration",
        "segment",
        "measure",
        "qc",
        "predict",
        "report",
    ]
    m = template_run["measure"]
    spec = default_spec()
    assert m["spec"] == {"name": spec.name, "version": spec.version, "sha256": spec.sha256}
    assert m["names"] == list(spec.features) and len(m["vector"]) == len(spec.features)
    assert Path(template_run["preprocess"]["n4_path"]).is_file()
    assert Path(template_run["segment"]["gm_path"]).is_file()
    assert template_run["qc"]["outcome"] in ("pass", "warn")  # 2 mm voxels warn
    by_name = {c["name"]: c for c in template_run["qc"]["checks"]}
    assert by_name["registration"]["outcome"] == "pass"
    assert by_name["brain_in_fov"]["outcome"] == "pass"
    assert by_name["voxel_size"]["outcome"] == "warn"


def test_template_measured_within_tolerance(template_run: dict[str, Any]) -> None:
    """The template T1 itself (brain only, 2 mm, rotated and shifted): its TIV and total GM.
    Regional accuracy is not asserted here: the template is a blurry population average
    whose tissue maps are probabilities, not an image a scanner makes (its CSF measures
    +44 %, its cerebellum -16 %); regional accuracy is held on the non-circular phantoms
    (test_realistic_accuracy.py) and on the real head against SAMSEG (bench/reference.py)."""
    truth = template_truth()
    m = template_run["measure"]
    got = dict(zip(m["names"], m["vector"], strict=True))
    assert abs(got["tiv"] / truth["tiv"] - 1) <= 0.05, (got["tiv"], truth["tiv"])
    assert abs(got["gm_total"] / truth["gm_total"] - 1) <= 0.10, (got["gm_total"], truth)


@pytest.fixture(scope="module")
def phantom_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One realistic phantom subject (skull, scalp, pose, warp, bias, Rician noise) at 2 mm,
    and the same subject with frontal GM scaled by +8 %; both analysed."""
    out: dict[str, Any] = {}
    for name, factors in (("base", {}), ("frontal_plus_8", FRONTAL_PLUS_8)):
        work = tmp_path_factory.mktemp(name)
        ph = make_phantom(PhantomSpec(seed=3, voxel_mm=(2.0, 2.0, 2.0), gm_factors=factors))
        out[name] = (ph, analyse(ph.write_nifti(work / "t1.nii.gz"), work))
    return out


FRONTAL_PLUS_8 = {"left_frontal": 1.08, "right_frontal": 1.08}


def test_phantom_measured_within_tolerance(phantom_pair: dict[str, Any]) -> None:
    """Regional GM against the phantom's truth at 2 mm: median <= 5 %, frontal <= 10 %,
    TIV <= 5 % (issue 3). The cerebellum gets 15 % here: at 2 mm its folia are all partial
    volume and it measures -13 %; at 1 mm it is held to 10 % on the non-circular phantoms
    (test_realistic_accuracy.py)."""
    ph, result = phantom_pair["base"]
    failed = [c for c in result["qc"]["checks"] if c["outcome"] == "fail"]
    assert not failed, failed
    m = result["features"]["measurement"]
    errors = {k: v["gm_ml"] / ph.truth["regions"][k]["gm_ml"] - 1 for k, v in m["regions"].items()}
    assert np.median(np.abs(list(errors.values()))) <= 0.05, errors
    for k in ("left_frontal", "right_frontal"):
        assert abs(errors[k]) <= 0.10, (k, errors[k])
    for k in ("left_cerebellum", "right_cerebellum"):
        assert abs(errors[k]) <= 0.15, (k, errors[k])
    assert abs(m["tiv_ml"] / ph.truth["tiv_ml"] - 1) <= 0.05


def test_frontal_increase_of_8_percent_is_measured(phantom_pair: dict[str, Any]) -> None:
    """Sensitivity: the same subject with frontal GM x1.08 (grown at the grey/white
    interface) measures a frontal increase of +5 % to +11 % (issue 3); regions that were not
    scaled move by less than 3 % (the segmentation's class means are global, so a frontal
    change leaks a little into the other regions: about -3 % in the occipital lobe)."""
    base_ph, base = phantom_pair["base"]
    plus_ph, plus = phantom_pair["frontal_plus_8"]
    b = base["features"]["measurement"]["regions"]
    p = plus["features"]["measurement"]["regions"]
    for region in FRONTAL_PLUS_8:
        truth = (
            plus_ph.truth["regions"][region]["gm_ml"] / base_ph.truth["regions"][region]["gm_ml"]
        )
        assert truth == pytest.approx(1.08, abs=0.01)
        change = p[region]["gm_ml"] / b[region]["gm_ml"] - 1
        assert 0.05 <= change <= 0.11, (region, change)
    for region in ("left_cerebellum", "right_cerebellum", "left_occipital", "right_parietal"):
        assert abs(p[region]["gm_ml"] / b[region]["gm_ml"] - 1) <= 0.03, region


@pytest.mark.parametrize("seed", [5, 7, 11])
def test_registration_finds_rotated_shifted_heads(seed: int, tmp_path: Path) -> None:
    """15 degree rotations and 15 mm shifts of a whole head (scalp, skull): the brain mask
    lands on the template's brain (Dice >= 0.9) and its volume is the phantom's TIV."""
    from ketanode.imaging import preprocess

    spec = PhantomSpec(seed=seed, voxel_mm=(2.0, 2.0, 2.0), rotation_deg=15, translation_mm=15)
    ph = make_phantom(spec)
    with scratch_dir(tmp_path / "tmp"):  # ANTs' temporaries stay out of /tmp
        pre = preprocess.preprocess(ph.write_nifti(tmp_path / "t1.nii.gz"), tmp_path)
    checks = {
        c.name: c
        for c in qc.registration_checks(pre.mask_path, pre.registration, pre.brain_ml, QCSettings())
    }
    assert checks["registration"].value >= 0.90, checks["registration"]
    assert checks["brain_in_fov"].value >= 0.98, checks["brain_in_fov"]
    assert abs(pre.brain_ml / ph.truth["tiv_ml"] - 1) <= 0.05, (pre.brain_ml, ph.truth["tiv_ml"])


# --- QC failures -----------------------------------------------------------------------------


def test_qc_fails_pure_noise(tmp_path: Path) -> None:
    noise = noise_volume(PhantomSpec(seed=1, voxel_mm=(3.0, 3.0, 3.0)))
    result = analyse(noise.write_nifti(tmp_path / "noise.nii.gz"), tmp_path)
    assert result["qc"]["outcome"] == "fail" and "features" not in result
    failed = {c["name"] for c in result["qc"]["checks"] if c["outcome"] == "fail"}
    # the brain extractor's blob fills the field of view: far beyond any intracranial volume
    assert failed == {"brain_volume"}, result["qc"]
    assert "QC failed: brain_volume = " in result["error"]


def test_qc_fails_a_5mm_slab_before_heavy_work(tmp_path: Path) -> None:
    slab = make_phantom(slab_spec(seed=2, slice_mm=5.0, n_slices=8))
    path = slab.write_nifti(tmp_path / "slab.nii.gz")
    with pytest.raises(qc.QCFailed) as info:
        pipeline.step_qc_input(_ctx_with(tmp_path, path))
    message = str(info.value)
    assert "voxel_size = 5 mm" in message and "coverage = 40 mm" in message
    result = analyse(path, tmp_path)
    assert result["qc"]["outcome"] == "fail" and "features" not in result


def _ctx_with(work: Path, path: Path) -> JobContext:
    ctx = JobContext(1, 1, 1, work, [], Settings())
    ctx.results.convert = describe(path)
    return ctx


def test_qc_thresholds_come_from_config(tmp_path: Path) -> None:
    strict = QCSettings(max_voxel_mm_warn=0.5, max_voxel_mm_fail=1.5)
    img = nib.Nifti1Image(np.ones((90, 110, 90), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    assert strict.max_voxel_mm_fail == 1.5
    checks = {c.name: c for c in qc.geometry_checks(_save(img, tmp_path / "i.nii.gz"), strict)}
    assert checks["voxel_size"].outcome == "fail" and checks["voxel_size"].fail == 1.5
    assert checks["coverage"].outcome == "pass"


def _save(img: nib.Nifti1Image, path: Path) -> Path:
    nib.save(img, str(path))
    return path
