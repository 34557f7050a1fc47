"""Accuracy of the measurement on the three non-circular phantoms (issue 11, "It must show").

The phantoms (:func:`ketanode.synthetic.realistic_phantom.realistic_specs`, 1 mm: MPRAGE
sagittal, IR-FSPGR axial, IR-FSPGR sagittal; whole heads with neck, face and fat) do not
share their anatomy with the template the pipeline registers to and takes its priors from.
Each goes through :func:`ketanode.imaging.analysis.analyse` once (one module fixture); per
phantom: median absolute regional GM error <= 5 %, left/right frontal and left/right
cerebellum each <= 10 %, TIV within 5 %. The figures are printed as one JSON line per
phantom (``pytest -s``) and repeated in every failure message.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import pytest

from ketanode.imaging.analysis import analyse
from ketanode.synthetic.realistic_phantom import make_realistic_phantom, realistic_specs

pytestmark = pytest.mark.timeout(3600)

KEY_REGIONS = ("left_frontal", "right_frontal", "left_cerebellum", "right_cerebellum")
SPECS = realistic_specs(1.0)
NAMES = [f"{s.contrast}-{s.orientation}-{s.seed}" for s in SPECS]


def _score(truth: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    line: dict[str, Any] = {"qc": result.get("qc", {}).get("outcome"), "seconds": result["seconds"]}
    if "features" not in result:
        line["error"] = result.get("error", "no features")
        return line
    m = result["features"]["measurement"]
    errors = {
        name: round(100 * (m["regions"][name]["gm_ml"] / t["gm_ml"] - 1), 2)
        for name, t in truth["regions"].items()
        if t["gm_ml"] > 1
    }
    return line | {
        "gm_error_pct": errors,
        "median_abs_gm_error_pct": round(statistics.median(abs(e) for e in errors.values()), 2),
        "key_region_error_pct": {k: errors[k] for k in KEY_REGIONS},
        "tiv_error_pct": round(100 * (m["tiv_ml"] / truth["tiv_ml"] - 1), 2),
        "tiv_ml": round(m["tiv_ml"], 1),
        "true_tiv_ml": round(truth["tiv_ml"], 1),
        "total_gm_error_pct": round(100 * (m["gm_ml"] / truth["gm_ml"] - 1), 2),
    }


@pytest.fixture(scope="module")
def scores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every phantom generated and measured once (one at a time: 2 cores)."""
    root = tmp_path_factory.mktemp("realistic-accuracy")
    out: dict[str, dict[str, Any]] = {}
    for name, spec in zip(NAMES, SPECS, strict=True):
        phantom = make_realistic_phantom(spec)
        nifti = phantom.write_nifti(root / f"{name}.nii.gz")
        truth = phantom.truth
        del phantom
        started = time.perf_counter()
        result = analyse(str(nifti), str(root / name))
        line = {"phantom": name, "total_s": round(time.perf_counter() - started, 1)}
        line |= _score(truth, result)
        print(json.dumps(line), flush=True)
        out[name] = line
    return out


# (median, key region) limits in %: the issue's, for every phantom. The IR-FSPGR axial phantom
# missed them until the segmentation tied the cerebellum's class variances to the cerebrum's,
# capped CSF's and took an outlier class (cerebellar GM -12 / -16 % -> -4.2 / -8.1 %,
# docs/architecture.md); change a limit only with a measured reason.
ISSUE_LIMITS = (5.0, 10.0)


@pytest.mark.parametrize("name", NAMES)
def test_regional_gm_and_tiv_within_the_issue_limits(
    scores: dict[str, dict[str, Any]], name: str
) -> None:
    s = scores[name]
    figures = json.dumps(s)
    median_limit, key_limit = ISSUE_LIMITS
    assert "error" not in s, figures
    assert s["median_abs_gm_error_pct"] <= median_limit, figures
    for region in KEY_REGIONS:
        assert abs(s["key_region_error_pct"][region]) <= key_limit, f"{region}: {figures}"
    assert abs(s["tiv_error_pct"]) <= 5.0, figures
    assert abs(s["total_gm_error_pct"]) <= 10.0, figures


def test_phantoms_are_whole_heads() -> None:
    """What the accuracy figures are about (cheap: the specs, not the images)."""
    for spec in SPECS:
        assert spec.voxel_mm == (1.0, 1.0, 1.0)
        assert spec.grid_shape()[1:] == (256, 256)
    assert {s.contrast for s in SPECS} == {"mprage", "spgr"}
    assert {s.orientation for s in SPECS} == {"sagittal", "axial"}
