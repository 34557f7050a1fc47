"""The template and atlas files shipped inside the package (see ``ketanode/data/*/SOURCE.md``).

Nothing is downloaded at run time. The atlas is configurable: a label image in MNI152 space,
a label table (``index,name``) and a region table (``region,labels,description``) that groups
labels into the regions ketanode measures. :func:`region_territories` gives every voxel near
the brain the nearest region (the territories that ``measure`` sums and the phantoms are
built from).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

DATA = Path(str(resources.files("ketanode") / "data"))
TEMPLATES = DATA / "templates"
ATLASES = DATA / "atlases"

TEMPLATE_T1 = TEMPLATES / "icbm152_2009a_sym_t1.nii.gz"
TEMPLATE_GM = TEMPLATES / "icbm152_2009a_sym_gm.nii.gz"
TEMPLATE_WM = TEMPLATES / "icbm152_2009a_sym_wm.nii.gz"

DEFAULT_ATLAS = ATLASES / "desikan_killiany.nii.gz"
DEFAULT_LABELS = ATLASES / "desikan_killiany_labels.csv"
DEFAULT_REGIONS = ATLASES / "desikan_killiany_regions.csv"

#: Atlas labels of the cerebellum and of the brain stem (no region territory there).
CEREBELLUM_LABELS = frozenset({6, 7, 8, 45, 46, 47})
BRAINSTEM_LABELS = frozenset({15, 16})


@dataclass(frozen=True)
class Region:
    name: str
    labels: tuple[int, ...]
    description: str


@dataclass(frozen=True)
class Atlas:
    """A label image in MNI152 space and the regions (groups of labels) measured in it."""

    name: str
    image_path: Path
    labels: dict[int, str]
    regions: tuple[Region, ...]

    def image(self) -> nib.Nifti1Image:
        img = nib.load(str(self.image_path))
        assert isinstance(img, nib.Nifti1Image)
        return img

    def region(self, name: str) -> Region:
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(f"atlas {self.name} has no region {name!r}")


class AtlasError(ValueError):
    pass


def _read_labels(path: Path) -> dict[int, str]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"index", "name"} <= set(reader.fieldnames):
            raise AtlasError(f"{path}: a label table needs the columns index,name")
        return {int(row["index"]): row["name"] for row in reader}


def _read_regions(path: Path, labels: dict[int, str]) -> tuple[Region, ...]:
    regions = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"region", "labels"} <= set(reader.fieldnames):
            raise AtlasError(f"{path}: a region table needs the columns region,labels")
        for row in reader:
            ids = tuple(int(x) for x in row["labels"].split())
            unknown = [i for i in ids if i not in labels]
            if not ids or unknown:
                raise AtlasError(f"{path}: region {row['region']!r} names unknown labels {unknown}")
            regions.append(Region(row["region"], ids, row.get("description") or ""))
    if not regions:
        raise AtlasError(f"{path}: no regions")
    return tuple(regions)


@lru_cache(maxsize=4)
def load_atlas(
    image: Path = DEFAULT_ATLAS, labels: Path = DEFAULT_LABELS, regions: Path = DEFAULT_REGIONS
) -> Atlas:
    for path in (image, labels, regions):
        if not Path(path).is_file():
            raise AtlasError(f"atlas file {path} does not exist")
    table = _read_labels(Path(labels))
    return Atlas(
        Path(image).name.split(".")[0], Path(image), table, _read_regions(Path(regions), table)
    )


def region_names_of_default_atlas() -> list[str]:
    """The region names whose 1-based index the territory labels are (default atlas)."""
    return [r.name for r in load_atlas().regions]


# --- territories ---------------------------------------------------------------------------


def _resample_labels(
    atlas_img: nib.Nifti1Image, shape: tuple[int, ...], affine: NDArray[np.float64]
) -> NDArray[np.int32]:
    """Nearest-neighbour resampling of a label image onto a grid (shape, affine)."""
    labels = np.asanyarray(atlas_img.dataobj).astype(np.int32)
    vox = np.linalg.inv(np.asarray(atlas_img.affine, dtype=np.float64)) @ affine
    out = np.zeros(shape, dtype=np.int32)
    for k in range(shape[0]):
        j, i = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
        pts = np.stack([np.full(j.size, k), j.ravel(), i.ravel()]).astype(np.float64)
        src = np.rint(vox[:3, :3] @ pts + vox[:3, 3:4]).astype(np.int64)
        ok = np.all((src >= 0) & (src < np.array(labels.shape)[:, None]), axis=0)
        plane = np.zeros(j.size, dtype=np.int32)
        plane[ok] = labels[src[0, ok], src[1, ok], src[2, ok]]
        out[k] = plane.reshape(j.shape)
    return out


def _is_cerebellar(region_labels: tuple[int, ...]) -> bool:
    return all(label in CEREBELLUM_LABELS for label in region_labels)


def region_territories(
    atlas: Atlas,
    reference_img: nib.Nifti1Image,
    mask: NDArray[np.bool_] | None = None,
    max_distance_mm: float = 6.0,
) -> tuple[NDArray[np.int16], list[str]]:
    """Region territories of ``atlas`` on the grid of ``reference_img`` (an MNI-space image).

    The atlas label image is resampled (nearest neighbour) onto the reference grid; every
    voxel in ``mask`` (default: within ``max_distance_mm`` of an atlas label) then gets the
    nearest region: cerebral regions within the cerebrum, cerebellar regions within the
    cerebellum (the compartment of a voxel is that of its nearest atlas label; the brain stem
    and 4th ventricle get no region). Returns the volume (0 = no region, k = ``names[k-1]``)
    and the region names in atlas order.
    """
    affine = np.asarray(reference_img.affine, dtype=np.float64)
    shape = tuple(int(s) for s in reference_img.shape[:3])
    labels = _resample_labels(atlas.image(), shape, affine)
    sampling = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    dist, nearest = ndi.distance_transform_edt(labels == 0, sampling=sampling, return_indices=True)
    nearest_label = labels[tuple(nearest)]
    del nearest
    if mask is None:
        mask = dist <= max_distance_mm
    cerebellum = np.isin(nearest_label, list(CEREBELLUM_LABELS))
    cerebrum = ~cerebellum & ~np.isin(nearest_label, list(BRAINSTEM_LABELS)) & (nearest_label > 0)
    names = [r.name for r in atlas.regions]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int16)
    for k, region in enumerate(atlas.regions, start=1):
        for label in region.labels:
            if label < lut.size:
                lut[label] = k
    region_map = lut[labels]
    out = np.zeros(shape, dtype=np.int16)
    cerebellar_ids = [k for k, r in enumerate(atlas.regions, 1) if _is_cerebellar(r.labels)]
    for compartment, want_cerebellar in ((cerebrum, False), (cerebellum, True)):
        ids = [k for k in range(1, len(names) + 1) if (k in cerebellar_ids) == want_cerebellar]
        seeds = np.isin(region_map, ids)
        if not seeds.any():
            continue
        _, idx = ndi.distance_transform_edt(~seeds, sampling=sampling, return_indices=True)
        sel = compartment & mask
        out[sel] = region_map[tuple(i[sel] for i in idx)]
    return out, names
