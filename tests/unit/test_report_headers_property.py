"""Issue 13, item 1, as a property: whatever a real archive holds in the source header
(invalid or empty DA/TM/DT/AS/PN, missing patient and study attributes, any Specific
Character Set, over-long values, raw bytes in any encoding, a wrong VR), the report builders
make an SR and a report image in the source's study without an exception, copy only what
was there, and a sample of them passes dciodvfy with no errors.

The headers are made as a file holds them: raw (undecoded) elements, decoded by pydicom with
the header's own character set when the builders read them. The report is the NOT SCORED one
with a small content tree and a small page (the header is handled alike for every report;
the content tree and the page do not depend on it, and cost most of the time: the scored SR
and the full page from odd headers are built in test_source_header.py)."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag

from ketanode.report import sr as sr_module
from ketanode.report.content import ResultForReport
from ketanode.report.minimal_sr import build_minimal_sr
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

DEVICE_UID = "1.2.826.0.1.3680043.8.498.1"
EXAMPLES = int(os.environ.get("KETANODE_HEADER_EXAMPLES", "1000"))
DCIODVFY_SAMPLE = 30
# pydicom's warnings on the odd values themselves (the node switches them off: logs.py)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")

KEYWORDS = (
    # DA, TM, DT, AS
    "StudyDate",
    "PatientBirthDate",
    "AcquisitionDate",
    "LastMenstrualDate",
    "StudyTime",
    "PatientBirthTime",
    "AcquisitionTime",
    "AcquisitionDateTime",
    "PatientAge",
    # PN
    "PatientName",
    "ReferringPhysicianName",
    "OtherPatientNames",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    # identifiers, descriptions, codes, numbers, long texts
    "PatientID",
    "IssuerOfPatientID",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "PatientSex",
    "PatientWeight",
    "PatientSize",
    "PatientComments",
    "AdditionalPatientHistory",
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "StationName",
    "SoftwareVersions",
    "BodyPartExamined",
)
CHARSETS = [
    "ISO_IR 100",
    "ISO_IR 192",
    "ISO_IR 6",
    "GB18030",
    "GBK",
    "ISO_IR 144",
    "ISO_IR 13",
    "ISO 2022 IR 6",
    "ISO 2022 IR 100",
    "ISO 2022 IR 87",
    "ISO-IR 999",
    "utf8",
    "",
    "\\ISO 2022 IR 87",
    "ISO 2022 IR 6\\ISO 2022 IR 87",
    "ISO 2022 IR 100\\ISO 2022 IR 144",
    "ISO 2022 IR 87\\ISO 2022 IR 100",
    "ISO_IR 100\\ISO_IR 192",
]
NEAR_VALID = [
    "***",
    "",
    " ",
    "\\",
    "^^^^^",
    "00000000",
    "20180231",
    "20181399",
    "2018-09-25",
    "19800101-",
    "240000",
    "13:22:22",
    "235959.9999999",
    "20180925132222.123456+0100",
    "2018092513",
    "045Y",
    "45Y",
    "000D",
    "Doe^Jane^^^",
    "=Doe^Jane=",
    "Doe^Jane\\Roe^Ann",
    "a" * 64,
    "a" * 65,
    "x" * 1025,
    "M",
    "m",
    "X",
    "1e400",
    "NaN",
    "-0",
]
VALUE = st.one_of(
    st.none(),  # missing
    st.sampled_from(NEAR_VALID),
    st.text(alphabet="0123456789.-+:/ *\\^=YMWD", max_size=40),
    st.text(max_size=120),  # any character, controls and far planes included
    st.text(min_size=201, max_size=2000),  # over-long
    st.binary(max_size=80),  # raw bytes: any encoding, or none
)


@st.composite
def headers(draw: st.DrawFn) -> dict[str, Any]:
    """The attributes of one generated header: keyword -> (value, encoding, VR on file)."""
    chosen = draw(
        st.dictionaries(st.sampled_from(KEYWORDS), VALUE, min_size=1, max_size=len(KEYWORDS))
    )
    out: dict[str, Any] = {
        "SpecificCharacterSet": draw(st.one_of(st.none(), st.sampled_from(CHARSETS))),
        "encoding": draw(st.sampled_from(["utf-8", "latin-1", "gb18030", "iso2022_jp", "cp1251"])),
        "values": chosen,
        # an explicit VR file may give another VR (UN, or a wrong one)
        "wrong_vr": draw(st.sets(st.sampled_from(KEYWORDS), max_size=3)),
    }
    return out


def _raw(ds: Dataset, keyword: str, value: str | bytes | None, encoding: str, vr: str) -> None:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    if value is None:
        if tag in ds:
            del ds[tag]
        return
    data = value if isinstance(value, bytes) else value.encode(encoding, errors="replace")
    ds[tag] = RawDataElement(BaseTag(tag), vr, len(data), data, 0, False, True)


def make_source(base: Dataset, header: dict[str, Any]) -> Dataset:
    src = copy.deepcopy(base)
    charset = header["SpecificCharacterSet"]
    _raw(src, "SpecificCharacterSet", charset, "ascii", "CS")
    for keyword, value in header["values"].items():
        vr = dictionary_VR(tag_for_keyword(keyword))
        if keyword in header["wrong_vr"]:
            vr = "UN" if vr != "UN" else "LO"
        _raw(src, keyword, value, header["encoding"], vr)
    return src


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Dataset], ResultForReport]:
    source, result = make_case(tmp_path_factory.mktemp("property_case"))
    report = replace(not_scored(result), qc_checks=[], volumes={}, contributions={})
    return source, report


def _decoded(src: Dataset, keyword: str) -> str:
    """The source's value as the builders read it (decoded with its character set)."""
    try:
        return str(src[keyword].value or "").rstrip(" ")
    except Exception:
        return "\x00undecodable"


def check_header(
    source: list[Dataset], report: ResultForReport, header: dict[str, Any], where: Path | None
) -> tuple[Dataset, Dataset]:
    src = make_source(source[0], header)
    cleaned = clean_source_header(src)
    assert set(cleaned.blanked) <= {*header["values"], "SpecificCharacterSet"}
    sr = saved(build_sr([src, *source[1:3]], report, device_uid=DEVICE_UID),
                where / "sr.dcm" if where else None)  # fmt: skip
    image = saved(build_report_image([src], report), where / "sc.dcm" if where else None)
    for ds in (sr, image):
        assert ds.StudyInstanceUID == source[0].StudyInstanceUID
        assert ds.SeriesInstanceUID != source[0].SeriesInstanceUID
        for keyword in TYPE_2:
            assert keyword in ds, keyword  # type 2: present, empty when missing or invalid
        for keyword in ("PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber"):
            out = str(ds[keyword].value or "").rstrip(" ")
            if not out:
                continue
            # copied as it was (never invented, never altered)
            if keyword in header["values"] and header["values"][keyword] is not None:
                assert out == _decoded(src, keyword), keyword
            else:
                assert out == str(source[0][keyword].value).rstrip(" "), keyword
            assert keyword not in cleaned.blanked, keyword
    refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    listed = {r.ReferencedSOPInstanceUID for s in refs for r in s.ReferencedSOPSequence}
    assert src.SOPInstanceUID in listed
    return sr, image


@pytest.mark.timeout(1800)  # about 0.1 s a header on an idle machine, 0.3 s on a busy one
def test_a_thousand_odd_headers_build_an_sr_and_a_report_image(
    case: tuple[list[Dataset], ResultForReport],
) -> None:
    source, report = case
    seen: list[float] = []
    made = sr_module.measurement_report(report, DEVICE_UID, "ketanode DICOM node")

    def content(*args: Any, **kwargs: Any) -> Any:
        return copy.deepcopy(made)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(header=headers())
    def one(header: dict[str, Any]) -> None:
        started = time.perf_counter()
        check_header(source, report, header, None)
        seen.append(time.perf_counter() - started)

    # the content tree does not depend on the header: made once (highdicom copies it)
    with (
        mock.patch("ketanode.report.secondary_capture.render_report_page", small_page),
        mock.patch.object(sr_module, "measurement_report", content),
    ):
        one()
    assert len(seen) >= EXAMPLES, len(seen)
    print(f"\n{len(seen)} headers, {np.median(seen) * 1000:.0f} ms median, {sum(seen):.1f} s")


@pytest.mark.skipif(not have(DCIODVFY), reason="dicom3tools not installed")
def test_a_sample_of_odd_headers_passes_dciodvfy(
    case: tuple[list[Dataset], ResultForReport], tmp_path: Path
) -> None:
    source, report = case
    checked: list[int] = []

    @settings(
        max_examples=DCIODVFY_SAMPLE,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(header=headers())
    def one(header: dict[str, Any]) -> None:
        where = tmp_path / str(len(checked))
        where.mkdir(exist_ok=True)  # Hypothesis replays a failing example
        check_header(source, report, header, where)
        src = make_source(source[0], header)
        minimal = build_minimal_sr([src, *source[1:3]], cause="ValueError", reason="QC failed")
        saved(minimal, where / "minimal.dcm")
        for name in ("sr.dcm", "sc.dcm", "minimal.dcm"):
            errors, _ = dciodvfy(where / name)
            assert errors == [], (name, errors, header)
        checked.append(1)

    with mock.patch("ketanode.report.secondary_capture.render_report_page", small_page):
        one()
    assert len(checked) >= DCIODVFY_SAMPLE


def test_the_minimal_sr_keeps_the_study_and_lists_the_evidence(
    case: tuple[list[Dataset], ResultForReport],
) -> None:
    source, _ = case
    ds = saved(build_minimal_sr(source, cause="RuntimeError", reason=None))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11"
    assert ds.StudyInstanceUID == source[0].StudyInstanceUID
    assert ds.PatientID == source[0].PatientID and ds.Modality == "SR"
    text = ds.ContentSequence[0].TextValue
    assert text.startswith("NOT SCORED: report could not be built (RuntimeError)")
    refs = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert [r.ReferencedSOPInstanceUID for r in refs.ReferencedSOPSequence] == [
        s.SOPInstanceUID for s in source
    ]
