"""Brain extraction on whole-head scans with deepbet (a CNN; weights inside its wheel).

Real scanner T1s hold neck, face, fat and shoulders; an intensity-based skull strip or an
affine of the whole head to a brain-only template lands on the scalp (issue 11: brain
correlation 0.09-0.16 on a UIH 3 T head). deepbet (Fisch et al. 2024, MIT licence; its two
TorchScript networks ship in the PyPI wheel, ``deepbet/../data/models``, with the licence in
its ``dist-info``) finds the brain's bounding box on a 128^3 copy, then segments the box at
256^3: the mask holds brain and the CSF around it (an intracranial mask), so its volume is
the TIV. Measured on the shared UIH head: 1673 mL, mask on the inner table of the skull, in
about 5 s on 2 cores. Nothing is downloaded.

The networks are loaded once per process. A volume with no brain-like foreground (noise, a
test object) gives an empty mask instead of an exception; quality control then refuses it.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _extractor() -> Any:
    from deepbet.bet import BrainExtraction

    return BrainExtraction(no_gpu=True)


def brain_mask(img: nib.Nifti1Image, threshold: float = 0.5) -> NDArray[np.bool_]:
    """The brain (intracranial) mask of ``img`` on its own voxel grid and axis order."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim != 3 or not np.isfinite(data).all() or float(data.max()) <= float(data.min()):
        return np.zeros(img.shape[:3], dtype=bool)
    try:
        _, mask, _ = _extractor().run(nib.Nifti1Image(data, img.affine), threshold=threshold)
    except (AssertionError, ValueError, IndexError) as exc:
        # deepbet asserts when its first network finds no foreground, and bincount fails on
        # an empty component map
        logger.info("brain extraction found no brain (%s)", type(exc).__name__)
        return np.zeros(data.shape, dtype=bool)
    out = np.asarray(mask.dataobj) > 0
    if out.shape != data.shape:  # deepbet hands back the input's orientation
        raise RuntimeError(f"brain mask shape {out.shape} differs from the image {data.shape}")
    return out
