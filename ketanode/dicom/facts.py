"""The facts about a series that ketanode keeps, read from one of its instances.

An Enhanced MR instance carries its pixel measures, orientation and frame type in its
functional groups: the Shared Functional Groups, or (some scanners) the first frame's
Per-Frame Functional Groups; a slice spacing it does not state is taken from the first two
frames' positions along the slice normal.
"""

from __future__ import annotations

import math
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


def _group(ds: Dataset, macro: str, attribute: str) -> Any:
    """``attribute`` of a functional group macro: shared first, then the first frame's."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        value = _first(ds, groups, macro, attribute)
        if value not in (None, ""):
            return value
    return None


def _float(value: Any) -> float | None:
    try:
        number = None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _vector(value: Any, n: int) -> list[float] | None:
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == n and all(math.isfinite(v) for v in numbers) else None


def _frame_spacing(ds: Dataset) -> float | None:
    """Distance between the first two frames' planes (Enhanced MR), or None."""
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    if not frames or len(frames) < 2:
        return None
    orientation = _vector(
        ds.get("ImageOrientationPatient")
        or _group(ds, "PlaneOrientationSequence", "ImageOrientationPatient"),
        6,
    )
    positions = [
        _vector(_first(frame, "PlanePositionSequence", "ImagePositionPatient"), 3)
        for frame in (frames[0], frames[1])
    ]
    if orientation is None or positions[0] is None or positions[1] is None:
        return None
    r, c = orientation[:3], orientation[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    step = abs(sum(n * (b - a) for n, a, b in zip(normal, positions[0], positions[1], strict=True)))
    return round(step, 6) if step > 1e-6 else None


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
    spacing = ds.get("PixelSpacing") or _group(ds, "PixelMeasuresSequence", "PixelSpacing")
    thickness = ds.get("SliceThickness") or _group(ds, "PixelMeasuresSequence", "SliceThickness")
    between = ds.get("SpacingBetweenSlices") or _group(
        ds, "PixelMeasuresSequence", "SpacingBetweenSlices"
    )
    if enhanced and between in (None, ""):
        between = _frame_spacing(ds)
    image_type = ds.get("ImageType") or _group(ds, "MRImageFrameTypeSequence", "FrameType")
    mr_type = ds.get("MRAcquisitionType") or _group(
        ds, "MRFOVGeometrySequence", "MRAcquisitionType"
    )
    # One Enhanced MR object carries the whole series; for single-frame series the
    # scanner usually says how many images the acquisition has.
    expected = 1 if enhanced else _int(ds.get("ImagesInAcquisition"))
    row_mm = col_mm = None
    pair = _vector(spacing, 2) if spacing is not None and not isinstance(spacing, str) else None
    if pair is not None:
        row_mm, col_mm = pair
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
