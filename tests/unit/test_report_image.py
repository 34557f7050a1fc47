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
from tests.unit._report_case import DCIODVFY, clinical, dciodvfy, have, make_case

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
WARN_RGB = (0xFF, 0xB0, 0x00)  # the demonstration-model banner


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
