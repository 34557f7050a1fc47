"""The feature spec: a named, versioned, ordered list of the features the pipeline emits.

The spec's SHA-256 hash covers its name, version, atlas and ordered feature names (canonical
JSON), so a model trained on one spec can refuse vectors made under another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ketanode.imaging.atlas import Atlas, load_atlas
from ketanode.imaging.measure import Measurement

SPEC_NAME = "ketanode-regional-volumes"
# The version changes whenever the same scan would give other numbers, so that a model
# trained on older features is refused: 1 = whole-head registration + Atropos;
# 2 = CNN brain mask (deepbet), 1 mm working grid, brain-to-brain registration, EM
# segmentation with priors (issue 11).
SPEC_VERSION = "2"
TOTALS = ("gm_total", "wm_total", "csf_total", "tiv")


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    version: str
    atlas: str
    features: tuple[str, ...]
    unit: str = "mL"

    def canonical(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "version": self.version,
                "atlas": self.atlas,
                "unit": self.unit,
                "features": list(self.features),
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()

    def vector(self, m: Measurement) -> list[float]:
        """The measurement as a vector in spec order (mL, rounded to 0.001)."""
        if m.atlas != self.atlas:
            raise ValueError(f"measurement atlas {m.atlas!r} is not the spec's {self.atlas!r}")
        values = {f"gm_{k}": v.gm_ml for k, v in m.regions.items()} | {
            "gm_total": m.gm_ml,
            "wm_total": m.wm_ml,
            "csf_total": m.csf_ml,
            "tiv": m.tiv_ml,
        }
        missing = [f for f in self.features if f not in values]
        if missing:
            raise KeyError(f"measurement lacks features {missing}")
        return [round(float(values[f]), 3) for f in self.features]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def default_spec(atlas: Atlas | None = None) -> FeatureSpec:
    """Regional GM (mL) for every atlas region in table order, then GM/WM/CSF totals and TIV."""
    atlas = atlas or load_atlas()
    names = tuple(f"gm_{r.name}" for r in atlas.regions) + TOTALS
    return FeatureSpec(SPEC_NAME, SPEC_VERSION, atlas.name, names)
