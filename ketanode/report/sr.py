"""The result as a DICOM Comprehensive 3D SR: a TID 1500 Measurement Report (IHE AI Results
style), built with highdicom.

Layout of the content tree::

    CONTAINER Imaging Measurement Report (TID 1500)
      Language, observer context (the node as a device: UID, name, manufacturer, model)
      Procedure Reported = Brain MRI (LN 24590-2)
      CONTAINER Imaging Measurements
        CONTAINER Measurement Group (TID 1501)
          Tracking Identifier "[Cornerstone3DTools@^0.1.0:PlanarFreehandROI ]ketanode ketamine
            response prediction" (the prefix when the probability has coordinates) / UID
          Finding = Ketamine response prediction (99KETANODE)
          Algorithm Name "ketanode", Version (the node software's), Parameters (model,
            model SHA-256, synthetic demonstration model yes/no, feature spec; the model
            ones only when a model was applied)
          CODE Predicted response to ketamine = Responder | Non-responder | Indeterminate
            (scored only; the class follows the probability by the model's decision rule)
          CODE Quality control outcome = Pass | Warning | Fail
          NUM Probability of response (1), NUM SVC decision value (1)        (scored only)
          NUM Decision threshold (1), NUM Indeterminate margin (1), NUM Training cohort
            response rate (1)                                     (scored, when recorded)
          NUM Grey matter volume (ml) + Finding Site (+ Laterality), for each region
          NUM Contribution to decision value (1) + the same Finding Site, for each model input
          NUM Volume (ml) of white matter / CSF / intracranial structure (when given)
          TEXT Comment: "<CLASS>, P(response) <P> % - [DEMO - ]RESEARCH USE ONLY" (scored only;
            OHIF shows it as the group's label)
          TEXT Not scored reason                                            (not scored only)
          TEXT Quality control check, one per failing or warning check
          TEXT Decision rule, TEXT Probability and training cohort          (scored only)
          TEXT Model label, TEXT Research use only notice, TEXT demonstration-model notice,
            TEXT DEMO result (a result of a synthetic model: also "DEMO" at the start of the
            series description)
        CONTAINER Measurement Group (TID 1410), for each model input       (scored only)
          Tracking Identifier "Cornerstone3DTools@^0.1.0:PlanarFreehandROI <region> GM" / UID
          SCOORD POLYLINE: the region's outline on the source instance where its
            cross-section is largest (:mod:`ketanode.report.region_outlines`)
          Finding = Grey matter volume, Finding Site (+ Laterality)
          NUM Grey matter volume (ml), INFERRED FROM a copy of the SCOORD;
          NUM Contribution to decision value (1)
          TEXT Comment "<region> GM: <volume> ml" (the name OHIF lists it under)

Viewers that draw TID 1500 (OHIF, for one) draw a measurement group only through an image
region, so each model input has a planar ROI group whose polyline is the region's outline on
a slice of the T1; the probability in the first group is INFERRED FROM the brain's outline
on its largest slice (OHIF 3.13 stops with an error on a group without any coordinates).
OHIF lists a group in its measurement panel (after the user accepts to track the SR's
measurements) only when its Tracking Identifier starts with a Cornerstone3D tool's and its
first NUM holds the coordinates: hence the prefix and the NUM's copy of the image region.
Outlines need the native territory map (``territories_path``) and single-frame source
instances with plane geometry; without them the SR has the first group only.

A *not scored* result (no prediction was made, e.g. quality control failed) has no predicted
class, probability, decision value, volumes or contributions: the group holds the QC outcome,
the flagged checks, the not-scored reason and the notices.

Evidence (Current Requested Procedure Evidence Sequence) lists every source instance.
Concepts without a standard code use the private scheme ``99KETANODE``, declared in the
Coding Scheme Identification Sequence. :func:`read_sr` reads the values back.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from ketanode.report.content import (
    DEMO_RESULT_TEXT,
    DISCLAIMER,
    INDETERMINATE,
    NON_RESPONDER,
    RESPONDER,
    ResultForReport,
    check_text,
    class_text,
    display_name,
    percent,
    rate_text,
    region_of,
    rule_text,
)
from ketanode.report.region_outlines import RegionOutline, region_outlines
from ketanode.report.source_header import clean_source_header
from ketanode.texts import DEMO, DEMO_LABEL, RESEARCH_USE_ONLY

logger = logging.getLogger(__name__)

SCHEME = "99KETANODE"
SCHEME_NAME = "ketanode private codes"
SERIES_DESCRIPTION = f"{RESEARCH_USE_ONLY} ketanode ketamine response SR"


def series_description(result: ResultForReport) -> str:
    """The SR's series description; ``DEMO ...`` for a demonstration model's result."""
    return f"{DEMO} {SERIES_DESCRIPTION}" if result.demo else SERIES_DESCRIPTION


DEFAULT_SERIES_NUMBER = 9901


def _private(value: str, meaning: str) -> Code:
    return Code(value, SCHEME, meaning)


# --- concepts ----------------------------------------------------------------------------
FINDING = _private("KRPRED", "Ketamine response prediction")
PREDICTED_CLASS = _private("KRCLASS", "Predicted response to ketamine")
CLASS_CODES = {
    RESPONDER: _private("RESPONDER", "Responder"),
    NON_RESPONDER: _private("NONRESPONDER", "Non-responder"),
    INDETERMINATE: _private("INDETERMINATE", "Indeterminate"),
}
THRESHOLD = _private("KRTHRESH", "Decision threshold of probability of response")
MARGIN = _private("KRMARGIN", "Indeterminate margin of probability of response")
RESPONSE_RATE = _private("KRTRAINRATE", "Response rate of the training cohort")
DECISION_RULE = _private("KRRULE", "Decision rule")
RATE_NOTICE = _private("KRRATENOTE", "Probability and training cohort")
DEMO_RESULT = _private("DEMORESULT", "DEMO result")
COMMENT = Code("121106", "DCM", "Comment")
PROBABILITY = _private("KRPROB", "Probability of response to ketamine")
DECISION = _private("SVCDEC", "SVC decision value")
CONTRIBUTION = _private("SVCCONTRIB", "Contribution to SVC decision value")
GM_VOLUME = _private("GMVOL", "Grey matter volume")
VOLUME = Code("118565006", "SCT", "Volume")
QC_OUTCOME = _private("QCOUTCOME", "Quality control outcome")
QC_CODES = {
    "pass": _private("QCPASS", "Pass"),
    "warn": _private("QCWARN", "Warning"),
    "fail": _private("QCFAIL", "Fail"),
}
QC_CHECK = _private("QCCHECK", "Quality control check")
NOT_SCORED_REASON = _private("NOTSCORED", "Not scored reason")
MODEL_LABEL = _private("MODELLABEL", "Model label")
RUO_NOTICE = _private("RUONOTICE", "Research use only notice")
DEMO_NOTICE = _private("DEMONOTICE", "Demonstration model notice")
PROCEDURE = Code("24590-2", "LN", "MR Brain")
DEVICE = Code("121007", "DCM", "Device")
ML = Code("ml", "UCUM", "milliliter")
NO_UNITS = Code("1", "UCUM", "no units")
LEFT = Code("7771000", "SCT", "Left")
RIGHT = Code("24028007", "SCT", "Right")

# region (without side) -> finding site; SNOMED CT where a fitting code exists
REGION_SITES: dict[str, Code] = {
    "frontal": Code("83251001", "SCT", "Frontal lobe"),
    "parietal": Code("16630005", "SCT", "Parietal lobe"),
    "temporal": Code("78277001", "SCT", "Temporal lobe"),
    "occipital": Code("31065004", "SCT", "Occipital lobe"),
    "insula": Code("36169008", "SCT", "Insula"),
    "cerebellum": Code("25991003", "SCT", "Cerebellar cortex"),
    "cingulate": _private("CINGCX", "Cingulate cortex"),
    "deep_grey": _private("DEEPGM", "Deep grey matter nuclei"),
}
BRAIN = Code("12738006", "SCT", "Brain")
# totals -> (concept name, finding site)
TOTALS: dict[str, tuple[Code, Code]] = {
    "gm_total": (GM_VOLUME, BRAIN),
    "wm_total": (VOLUME, Code("389080008", "SCT", "White matter")),
    "csf_total": (VOLUME, Code("65216001", "SCT", "Cerebrospinal fluid")),
    "tiv": (VOLUME, Code("128319008", "SCT", "Intracranial structure")),
}
TRACKING_ID = "ketanode ketamine response prediction"
VIEWER_TOOL = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"


def default_device_uid() -> str:
    """A stable device observer UID for this host (configure one to keep it across hosts)."""
    return str(generate_uid(entropy_srcs=["ketanode-device", socket.gethostname()]))


def site_of(feature: str) -> tuple[Code, Code | None]:
    """Finding site and laterality of a regional feature (``gm_left_frontal``); regions
    without a standard code get a private one."""
    region = region_of(feature)
    side: Code | None = None
    for prefix, code in (("left_", LEFT), ("right_", RIGHT)):
        if region.startswith(prefix):
            region, side = region[len(prefix) :], code
    site = REGION_SITES.get(region)
    if site is None:
        value = "R-" + region.upper().replace("_", "")[:14]
        site = _private(value, region.replace("_", " "))
    return site, side


def _concept(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def _finding_site(feature: str) -> hd.sr.FindingSite:
    site, side = site_of(feature)
    return hd.sr.FindingSite(
        anatomic_location=_concept(site), laterality=_concept(side) if side else None
    )


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=_concept(name), value=value[:1024], relationship_type="CONTAINS"
    )


def _ordered_volumes(result: ResultForReport) -> list[str]:
    """Regional volumes by decreasing |contribution| (drivers first), then the rest."""
    ranked = [f for f, _ in result.drivers() if f in result.volumes]
    rest = sorted(f for f in result.volumes if f not in ranked and f not in TOTALS)
    totals = [f for f in TOTALS if f in result.volumes]
    return ranked + rest + totals


def algorithm_identification(result: ResultForReport) -> hd.sr.AlgorithmIdentification:
    """The node software (name ``ketanode``, its version); model parameters when a model
    was applied."""
    model = {
        "model_name": result.model_name,
        "model_version": result.model_version,
        "model_sha256": result.model_sha256,
    }
    parameters = [f"{k}={v}" for k, v in model.items() if v is not None]
    if parameters:
        synthetic = "yes" if result.model_synthetic else "no"
        parameters.append(f"synthetic_demonstration_model={synthetic}")
    parameters += [
        f"feature_spec={result.feature_spec_name}",
        f"feature_spec_sha256={result.feature_spec_sha256}",
    ]
    return hd.sr.AlgorithmIdentification(
        name="ketanode",
        version=result.software_version,
        manufacturer="ketanode",
        parameters=parameters,
    )


def _source_image(outline: RegionOutline) -> hd.sr.SourceImageForRegion:
    return hd.sr.SourceImageForRegion(outline.sop_class_uid, outline.sop_instance_uid)


def _measurements(
    result: ResultForReport, brain: RegionOutline | None = None
) -> list[hd.sr.Measurement]:
    if result.probability is None or result.decision_value is None:
        return []  # not scored: neither the prediction nor the (unchecked) measurements
    coordinates = None
    if brain is not None:
        coordinates = [
            hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=brain.points,
                source_image=_source_image(brain),
            )
        ]
    out = [
        hd.sr.Measurement(
            name=_concept(PROBABILITY),
            value=float(result.probability),
            unit=_concept(NO_UNITS),
            referenced_coordinates=coordinates,
        ),
        hd.sr.Measurement(
            name=_concept(DECISION), value=float(result.decision_value), unit=_concept(NO_UNITS)
        ),
    ]
    rule = (
        (THRESHOLD, result.decision_threshold),
        (MARGIN, result.indeterminate_margin),
        (RESPONSE_RATE, result.training_response_rate),
    )
    out += [
        hd.sr.Measurement(name=_concept(c), value=float(v), unit=_concept(NO_UNITS))
        for c, v in rule
        if v is not None
    ]
    for feature in _ordered_volumes(result):
        if feature in TOTALS:
            name, site = TOTALS[feature]
            sites = [hd.sr.FindingSite(anatomic_location=_concept(site))]
        else:
            name, sites = GM_VOLUME, [_finding_site(feature)]
        out.append(
            hd.sr.Measurement(
                name=_concept(name),
                value=float(result.volumes[feature]),
                unit=_concept(ML),
                finding_sites=sites,
            )
        )
    for feature, value in result.drivers():
        out.append(
            hd.sr.Measurement(
                name=_concept(CONTRIBUTION),
                value=float(value),
                unit=_concept(NO_UNITS),
                finding_sites=[_finding_site(feature)],
            )
        )
    return out


def _texts(result: ResultForReport) -> list[hd.sr.TextContentItem]:
    items: list[hd.sr.TextContentItem] = []
    if result.not_scored_reason is not None:
        # verbatim and whole (a TEXT value may be long): read_sr gives it back unchanged
        reason = hd.sr.TextContentItem(
            name=_concept(NOT_SCORED_REASON),
            value=result.not_scored_reason,
            relationship_type="CONTAINS",
        )
        items.append(reason)
    items += [_text(QC_CHECK, check_text(c)) for c in result.flagged_checks()]
    if not items:
        n = len(result.qc_checks)
        items.append(_text(QC_CHECK, f"all {n} quality control checks passed"))
    if result.scored and result.probability is not None:
        # the one line a viewer that draws only labels (OHIF lists a group's DCM Comment)
        # shows beside the numbers: the class, P and what this is
        summary = f"{class_text(result)}, P(response) {percent(result.probability)}"
        demo = "DEMO - " if result.demo else ""
        items.insert(0, _text(COMMENT, f"{summary} - {demo}{RESEARCH_USE_ONLY}"))
        items.append(_text(DECISION_RULE, rule_text(result) or "class from the sign of the SVC"))
        items.append(_text(RATE_NOTICE, rate_text(result)))
    if result.model_label:
        items.append(_text(MODEL_LABEL, result.model_label))
    items.append(_text(RUO_NOTICE, DISCLAIMER))
    if result.model_synthetic:
        items.append(_text(DEMO_NOTICE, DEMO_LABEL))
    if result.demo:
        items.append(_text(DEMO_RESULT, DEMO_RESULT_TEXT))
    return items


def region_groups(
    result: ResultForReport, outlines: Mapping[str, RegionOutline]
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1410 planar ROI group per model input with an outline (drivers first)."""
    if result.probability is None:
        return []
    groups = []
    for feature, contribution in result.drivers():
        outline = outlines.get(region_of(feature))
        if outline is None or feature not in result.volumes:
            continue
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=outline.points,
            source_image=_source_image(outline),
        )
        label = f"{region_of(feature).replace('_', ' ')} GM"
        volume = float(result.volumes[feature])
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(), identifier=viewer_tracking_id(label)
            ),
            referenced_region=region,
            finding_type=_concept(GM_VOLUME),
            finding_sites=[_finding_site(feature)],
            measurements=[
                hd.sr.Measurement(name=_concept(GM_VOLUME), value=volume, unit=_concept(ML)),
                hd.sr.Measurement(
                    name=_concept(CONTRIBUTION),
                    value=float(contribution),
                    unit=_concept(NO_UNITS),
                ),
            ],
        )
        items = group[0].ContentSequence
        _infer_from(_num(items, GM_VOLUME), _scoord(items))
        items.append(_text(COMMENT, f"{label}: {volume:.2f} ml"))
        groups.append(group)
    return groups


def viewer_tracking_id(label: str) -> str:
    """A group's Tracking Identifier: the Cornerstone tool prefix, then the label.

    OHIF (3.13) restores a group into its measurement panel only when the identifier starts
    with a Cornerstone3D tool's (``Cornerstone3DTools@^0.1.0:PlanarFreehandROI``, a planar
    closed polyline: what each group holds); the label after it keeps the identifier
    readable, and OHIF shows the group's DCM Comment as its name.
    """
    return f"{VIEWER_TOOL} {label}"


def _num(items: Sequence[Dataset], concept: Code) -> Dataset:
    code = _concept(concept)
    return next(
        i
        for i in items
        if i.ValueType == "NUM"
        and i.ConceptNameCodeSequence[0].CodeValue == code.value
        and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == code.scheme_designator
    )


def _scoord(items: Sequence[Dataset]) -> Dataset:
    return next(i for i in items if i.ValueType == "SCOORD")


def _infer_from(num: Dataset, scoord: Dataset) -> None:
    """The NUM INFERRED FROM a copy of the group's image region (TID 300 allows it): the
    Cornerstone adapters read a planar ROI's outline from under its first NUM."""
    region = copy.deepcopy(scoord)
    region.RelationshipType = "INFERRED FROM"
    if "ContentSequence" not in num:
        num.ContentSequence = DicomSequence()
    num.ContentSequence.append(region)


def outlines_for(
    source: Sequence[Dataset], result: ResultForReport
) -> tuple[dict[str, RegionOutline], RegionOutline | None]:
    """The model inputs' outlines and the brain's, on the source instances; empty when the
    result has no territory map or the source no plane geometry. Never raises: an SR without
    outlines is still a complete report."""
    if result.probability is None or result.territories_path is None:
        return {}, None
    try:
        wanted = [region_of(f) for f, _ in result.drivers()]
        outlines = region_outlines(source, result.territories_path, result.region_names, wanted)
        # the brain mask when the result has one, else the union of the territories
        mask = result.brain_mask_path or result.territories_path
        brain = region_outlines(source, mask, ["brain"], ["brain"], binary=True).get("brain")
        return outlines, brain
    except Exception as exc:  # outlines are an addition; the report stands without them
        logger.warning("SR without region outlines: %s", type(exc).__name__)
        return {}, None


def measurement_report(
    result: ResultForReport,
    device_uid: str,
    device_model_name: str,
    outlines: Mapping[str, RegionOutline] | None = None,
    brain: RegionOutline | None = None,
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree for one result (``outlines``: planar ROI groups of the
    model inputs; ``brain``: the image region the probability is inferred from)."""
    observer = hd.sr.ObserverContext(
        observer_type=_concept(DEVICE),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name="ketanode",
            manufacturer_name="ketanode",
            model_name=device_model_name,
        ),
    )
    evaluations = [
        hd.sr.QualitativeEvaluation(_concept(QC_OUTCOME), _concept(QC_CODES[result.qc_outcome]))
    ]
    if result.predicted_class is not None:
        predicted = hd.sr.QualitativeEvaluation(
            _concept(PREDICTED_CLASS), _concept(CLASS_CODES[result.predicted_class])
        )
        evaluations.insert(0, predicted)
    # a viewer restores the group as a planar ROI only when its probability has coordinates
    drawn = brain is not None and result.probability is not None
    overall_id = viewer_tracking_id(TRACKING_ID) if drawn else TRACKING_ID
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=overall_id),
        finding_type=_concept(FINDING),
        algorithm_id=algorithm_identification(result),
        measurements=_measurements(result, brain) or None,
        qualitative_evaluations=evaluations,
    )
    group[0].ContentSequence.extend(_texts(result))
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_concept(PROCEDURE),
        # region groups only beside a probability with coordinates (see the module docstring)
        imaging_measurements=[group, *region_groups(result, (outlines or {}) if brain else {})],
    )


def _separate(node: Dataset) -> None:
    """Every container SEPARATE: its items are distinct statements, not one running text,
    so text renderers (DCMTK dsr2html, viewers without SR drawing) name each value."""
    if node.get("ValueType") == "CONTAINER":
        node.ContinuityOfContent = "SEPARATE"
    for item in node.get("ContentSequence", []):
        _separate(item)


def _check_source(source: Sequence[Dataset]) -> None:
    if not source:
        raise ValueError("no source instances")
    studies = {str(ds.StudyInstanceUID) for ds in source}
    if len(studies) != 1:
        raise ValueError("source instances belong to more than one study")


def build_sr(
    source: Sequence[Dataset],
    result: ResultForReport,
    *,
    device_uid: str | None = None,
    device_model_name: str = "ketanode DICOM node",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = DEFAULT_SERIES_NUMBER,
    instance_number: int = 1,
    institution_name: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR (TID 1500) for ``result`` in the source series' study.

    ``source``: the datasets of the source series (headers suffice: UIDs, patient and study
    attributes). Patient and study modules are copied from the first one (values not valid for
    their VR left empty: :func:`~ketanode.report.source_header.clean_source_header`); every
    instance is listed as evidence. New series and SOP instance UIDs are generated unless given.
    """
    _check_source(source)
    # patient and study attributes from the first instance, invalid values left empty
    first = clean_source_header(source[0]).dataset
    now = dt.datetime.now()
    outlines, brain = outlines_for(source, result)
    content = measurement_report(
        result, device_uid or default_device_uid(), device_model_name, outlines, brain
    )
    kwargs: dict[str, Any] = {}
    if "SpecificCharacterSet" in first:
        kwargs["specific_character_set"] = first.SpecificCharacterSet
    sr = hd.sr.Comprehensive3DSR(
        evidence=[first, *source[1:]],
        content=content[0],
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer="ketanode",
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        series_description=series_description(result),
        manufacturer_model_name=device_model_name,
        software_versions=result.software_version,
        content_date=now.date(),
        content_time=now.time(),
        series_date=now.date(),
        series_time=now.time(),
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=SCHEME,
                name=SCHEME_NAME,
                responsible_organization="ketanode project",
            )
        ],
        **kwargs,
    )
    _separate(sr)
    logger.info(
        "SR built: SOP instance %s, series %s, study %s, %d evidence instances",
        sr.SOPInstanceUID,
        sr.SeriesInstanceUID,
        sr.StudyInstanceUID,
        len(source),
    )
    return sr


# --- reading back ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SRValues:
    """What :func:`read_sr` finds in an SR written by :func:`build_sr`.

    For a not-scored SR, ``predicted_class``, ``probability``, ``decision_value`` and
    ``model_sha256`` are ``None`` and ``not_scored_reason`` holds the reason."""

    qc_outcome: str
    volumes: dict[str, float]
    contributions: dict[str, float]
    algorithm: dict[str, str]
    texts: dict[str, list[str]]
    predicted_class: str | None = None
    probability: float | None = None
    decision_value: float | None = None
    not_scored_reason: str | None = None
    decision_threshold: float | None = None
    indeterminate_margin: float | None = None
    training_response_rate: float | None = None

    @property
    def scored(self) -> bool:
        return self.predicted_class is not None

    @property
    def demo(self) -> bool:
        """A demonstration model's result (the SR content says DEMO)."""
        return bool(self.texts.get(DEMO_RESULT.meaning))

    @property
    def model_sha256(self) -> str | None:
        return self.algorithm.get("model_sha256")

    @property
    def model_synthetic(self) -> bool:
        return self.algorithm.get("synthetic_demonstration_model") == "yes"


def _code_key(item: Dataset) -> tuple[str, str]:
    return (str(item.CodingSchemeDesignator), str(item.CodeValue))


def _key(code: Code) -> tuple[str, str]:
    return (code.scheme_designator, str(code.value))


def _walk(items: Sequence[Dataset]) -> list[Dataset]:
    out: list[Dataset] = []
    for item in items:
        out.append(item)
        out.extend(_walk(item.get("ContentSequence", [])))
    return out


def _site_key(num: Dataset) -> tuple[tuple[str, str], tuple[str, str] | None] | None:
    site: tuple[str, str] | None = None
    side: tuple[str, str] | None = None
    for child in num.get("ContentSequence", []):
        name = _code_key(child.ConceptNameCodeSequence[0])
        if name == ("SCT", "363698007"):  # Finding Site
            site = _code_key(child.ConceptCodeSequence[0])
            for mod in child.get("ContentSequence", []):
                if _code_key(mod.ConceptNameCodeSequence[0]) == ("SCT", "272741003"):
                    side = _code_key(mod.ConceptCodeSequence[0])
    return None if site is None else (site, side)


def _feature_for(
    name: tuple[str, str], site: tuple[tuple[str, str], tuple[str, str] | None]
) -> str | None:
    for feature, (concept, code) in TOTALS.items():
        if name == _key(concept) and site == (_key(code), None):
            return feature
    side = {None: "", _key(LEFT): "left_", _key(RIGHT): "right_"}.get(site[1])
    if side is None:
        return None
    for region, code in REGION_SITES.items():
        if site[0] == _key(code):
            return f"gm_{side}{region}"
    if site[0][0] == SCHEME and site[0][1].startswith("R-"):
        return None  # a private region code of another atlas: not reversible by name
    return None


def read_sr(ds: Dataset) -> SRValues:
    """The values of an SR written by :func:`build_sr` (a pydicom dataset, e.g. dcmread)."""
    items = _walk(ds.ContentSequence)
    classes = {_key(v): k for k, v in CLASS_CODES.items()}
    qcs = {_key(v): k for k, v in QC_CODES.items()}
    found: dict[str, Any] = {"volumes": {}, "contributions": {}, "algorithm": {}, "texts": {}}
    for item in items:
        if "ConceptNameCodeSequence" not in item:
            continue
        name = _code_key(item.ConceptNameCodeSequence[0])
        vtype = item.ValueType
        if vtype == "CODE" and name == _key(PREDICTED_CLASS):
            found["predicted_class"] = classes[_code_key(item.ConceptCodeSequence[0])]
        elif vtype == "CODE" and name == _key(QC_OUTCOME):
            found["qc_outcome"] = qcs[_code_key(item.ConceptCodeSequence[0])]
        elif vtype == "NUM":
            value = float(item.MeasuredValueSequence[0].NumericValue)
            if name == _key(PROBABILITY):
                found["probability"] = value
            elif name == _key(DECISION):
                found["decision_value"] = value
            elif name == _key(THRESHOLD):
                found["decision_threshold"] = value
            elif name == _key(MARGIN):
                found["indeterminate_margin"] = value
            elif name == _key(RESPONSE_RATE):
                found["training_response_rate"] = value
            elif name in (_key(GM_VOLUME), _key(VOLUME), _key(CONTRIBUTION)):
                site = _site_key(item)
                lookup = _key(GM_VOLUME) if name == _key(CONTRIBUTION) else name
                feature = _feature_for(lookup, site) if site else None
                if feature is not None:
                    target = "contributions" if name == _key(CONTRIBUTION) else "volumes"
                    found[target][feature] = value
        elif vtype == "TEXT":
            if name == ("DCM", "111002"):  # Algorithm Parameters
                k, _, v = str(item.TextValue).partition("=")
                found["algorithm"][k] = v
            elif name == ("DCM", "111001"):
                found["algorithm"]["name"] = str(item.TextValue)
            elif name == ("DCM", "111003"):
                found["algorithm"]["version"] = str(item.TextValue)
            elif name == _key(NOT_SCORED_REASON):
                found["not_scored_reason"] = str(item.TextValue)
            else:
                meaning = str(item.ConceptNameCodeSequence[0].CodeMeaning)
                found["texts"].setdefault(meaning, []).append(str(item.TextValue))
    needed: tuple[str, ...] = ("predicted_class", "probability", "decision_value", "qc_outcome")
    if "not_scored_reason" in found:
        needed = ("qc_outcome",)
        scored = [k for k in ("predicted_class", "probability", "decision_value") if k in found]
        if scored:
            raise ValueError(f"not a ketanode SR: not scored, yet {', '.join(scored)}")
    missing = [k for k in needed if k not in found]
    if missing:
        raise ValueError(f"not a ketanode SR: no {', '.join(missing)}")
    return SRValues(**found)


__all__ = ["ResultForReport", "SRValues", "build_sr", "display_name", "read_sr"]
