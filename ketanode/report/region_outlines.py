"""Outlines of measured regions on the source series' own images, for the SR's image regions.

A viewer draws a TID 1500 measurement group only through its image region: a SCOORD
polyline in the pixel coordinates of one referenced instance of the study (OHIF, for one,
shows nothing of a report without them). This module finds, for each region, the source
instance on which the region's cross-section is largest (its representative slice) and the
outline of that cross-section there, as (column, row) points in DICOM's SCOORD convention:
the top left-hand corner of the top left pixel is (0, 0), so a pixel's centre is at
(column + 0.5, row + 0.5).

The region map is the job's native territory map (integer labels in the T1's own space,
``territories.nii.gz``): each pixel of an instance is placed in the patient's space from
its Image Position/Orientation and Pixel Spacing, carried into the map's voxels through the
NIfTI affine (RAS, so LPS x and y change sign) and takes the label of the voxel it falls in.
Nothing here depends on the series' orientation or resolution: a sagittal 0.5 mm series and
an axial 1 mm one are sampled the same way. Instances without that geometry (a multi-frame
Enhanced MR instance, whose per-frame geometry sits in functional groups) give no outline;
the SR then keeps its measurements without an image region.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import contourpy
import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset

logger = logging.getLogger(__name__)

# Points kept on one outline at most (a viewer draws a polyline point by point).
MAX_POINTS = 160
# Sampling step (pixels) while looking for the representative slice; the outline itself is
# traced at full resolution.
SEARCH_STEP = 2


@dataclass(frozen=True)
class RegionOutline:
    """One region's outline on its representative source instance."""

    region: str
    sop_class_uid: str
    sop_instance_uid: str
    points: NDArray[np.float64]  # (n, 2) closed polyline, (column, row), first == last
    area_mm2: float


@dataclass(frozen=True)
class _Plane:
    ds: Dataset
    origin: NDArray[np.float64]  # LPS of pixel (0, 0)'s centre
    col_step: NDArray[np.float64]  # LPS step of one column (along a row)
    row_step: NDArray[np.float64]  # LPS step of one row (down a column)
    rows: int
    columns: int

    @property
    def pixel_area(self) -> float:
        return float(np.linalg.norm(self.col_step) * np.linalg.norm(self.row_step))


def _plane(ds: Dataset) -> _Plane | None:
    try:
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            return None
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        spacing = [float(v) for v in ds.PixelSpacing]
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    if ipp.shape != (3,) or iop.shape != (6,) or len(spacing) != 2 or rows < 2 or columns < 2:
        return None
    if not all(np.isfinite(ipp)) or not all(np.isfinite(iop)) or min(spacing) <= 0:
        return None
    # PixelSpacing is (between rows, between columns); IOP's first triplet is the direction
    # of increasing column index, the second that of increasing row index.
    return _Plane(ds, ipp, iop[:3] * spacing[1], iop[3:] * spacing[0], rows, columns)


def _labels_on(
    plane: _Plane, labels: NDArray[Any], ras_to_vox: NDArray[np.float64], step: int
) -> NDArray[np.int32]:
    r = np.arange(0, plane.rows, step, dtype=np.float64)
    c = np.arange(0, plane.columns, step, dtype=np.float64)
    rr, cc = np.meshgrid(r, c, indexing="ij")
    lps = (
        plane.origin[None, None, :]
        + cc[..., None] * plane.col_step[None, None, :]
        + rr[..., None] * plane.row_step[None, None, :]
    )
    ras = lps * np.array([-1.0, -1.0, 1.0])
    vox = ras @ ras_to_vox[:3, :3].T + ras_to_vox[:3, 3]
    idx = np.rint(vox).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(labels.shape)), axis=-1)
    out = np.zeros(rr.shape, dtype=np.int32)
    i = idx[inside]
    out[inside] = labels[i[:, 0], i[:, 1], i[:, 2]]
    return out


def _outline(mask: NDArray[np.bool_]) -> NDArray[np.float64] | None:
    padded = np.pad(mask.astype(np.float64), 1)
    lines = contourpy.contour_generator(z=padded, line_type="Separate").lines(0.5)
    if not lines:
        return None
    longest: Any = max(lines, key=lambda a: len(a))
    line = np.asarray(longest, dtype=np.float64)  # (x, y) = (column, row) + 1
    if len(line) < 4:
        return None
    if len(line) > MAX_POINTS:
        keep = np.linspace(0, len(line) - 1, MAX_POINTS).round().astype(int)
        line = line[keep]
    pts = line - 1.0 + 0.5  # undo the padding, then pixel centres in SCOORD convention
    if not np.array_equal(pts[0], pts[-1]):
        pts = np.vstack([pts, pts[:1]])
    return pts


def region_outlines(
    source: Sequence[Dataset],
    territories_path: str | Path,
    region_names: Sequence[str],
    wanted: Sequence[str],
    *,
    binary: bool = False,
) -> dict[str, RegionOutline]:
    """Outline of each of ``wanted`` (names in ``region_names``; label k is
    ``region_names[k - 1]``) on the source instance where its cross-section is largest.
    ``binary``: every non-zero voxel is label 1 (a mask, or the union of the territories).

    Regions that appear on no instance (or a series without plane geometry) are left out.
    """
    img: Any = nib.load(str(territories_path))
    labels = np.asarray(img.dataobj)
    labels = (labels > 0).astype(np.int32) if binary else labels.astype(np.int32)
    if labels.ndim != 3:
        return {}
    ras_to_vox: NDArray[np.float64] = np.linalg.inv(np.asarray(img.affine, dtype=np.float64))
    label_of = {name: k + 1 for k, name in enumerate(region_names)}
    targets = {name: label_of[name] for name in wanted if name in label_of}
    planes = [p for p in (_plane(ds) for ds in source) if p is not None]
    if not planes or not targets:
        return {}
    best: dict[str, tuple[int, int]] = {}  # region -> (count, plane index)
    for i, plane in enumerate(planes):
        coarse = _labels_on(plane, labels, ras_to_vox, SEARCH_STEP)
        counts = np.bincount(coarse.ravel(), minlength=max(targets.values()) + 1)
        for name, k in targets.items():
            n = int(counts[k])
            if n > best.get(name, (0, -1))[0]:
                best[name] = (n, i)
    out: dict[str, RegionOutline] = {}
    for name, (_, i) in best.items():
        plane = planes[i]
        mask = _labels_on(plane, labels, ras_to_vox, 1) == targets[name]
        pts = _outline(mask)
        if pts is None:
            continue
        out[name] = RegionOutline(
            region=name,
            sop_class_uid=str(plane.ds.SOPClassUID),
            sop_instance_uid=str(plane.ds.SOPInstanceUID),
            points=pts,
            area_mm2=float(mask.sum()) * plane.pixel_area,
        )
    return out


def outline_summary(outlines: Mapping[str, RegionOutline]) -> dict[str, int]:
    """Points per outlined region (for logs: no identifiers, no coordinates)."""
    return {name: len(o.points) for name, o in outlines.items()}
