"""DICOM series to NIfTI: dicom2nifti (single-frame and Enhanced multi-frame), and the
node's own conversion of an Enhanced MR instance when dicom2nifti cannot convert it.

The node's own conversion reads one multi-frame instance whose frames form one stack:
orientation, pixel spacing and rescale from the Shared Functional Groups (or each frame's
own), each frame placed by its Plane Position along the slice normal (sorted, evenly
spaced, one position per frame), the affine from those positions (LPS to RAS).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dicom2nifti.convert_dicom as d2n_convert
import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset

from ketanode.config import ENHANCED_MR_IMAGE_STORAGE

logger = logging.getLogger(__name__)


class ConversionError(Exception):
    pass


@dataclass
class Volume:
    path: str
    shape: list[int]
    zooms_mm: list[float]
    affine: list[list[float]]
    axcodes: str
    dtype: str
    n_files: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(path: Path, n_files: int = 0) -> Volume:
    img = nib.load(str(path))
    assert isinstance(img, nib.Nifti1Image)
    return Volume(
        path=str(path),
        shape=[int(s) for s in img.shape],
        zooms_mm=[round(float(z), 6) for z in img.header.get_zooms()[:3]],
        affine=np.round(img.affine, 6).tolist(),
        axcodes="".join(str(c) for c in nib.aff2axcodes(img.affine)),
        dtype=str(img.get_data_dtype()),
        n_files=n_files,
    )


def convert_series(files: Sequence[Path], out_path: Path) -> Volume:
    """Convert one series to a NIfTI file at ``out_path`` (written atomically)."""
    if not files:
        raise ConversionError("no files to convert")
    datasets = [dcmread(str(f)) for f in files]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{uuid.uuid4().hex}.nii.gz")
    try:
        d2n_convert.dicom_array_to_nifti(datasets, str(tmp), reorient_nifti=True)
        if len(datasets) == 1 and _is_enhanced(datasets[0]):
            _check_against_frames(datasets[0], tmp)
        os.replace(tmp, out_path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if not (len(datasets) == 1 and _is_enhanced(datasets[0])):
            raise ConversionError(f"dicom2nifti could not convert the series: {exc}") from exc
        logger.info(
            "dicom2nifti could not convert the Enhanced MR instance (%s); converting it "
            "with the node's own conversion",
            type(exc).__name__,
        )
        try:
            _write(enhanced_to_nifti(datasets[0]), out_path)
        except ConversionError:
            raise
        except Exception as own:
            raise ConversionError(
                f"neither dicom2nifti ({type(exc).__name__}) nor the node's Enhanced MR "
                f"conversion ({type(own).__name__}: {own}) could convert the series"
            ) from own
    finally:
        tmp.unlink(missing_ok=True)
    return describe(out_path, len(files))


class _Disagrees(Exception):
    """dicom2nifti's volume is not where the frames' positions put it."""


def _check_against_frames(ds: Dataset, path: Path) -> None:
    """dicom2nifti places Enhanced MR frames by In-Stack Position Number but takes the slice
    direction from the first and last frames in the file: frames stored in descending
    order come out flipped through the slices. Its volume must equal the one the frames'
    own positions give."""
    try:
        own = enhanced_to_nifti(ds)
    except ConversionError:
        return  # not one evenly spaced stack (4D, ...): nothing to check it against
    converted = nib.load(str(path))
    assert isinstance(converted, nib.Nifti1Image)
    theirs = nib.as_closest_canonical(converted)
    same = (
        theirs.shape == own.shape
        and np.allclose(theirs.affine, own.affine, atol=1e-3)
        and np.allclose(np.asarray(theirs.dataobj), np.asarray(own.dataobj))
    )
    if not same:
        raise _Disagrees("dicom2nifti's volume disagrees with the frames' positions")


def _is_enhanced(ds: Dataset) -> bool:
    return str(ds.get("SOPClassUID", "")) == ENHANCED_MR_IMAGE_STORAGE and (
        "PerFrameFunctionalGroupsSequence" in ds
    )


def _write(img: nib.Nifti1Image, out_path: Path) -> None:
    tmp = out_path.with_name(f".{uuid.uuid4().hex}.nii.gz")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def _macro(ds: Dataset, frame: Dataset, macro: str) -> Dataset | None:
    """A functional group macro's item for ``frame``: its own, else the shared one."""
    for holder in (frame, *(ds.get("SharedFunctionalGroupsSequence") or [])):
        items = holder.get(macro)
        if items:
            return items[0]  # type: ignore[no-any-return]
    return None


def _floats(value: object, n: int, what: str) -> NDArray[np.float64]:
    try:
        array = np.array([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{what} is not {n} numbers") from exc
    if array.shape != (n,) or not np.all(np.isfinite(array)):
        raise ConversionError(f"{what} is not {n} numbers")
    return array


def enhanced_to_nifti(ds: Dataset) -> nib.Nifti1Image:
    """One Enhanced MR instance (one stack of frames) as a NIfTI image (RAS affine)."""
    frames = list(ds.PerFrameFunctionalGroupsSequence)
    n = len(frames)
    pixels = np.asarray(ds.pixel_array)
    if n < 2 or pixels.ndim != 3 or pixels.shape[0] != n:
        raise ConversionError(
            f"an Enhanced MR volume needs at least 2 frames of one sample each "
            f"(pixel data {pixels.shape}, {n} frame items)"
        )
    first = frames[0]
    plane = _macro(ds, first, "PlaneOrientationSequence")
    measures = _macro(ds, first, "PixelMeasuresSequence")
    if plane is None or measures is None:
        raise ConversionError("no Plane Orientation or Pixel Measures functional group")
    orientation = _floats(plane.ImageOrientationPatient, 6, "Image Orientation (Patient)")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise ConversionError("Image Orientation (Patient) is not two orthogonal unit vectors")
    spacing = _floats(measures.PixelSpacing, 2, "Pixel Spacing")  # (between rows, columns)
    positions = []
    for k, frame in enumerate(frames):
        position = _macro(ds, frame, "PlanePositionSequence")
        if position is None:
            raise ConversionError(f"frame {k + 1} has no Plane Position")
        positions.append(_floats(position.ImagePositionPatient, 3, "Image Position (Patient)"))
        other = _macro(ds, frame, "PlaneOrientationSequence")
        if other is not None and not np.allclose(
            _floats(other.ImageOrientationPatient, 6, "Image Orientation (Patient)"),
            orientation,
            atol=1e-4,
        ):
            raise ConversionError("frames of more than one orientation")
    along = np.array([float(np.dot(p, normal)) for p in positions])
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    if np.any(steps < 1e-4):
        raise ConversionError("frames share a position: more than one volume in the instance")
    if not np.allclose(steps, steps.mean(), rtol=0.01, atol=1e-3):
        raise ConversionError(
            f"frames are not evenly spaced ({steps.min():.4g} to {steps.max():.4g} mm)"
        )
    volume = np.empty(pixels.shape, dtype=np.float64)
    rescaled = False
    for k, frame in enumerate(frames):
        transform = _macro(ds, frame, "PixelValueTransformationSequence")
        slope = float(getattr(transform, "RescaleSlope", 1) or 1) if transform else 1.0
        intercept = float(getattr(transform, "RescaleIntercept", 0) or 0) if transform else 0.0
        rescaled = rescaled or slope != 1.0 or intercept != 0.0
        volume[k] = pixels[k] * slope + intercept
    volume = volume[order]
    # voxel (i column, j row, k slice) -> LPS; then to RAS
    origin = positions[int(order[0])]
    step = (positions[int(order[-1])] - origin) / (n - 1)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1]
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    data = np.transpose(volume, (2, 1, 0))  # [slice, row, column] -> [i, j, k]
    if not rescaled:
        data = data.astype(pixels.dtype)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    canonical = nib.as_closest_canonical(img)
    assert isinstance(canonical, nib.Nifti1Image)
    return canonical
