"""The template and atlas files shipped inside the package (see ``ketanode/data/*/SOURCE.md``).

Nothing is downloaded at run time. The atlas is configurable: a label image in MNI152 space,
a label table (``index,name``) and a region table (``region,labels,description``) that groups
labels into the regions ketanode measures.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import nibabel as nib

DATA = Path(str(resources.files("ketanode") / "data"))
TEMPLATES = DATA / "templates"
ATLASES = DATA / "atlases"

TEMPLATE_T1 = TEMPLATES / "icbm152_2009a_sym_t1.nii.gz"
TEMPLATE_GM = TEMPLATES / "icbm152_2009a_sym_gm.nii.gz"
TEMPLATE_WM = TEMPLATES / "icbm152_2009a_sym_wm.nii.gz"

DEFAULT_ATLAS = ATLASES / "desikan_killiany.nii.gz"
DEFAULT_LABELS = ATLASES / "desikan_killiany_labels.csv"
DEFAULT_REGIONS = ATLASES / "desikan_killiany_regions.csv"


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
