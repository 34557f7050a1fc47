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

from ketanode.dicom.report_content import ResultForReport
from ketanode.dicom.report_image import build_report_image, render_report_page, write_png
from tests.unit._report_case import DCIODVFY, clinical, dciodvfy, have, make_case, not_scored

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
WARN_RGB = (0xFF, 0xB0, 0x00)  # the demonstration-model banner
FAIL_RGB = (0xFF, 0x4D, 0x4D)  # the NOT SCORED headline box
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
    assert ds.SeriesDescription.startswith("RESEARCH USE ONLY")
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
