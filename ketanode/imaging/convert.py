"""DICOM series to NIfTI with dicom2nifti (single-frame and Enhanced multi-frame)."""

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
from pydicom import dcmread

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
        os.replace(tmp, out_path)
    except Exception as exc:
        raise ConversionError(f"dicom2nifti could not convert the series: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return describe(out_path, len(files))
