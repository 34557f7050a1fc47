"""Write a 3D volume as a DICOM MR series with realistic headers.

Used by the demo, the tests and the benchmarks (and by the phantom generator). The
volume is indexed ``[slice, row, column]``; geometry follows the DICOM patient (LPS)
coordinate system.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from ketanode.config import ENHANCED_MR_IMAGE_STORAGE, MR_IMAGE_STORAGE

#: (row direction, column direction) of each plane, in LPS.
ORIENTATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}

VENDORS = {
    "siemens": ("SIEMENS", "Prisma", "t1_mprage_sag_p2_iso", "GR\\IR"),
    "ge": ("GE MEDICAL SYSTEMS", "SIGNA Pioneer", "3D Ax T1 MP-RAGE", "RM\\IR"),
    "philips": ("Philips Medical Systems", "Ingenia", "T1W_3D_TFE", "GR"),
}


@dataclass
class SeriesSpec:
    patient_name: str = "KETANODE^PHANTOM"
    patient_id: str = "PHANTOM-0001"
    patient_birth_date: str = "19700101"
    patient_sex: str = "O"
    accession_number: str = "KN0001"
    study_uid: str = field(default_factory=lambda: str(generate_uid()))
    series_uid: str = field(default_factory=lambda: str(generate_uid()))
    series_number: int = 3
    series_description: str | None = None  # default: the vendor's T1 name
    protocol_name: str | None = None
    vendor: str = "siemens"
    orientation: str = "sagittal"
    mr_acquisition_type: str = "3D"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "NONE")
    modality: str = "MR"
    transfer_syntax: str = ExplicitVRLittleEndian
    enhanced: bool = False
    # Enhanced MR only: where pixel measures and orientation go ("shared": the Shared
    # Functional Groups; "per_frame": each frame's, as some scanners write them), and the
    # order of the frames in the instance ("ascending" along the slice normal,
    # "descending", or "shuffled"; In-Stack Position Number always counts along the normal)
    enhanced_groups: str = "shared"
    enhanced_frame_order: str = "ascending"
    images_in_acquisition: bool = True
    origin_mm: tuple[float, float, float] | None = None  # default: volume centred on 0


def _base(spec: SeriesSpec, sop_class: str, sop_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    ds = Dataset()
    ds.file_meta = meta
    now = dt.datetime.now()
    manufacturer, model, t1_name, sequence = VENDORS[spec.vendor]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(sop_uid)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = spec.accession_number
    ds.Modality = spec.modality
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.InstitutionName = "ketanode test site"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MRI BRAIN"
    ds.SeriesDescription = spec.series_description or t1_name
    ds.ProtocolName = spec.protocol_name or t1_name
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.patient_birth_date
    ds.PatientSex = spec.patient_sex
    ds.StudyInstanceUID = UID(spec.study_uid)
    ds.SeriesInstanceUID = UID(spec.series_uid)
    ds.StudyID = "1"
    ds.SeriesNumber = spec.series_number
    ds.FrameOfReferenceUID = (
        UID(spec.study_uid + ".1") if len(spec.study_uid) < 62 else generate_uid()
    )
    ds.PositionReferenceIndicator = ""
    ds.ImageType = list(spec.image_type)
    ds.MRAcquisitionType = spec.mr_acquisition_type
    ds.ScanningSequence = sequence.split("\\")
    ds.SequenceVariant = "SK"
    ds.ScanOptions = ""
    ds.MagneticFieldStrength = 3
    ds.RepetitionTime = 2300
    ds.EchoTime = 2.98
    ds.InversionTime = 900
    ds.FlipAngle = 9
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    return ds


def _geometry(
    shape: tuple[int, int, int], voxel_mm: tuple[float, float, float], spec: SeriesSpec
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    row_dir, col_dir = (np.array(v) for v in ORIENTATIONS[spec.orientation])
    normal = np.cross(row_dir, col_dir)
    n_slices, n_rows, n_cols = shape
    slice_mm, row_mm, col_mm = voxel_mm
    if spec.origin_mm is None:
        origin = -(
            row_dir * col_mm * (n_cols - 1) / 2
            + col_dir * row_mm * (n_rows - 1) / 2
            + normal * slice_mm * (n_slices - 1) / 2
        )
    else:
        origin = np.array(spec.origin_mm, dtype=float)
    return origin, row_dir, col_dir, normal


def write_series(
    volume: NDArray[np.generic],
    voxel_mm: tuple[float, float, float],
    out_dir: Path,
    spec: SeriesSpec | None = None,
) -> list[Path]:
    """Write ``volume[slice, row, col]`` with voxel size (slice, row, column) in mm."""
    spec = spec or SeriesSpec()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = np.clip(np.asarray(volume), 0, 65535).astype(np.uint16)
    origin, row_dir, col_dir, normal = _geometry(data.shape, voxel_mm, spec)
    slice_mm, row_mm, col_mm = voxel_mm
    if spec.enhanced:
        return [_write_enhanced(data, voxel_mm, out_dir, spec, origin, row_dir, col_dir, normal)]
    paths = []
    for k in range(data.shape[0]):
        sop_uid = str(generate_uid())
        ds = _base(spec, MR_IMAGE_STORAGE, sop_uid)
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        if spec.images_in_acquisition:
            ds.ImagesInAcquisition = data.shape[0]
        position = origin + normal * slice_mm * k
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.SliceLocation = round(float(np.dot(position, normal)), 4)
        ds.SliceThickness = slice_mm
        ds.SpacingBetweenSlices = slice_mm
        ds.PixelSpacing = [row_mm, col_mm]
        ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[2])
        ds.WindowCenter, ds.WindowWidth = 600, 1200
        ds.PixelData = data[k].tobytes()
        path = out_dir / f"IM{k + 1:04d}.dcm"
        _save(ds, path, spec.transfer_syntax)
        paths.append(path)
    return paths


def _write_enhanced(
    data: NDArray[np.uint16],
    voxel_mm: tuple[float, float, float],
    out_dir: Path,
    spec: SeriesSpec,
    origin: NDArray[np.float64],
    row_dir: NDArray[np.float64],
    col_dir: NDArray[np.float64],
    normal: NDArray[np.float64],
) -> Path:
    slice_mm, row_mm, col_mm = voxel_mm
    sop_uid = str(generate_uid())
    ds = _base(spec, ENHANCED_MR_IMAGE_STORAGE, sop_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.ContentQualification = "RESEARCH"
    ds.AcquisitionDateTime = ds.StudyDate + ds.StudyTime
    ds.NumberOfFrames = int(data.shape[0])
    ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[2])
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T1"
    ds.PulseSequenceName = "MPRAGE"
    ds.KSpaceFiltering = "NONE"
    ds.ResonantNucleus = "1H"
    ds.ImagingFrequency = 123.2
    ds.DimensionOrganizationType = "3D"
    for name in (
        "ScanningSequence",
        "SequenceVariant",
        "ScanOptions",
        "RepetitionTime",
        "EchoTime",
        "InversionTime",
        "FlipAngle",
    ):
        if name in ds:
            delattr(ds, name)
    dim_uid = generate_uid()
    ds.DimensionOrganizationSequence = Sequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = dim_uid
    index = Dataset()
    index.DimensionOrganizationUID = dim_uid
    index.DimensionIndexPointer = 0x00209057  # In-Stack Position Number
    index.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
    ds.DimensionIndexSequence = Sequence([index])

    if spec.enhanced_groups not in ("shared", "per_frame"):
        raise ValueError(f"enhanced_groups: 'shared' or 'per_frame', not {spec.enhanced_groups!r}")
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [row_mm, col_mm]
    measures.SliceThickness = slice_mm
    measures.SpacingBetweenSlices = slice_mm
    plane = Dataset()
    plane.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
    if spec.enhanced_groups == "shared":
        shared.PixelMeasuresSequence = Sequence([measures])
        shared.PlaneOrientationSequence = Sequence([plane])
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    frame_type.PixelPresentation = "MONOCHROME"
    frame_type.VolumetricProperties = "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "NONE"
    frame_type.ComplexImageComponent = "MAGNITUDE"
    frame_type.AcquisitionContrast = "T1"
    shared.MRImageFrameTypeSequence = Sequence([frame_type])
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = 600, 1200
    shared.FrameVOILUTSequence = Sequence([voi])
    transform = Dataset()
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = 0, 1, "US"
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    n = data.shape[0]
    if spec.enhanced_frame_order == "ascending":
        order = list(range(n))
    elif spec.enhanced_frame_order == "descending":
        order = list(range(n))[::-1]
    elif spec.enhanced_frame_order == "shuffled":
        order = [int(k) for k in np.random.default_rng(n).permutation(n)]
    else:
        raise ValueError(f"enhanced_frame_order: not {spec.enhanced_frame_order!r}")
    per_frame = []
    for k in order:  # frame k of the volume, written in this order
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [round(float(v), 4) for v in origin + normal * slice_mm * k]
        item.PlanePositionSequence = Sequence([pos])
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [k + 1]
        item.FrameContentSequence = Sequence([content])
        if spec.enhanced_groups == "per_frame":
            item.PixelMeasuresSequence = Sequence([copy.deepcopy(measures)])
            item.PlaneOrientationSequence = Sequence([copy.deepcopy(plane)])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.ascontiguousarray(data[order]).tobytes()
    path = out_dir / "ENHANCED.dcm"
    _save(ds, path, spec.transfer_syntax)
    return path


def _save(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    ts = UID(transfer_syntax)
    if ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = ts
        ds.save_as(
            path,
            enforce_file_format=True,
            implicit_vr=ts == ImplicitVRLittleEndian,
            little_endian=True,
        )
        return
    ds.compress(ts)
    ds.save_as(path, enforce_file_format=True)
