"""Regional GM/WM/CSF volumes (mL) in the subject's native space, tissue totals and TIV.

Atlas labels are thin cortical ribbons drawn on one template brain; after an affine they do
not cover a subject's GM. So every intracranial template voxel is assigned to the nearest
atlas region (its *territory*), the territory map is pulled into native space (nearest
neighbour), and each tissue's posterior probability is summed per territory. Voxels outside
the brain mask count for nothing; TIV is the sum of the three posteriors (= mask volume).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import ants
import nibabel as nib
import numpy as np

from ketanode.imaging.atlas import (
    DEFAULT_ATLAS,
    TEMPLATE_GM,
    TEMPLATE_T1,
    TEMPLATE_WM,
    Atlas,
    Region,
    load_atlas,
    region_territories,
)
from ketanode.imaging.preprocess import Registration, pull_to_native, read, template_priors
from ketanode.imaging.segment import CLASSES, Segmentation


@dataclass(frozen=True)
class RegionVolumes:
    gm_ml: float
    wm_ml: float
    csf_ml: float


@dataclass(frozen=True)
class Measurement:
    atlas: str
    regions: dict[str, RegionVolumes]
    gm_ml: float
    wm_ml: float
    csf_ml: float
    tiv_ml: float
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        return cls(
            atlas=str(d["atlas"]),
            regions={k: RegionVolumes(**v) for k, v in d["regions"].items()},
            gm_ml=float(d["gm_ml"]),
            wm_ml=float(d["wm_ml"]),
            csf_ml=float(d["csf_ml"]),
            tiv_ml=float(d["tiv_ml"]),
            extra={k: float(v) for k, v in d.get("extra", {}).items()},
        )


def territories(atlas: Atlas | None = None) -> ants.ANTsImage:
    """Territory map on the template grid: 0 outside the intracranial mask, else k (1-based
    index into ``atlas.regions``) of the nearest region's labelled voxel."""
    atlas = atlas or load_atlas()
    return _territories(atlas.image_path, atlas.regions)


@lru_cache(maxsize=2)
def _territories(image_path: Path, regions: tuple[Region, ...]) -> ants.ANTsImage:
    # the phantom's definition, so that measurements and phantom truth agree: nearest region
    # within the cerebrum / cerebellum compartment; brain stem and 4th ventricle get none
    atlas = load_atlas(image_path) if image_path != DEFAULT_ATLAS else load_atlas()
    if atlas.regions != regions:
        atlas = Atlas(atlas.name, image_path, atlas.labels, regions)
    icv = template_priors()[0]
    # best-effort disk cache (the territories take ~7 s and each job is a fresh process)
    files = (TEMPLATE_T1, TEMPLATE_GM, TEMPLATE_WM, image_path)
    digest = hashlib.sha256(
        repr(
            (1, regions, [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
        ).encode()
    ).hexdigest()[:16]
    root = os.environ.get("KETANODE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ketanode"
    )
    cache = Path(root) / "measure" / f"territories-{digest}.npy"
    if cache.is_file():
        try:
            terr = np.load(cache)
            if terr.shape == icv.shape:
                return icv.new_image_like(terr.astype(np.float32))
        except (OSError, ValueError):
            pass
    ref = nib.load(str(TEMPLATE_T1))
    assert isinstance(ref, nib.Nifti1Image)
    terr, _ = region_territories(atlas, ref, mask=icv.numpy() > 0.5)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{os.getpid()}-{cache.name}")
        with tmp.open("wb") as fh:
            np.save(fh, terr.astype(np.int16))
        os.replace(tmp, cache)
    except OSError:
        pass
    # nibabel and ANTs index the same voxels of the template file: same array order
    return icv.new_image_like(terr.astype(np.float32))


def template_truth(atlas: Atlas | None = None) -> dict[str, float]:
    """Regional GM (mL) of the template itself, by the same territory definition: the
    expected measurement for an image made from the template T1."""
    atlas = atlas or load_atlas()
    terr = territories(atlas).numpy()
    icv, csf, gm, wm = (p.numpy() for p in template_priors())
    vox = float(np.prod(template_priors()[0].spacing)) / 1000.0
    out = {
        f"gm_{r.name}": float(gm[terr == k].sum() * vox)
        for k, r in enumerate(atlas.regions, start=1)
    }
    inside = icv > 0.5
    out |= {
        "gm_total": float(gm[inside].sum() * vox),
        "wm_total": float(wm[inside].sum() * vox),
        "csf_total": float(csf[inside].sum() * vox),
        "tiv": float(inside.sum() * vox),
    }
    return out


def native_territories(
    reg: Registration, reference: ants.ANTsImage, atlas: Atlas | None = None
) -> ants.ANTsImage:
    """The territory map pulled onto ``reference``'s grid (nearest neighbour): labels k =
    1-based index of the atlas regions, 0 outside them."""
    return pull_to_native(
        territories(atlas or load_atlas()),
        reference,
        reg.to_native,
        reg.invert_to_native,
        "nearestNeighbor",
    )


def cerebellar_labels(atlas: Atlas | None = None) -> list[int]:
    """Territory labels (1-based region indices) of the cerebellar regions."""
    atlas = atlas or load_atlas()
    return [k for k, r in enumerate(atlas.regions, start=1) if "cerebell" in r.name]


def measure(
    seg: Segmentation,
    reg: Registration,
    atlas: Atlas | None = None,
    territories_path: Path | None = None,
) -> Measurement:
    """Sum each tissue's fraction per atlas territory, in native space. ``territories_path``:
    the native territory map (labels k = 1-based index of the atlas regions; the report page
    outlines the driving regions with it), read when the file exists (the segment step
    writes it), else pulled through the registration and written there."""
    atlas = atlas or load_atlas()
    gm_img = read(seg.gm_path)
    probs = {name: read(seg.path(name)).numpy() for name in CLASSES}
    if territories_path is not None and Path(territories_path).is_file():
        terr = ants.image_read(str(territories_path), pixeltype="float")
    else:
        terr = native_territories(reg, gm_img, atlas)
        if territories_path is not None:
            ants.image_write(terr, str(territories_path))
    t = np.rint(terr.numpy()).astype(np.int64)
    vox = float(np.prod(gm_img.spacing)) / 1000.0
    n = len(atlas.regions) + 1
    sums = {
        name: np.bincount(t.ravel(), weights=p.ravel(), minlength=n) * vox
        for name, p in probs.items()
    }
    regions = {
        r.name: RegionVolumes(
            round(float(sums["gm"][k]), 3),
            round(float(sums["wm"][k]), 3),
            round(float(sums["csf"][k]), 3),
        )
        for k, r in enumerate(atlas.regions, start=1)
    }
    totals = {name: float(p.sum() * vox) for name, p in probs.items()}
    return Measurement(
        atlas=atlas.name,
        regions=regions,
        gm_ml=round(totals["gm"], 3),
        wm_ml=round(totals["wm"], 3),
        csf_ml=round(totals["csf"], 3),
        tiv_ml=round(sum(totals.values()), 3),
    )


def measure_files(
    seg_dir: str | Path, reg: Registration, atlas: Atlas | None = None
) -> Measurement:
    d = Path(seg_dir)
    return measure(Segmentation(*(str(d / f"{c}_prob.nii.gz") for c in CLASSES)), reg, atlas)
