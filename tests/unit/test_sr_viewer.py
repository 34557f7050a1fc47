"""The SR as viewers and text renderers read it (issue 15): a planar ROI group (TID 1410)
per model input, its polyline on a source instance; the probability inferred from the
brain's outline (OHIF stops on a group without coordinates); DCMTK's dsr2html names every
value; dciodvfy finds no error."""

from __future__ import annotations

import html
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from ketanode.report.content import ResultForReport
from ketanode.report.sr import build_sr, read_sr
from tests.unit._report_case import SHA, dciodvfy, make_case

DSR2HTML = "/usr/bin/dsr2html"
IMAGE_REGION = ("DCM", "111030")


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Dataset], ResultForReport]:
    return make_case(tmp_path_factory.mktemp("sr_viewer_case"))


@pytest.fixture(scope="module")
def sr_file(
    case: tuple[list[Dataset], ResultForReport], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    source, result = case
    path = tmp_path_factory.mktemp("sr_viewer") / "sr.dcm"
    build_sr(source, result, device_uid="1.2.826.0.1.3680043.8.498.1").save_as(
        path, enforce_file_format=True
    )
    return path


def _groups(ds: Dataset) -> list[Dataset]:
    measurements = [
        item
        for item in ds.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "126010"  # Imaging Measurements
    ]
    return list(measurements[0].ContentSequence)


def _code(item: Dataset) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return (str(c.CodingSchemeDesignator), str(c.CodeValue))


def test_a_planar_roi_group_per_model_input(
    case: tuple[list[Dataset], ResultForReport], sr_file: Path
) -> None:
    source, result = case
    ds = pydicom.dcmread(sr_file)
    groups = _groups(ds)
    regions = groups[1:]
    assert len(regions) == len(result.contributions)
    by_uid = {str(s.SOPInstanceUID): s for s in source}
    ranked = [f for f, _ in result.drivers()]
    for group, feature in zip(regions, ranked, strict=True):
        items = list(group.ContentSequence)
        ident = next(i for i in items if _code(i) == ("DCM", "112039"))
        label = feature[3:].replace("_", " ") + " GM"
        # OHIF restores a group into its measurement panel only under a Cornerstone tool's
        # tracking identifier, with the outline under the group's first NUM, and lists it
        # under its DCM Comment
        assert ident.TextValue == f"Cornerstone3DTools@^0.1.0:PlanarFreehandROI {label}"
        comment = [i.TextValue for i in items if _code(i) == ("DCM", "121106")]
        assert comment == [f"{label}: {result.volumes[feature]:.2f} ml"]
        first_num = next(i for i in items if i.ValueType == "NUM")
        assert first_num.ConceptNameCodeSequence[0].CodeMeaning == "Grey matter volume"
        (inferred,) = [i for i in first_num.ContentSequence if i.ValueType == "SCOORD"]
        assert inferred.RelationshipType == "INFERRED FROM"
        scoord = next(i for i in items if i.ValueType == "SCOORD")
        assert list(inferred.GraphicData) == list(scoord.GraphicData)
        assert _code(scoord) == IMAGE_REGION and scoord.GraphicType == "POLYLINE"
        ref = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        src = by_uid[str(ref.ReferencedSOPInstanceUID)]  # an instance of the source series
        assert ref.ReferencedSOPClassUID == src.SOPClassUID
        pts = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)
        assert len(pts) >= 4 and np.array_equal(pts[0], pts[-1])
        assert pts[:, 0].min() >= 0 and pts[:, 0].max() <= src.Columns
        assert pts[:, 1].min() >= 0 and pts[:, 1].max() <= src.Rows
        nums = {
            str(i.ConceptNameCodeSequence[0].CodeMeaning): float(
                i.MeasuredValueSequence[0].NumericValue
            )
            for i in items
            if i.ValueType == "NUM"
        }
        assert nums["Grey matter volume"] == pytest.approx(result.volumes[feature])
        assert nums["Contribution to SVC decision value"] == pytest.approx(
            result.contributions[feature]
        )
    # and read_sr still reads the first group's values only, unchanged
    values = read_sr(ds)
    assert values.volumes == pytest.approx(dict(result.volumes))
    assert values.contributions == pytest.approx(dict(result.contributions))


def test_the_probability_is_inferred_from_the_brain_outline(sr_file: Path) -> None:
    ds = pydicom.dcmread(sr_file)
    first = _groups(ds)[0]
    prob = next(
        i
        for i in first.ContentSequence
        if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeMeaning.startswith("Prob")
    )
    scoords = [i for i in prob.ContentSequence if i.ValueType == "SCOORD"]
    assert len(scoords) == 1 and scoords[0].RelationshipType == "INFERRED FROM"
    # the line OHIF shows as the group's label: class, P and research use only
    comment = [i for i in first.ContentSequence if _code(i) == ("DCM", "121106")]
    assert len(comment) == 1
    assert re.fullmatch(
        r"(RESPONDER|NON-RESPONDER|INDETERMINATE), P\(response\) \d+\.\d % - "
        r"(DEMO - )?RESEARCH USE ONLY",
        comment[0].TextValue,
    ), comment[0].TextValue
    # every group a viewer reads has coordinates somewhere
    for group in _groups(ds):
        assert "SCOORD" in _value_types(group)


def _value_types(item: Dataset) -> set[str]:
    out = {str(item.get("ValueType", ""))}
    for child in item.get("ContentSequence", []):
        out |= _value_types(child)
    return out


def test_no_outline_without_territories(
    case: tuple[list[Dataset], ResultForReport], tmp_path: Path
) -> None:
    source, result = case
    bare = replace(result, territories_path=None)
    path = tmp_path / "sr.dcm"
    build_sr(source, bare).save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    assert len(_groups(ds)) == 1
    assert "SCOORD" not in _value_types(ds)
    # without coordinates the group does not claim to be a viewer's planar ROI
    (ident,) = [i for i in _groups(ds)[0].ContentSequence if _code(i) == ("DCM", "112039")]
    assert ident.TextValue == "ketanode ketamine response prediction"
    assert read_sr(ds).probability == pytest.approx(result.probability)


def test_dciodvfy_finds_no_errors(sr_file: Path) -> None:
    errors, _ = dciodvfy(sr_file)
    assert errors == []


def _dsr2html_text(path: Path) -> str:
    proc = subprocess.run(
        [DSR2HTML, str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    text = html.unescape(re.sub(r"<[^>]+>", " ", proc.stdout))
    return re.sub(r"\s+", " ", text)


def test_dsr2html_reads_well(case: tuple[list[Dataset], ResultForReport], sr_file: Path) -> None:
    _, result = case
    text = _dsr2html_text(sr_file)
    assert "Predicted response to ketamine: Responder" in text
    assert f"Probability of response to ketamine: {result.probability}" in text
    assert f"model_sha256={SHA}" in text
    assert "RESEARCH USE ONLY" in text
    for feature, ml in result.volumes.items():
        # each volume with its name, not a bare number (containers are SEPARATE)
        assert re.search(rf"(Grey matter volume|Volume): {re.escape(str(ml))} ml", text), feature
    for group in ("left frontal GM", "right cerebellum GM"):
        # each region group named by its Comment; the long tracking identifier in an annex
        assert re.search(rf"Comment: \"?{group}: \d+\.\d\d ml", text), group
        assert f"Cornerstone3DTools@^0.1.0:PlanarFreehandROI {group}" in text
    assert "Image Region: Polyline" in text
