"""The last resort: a minimal "NOT SCORED: report could not be built" SR.

When the SR or the report image cannot be built from a series (a source header the
builders still refuse, a bug), the study would get no answer at all and the radiologist
could not tell that the node looked. :func:`build_minimal_sr` makes a Basic Text SR by hand
(pydicom only, no highdicom, none of the report's content) that says so, in the source's
study (its Study Instance UID, its instances listed as evidence), with what of the patient
and study modules can be copied safely (:func:`~ketanode.report.source_header.clean_source_header`:
invalid values left empty; all of them left empty when even that fails or the copy cannot
be written). Never a value that was not in the source.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from io import BytesIO

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from ketanode.report.source_header import PATIENT_STUDY, TYPE_2, clean_source_header
from ketanode.texts import RESEARCH_USE_ONLY

logger = logging.getLogger(__name__)

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SCHEME = "99KETANODE"
TITLE = "NOT SCORED: report could not be built"
SERIES_DESCRIPTION = f"{RESEARCH_USE_ONLY} ketanode ketamine response SR (not scored)"
SERIES_NUMBER = 9901
NOTICE = (
    f"{RESEARCH_USE_ONLY}. Not for clinical use. ketanode examined this series but could not "
    "build its report; no score is given. See the node's dashboard and log for the job."
)


def _code(value: str, meaning: str, scheme: str = SCHEME) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _text(value: str, meaning: str, text: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = DicomSequence([_code(value, meaning)])
    item.TextValue = text[:10240]
    return item


def _evidence(source: Sequence[Dataset]) -> DicomSequence:
    by_series: dict[str, list[Dataset]] = {}
    for ds in source:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ref)
    study = Dataset()
    study.StudyInstanceUID = source[0].StudyInstanceUID
    series_items = []
    for series_uid, refs in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedSOPSequence = DicomSequence(refs)
        series_items.append(item)
    study.ReferencedSeriesSequence = DicomSequence(series_items)
    return DicomSequence([study])


def _patient_and_study(ds: Dataset, source: Dataset) -> list[str]:
    """Copy what can be copied safely; the keywords left empty."""
    try:
        header = clean_source_header(source)
    except Exception as exc:  # even the cleaning failed: every value left empty
        logger.warning("minimal SR: source header unreadable (%s); left empty", type(exc).__name__)
        for keyword in TYPE_2:
            setattr(ds, keyword, "")
        return list(TYPE_2)
    for keyword in ("SpecificCharacterSet", *PATIENT_STUDY):
        if keyword in header.dataset:
            ds[keyword] = header.dataset[keyword]
    return list(header.blanked)


def _writable(ds: Dataset) -> bool:
    try:
        ds.save_as(BytesIO(), enforce_file_format=True)
    except Exception:
        return False
    return True


def build_minimal_sr(
    source: Sequence[Dataset],
    *,
    cause: str,
    reason: str | None = None,
    software_version: str = "",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """A Basic Text SR saying "NOT SCORED: report could not be built" in the study of
    ``source`` (headers of the series; the first gives the patient and study modules).

    ``cause``: why, in a few words without any value from the data (an exception's type);
    ``reason``: the not-scored reason the full report would have carried, if any."""
    if not source:
        raise ValueError("no source instances")
    first = source[0]
    now = dt.datetime.now()
    sop_uid = sop_instance_uid or str(generate_uid())
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = first.StudyInstanceUID
    for keyword in TYPE_2:
        setattr(ds, keyword, "")
    blanked = _patient_and_study(ds, first)
    ds.StudyInstanceUID = first.StudyInstanceUID  # the source's study, always
    ds.Modality = "SR"
    ds.SeriesInstanceUID = series_instance_uid or str(generate_uid())
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.SeriesDate = now.strftime("%Y%m%d")
    ds.SeriesTime = now.strftime("%H%M%S")
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([])
    ds.Manufacturer = "ketanode"
    ds.ManufacturerModelName = "ketanode DICOM node"
    if software_version:
        ds.SoftwareVersions = software_version[:64]
    ds.InstanceNumber = 1
    ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = DicomSequence([])
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(source)
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "ketanode private codes"
    scheme.CodingSchemeResponsibleOrganization = "ketanode project"
    ds.CodingSchemeIdentificationSequence = DicomSequence([scheme])
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code("KRPRED", "Ketamine response prediction")])
    ds.ContinuityOfContent = "SEPARATE"
    text = f"{TITLE} ({cause})."
    if reason:
        text += f" {reason}"
    ds.ContentSequence = DicomSequence(
        [
            _text("NOTSCORED", "Not scored reason", text),
            _text("RUONOTICE", "Research use only notice", NOTICE),
        ]
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(BASIC_TEXT_SR)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    if not _writable(ds):  # a copied value still cannot be written: leave them all empty
        for keyword in ("SpecificCharacterSet", *PATIENT_STUDY):
            if keyword in ds:
                del ds[keyword]
        for keyword in TYPE_2:
            setattr(ds, keyword, "")
        blanked = list(TYPE_2)
    logger.warning(
        "minimal NOT SCORED SR %s built (%s); %d source values left empty",
        sop_uid,
        cause,
        len(blanked),
    )
    return ds


__all__ = ["BASIC_TEXT_SR", "TITLE", "build_minimal_sr"]
