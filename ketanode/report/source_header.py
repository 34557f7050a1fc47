"""The part of a source header that the report builders copy, made safe to copy.

A real archive holds headers that are not valid DICOM: an anonymiser writes "***" into
StudyDate and PatientBirthDate, a scanner writes an over-long LO or a lower-case CS. The
builders (:mod:`ketanode.report.sr`, :mod:`ketanode.report.secondary_capture`, through highdicom)
copy the patient and study attributes of the first source instance into the new objects and
refuse such values, so one bad date would stop the report of the whole series.

:func:`clean_source_header` gives them a copy of the attributes they read (patient and study
modules, the acquisition equipment highdicom records as contributing equipment, Body Part
Examined, Specific Character Set) in which every value that is not valid for its VR, its VM
or the character set, is left empty. Nothing is invented: a valid value is copied as it is,
an invalid one becomes empty, and the type 2 attributes the builders need are present
(empty when the source lacks them). The identity UIDs (SOP Class, SOP Instance, Series and
Study Instance UID) are copied unchanged, so the report lands in the source's study.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Any

from highdicom.enum import SpecificCharacterSetValues
from pydicom import Dataset
from pydicom import config as pydicom_config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM, validate_value

logger = logging.getLogger(__name__)

# highdicom warns when a person name has no '^' (an anonymiser's "***", a scanner's single
# name) and quotes the name in the warning, which reaches stderr or the log: the name is
# copied as the source has it (valid PN), and the warning is never shown. highdicom.base's
# log line that would quote a patient_name argument is dropped too.
_PERSON_NAME_WARNING = r"The string .* is unlikely to represent the intended person name"


def quiet_person_name_warning() -> None:
    """Ignore highdicom's person-name warning: the filter goes (back) to the front of the
    list before every build, as a ``warnings.catch_warnings`` block elsewhere may have
    dropped it or put another before it (``filterwarnings`` keeps one copy)."""
    warnings.filterwarnings("ignore", message=_PERSON_NAME_WARNING, category=UserWarning)


quiet_person_name_warning()


class _NoNameArguments(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not any(word in text for word in ("_name", "person name", "PersonName"))


logging.getLogger("highdicom.base").addFilter(_NoNameArguments())

# PS3.3 C.7.1.1 Patient, C.7.1.3 Clinical Trial Subject, C.7.2.1 General Study,
# C.7.2.2 Patient Study, C.7.2.3 Clinical Trial Study: the root attributes highdicom copies
# into an SR (copy_patient_and_study_information)
PATIENT = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "TypeOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "ReferencedPatientSequence",
    "SourcePatientGroupIdentificationSequence",
    "GroupOfPatientsIdentificationSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar",
    "PatientSex",
    "QualityControlSubject",
    "StrainDescription",
    "StrainNomenclature",
    "StrainStockSequence",
    "StrainAdditionalInformation",
    "StrainCodeSequence",
    "GeneticModificationsSequence",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
    "ReferencedPatientPhotoSequence",
    "EthnicGroupCodeSequence",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
)
# Clinical Trial Subject
CLINICAL_TRIAL_SUBJECT = (
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID",
    "OtherClinicalTrialProtocolIDsSequence",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "IssuerOfClinicalTrialSiteID",
    "ClinicalTrialSubjectID",
    "IssuerOfClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "IssuerOfClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
)
# General Study (StudyInstanceUID: see IDENTITY)
GENERAL_STUDY = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence",
    "StudyDescription",
    "ProcedureCodeSequence",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "ReferencedStudySequence",
    "StudyID",
    "RequestingService",
    "RequestingServiceCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
)
# Patient Study
PATIENT_STUDY_MODULE = (
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "PatientAge",
    "PatientSize",
    "PatientSizeCodeSequence",
    "PatientBodyMassIndex",
    "MeasuredAPDimension",
    "MeasuredLateralDimension",
    "PatientWeight",
    "MedicalAlerts",
    "Allergies",
    "Occupation",
    "SmokingStatus",
    "AdditionalPatientHistory",
    "PregnancyStatus",
    "LastMenstrualDate",
    "PatientSexNeutered",
    "ReasonForVisit",
    "ReasonForVisitCodeSequence",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence",
    "PatientState",
)
# Clinical Trial Study
CLINICAL_TRIAL_STUDY = (
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
    "LongitudinalTemporalOffsetFromEvent",
    "LongitudinalTemporalEventType",
    "ClinicalTrialTimePointTypeCodeSequence",
    "IssuerOfClinicalTrialTimePointID",
    "ConsentForClinicalTrialUseSequence",
)
PATIENT_STUDY = (
    *PATIENT,
    *CLINICAL_TRIAL_SUBJECT,
    *GENERAL_STUDY,
    *PATIENT_STUDY_MODULE,
    *CLINICAL_TRIAL_STUDY,
)
# read by highdicom's ContributingEquipment.for_image_acquisition
EQUIPMENT = (
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceSerialNumber",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "InstitutionAddress",
    "StationName",
    "AcquisitionDateTime",
    "AcquisitionDate",
    "AcquisitionTime",
)
OTHER = ("BodyPartExamined",)  # the report image's General Series
# copied unchanged, valid or not: the objects must land in the source's study
IDENTITY = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
# type 2 attributes the builders read (highdicom's constructors): present, empty if need be
TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# Specific Character Set used when the source's is not one the builders can write
FALLBACK_CHARSET = "ISO_IR 192"
ENUMERATED = {"PatientSex": {"M", "F", "O"}}
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI", "UR"}
LONG_TEXT_VRS = {"LT", "ST", "UT"}  # may hold CR, LF, FF and TAB
CONVERTERS: dict[str, Any] = {"DA": DA, "TM": TM, "DT": DT}
# terms highdicom accepts and pydicom can write
_CHARSETS = {s.value for s in SpecificCharacterSetValues} & set(python_encoding)
_MULTI_BYTE = {"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 58"}
_DEFAULT_REPERTOIRE = {"ISO_IR 6", "ISO 2022 IR 6"}


@dataclass(frozen=True)
class SourceHeader:
    """The copy given to the builders, and the keywords whose values were left empty."""

    dataset: Dataset
    blanked: tuple[str, ...]


def _charset(ds: Dataset) -> list[str] | None:
    """The source's Specific Character Set as highdicom accepts it, or None when it is not
    one (unknown terms, code extensions alone, ...). Absent: the default repertoire."""
    if "SpecificCharacterSet" not in ds:
        return []
    value = ds["SpecificCharacterSet"].value
    terms = [str(t) for t in (value if isinstance(value, MultiValue | list) else [value])]
    terms = [t.strip() for t in terms]
    if len(terms) == 1:
        if terms[0] in ("", *_DEFAULT_REPERTOIRE):
            return []
        ok = terms[0] in _CHARSETS and not terms[0].startswith("ISO 2022")
        return terms if ok else None
    if terms[0] == "":
        terms[0] = "ISO 2022 IR 6"  # an empty first value: the default repertoire
    ok = (
        all(t in _CHARSETS and t.startswith("ISO 2022") for t in terms)
        and terms[0] not in _MULTI_BYTE
    )
    return terms if ok else None


def _encodable(text: str, encodings: list[str]) -> bool:
    """Every character of ``text`` can be written in one of ``encodings`` (Python codec
    names; none: the default repertoire, ASCII)."""
    codecs = encodings or ["ascii"]
    for codec in codecs:
        try:
            text.encode(codec)
            return True
        except (UnicodeError, LookupError):
            continue
    # mixed: each character in one of the code extensions
    return all(any(_encodes(char, c) for c in codecs) for char in text)


def _encodes(char: str, codec: str) -> bool:
    try:
        char.encode(codec)
    except (UnicodeError, LookupError):
        return False
    return True


def _control_free(text: str, vr: str) -> bool:
    """No C0 or C1 control character (ESC sequences are gone once decoded), except the
    format effectors of the long text VRs."""
    allowed = {"\n", "\r", "\f", "\t"} if vr in LONG_TEXT_VRS else set()
    return all(not (ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F) or c in allowed for c in text)


def _valid_one(vr: str, value: Any, encodings: list[str]) -> bool:
    if vr in TEXT_VRS | LONG_TEXT_VRS:
        if isinstance(value, bytes | bytearray):
            return False  # not decoded: cannot be checked, so not copied
        text = value if isinstance(value, str) else str(value)
        if text == "":
            return True
        if not _control_free(text, vr) or not _encodable(text, encodings):
            return False
        validate_value(vr, text, pydicom_config.RAISE)
        if vr in CONVERTERS:
            CONVERTERS[vr](text)  # what highdicom does with StudyDate, StudyTime, ...
        return True
    validate_value(vr, value, pydicom_config.RAISE)
    return True


def _valid(keyword: str, element: DataElement, encodings: list[str]) -> bool:
    """The element's value is valid for its (dictionary) VR, VM and the character set."""
    value = element.value
    if value is None or value == "":
        return True
    values = list(value) if isinstance(value, MultiValue | list) else [value]
    if len(values) > 1 and dictionary_VM(element.tag) == "1":
        return False
    try:
        if not all(_valid_one(element.VR, v, encodings) for v in values):
            return False
    except (ValueError, TypeError, OverflowError):
        return False  # the message quotes the value: never logged
    allowed = ENUMERATED.get(keyword)
    return allowed is None or all(str(v) in allowed for v in values)


def _empty(tag: int, vr: str) -> DataElement:
    if vr == "SQ":
        return DataElement(tag, vr, [])
    return DataElement(tag, vr, "" if vr in TEXT_VRS | LONG_TEXT_VRS else None)


def _as_standard(tag: int, vr: str, element: DataElement) -> DataElement | None:
    """The element with the standard's VR (an explicit VR file may give another), or None
    when its value cannot be held by that VR."""
    if vr == element.VR:
        return element
    if vr == "SQ" or element.VR == "SQ":
        return None
    try:
        return DataElement(tag, vr, element.value, validation_mode=pydicom_config.IGNORE)
    except (ValueError, TypeError, OverflowError):
        return None


def clean_source_header(source: Dataset) -> SourceHeader:
    """A copy of the attributes of ``source`` that the report builders read, every value
    that is not valid for its VR, VM or character set left empty; the identity UIDs
    unchanged. The keywords left empty are logged (never the values)."""
    quiet_person_name_warning()  # the builders' next step would quote a name
    out = Dataset()
    blanked: list[str] = []
    for keyword in IDENTITY:
        if keyword in source:
            out[keyword] = copy.deepcopy(source[keyword])
    charset = _charset(source)
    if charset is None:
        blanked.append("SpecificCharacterSet")
        charset = [FALLBACK_CHARSET]
    if charset:
        out.SpecificCharacterSet = charset[0] if len(charset) == 1 else charset
    # the default repertoire is ASCII (pydicom reads it as Latin-1, leniently)
    encodings = ["ascii" if t in _DEFAULT_REPERTOIRE else python_encoding[t] for t in charset]
    for keyword in (*PATIENT_STUDY, *EQUIPMENT, *OTHER):
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        vr = dictionary_VR(tag)
        if keyword not in source:
            if keyword in TYPE_2:
                out.add(_empty(tag, vr))
            continue
        element = _as_standard(tag, vr, source[keyword])
        if element is not None and (vr == "SQ" or _valid(keyword, element, encodings)):
            out.add(copy.deepcopy(element))
        else:
            blanked.append(keyword)
            out.add(_empty(tag, vr))
    if blanked:
        logger.warning(
            "source header %s: invalid values left empty in the report: %s",
            out.get("SOPInstanceUID", "?"),
            ", ".join(blanked),
        )
    return SourceHeader(out, tuple(blanked))


__all__ = ["SourceHeader", "clean_source_header"]
