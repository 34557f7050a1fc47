"""Scan-rescan repeatability: ICC(3,1) of regional grey matter over phantom subject pairs.

For subjects 1..N, generates two phantoms (ketanode.synthetic.phantom) with the same anatomy:
scan 1 is ``PhantomSpec(seed=s)`` and scan 2 is ``PhantomSpec(seed=s, scan_seed=1)``, a new
pose, bias field and noise. Each scan is measured in a fresh spawned child process. Prints
one JSON line per scan, one per feature (GM of every atlas region, gm_total, wm_total, tiv)
with ICC(3,1) and the mean absolute scan-rescan difference, and a summary:

    python bench/repeatability.py                      # 10 pairs at 1 mm
    python bench/repeatability.py --voxel 2 --pairs 10 --out /tmp/repeat-2mm.jsonl

ICC(3,1) is Shrout & Fleiss (1979) case 3, single measures (two-way mixed, consistency):
(MS_subjects - MS_error) / (MS_subjects + (k - 1) MS_error).

Goal (issue 3): ICC(3,1) >= 0.95 for left/right frontal, left/right cerebellum, total GM
and TIV. A pair with a scan that fails QC (or errors) is reported and left out of the ICCs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GOAL = 0.95
KEY_FEATURES = (
    "left_frontal",
    "right_frontal",
    "left_cerebellum",
    "right_cerebellum",
    "gm_total",
    "tiv",
)
TOTALS = ("gm_total", "wm_total", "tiv")


def icc_3_1(x: Sequence[Sequence[float]] | np.ndarray[Any, Any]) -> float:
    """ICC(3,1) of an n subjects x k measurements table (n >= 2, k >= 2); nan if undefined."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"need an n x k table with n >= 2 and k >= 2, got shape {a.shape}")
    n, k = a.shape
    grand = a.mean()
    ss_rows = k * float(((a.mean(axis=1) - grand) ** 2).sum())
    ss_cols = n * float(((a.mean(axis=0) - grand) ** 2).sum())
    ss_err = float(((a - grand) ** 2).sum()) - ss_rows - ss_cols
    ms_rows = ss_rows / (n - 1)
    ms_err = ss_err / ((n - 1) * (k - 1))
    denom = ms_rows + (k - 1) * ms_err
    return float("nan") if denom <= 0 else (ms_rows - ms_err) / denom


def _scan(seed: int, scan: int, voxel: float, workdir: str) -> dict[str, Any]:
    """One scan, in a child process: generate the phantom, write it, measure it."""
    from ketanode.imaging.analysis import analyse
    from ketanode.synthetic.phantom import PhantomSpec, make_phantom

    line: dict[str, Any] = {"bench": "repeatability", "seed": seed, "scan": scan}
    spec = PhantomSpec(
        seed=seed, scan_seed=None if scan == 1 else scan - 1, voxel_mm=(voxel, voxel, voxel)
    )
    t = time.perf_counter()
    phantom = make_phantom(spec)
    nifti = Path(workdir) / f"subject-{seed}-scan-{scan}.nii.gz"
    phantom.write_nifti(nifti)
    line["generate_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    result = analyse(nifti, Path(workdir) / f"out-{seed}-{scan}")
    line["seconds"] = round(time.perf_counter() - t, 2)
    line["qc"] = result["qc"]["outcome"]
    not_pass = {
        c["name"]: c["outcome"] for c in result["qc"].get("checks", []) if c["outcome"] != "pass"
    }
    if not_pass:
        line["qc_checks"] = not_pass
    if "error" in result:
        line["error"] = result["error"]
    if "features" in result:
        m = result["features"]["measurement"]
        line |= {
            "gm_ml": {name: r["gm_ml"] for name, r in m["regions"].items()},
            "gm_total": m["gm_ml"],
            "wm_total": m["wm_ml"],
            "tiv": m["tiv_ml"],
        }
    nifti.unlink(missing_ok=True)
    return line


def _usable(line: dict[str, Any]) -> bool:
    return "gm_ml" in line and line.get("qc") != "fail" and "error" not in line


def _value(line: dict[str, Any], feature: str) -> float:
    return float(line[feature] if feature in TOTALS else line["gm_ml"][feature])


def feature_lines(
    pairs: list[tuple[dict[str, Any], dict[str, Any]]],
) -> list[dict[str, Any]]:
    """ICC(3,1) and scan-rescan difference of every feature over the usable pairs."""
    if not pairs:
        return []
    features = list(pairs[0][0]["gm_ml"]) + list(TOTALS)
    out = []
    for f in features:
        table = np.array([[_value(a, f), _value(b, f)] for a, b in pairs])
        mean = table.mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            diff = np.where(mean > 0, 100 * np.abs(table[:, 1] - table[:, 0]) / mean, np.nan)
        icc = icc_3_1(table) if len(pairs) >= 2 else float("nan")
        out.append(
            {
                "bench": "repeatability",
                "feature": f,
                "n_pairs": len(pairs),
                "icc_3_1": None if np.isnan(icc) else round(icc, 4),
                "mean_ml": round(float(table.mean()), 3),
                "between_subject_sd_ml": round(float(mean.std(ddof=1)), 3)
                if len(pairs) > 1
                else None,
                "mean_abs_diff_pct": round(float(np.nanmean(diff)), 3),
                "max_abs_diff_pct": round(float(np.nanmax(diff)), 3),
            }
        )
    return out


def summary_line(
    scans: list[dict[str, Any]], features: list[dict[str, Any]], n_pairs: int, wall_s: float
) -> dict[str, Any]:
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for s in scans:
        by_seed.setdefault(s["seed"], []).append(s)
    excluded = {
        seed: [
            f"scan {s['scan']}: " + (s.get("error") or f"qc {s.get('qc')}")
            for s in ss
            if not _usable(s)
        ]
        for seed, ss in sorted(by_seed.items())
        if len(ss) < 2 or not all(map(_usable, ss))
    }
    icc = {f["feature"]: f["icc_3_1"] for f in features}
    key = {k: icc.get(k) for k in KEY_FEATURES}
    regions = [f for f in features if f["feature"] not in TOTALS]
    worst = min(regions, key=lambda f: -1.0 if f["icc_3_1"] is None else f["icc_3_1"], default=None)
    return {
        "bench": "repeatability",
        "summary": True,
        "pairs": n_pairs,
        "pairs_used": n_pairs - len(excluded),
        "excluded_pairs": excluded,
        "qc": dict(
            sorted(
                {
                    o: sum(1 for s in scans if s.get("qc") == o)
                    for o in {s.get("qc") for s in scans}
                }.items(),
                key=lambda kv: str(kv[0]),
            )
        ),
        "key_icc_3_1": key,
        "goal": GOAL,
        "pass": all(v is not None and v >= GOAL for v in key.values()),
        "min_region_icc_3_1": None if worst is None else worst["icc_3_1"],
        "min_region": None if worst is None else worst["feature"],
        "regions_below_goal": sorted(
            f["feature"] for f in regions if f["icc_3_1"] is None or f["icc_3_1"] < GOAL
        ),
        "median_region_mean_abs_diff_pct": (
            round(statistics.median(f["mean_abs_diff_pct"] for f in regions), 3)
            if regions
            else None
        ),
        "median_scan_s": round(statistics.median(s["seconds"] for s in scans if "seconds" in s), 2)
        if any("seconds" in s for s in scans)
        else None,
        "wall_s": round(wall_s, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--pairs", type=int, default=10, help="subjects (seeds 1..N)")
    parser.add_argument("--voxel", type=float, default=1.0, help="isotropic voxel size, mm")
    parser.add_argument("--workers", type=int, default=1, help="analyses run in parallel")
    parser.add_argument("--out", type=Path, help="also write the JSON lines here")
    args = parser.parse_args()
    if args.pairs < 1 or args.workers < 1:
        parser.error("--pairs and --workers must be >= 1")
    out = args.out.open("w") if args.out else None

    def emit(line: dict[str, Any]) -> None:
        text = json.dumps(line)
        print(text, flush=True)
        if out is not None:
            out.write(text + "\n")
            out.flush()

    started = time.perf_counter()
    scans: list[dict[str, Any]] = []
    jobs = [(seed, scan) for seed in range(1, args.pairs + 1) for scan in (1, 2)]
    try:
        with (
            tempfile.TemporaryDirectory(prefix="ketanode-repeat-") as tmp,
            ProcessPoolExecutor(
                max_workers=args.workers, mp_context=mp.get_context("spawn"), max_tasks_per_child=1
            ) as pool,
        ):
            futures: dict[Future[dict[str, Any]], tuple[int, int]] = {
                pool.submit(_scan, seed, scan, args.voxel, tmp): (seed, scan) for seed, scan in jobs
            }
            for fut in as_completed(futures):
                seed, scan = futures[fut]
                try:
                    line = fut.result()
                except Exception as exc:  # a crashed child: report it, keep the others
                    line = {
                        "bench": "repeatability",
                        "seed": seed,
                        "scan": scan,
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                line["voxel_mm"] = args.voxel
                emit(line)
                scans.append(line)
        scans.sort(key=lambda s: (s["seed"], s["scan"]))
        by_seed: dict[int, dict[int, dict[str, Any]]] = {}
        for s in scans:
            by_seed.setdefault(s["seed"], {})[s["scan"]] = s
        pairs = [
            (d[1], d[2])
            for _, d in sorted(by_seed.items())
            if 1 in d and 2 in d and _usable(d[1]) and _usable(d[2])
        ]
        features = feature_lines(pairs)
        for f in features:
            emit(f)
        emit(summary_line(scans, features, args.pairs, time.perf_counter() - started))
    finally:
        if out is not None:
            out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
