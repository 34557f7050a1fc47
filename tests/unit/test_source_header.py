"""Report builders on real-world source headers (issue 13, item 1): values not valid for
their VR are left empty in the SR and the report image, the identity UIDs are kept, and
the builders never raise on them."""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.tag import BaseTag
from pydicom.valuerep import DA, TM

from ketanode.report.content import ResultForReport
from ketanode.report.secondary_capture import build_report_image
from ketanode.report.source_header import TYPE_2, clean_source_header
from ketanode.report.sr import build_sr
from tests.unit._report_case import (
    DCIODVFY,
    dciodvfy,
    have,
    make_case,
    not_scored,
    saved,
    small_page,
)

REAL_HEAD = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "data"
    / "dicom"
    / "uih-t1-3d-sag"
    / "00000001.dcm"
)
JUNK_KEYWORDS = ("StudyDate", "StudyTime", "PatientBirthDate", "PatientName")
DEVICE_UID = "1.2.826.0.1.3680043.8.498.1"
# highdicom's advice on single-component person names ("***"): not what is tested here
pytestmark = pytest.mark.filterwarnings("ignore:The string .* person name:UserWarning")


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Dataset], ResultForReport]:
    return make_case(tmp_path_factory.mktemp("source_header_case"))


def _put(ds: Dataset, keyword: str, value: Any) -> None:
    """Set a value as a file may hold it: unchecked (None: the attribute is missing)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    if value is None:
        if tag in ds:
            del ds[tag]
        return
    vr = dictionary_VR(tag)
    try:
        ds[tag] = DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE)
    except ValueError:  # DS 'abc': only raw bytes hold it, as they come from a file
        raw = str(value).encode("latin-1")
        ds[tag] = RawDataElement(BaseTag(tag), vr, len(raw), raw, 0, False, True)


# --- the real anonymised head -------------------------------------------------------------


@pytest.mark.skipif(not REAL_HEAD.is_file(), reason="shared data not available")
@pytest.mark.skipif(not have(DCIODVFY), reason="dicom3tools not installed")
def test_real_anonymised_head_gets_sr_not_scored_sr_and_report_image(
    case: tuple[list[Dataset], ResultForReport],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, result = case
    header = pydicom.dcmread(REAL_HEAD, stop_before_pixels=True)
    assert header.StudyDate == "***" and header.PatientBirthDate == "***"  # the input
    with caplog.at_level(logging.INFO, logger="ketanode"):
        built = {
            "sr": build_sr([header], result, device_uid=DEVICE_UID),
            "sr_not_scored": build_sr([header], not_scored(result), device_uid=DEVICE_UID),
            "image": build_report_image([header], replace(result, t1_path=None)),
            "image_not_scored": build_report_image([header], not_scored(result)),
        }
    for name, obj in built.items():
        path = tmp_path / f"{name}.dcm"
        ds = saved(obj, path)
        errors, _ = dciodvfy(path)
        assert errors == [], (name, errors)
        assert ds.StudyInstanceUID == header.StudyInstanceUID, name
        assert ds.PatientID == header.PatientID, name
        assert ds.PatientName == header.PatientName, name
        assert ds.PatientSex == header.PatientSex, name
        assert ds.StudyTime == header.StudyTime, name
        assert ds.StudyID == header.StudyID, name
        # the '***' dates: present (type 2), empty
        assert "StudyDate" in ds and ds.StudyDate == "", name
        assert "PatientBirthDate" in ds and ds.PatientBirthDate == "", name
        assert ds.get("PatientAge", "") == "", name
        assert ds.SeriesInstanceUID != header.SeriesInstanceUID, name
    evidence = pydicom.dcmread(tmp_path / "sr.dcm").CurrentRequestedProcedureEvidenceSequence
    assert evidence[0].StudyInstanceUID == header.StudyInstanceUID
    refs = evidence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in refs] == [header.SOPInstanceUID]
    # what was left empty is logged by keyword
    blanked = [r.getMessage() for r in caplog.records if "left empty" in r.getMessage()]
    assert blanked and all("StudyDate" in m and "PatientBirthDate" in m for m in blanked)


# --- the copy itself ------------------------------------------------------------------------


def test_valid_values_are_copied_unchanged(case: tuple[list[Dataset], ResultForReport]) -> None:
    source, _ = case
    header = clean_source_header(source[0])
    assert header.blanked == ()
    for keyword in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "StudyDate",
        "StudyTime",
        "SpecificCharacterSet",
    ):
        if keyword in source[0]:
            assert header.dataset[keyword].value == source[0][keyword].value, keyword


def test_invalid_values_are_left_empty_and_logged_by_keyword(
    case: tuple[list[Dataset], ResultForReport], caplog: pytest.LogCaptureFixture
) -> None:
    source, _ = case
    src = copy.deepcopy(source[0])
    bad = {
        "StudyDate": "20181399",
        "StudyTime": "256060",
        "PatientBirthDate": "19800101-",
        "PatientName": "Doe\x01Jane",
        "PatientAge": "***",
        "PatientSex": "X",
        "PatientID": "SECRET-" + "9" * 70,  # over-long LO
        "AccessionNumber": ["A1", "A2"],  # VM 1
        "StudyDescription": "Kopf \u4e2d",  # not in the source's ISO_IR 100
        "PatientWeight": "abc",
    }
    for keyword, value in bad.items():
        _put(src, keyword, value)
    src.StudyInstanceUID = source[0].StudyInstanceUID
    with caplog.at_level(logging.DEBUG, logger="ketanode"):
        header = clean_source_header(src)
    assert set(header.blanked) == set(bad)
    for keyword in bad:
        assert keyword in header.dataset and header.dataset[keyword].value in ("", None)
    assert header.dataset.StudyInstanceUID == source[0].StudyInstanceUID
    assert header.dataset.SOPInstanceUID == source[0].SOPInstanceUID
    logged = caplog.text
    assert all(keyword in logged for keyword in bad)
    assert "SECRET" not in logged and "Doe" not in logged and "Kopf" not in logged


def test_missing_type_2_attributes_are_present_and_empty(
    case: tuple[list[Dataset], ResultForReport], tmp_path: Path
) -> None:
    source, result = case
    src = copy.deepcopy(source[0])
    for keyword in TYPE_2:
        _put(src, keyword, None)
    header = clean_source_header(src)
    assert header.blanked == ()
    for keyword in TYPE_2:
        assert keyword in header.dataset and header.dataset[keyword].value in ("", None)
    sr = saved(build_sr([src], result, device_uid=DEVICE_UID), tmp_path / "sr.dcm")
    assert sr.PatientID == "" and sr.StudyInstanceUID == src.StudyInstanceUID


def test_unusable_character_set_falls_back_to_utf8(
    case: tuple[list[Dataset], ResultForReport],
) -> None:
    source, result = case
    src = copy.deepcopy(source[0])
    _put(src, "SpecificCharacterSet", "ISO-IR 999")
    _put(src, "PatientName", "Müller^Jürgen")
    header = clean_source_header(src)
    assert header.blanked == ("SpecificCharacterSet",)
    assert header.dataset.SpecificCharacterSet == "ISO_IR 192"
    sr = saved(build_sr([src], result, device_uid=DEVICE_UID))
    assert str(sr.PatientName) == "Müller^Jürgen"


@pytest.mark.skipif(not have(DCIODVFY), reason="dicom3tools not installed")
@pytest.mark.parametrize(
    "values",
    [
        {"StudyDate": "***", "PatientBirthDate": "***", "PatientAge": "***"},
        {"StudyDate": "2018-09-25", "StudyTime": "13:22:22", "PatientName": "x" * 80},
        {"PatientName": "a\\b", "PatientSex": "m", "PatientID": None, "StudyDate": None},
        {"SpecificCharacterSet": "ISO 2022 IR 100", "PatientName": "Ærø^Åse"},
        {"AcquisitionDateTime": "***", "Manufacturer": "\x00", "BodyPartExamined": "brain"},
        {"BodyPartExamined": "45Y"},  # not a body part: dciodvfy then wants a Laterality
        {"BodyPartExamined": "KNEE"},  # a paired one
    ],
    ids=[
        "anonymiser",
        "formatted-and-long",
        "multi-and-missing",
        "charset",
        "equipment",
        "junk-body-part",
        "paired-body-part",
    ],
)
def test_odd_headers_build_valid_objects(
    case: tuple[list[Dataset], ResultForReport], tmp_path: Path, values: dict[str, Any]
) -> None:
    source, result = case
    src = copy.deepcopy(source[0])
    for keyword, value in values.items():
        _put(src, keyword, value)
    with mock.patch("ketanode.report.secondary_capture.render_report_page", small_page):
        objects = {
            "sr": build_sr([src], result, device_uid=DEVICE_UID),
            "sr_not_scored": build_sr([src], not_scored(result), device_uid=DEVICE_UID),
            "image": build_report_image([src], result),
        }
    for name, obj in objects.items():
        path = tmp_path / f"{name}.dcm"
        ds = saved(obj, path)
        errors, _ = dciodvfy(path)
        assert errors == [], (name, errors)
        assert ds.StudyInstanceUID == src.StudyInstanceUID


# --- property: junk in the dates, times and names never stops a report ----------------------

_JUNK = st.one_of(
    st.none(),  # missing
    st.text(max_size=80),
    st.text(alphabet="0123456789.-+:/ *\\^=", max_size=30),  # near-valid dates, times, names
    st.sampled_from(["***", "", " ", "00000000", "20180231", "240000", "19800101-", "^^^^^"]),
)


def _is_valid(keyword: str, value: str) -> bool:
    try:
        if keyword in ("StudyDate", "PatientBirthDate"):
            DA(value)
        elif keyword == "StudyTime":
            TM(value)
    except ValueError:
        return False
    return True


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(values=st.fixed_dictionaries({k: _JUNK for k in JUNK_KEYWORDS}))
def test_junk_dates_times_and_names_never_make_the_builders_raise(
    case: tuple[list[Dataset], ResultForReport], values: dict[str, Any]
) -> None:
    """The NOT SCORED report (its SR builds in a quarter of the scored one's time; the
    header is handled alike, and the scored SR is built from odd headers above)."""
    source, result = case
    src = copy.deepcopy(source[0])
    for keyword, value in values.items():
        _put(src, keyword, value)
    report = not_scored(result)
    with mock.patch("ketanode.report.secondary_capture.render_report_page", small_page):
        objects = [
            build_sr([src, *source[1:3]], report, device_uid=DEVICE_UID),
            build_report_image([src], report),
        ]
    for obj in objects:
        ds = saved(obj)
        assert ds.StudyInstanceUID == source[0].StudyInstanceUID
        assert ds.PatientID == source[0].PatientID
        for keyword in values:
            assert keyword in ds  # type 2: present, empty when missing or invalid
            out = str(ds[keyword].value or "")
            if out:  # copied as it was, and valid
                assert out == str(src[keyword].value).rstrip(" "), keyword
                assert _is_valid(keyword, out), keyword
