"""Wall time of each imaging step, peak memory, and accuracy against phantom truth.

Generates a 1 mm 176x240x256 phantom (ketanode.imaging.phantom) with known regional grey
matter, runs the node's measurement steps on it in a child process (so that process's peak
RSS is the pipeline's), and prints one JSON line per subject and a summary:

    python bench/pipeline.py                 # one 1 mm subject
    python bench/pipeline.py --subjects 3 --voxel 1.5
    python bench/pipeline.py --set atropos_iterations=3 --set registration=syn

Goals (issue 3): <= 45 s from NIfTI to features on 2 cores, <= 2 GB peak; median absolute
error of regional GM <= 5 %, <= 10 % for left/right frontal and cerebellum, TIV within 5 %.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ketanode.config import PipelineSettings  # noqa: E402
from ketanode.imaging.analysis import analyse  # noqa: E402
from ketanode.imaging.phantom import PhantomSpec, make_phantom  # noqa: E402

KEY_REGIONS = ("left_frontal", "right_frontal", "left_cerebellum", "right_cerebellum")


def _child(nifti: str, out_dir: str, queue: Any, overrides: dict[str, Any]) -> None:
    started = time.perf_counter()
    result = analyse(nifti, out_dir, PipelineSettings(**overrides))
    result["total_s"] = round(time.perf_counter() - started, 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    queue.put(result)


def run_subject(
    seed: int, voxel: float, workdir: Path, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    spec = PhantomSpec(seed=seed, voxel_mm=(voxel, voxel, voxel))
    t = time.perf_counter()
    phantom = make_phantom(spec)
    generate_s = round(time.perf_counter() - t, 2)
    nifti = workdir / f"subject-{seed}.nii.gz"
    phantom.write_nifti(nifti)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    out = str(workdir / f"out-{seed}")
    proc = ctx.Process(target=_child, args=(str(nifti), out, queue, overrides or {}))
    proc.start()
    result = queue.get()
    proc.join()
    truth = phantom.truth
    line: dict[str, Any] = {
        "bench": "pipeline", "seed": seed, "voxel_mm": voxel,
        "shape": list(phantom.data.shape), "generate_s": generate_s,
        "steps_s": result["seconds"], "preprocess_s": result.get("preprocess_seconds"),
        "total_s": result["total_s"], "peak_rss_mb": result["peak_rss_mb"],
        "qc": result["qc"]["outcome"],
    }
    if "features" not in result:
        line["error"] = result.get("error")
        return line
    m = result["features"]["measurement"]
    errors = {
        name: round(100 * (m["regions"][name]["gm_ml"] / t_["gm_ml"] - 1), 2)
        for name, t_ in truth["regions"].items() if t_["gm_ml"] > 1
    }
    line |= {
        "gm_error_pct": errors,
        "median_abs_gm_error_pct": round(statistics.median(abs(e) for e in errors.values()), 2),
        "key_region_error_pct": {k: errors[k] for k in KEY_REGIONS},
        "tiv_error_pct": round(100 * (m["tiv_ml"] / truth["tiv_ml"] - 1), 2),
        "tiv_ml": round(m["tiv_ml"], 1), "true_tiv_ml": round(truth["tiv_ml"], 1),
    }
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=1)
    parser.add_argument("--voxel", type=float, default=1.0)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a [pipeline] setting, e.g. --set atropos_iterations=3 --set registration=syn",
    )
    args = parser.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    PipelineSettings(**overrides)  # validate before any work
    lines = []
    with tempfile.TemporaryDirectory(prefix="ketanode-bench-") as tmp:
        for seed in range(args.subjects):
            line = run_subject(1000 + seed, args.voxel, Path(tmp), overrides)
            line["settings"] = overrides
            print(json.dumps(line), flush=True)
            lines.append(line)
    ok = [x for x in lines if "median_abs_gm_error_pct" in x]
    summary = {
        "bench": "pipeline", "summary": True, "subjects": len(lines), "measured": len(ok),
        "median_total_s": statistics.median(x["total_s"] for x in lines),
        "max_peak_rss_mb": max(x["peak_rss_mb"] for x in lines),
    }
    if ok:
        summary |= {
            "median_abs_gm_error_pct": statistics.median(x["median_abs_gm_error_pct"] for x in ok),
            "worst_key_region_error_pct": max(
                abs(e) for x in ok for e in x["key_region_error_pct"].values()),
            "worst_tiv_error_pct": max(abs(x["tiv_error_pct"]) for x in ok),
        }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
