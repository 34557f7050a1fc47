"""The facts about a series that ketanode keeps, read from one of its instances."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pydicom.dataset import Dataset

from ketanode.config import ENHANCED_MR_IMAGE_STORAGE


def _first(ds: Dataset, *path: str) -> Any:
    """Value at a nested path through the first item of each sequence, or None."""
    node: Any = ds
    for name in path:
        if node is None:
            return None
        value = node.get(name)
        if value is None:
            return None
        node = (value[0] if len(value) else None) if name.endswith("Sequence") else value
    return node


def _float(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _text(value: Any, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text[:limit] or None


@dataclass
class SeriesFacts:
    modality: str | None
    sop_class_uid: str | None
    series_number: int | None
    description: str | None
    protocol_name: str | None
    manufacturer: str | None
    image_type: str | None
    mr_acquisition_type: str | None
    rows: int | None
    columns: int | None
    pixel_spacing_row: float | None
    pixel_spacing_col: float | None
    slice_thickness: float | None
    spacing_between_slices: float | None
    expected_instances: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def series_facts(ds: Dataset) -> SeriesFacts:
    sop_class = str(ds.get("SOPClassUID", "")) or None
    enhanced = sop_class == ENHANCED_MR_IMAGE_STORAGE
    spacing = ds.get("PixelSpacing") or _first(
        ds, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence", "PixelSpacing"
    )
    thickness = ds.get("SliceThickness") or _first(
        ds, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence", "SliceThickness"
    )
    between = ds.get("SpacingBetweenSlices") or _first(
        ds, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence", "SpacingBetweenSlices"
    )
    image_type = ds.get("ImageType") or _first(
        ds, "SharedFunctionalGroupsSequence", "MRImageFrameTypeSequence", "FrameType"
    )
    mr_type = ds.get("MRAcquisitionType") or _first(
        ds, "SharedFunctionalGroupsSequence", "MRFOVGeometrySequence", "MRAcquisitionType"
    )
    # One Enhanced MR object carries the whole series; for single-frame series the
    # scanner usually says how many images the acquisition has.
    expected = 1 if enhanced else _int(ds.get("ImagesInAcquisition"))
    row_mm = col_mm = None
    if spacing is not None and len(spacing) == 2:
        row_mm, col_mm = _float(spacing[0]), _float(spacing[1])
    return SeriesFacts(
        modality=_text(ds.get("Modality"), 16),
        sop_class_uid=sop_class,
        series_number=_int(ds.get("SeriesNumber")),
        description=_text(ds.get("SeriesDescription"), 64),
        protocol_name=_text(ds.get("ProtocolName"), 64),
        manufacturer=_text(ds.get("Manufacturer"), 64),
        image_type=_text(image_type, 128),
        mr_acquisition_type=_text(mr_type, 2),
        rows=_int(ds.get("Rows")),
        columns=_int(ds.get("Columns")),
        pixel_spacing_row=row_mm,
        pixel_spacing_col=col_mm,
        slice_thickness=_float(thickness),
        spacing_between_slices=_float(between),
        expected_instances=expected if expected and expected > 0 else None,
    )
