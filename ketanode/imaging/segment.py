"""Three-class tissue segmentation (CSF, GM, WM) with Atropos and template tissue priors.

The template GM/WM maps and CSF = intracranial - GM - WM are pulled into native space with the
registration and used as prior probability images; a plain Gaussian mixture underestimated
cerebellar GM by about 35 % (DESIGN.md section 7), priors fix that.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ants
import numpy as np

from ketanode.imaging.preprocess import Registration, pull_to_native, read, template_priors

CLASSES = ("csf", "gm", "wm")


class SegmentationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Segmentation:
    """Paths of the native-space probability maps (0-1, float32), one per class."""

    csf_path: str
    gm_path: str
    wm_path: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def path(self, tissue: str) -> str:
        return str(getattr(self, f"{tissue}_path"))


def native_priors(
    native: ants.ANTsImage, reg: Registration, smooth_mm: float = 1.0
) -> list[ants.ANTsImage]:
    """CSF, GM, WM priors in native space (each smoothed a little, summing to <= 1)."""
    out = []
    for prior in template_priors()[1:]:
        p = pull_to_native(prior, native, reg.to_native, reg.invert_to_native)
        if smooth_mm > 0:
            p = ants.smooth_image(p, smooth_mm, sigma_in_physical_coordinates=True)
        out.append(p)
    return out


def atropos(
    native: ants.ANTsImage,
    mask: ants.ANTsImage,
    priors: list[ants.ANTsImage],
    prior_weight: float = 0.25,
    iterations: int = 5,
    mrf: float = 0.1,
) -> list[ants.ANTsImage]:
    """Run Atropos initialised from and regularised by ``priors``; returns CSF, GM, WM
    posterior probabilities (zero outside the mask)."""
    if float(mask.sum()) < 1000:
        raise SegmentationError("the brain mask is (nearly) empty")
    radius = "x".join("1" for _ in range(native.dimension))
    result = ants.atropos(
        a=native,
        x=mask,
        i=priors,
        m=f"[{mrf},{radius}]",
        c=f"[{iterations},0]",
        priorweight=prior_weight,
    )
    probs = list(result["probabilityimages"])
    if len(probs) != 3:
        raise SegmentationError(f"Atropos returned {len(probs)} classes, expected 3")
    m = mask.numpy() > 0
    return [p.new_image_like(np.where(m, p.numpy(), 0.0).astype(np.float32)) for p in probs]


def crop_to_mask(
    img: ants.ANTsImage, mask: ants.ANTsImage, margin: int = 2
) -> tuple[ants.ANTsImage, ants.ANTsImage, tuple[slice, ...]]:
    """``img`` and ``mask`` cropped to the mask's bounding box plus ``margin`` voxels, and the
    index slices of the box in the full grid. Atropos on the box gives the same posteriors
    as on the whole image in about two thirds of the time (1.2 mm head: 34 s -> 23 s)."""
    m = mask.numpy() > 0
    if not m.any():
        raise SegmentationError("the brain mask is empty")
    nz = np.argwhere(m)
    lo = np.maximum(nz.min(axis=0) - margin, 0)
    hi = np.minimum(nz.max(axis=0) + 1 + margin, m.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    cropped = ants.crop_indices(img, lo.tolist(), hi.tolist())
    # Atropos reads the priors back from NIfTI files (float32 origin): round the origin the
    # same way, or ITK finds the images "not in the same physical space"
    cropped.set_origin(tuple(float(np.float32(v)) for v in cropped.origin))
    cmask = cropped.new_image_like(np.ascontiguousarray(m[box]).astype(np.float32))
    return cropped, cmask, box


def segment(
    n4_path: str | Path,
    mask_path: str | Path,
    reg: Registration,
    out_dir: str | Path,
    prior_weight: float = 0.25,
    iterations: int = 5,
) -> Segmentation:
    """Segment the bias-corrected image inside the brain mask; writes
    ``{csf,gm,wm}_prob.nii.gz`` (on the input's grid) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    native = read(n4_path)
    mask = ants.image_read(str(mask_path), pixeltype="float")
    box_img, box_mask, box = crop_to_mask(native, mask)
    priors = native_priors(box_img, reg)
    probs = atropos(box_img, box_mask, priors, prior_weight=prior_weight, iterations=iterations)
    paths = []
    for name, img in zip(CLASSES, probs, strict=True):
        full = np.zeros(native.shape, dtype=np.float32)
        full[box] = img.numpy()
        path = out / f"{name}_prob.nii.gz"
        ants.image_write(native.new_image_like(full), str(path))
        paths.append(str(path))
    return Segmentation(*paths)
