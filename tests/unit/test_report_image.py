"""The report image (issue 5): a Secondary Capture in the source's study, RGB, large enough
for a reading-room display, valid by dicom3tools."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from ketanode.report.content import ResultForReport
from ketanode.report.secondary_capture import build_report_image, render_report_page, write_png
from tests.unit._report_case import DCIODVFY, clinical, dciodvfy, have, make_case, not_scored

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
WARN_RGB = (0xFF, 0xB0, 0x00)  # the demonstration-model banner
FAIL_RGB = (0xFF, 0x4D, 0x4D)  # the NOT SCORED headline box
MASK_RGB = (0x4A, 0xA3, 0xFF)  # the brain mask's outline on a not-scored page
HEADLINE_ROWS = slice(0, 400)  # title, (banner,) headline


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Dataset], ResultForReport]:
    return make_case(tmp_path_factory.mktemp("image_case"))


@pytest.fixture(scope="module")
def sc_file(
    case: tuple[list[Dataset], ResultForReport], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    source, result = case
    path = tmp_path_factory.mktemp("sc") / "report.dcm"
    build_report_image(source, result).save_as(path, enforce_file_format=True)
    return path


def _banner_pixels(pixels: np.ndarray) -> int:
    return int(np.all(pixels == np.array(WARN_RGB, dtype=np.uint8), axis=-1).sum())


def test_secondary_capture_in_the_study(
    case: tuple[list[Dataset], ResultForReport], sc_file: Path
) -> None:
    source, _ = case
    ds = pydicom.dcmread(sc_file)
    src = source[0]
    assert ds.SOPClassUID == SECONDARY_CAPTURE
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.PatientID == src.PatientID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    # a demonstration model's page says so first (issue 12)
    assert ds.SeriesDescription == "DEMO RESEARCH USE ONLY ketanode ketamine response report"
    assert ds.ImageComments.startswith("DEMO: DEMONSTRATION MODEL")
    assert ds.Rows >= 1024 and ds.Columns >= 1024
    assert ds.PhotometricInterpretation == "RGB"
    assert ds.SamplesPerPixel == 3 and ds.BitsAllocated == 8
    assert ds.BurnedInAnnotation == "NO"
    pixels = ds.pixel_array
    assert pixels.shape == (ds.Rows, ds.Columns, 3)
    assert pixels.std() > 10  # not blank
    assert _banner_pixels(pixels) > 10_000  # synthetic model: the warning banner is drawn


@pytest.mark.skipif(not have(DCIODVFY), reason="dicom3tools not installed")
def test_dciodvfy_finds_no_errors(sc_file: Path) -> None:
    errors, warnings = dciodvfy(sc_file)
    assert errors == [], errors
    assert warnings == [], warnings


def test_no_banner_for_a_non_synthetic_model(
    case: tuple[list[Dataset], ResultForReport],
) -> None:
    _, result = case
    assert _banner_pixels(render_report_page(clinical(result))) == 0


def test_indeterminate_result_page_and_no_demo_for_a_real_model(
    case: tuple[list[Dataset], ResultForReport],
) -> None:
    source, result = case
    near = replace(clinical(result), predicted_class="indeterminate", probability=0.52)
    ds = build_report_image(source, near)
    assert ds.SeriesDescription == "RESEARCH USE ONLY ketanode ketamine response report"
    assert "DEMO" not in ds.ImageComments
    pixels = render_report_page(near)
    assert pixels.shape == (2048, 1536, 3)


def test_without_territories_or_images(case: tuple[list[Dataset], ResultForReport]) -> None:
    source, result = case
    for variant in (
        replace(result, territories_path=None),
        replace(result, gm_path=None, territories_path=None),
        replace(result, t1_path=None, gm_path=None, territories_path=None),
    ):
        ds = build_report_image(source, variant)
        assert ds.Rows >= 1024 and ds.pixel_array.std() > 5


def test_png(case: tuple[list[Dataset], ResultForReport], sc_file: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = write_png(pydicom.dcmread(sc_file), tmp_path / "page.png")
    with Image.open(out) as im:
        assert im.mode == "RGB" and min(im.size) >= 1024


def test_logs_hold_no_patient_identifiers(
    case: tuple[list[Dataset], ResultForReport], caplog: pytest.LogCaptureFixture
) -> None:
    source, result = case
    with caplog.at_level(logging.DEBUG, logger="ketanode"):
        ds = build_report_image(source, replace(result, t1_path=None))
    assert ds.SOPInstanceUID in caplog.text
    for value in (source[0].PatientID, str(source[0].PatientName)):
        assert value not in caplog.text


# --- not scored: examined, QC failed, no prediction ------------------------------------------


def _fail_pixels(pixels: np.ndarray) -> int:
    return int(np.all(pixels == np.array(FAIL_RGB, dtype=np.uint8), axis=-1).sum())


@pytest.fixture(scope="module")
def not_scored_sc_file(
    case: tuple[list[Dataset], ResultForReport], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    source, result = case
    path = tmp_path_factory.mktemp("sc_not_scored") / "report.dcm"
    build_report_image(source, not_scored(result)).save_as(path, enforce_file_format=True)
    return path


@pytest.mark.skipif(not have(DCIODVFY), reason="dicom3tools not installed")
def test_not_scored_dciodvfy_finds_no_errors(not_scored_sc_file: Path) -> None:
    errors, warnings = dciodvfy(not_scored_sc_file)
    assert errors == [], errors
    assert warnings == [], warnings


def test_not_scored_page_has_the_headline_and_the_t1(
    case: tuple[list[Dataset], ResultForReport], not_scored_sc_file: Path
) -> None:
    source, result = case
    ds = pydicom.dcmread(not_scored_sc_file)
    assert ds.StudyInstanceUID == source[0].StudyInstanceUID
    assert ds.SeriesDescription.startswith("RESEARCH USE ONLY")
    assert "NOT SCORED - quality control failed" in ds.ImageComments
    unscored = not_scored(result)
    assert unscored.gm_path is None and unscored.territories_path is None
    page = ds.pixel_array
    assert page.shape == (ds.Rows, ds.Columns, 3) and ds.Rows >= 1024
    scored = render_report_page(result)
    # the red NOT SCORED box fills the headline area; a scored page has none of it
    assert _fail_pixels(page[HEADLINE_ROWS]) > 150_000
    assert _fail_pixels(scored[HEADLINE_ROWS]) == 0
    assert _banner_pixels(page) < 10_000  # no demonstration banner (only the warn line)
    assert not np.array_equal(page, scored)
    # the T1 slices are drawn in the middle of the page (no chart below them)
    assert page[900:1700].std() > 10
    without_t1 = render_report_page(replace(unscored, t1_path=None))
    assert np.abs(page[900:1700].astype(int) - without_t1[900:1700]).mean() > 5


def test_not_scored_thin_slab_and_png(
    case: tuple[list[Dataset], ResultForReport], tmp_path: Path
) -> None:
    import nibabel as nib
    from PIL import Image

    _, result = case
    assert result.t1_path is not None
    img = nib.load(str(result.t1_path))
    assert isinstance(img, nib.Nifti1Image)
    slab = np.asarray(img.get_fdata(), dtype=np.float32)[:, :, 30:35]
    slab_path = tmp_path / "slab.nii.gz"
    nib.save(nib.Nifti1Image(slab, img.affine), str(slab_path))
    thin = replace(
        not_scored(result),
        t1_path=slab_path,
        not_scored_reason="QC failed: coverage = 15 mm (fail): smallest field-of-view extent",
    )
    page = render_report_page(thin)
    assert _fail_pixels(page[HEADLINE_ROWS]) > 150_000
    assert page[900:1700].std() > 10  # the slab's own plane, not slivers
    out = write_png(thin, tmp_path / "not_scored.png")
    with Image.open(out) as im:
        assert im.mode == "RGB" and min(im.size) >= 1024


# --- a real head: neck and shoulders in the field of view -------------------------------------


def _head_with_neck(root: Path) -> dict[str, Path]:
    """A 2 mm RAS volume: a brain (its intracranial mask given) in the upper part of the
    field of view and, below it, a larger and brighter "neck"; territories: label 6 (the top
    driver of the case, right deep grey) spills from the bottom of the brain far into the
    neck, label 1 (left frontal) lies in the front of the brain."""
    import nibabel as nib

    shape = (60, 70, 110)
    idx = np.indices(shape, dtype=np.float32)

    def ellipsoid(centre: tuple[float, float, float], radii: tuple[float, float, float]):
        return sum(((idx[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) <= 1.0

    brain = ellipsoid((30, 35, 80), (20, 24, 18))
    neck = ellipsoid((30, 35, 32), (26, 30, 28)) & ~ellipsoid((30, 35, 80), (23, 27, 21))
    t1 = np.where(brain, 0.6, 0.0) + np.where(neck, 1.0, 0.0)
    t1 += 0.3 * ellipsoid((30, 35, 80), (12, 14, 10))  # some "white matter"
    terr = np.zeros(shape, dtype=np.int16)
    terr[(brain & (idx[2] < 70)) | ellipsoid((30, 35, 30), (20, 24, 24))] = 6
    terr[brain & (idx[1] > 45)] = 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = {}
    for name, data in (
        ("t1", t1.astype(np.float32)),
        ("mask", brain.astype(np.uint8)),
        ("terr", terr),
    ):
        paths[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(paths[name]))
    return paths


def _mask_pixels(pixels: np.ndarray) -> int:
    return int(np.all(pixels == np.array(MASK_RGB, dtype=np.uint8), axis=-1).sum())


def _brain_box(mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    idx = np.argwhere(np.asarray(nib.load(str(mask_path)).get_fdata()) > 0.5)
    return idx.min(axis=0), idx.max(axis=0) + 1


def test_a_head_with_a_neck_is_drawn_at_the_brain(
    case: tuple[list[Dataset], ResultForReport], tmp_path: Path
) -> None:
    from ketanode.report.secondary_capture import BRAIN_MARGIN_MM, slice_geometry

    _, result = case
    paths = _head_with_neck(tmp_path)
    lo, hi = _brain_box(paths["mask"])
    margin = int(np.ceil(BRAIN_MARGIN_MM / 2.0))
    scored = replace(
        result,
        t1_path=paths["t1"],
        gm_path=None,
        territories_path=paths["terr"],
        brain_mask_path=paths["mask"],
    )
    unscored = replace(not_scored(result), t1_path=paths["t1"], brain_mask_path=paths["mask"])

    def inside_the_brain(centres: tuple[tuple[int, int, int], ...]) -> bool:
        return len(centres) == 2 and all(
            np.all(np.array(c) >= lo) and np.all(np.array(c) < hi) for c in centres
        )

    # a scored page: the panels show the brain plus the margin, not the neck below it, and
    # every row's three slices cut the brain
    geo = slice_geometry(scored)
    assert geo.brain_box == tuple((int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    for (a, b), m0, m1, n in zip(geo.box, lo, hi, (60, 70, 110), strict=True):
        assert a == max(m0 - margin, 0) and b == min(m1 + margin, n)
    assert inside_the_brain(geo.centres), (geo.centres, lo, hi)
    # the top driver's slices go through its part inside the brain (its territory's centre,
    # neck included, lies below the brain), the next driver's through the front of the brain
    assert geo.centres[0][2] < 80 and geo.centres[1][1] > 45
    # a not-scored page shows the image as received (the mask may be what went wrong: it is
    # outlined), its slices through the brain all the same
    geo = slice_geometry(unscored)
    assert geo.box[2][0] < lo[2] - margin and inside_the_brain(geo.centres), geo
    for variant in (scored, unscored):
        assert render_report_page(variant)[900:1700].std() > 10
    outlined = render_report_page(unscored)[600:1800]
    plain = render_report_page(replace(unscored, brain_mask_path=None))[600:1800]
    assert _mask_pixels(outlined) > 500 and _mask_pixels(plain) == 0
    # without a mask (a series stopped before preprocessing) the page keeps the head crop:
    # this head's neck then draws the slices, which is what the mask prevents
    for variant in (replace(scored, brain_mask_path=None), replace(unscored, brain_mask_path=None)):
        geo = slice_geometry(variant)
        assert geo.brain_box is None and geo.box[2][0] < lo[2] - margin
        assert not inside_the_brain(geo.centres), geo
