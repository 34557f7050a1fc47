"""The SR (issue 5): TID 1500 content, study/patient/series, validation by dicom3tools and
DCMTK, values read back equal to the input."""

from __future__ import annotations

import copy
import logging
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import highdicom as hd
import pydicom
import pytest
from pydicom import Dataset

from ketanode.report.content import ResultForReport
from ketanode.report.sr import SCHEME, build_sr, read_sr
from ketanode.texts import DEMO_LABEL
from tests.unit._report_case import (
    DCIODVFY,
    DSRDUMP,
    NOT_SCORED_REASON,
    SHA,
    clinical,
    dciodvfy,
    have,
    make_case,
    not_scored,
)

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Dataset], ResultForReport]:
    return make_case(tmp_path_factory.mktemp("sr_case"))


@pytest.fixture(scope="module")
def sr_file(
    case: tuple[list[Dataset], ResultForReport], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    source, result = case
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    build_sr(source, result, device_uid="1.2.826.0.1.3680043.8.498.1").save_as(
        path, enforce_file_format=True
    )
    return path


def test_study_patient_and_new_series(
    case: tuple[list[Dataset], ResultForReport], sr_file: Path
) -> None:
    source, _ = case
    ds = pydicom.dcmread(sr_file)
    src = source[0]
    assert ds.SOPClassUID == COMPREHENSIVE_3D_SR
    assert ds.Modality == "SR"
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.PatientID == src.PatientID
    assert ds.PatientName == src.PatientName
    assert ds.PatientBirthDate == src.PatientBirthDate
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert ds.SOPInstanceUID not in {s.SOPInstanceUID for s in source}
    # a demonstration model's result says so first
    assert ds.SeriesDescription == "DEMO RESEARCH USE ONLY ketanode ketamine response SR"
    assert ds.Manufacturer == "ketanode"
    assert ds.CompletionFlag == "COMPLETE"
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    schemes = [item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence]
    assert SCHEME in schemes and SCHEME.startswith("99")
    # evidence: every source instance, in the same study
    evidence = ds.CurrentRequestedProcedureEvidenceSequence
    assert len(evidence) == 1 and evidence[0].StudyInstanceUID == src.StudyInstanceUID
    series = evidence[0].ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in series] == [src.SeriesInstanceUID]
    refs = {r.ReferencedSOPInstanceUID for r in series[0].ReferencedSOPSequence}
    assert refs == {s.SOPInstanceUID for s in source}


def test_values_read_back_equal_the_input(
    case: tuple[list[Dataset], ResultForReport], sr_file: Path
) -> None:
    _, result = case
    values = read_sr(pydicom.dcmread(sr_file))
    assert values.predicted_class == result.predicted_class
    assert values.probability == pytest.approx(result.probability, abs=1e-9)
    assert values.decision_value == pytest.approx(result.decision_value, abs=1e-9)
    assert values.qc_outcome == "warn"
    assert values.model_sha256 == SHA
    assert values.model_synthetic is True
    assert values.algorithm["name"] == "ketanode"
    assert values.algorithm["version"] == "0.1.0"
    assert values.volumes == pytest.approx(dict(result.volumes), abs=1e-9)
    assert values.contributions == pytest.approx(dict(result.contributions), abs=1e-9)
    assert DEMO_LABEL in values.texts["Demonstration model notice"]
    assert values.demo and values.texts["DEMO result"][0].startswith("DEMO result:")
    # the decision rule and the training cohort's response rate, as numbers and in words
    assert (values.decision_threshold, values.indeterminate_margin) == (0.5, 0.05)
    assert values.training_response_rate == 0.5
    assert values.texts["Decision rule"] == [
        "Responder when P(response) >= 55.0 %, non-responder when <= 45.0 %, "
        "indeterminate in between (threshold 50.0 % +- 5.0 %)."
    ]
    assert (
        "training cohort's response rate (50.0 %)"
        in values.texts["Probability and training cohort"][0]
    )
    assert any("RESEARCH USE ONLY" in t for t in values.texts["Research use only notice"])
    assert values.texts["Quality control check"] == [
        "voxel_size = 3 mm (warn): largest voxel dimension"
    ]


def test_highdicom_reads_the_measurement_report(sr_file: Path) -> None:
    sr = hd.sr.srread(sr_file)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    evaluations = {
        q.name.meaning: cast(Any, q.value).meaning for q in groups[0].get_qualitative_evaluations()
    }
    assert evaluations == {
        "Predicted response to ketamine": "Responder",
        "Quality control outcome": "Warning",
    }
    measured = {m.name.meaning for m in groups[0].get_measurements()}
    assert {
        "Probability of response to ketamine",
        "SVC decision value",
        "Grey matter volume",
        "Volume",
    } <= measured
    frontal = [
        m
        for m in groups[0].get_measurements(name=hd.sr.CodedConcept("GMVOL", SCHEME, "x"))
        if m.finding_sites and m.finding_sites[0].value.value == "83251001"
    ]
    assert len(frontal) == 2  # left and right frontal lobe, each with a laterality
    sides = {cast(Any, f.finding_sites[0].laterality).meaning for f in frontal}
    assert sides == {"Left", "Right"}
    assert {m.unit.value for m in frontal} == {"ml"}
    observer = sr.content.get_observer_contexts()
    assert observer and str(observer[0].observer_type.meaning) == "Device"


@pytest.mark.skipif(not have(DCIODVFY), reason="dicom3tools not installed")
def test_dciodvfy_finds_no_errors(sr_file: Path) -> None:
    errors, warnings = dciodvfy(sr_file)
    assert errors == []
    # the only warnings: the private coding scheme is not one dciodvfy knows
    assert all("99KETANODE" in w for w in warnings), warnings


@pytest.mark.skipif(not have(DSRDUMP), reason="DCMTK not installed")
def test_dsrdump_parses_it(sr_file: Path) -> None:
    proc = subprocess.run(
        [DSRDUMP, "+Pl", str(sr_file)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Comprehensive 3D SR" in out
    assert "RESEARCH USE ONLY" in out
    assert '(RESPONDER,99KETANODE,"Responder")' in out
    assert '"Probability of response to ketamine")="0.731234"' in out
    assert f"model_sha256={SHA}" in out
    assert '(83251001,SCT,"Frontal lobe")' in out
    assert "error" not in proc.stderr.lower()


def test_non_synthetic_model_has_no_demo_notice(
    case: tuple[list[Dataset], ResultForReport],
) -> None:
    source, result = case
    ds = build_sr(source, clinical(result))
    values = read_sr(ds)
    assert values.model_synthetic is False and not values.demo
    assert ds.SeriesDescription == "RESEARCH USE ONLY ketanode ketamine response SR"
    assert "Demonstration model notice" not in values.texts
    assert values.texts["Quality control check"] == ["all 0 quality control checks passed"]
    assert values.qc_outcome == "pass"


def test_uids_and_numbers_can_be_given(case: tuple[list[Dataset], ResultForReport]) -> None:
    source, result = case
    ds = build_sr(
        source,
        result,
        series_instance_uid="1.2.3.4",
        sop_instance_uid="1.2.3.4.5",
        series_number=42,
        device_uid="1.2.3.9",
    )
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesNumber) == (
        "1.2.3.4",
        "1.2.3.4.5",
        42,
    )
    assert "1.2.3.9" in str(ds.ContentSequence)


def test_refuses_bad_input(case: tuple[list[Dataset], ResultForReport]) -> None:
    source, result = case
    with pytest.raises(ValueError):
        replace(result, probability=1.5)
    with pytest.raises(ValueError):
        replace(result, predicted_class="maybe")
    with pytest.raises(ValueError):
        replace(result, model_sha256="abc")
    with pytest.raises(ValueError):
        build_sr([], result)
    other = copy.deepcopy(source[0])
    other.StudyInstanceUID = "1.2.3"
    with pytest.raises(ValueError):
        build_sr([source[0], other], result)


def test_logs_hold_no_patient_identifiers(
    case: tuple[list[Dataset], ResultForReport], caplog: pytest.LogCaptureFixture
) -> None:
    source, result = case
    with caplog.at_level(logging.DEBUG, logger="ketanode"):
        ds = build_sr(source, result)
    assert ds.SOPInstanceUID in caplog.text
    for value in (source[0].PatientID, str(source[0].PatientName)):
        assert value not in caplog.text


# --- not scored: examined, QC failed, no prediction ------------------------------------------


@pytest.fixture(scope="module")
def not_scored_sr_file(
    case: tuple[list[Dataset], ResultForReport], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    source, result = case
    path = tmp_path_factory.mktemp("sr_not_scored") / "sr.dcm"
    build_sr(source, not_scored(result), device_uid="1.2.826.0.1.3680043.8.498.1").save_as(
        path, enforce_file_format=True
    )
    return path


def test_not_scored_reads_back_without_a_prediction(
    case: tuple[list[Dataset], ResultForReport], not_scored_sr_file: Path
) -> None:
    source, _ = case
    ds = pydicom.dcmread(not_scored_sr_file)
    assert ds.StudyInstanceUID == source[0].StudyInstanceUID
    assert ds.SeriesDescription.startswith("RESEARCH USE ONLY")  # no model, no DEMO
    values = read_sr(ds)
    assert values.scored is False and not values.demo
    assert values.predicted_class is None
    assert values.probability is None
    assert values.decision_value is None
    assert values.model_sha256 is None
    assert values.not_scored_reason == NOT_SCORED_REASON
    assert values.qc_outcome == "fail"
    assert values.volumes == {} and values.contributions == {}
    assert values.algorithm["name"] == "ketanode"
    assert values.algorithm["version"] == "0.1.0"
    assert "model_name" not in values.algorithm
    assert values.texts["Quality control check"] == [
        "registration = 0.11 (fail): correlation with the template inside its brain",
        "voxel_size = 3 mm (warn): largest voxel dimension",
    ]
    assert any("RESEARCH USE ONLY" in t for t in values.texts["Research use only notice"])
    assert "Demonstration model notice" not in values.texts


def test_scored_reads_back_as_scored(sr_file: Path) -> None:
    values = read_sr(pydicom.dcmread(sr_file))
    assert values.scored is True and values.not_scored_reason is None


def test_not_scored_highdicom_sees_only_the_qc_outcome(not_scored_sr_file: Path) -> None:
    sr = hd.sr.srread(not_scored_sr_file)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    evaluations = {
        q.name.meaning: cast(Any, q.value).meaning for q in groups[0].get_qualitative_evaluations()
    }
    assert evaluations == {"Quality control outcome": "Fail"}
    assert groups[0].get_measurements() == []


@pytest.mark.skipif(not have(DCIODVFY), reason="dicom3tools not installed")
def test_not_scored_dciodvfy_finds_no_errors(not_scored_sr_file: Path) -> None:
    errors, warnings = dciodvfy(not_scored_sr_file)
    assert errors == [], errors
    assert all("99KETANODE" in w for w in warnings), warnings


@pytest.mark.skipif(not have(DSRDUMP), reason="DCMTK not installed")
def test_not_scored_dsrdump_parses_it(not_scored_sr_file: Path) -> None:
    proc = subprocess.run(
        [DSRDUMP, "+Pl", str(not_scored_sr_file)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "error" not in proc.stderr.lower()
    assert "Comprehensive 3D SR" in out
    assert "RESEARCH USE ONLY" in out
    assert '(QCFAIL,99KETANODE,"Fail")' in out
    assert f'"Not scored reason")="{NOT_SCORED_REASON}"' in out
    assert "registration = 0.11 (fail)" in out
    assert "Predicted response to ketamine" not in out
    assert "Probability of response to ketamine" not in out
    assert "SVC decision value" not in out
    assert '"Algorithm Name")="ketanode"' in out


def test_scored_and_not_scored_are_validated(
    case: tuple[list[Dataset], ResultForReport],
) -> None:
    _, result = case
    unscored = not_scored(result)
    assert unscored.scored is False and result.scored is True
    with pytest.raises(ValueError, match="not_scored_reason"):
        replace(unscored, not_scored_reason=None)
    with pytest.raises(ValueError, match="not_scored_reason"):
        replace(unscored, not_scored_reason="  ")
    with pytest.raises(ValueError, match="probability"):
        replace(result, probability=None)
    with pytest.raises(ValueError, match="decision_value"):
        replace(result, decision_value=None)
    with pytest.raises(ValueError, match="model_sha256"):
        replace(result, model_sha256=None)
    with pytest.raises(ValueError, match="not_scored_reason"):
        replace(result, not_scored_reason="QC failed")
    with pytest.raises(ValueError, match="probability"):
        replace(unscored, probability=0.5)
    with pytest.raises(ValueError, match="model_sha256"):
        replace(unscored, model_sha256="ABC")
    # a model may be named on a not-scored result; its SHA-256 is still checked and shown
    named = replace(unscored, model_name="ketanode-demo", model_version="1", model_sha256=SHA)
    assert read_sr(build_sr(case[0], named)).model_sha256 == SHA


def test_indeterminate_result_and_a_contradiction_refused(
    case: tuple[list[Dataset], ResultForReport], tmp_path: Path
) -> None:
    """Near the threshold the class is "indeterminate" in the SR; a class that contradicts
    its probability under the model's rule cannot be built at all."""
    source, result = case
    near = replace(clinical(result), predicted_class="indeterminate", probability=0.52)
    ds = build_sr(source, near)
    values = read_sr(ds)
    assert (values.predicted_class, values.probability) == ("indeterminate", 0.52)
    path = tmp_path / "indeterminate.dcm"
    ds.save_as(path, enforce_file_format=True)
    if have(DCIODVFY):
        assert dciodvfy(path)[0] == []
    for cls, p in (("responder", 0.52), ("non-responder", 0.60), ("responder", 0.40)):
        with pytest.raises(ValueError, match="contradicts"):
            replace(result, predicted_class=cls, probability=p)
