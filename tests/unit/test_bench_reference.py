"""bench/reference.py without SAMSEG: its .stats parser and the node-vs-SAMSEG pairs."""

from __future__ import annotations

import importlib.util
import math
from types import ModuleType

import pytest

from tests.support import REPO

# The format SAMSEG 0.4a0 writes (Samseg.py: '# Measure %s, %.6f, mm^3'): the ICV first, then
# every structure of its atlas in atlas order (volumes in mm^3; these are made up, round).
SBTIV_STATS = "# Measure Intra-Cranial, 1500000.000000, mm^3\n"
SAMSEG_STATS = """\
# Measure Intra-Cranial, 1500000.000000, mm^3
# Measure Unknown, 9000000.000000, mm^3
# Measure Skull, 600000.000000, mm^3
# Measure Soft_Nonbrain_Tissue, 900000.000000, mm^3
# Measure Brain-Stem, 20000.000000, mm^3
# Measure CSF, 300000.000000, mm^3
# Measure Left-Cerebellum-Cortex, 50000.000000, mm^3
# Measure Right-Cerebellum-Cortex, 52000.000000, mm^3
# Measure 4th-Ventricle, 1500.000000, mm^3
# Measure Fluid_Inside_Eyes, 12000.000000, mm^3
# Measure Left-Cerebral-Cortex, 250000.000000, mm^3
# Measure Right-Cerebral-Cortex, 248000.000000, mm^3
# Measure Left-Cerebellum-White-Matter, 14000.000000, mm^3
# Measure Right-Cerebellum-White-Matter, 13500.000000, mm^3
# Measure Right-Cerebral-White-Matter, 230000.000000, mm^3
# Measure Left-Cerebral-White-Matter, 231000.000000, mm^3
# Measure Right-choroid-plexus, 650.000000, mm^3
# Measure Right-Amygdala, 1600.000000, mm^3
# Measure Left-Amygdala, 1500.000000, mm^3
# Measure Right-Hippocampus, 4100.000000, mm^3
# Measure Right-Inf-Lat-Vent, 300.000000, mm^3
# Measure Left-Hippocampus, 4000.000000, mm^3
# Measure Left-choroid-plexus, 700.000000, mm^3
# Measure Left-Inf-Lat-Vent, 250.000000, mm^3
# Measure Optic-Chiasm, 200.000000, mm^3
# Measure Right-VentralDC, 4000.000000, mm^3
# Measure Left-VentralDC, 4100.000000, mm^3
# Measure 3rd-Ventricle, 900.000000, mm^3
# Measure Left-Accumbens-area, 500.000000, mm^3
# Measure Left-Putamen, 5000.000000, mm^3
# Measure Right-Putamen, 4900.000000, mm^3
# Measure Right-vessel, 50.000000, mm^3
# Measure Right-Accumbens-area, 450.000000, mm^3
# Measure WM-hypointensities, 800.000000, mm^3
# Measure Left-Lateral-Ventricle, 8000.000000, mm^3
# Measure Left-vessel, 40.000000, mm^3
# Measure Right-Lateral-Ventricle, 7500.000000, mm^3
# Measure Right-Pallidum, 1800.000000, mm^3
# Measure Left-Caudate, 3500.000000, mm^3
# Measure Right-Thalamus, 7900.000000, mm^3
# Measure Left-Pallidum, 1900.000000, mm^3
# Measure Right-Caudate, 3600.000000, mm^3
# Measure Left-Thalamus, 8000.000000, mm^3
# Measure non-WM-hypointensities, 0.000000, mm^3
# Measure 5th-Ventricle, 0.000000, mm^3
"""
LEFT_DEEP = 8000 + 3500 + 5000 + 1900 + 4000 + 1500 + 500  # thalamus ... accumbens, mm^3
RIGHT_DEEP = 7900 + 3600 + 4900 + 1800 + 4100 + 1600 + 450

LOBES = ("frontal", "parietal", "temporal", "occipital", "cingulate", "insula")


def _bench() -> ModuleType:
    # bench/ is not a package: load the script by path
    spec = importlib.util.spec_from_file_location(
        "bench_reference", REPO / "bench" / "reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _measurement(gm: float = 10.0) -> dict[str, object]:
    # the node's region names (ketanode/data/atlases/desikan_killiany_regions.csv)
    names = [f"{s}_{r}" for s in ("left", "right") for r in (*LOBES, "cerebellum", "deep_grey")]
    regions = {n: {"gm_ml": gm, "wm_ml": 1.0, "csf_ml": 0.5} for n in names}
    regions["left_cerebellum"]["gm_ml"] = 55.0
    regions["right_deep_grey"]["gm_ml"] = 20.0
    return {"atlas": "dk", "regions": regions, "gm_ml": 700.0, "wm_ml": 450.0,
            "csf_ml": 300.0, "tiv_ml": 1450.0}  # fmt: skip


def test_parse_stats_reads_every_measure_line_in_ml() -> None:
    ref = _bench()
    assert ref.parse_stats(SBTIV_STATS) == {"Intra-Cranial": 1500.0}
    s = ref.parse_stats(SAMSEG_STATS)
    assert len(s) == 45  # the ICV and the 44 names of the atlas (Unknown included)
    assert s["Left-Cerebral-Cortex"] == 250.0
    assert s["Right-Accumbens-area"] == 0.45
    assert s["5th-Ventricle"] == 0.0
    # comments and other lines are skipped; samseg.fs.stats' eTIV line keeps its first name
    assert ref.parse_stats("# ColHeaders Index SegId\n  1 4 2 3.0 CSF\n") == {}
    fs = "# Measure EstimatedTotalIntraCranialVol, eTIV, Estimated TIV, 1500000.000000, mm^3"
    assert ref.parse_stats(fs) == {"EstimatedTotalIntraCranialVol": 1500.0}


def test_samseg_quantities_match_the_node_regions() -> None:
    ref = _bench()
    q = ref.samseg_quantities(ref.parse_stats(SAMSEG_STATS), 1490.0)
    assert q["tiv"] == 1490.0  # sbtiv.stats wins over samseg.stats' own line
    assert ref.samseg_quantities(ref.parse_stats(SAMSEG_STATS))["tiv"] == 1500.0
    assert q["left_cerebral_cortex"] == 250.0 and q["right_cerebral_cortex"] == 248.0
    assert q["left_cerebellar_cortex"] == 50.0 and q["right_cerebellar_cortex"] == 52.0
    assert math.isclose(q["left_deep_grey"], LEFT_DEEP / 1000)
    assert math.isclose(q["right_deep_grey"], RIGHT_DEEP / 1000)
    # cortex + cerebellar cortex + the seven deep grey structures; not ventral DC
    total = (250000 + 248000 + 50000 + 52000 + LEFT_DEEP + RIGHT_DEEP) / 1000
    assert math.isclose(q["total_gm"], total)
    assert math.isclose(q["ventral_dc"], 8.1)
    broken = ref.parse_stats(SAMSEG_STATS.replace("Left-Thalamus", "Left-Thal"))
    with pytest.raises(KeyError, match="Left-Thalamus"):
        ref.samseg_quantities(broken)


def test_node_quantities_sum_the_cortical_regions_of_each_side() -> None:
    ref = _bench()
    n = ref.node_quantities(_measurement())
    assert n["tiv"] == 1450.0 and n["total_gm"] == 700.0
    assert n["left_cerebral_cortex"] == 60.0 and n["right_cerebral_cortex"] == 60.0
    assert n["regions"]["left_cerebral_cortex"] == sorted(f"left_{r}" for r in LOBES)
    assert n["left_cerebellar_cortex"] == 55.0 and n["right_cerebellar_cortex"] == 10.0
    assert n["right_deep_grey"] == 20.0
    assert n["regions_gm"] == 12 * 10.0 + 55.0 + 20.0 + 2 * 10.0
    # an atlas without cerebellar regions: no cerebellar pair rather than a wrong one
    m = _measurement()
    del m["regions"]["left_cerebellum"]  # type: ignore[attr-defined]
    assert "left_cerebellar_cortex" not in ref.node_quantities(m)


def test_pairs_and_goals() -> None:
    ref = _bench()
    samseg = ref.samseg_quantities(ref.parse_stats(SAMSEG_STATS), 1500.0)
    lines = ref.pairs(ref.node_quantities(_measurement()), samseg)
    by = {x["quantity"]: x for x in lines}
    assert list(by) == list(ref.QUANTITIES)
    assert by["tiv"] == {"quantity": "tiv", "node_ml": 1450.0, "samseg_ml": 1500.0,
                         "diff_pct": -3.33, "node_from": ["tiv_ml"]}  # fmt: skip
    assert by["left_cerebellar_cortex"]["diff_pct"] == 10.0  # 55 vs 50
    assert by["right_cerebellar_cortex"]["diff_pct"] == round(100 * (10 / 52 - 1), 2)
    total = samseg["total_gm"]
    assert by["total_gm"]["diff_pct"] == round(100 * (700 / total - 1), 2)
    assert by["total_gm"]["samseg_ventral_dc_ml"] == 8.1
    g = ref.goals(lines)
    assert g["tiv"] == {"limit_pct": 7.0, "diff_pct": -3.33, "holds": True}
    assert g["cerebellar_gm"]["holds"] is False  # right side is -81 %
    assert g["cerebellar_gm"]["diff_pct"] == by["right_cerebellar_cortex"]["diff_pct"]
    assert g["total_gm"]["holds"] is (abs(700 / total - 1) <= 0.10)
    # exactly at the limit holds
    assert ref.goals([{"quantity": "tiv", "diff_pct": -7.0}])["tiv"]["holds"] is True
    # no node figures (the node failed): SAMSEG's side printed, goals undecided
    lines = ref.pairs(None, samseg)
    assert all(x["node_ml"] is None and x["diff_pct"] is None for x in lines)
    assert all(v["holds"] is None for v in ref.goals(lines).values())
    assert ref.rel_diff_pct(1.0, 0.0) is None
