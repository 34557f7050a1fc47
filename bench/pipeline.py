"""Wall time of each imaging step, peak memory, and accuracy against phantom truth.

Generates a 1 mm 176x240x256 phantom (ketanode.synthetic.phantom) with known regional grey
matter, or takes real scans (``--input``, NIfTI or a DICOM folder; ``--real-head`` is the
shared UIH head), runs the node's measurement steps on each in a child process (so that
process's peak RSS is the pipeline's), and prints one JSON line per input and a summary:

    python bench/pipeline.py                 # one 1 mm subject
    python bench/pipeline.py --real-head     # the real head of ../shared (no truth)
    python bench/pipeline.py --real-head --subjects 1 --concurrent 2   # pipeline.workers = 2
    python bench/pipeline.py --subjects 3 --voxel 1.5
    python bench/pipeline.py --set segmentation=atropos --set registration=syn

``--concurrent N`` runs N inputs at a time, each in its own process, as the node does with
``pipeline.workers = N`` (each input is then run N times, so that N jobs overlap).

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
from ketanode.synthetic.phantom import PhantomSpec, make_phantom  # noqa: E402

KEY_REGIONS = ("left_frontal", "right_frontal", "left_cerebellum", "right_cerebellum")


def _child(nifti: str, out_dir: str, queue: Any, overrides: dict[str, Any]) -> None:
    started = time.perf_counter()
    result = analyse(nifti, out_dir, PipelineSettings(**overrides))
    result["total_s"] = round(time.perf_counter() - started, 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    queue.put(result)


REAL_HEAD = REPO.parent / "shared" / "data" / "dicom" / "uih-t1-3d-sag"


def _start(nifti: Path, out: Path, overrides: dict[str, Any]) -> tuple[Any, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(str(nifti), str(out), queue, overrides))
    proc.start()
    return proc, queue


def _line(name: str, nifti: Path, result: dict[str, Any]) -> dict[str, Any]:
    import nibabel as nib

    img = nib.load(str(nifti))
    line: dict[str, Any] = {
        "bench": "pipeline",
        "input": name,
        "shape": list(img.shape),
        "voxel_mm": [round(float(z), 3) for z in img.header.get_zooms()[:3]],
        "steps_s": result["seconds"],
        "preprocess_s": result.get("preprocess_seconds"),
        "total_s": result["total_s"],
        "peak_rss_mb": result["peak_rss_mb"],
        "qc": result["qc"]["outcome"],
    }
    if "features" not in result:
        line["error"] = result.get("error")
    else:
        m = result["features"]["measurement"]
        line |= {
            "tiv_ml": round(m["tiv_ml"], 1),
            "gm_ml": round(m["gm_ml"], 1),
            "gm_fraction": round(m["gm_ml"] / m["tiv_ml"], 4),
        }
    return line


def run_batch(
    inputs: list[tuple[str, Path, dict[str, Any] | None]],
    workdir: Path,
    overrides: dict[str, Any],
    concurrent: int,
) -> list[dict[str, Any]]:
    """Measure every input, ``concurrent`` at a time; one line each (with truth errors)."""
    lines: list[dict[str, Any]] = []
    for start in range(0, len(inputs), concurrent):
        batch = inputs[start : start + concurrent]
        t = time.perf_counter()
        running = [
            (name, nifti, truth, *_start(nifti, workdir / f"out-{start + i}", overrides))
            for i, (name, nifti, truth) in enumerate(batch)
        ]
        for name, nifti, truth, proc, queue in running:
            result = queue.get()
            proc.join()
            line = _line(name, nifti, result) | {"concurrent": len(batch)}
            if truth is not None and "features" in result:
                line |= _errors(result["features"]["measurement"], truth)
            lines.append(line)
        wall = round(time.perf_counter() - t, 2)
        for line in lines[-len(batch) :]:
            line["batch_wall_s"] = wall
    return lines


def phantom_input(seed: int, voxel: float, workdir: Path) -> tuple[str, Path, dict[str, Any]]:
    spec = PhantomSpec(seed=seed, voxel_mm=(voxel, voxel, voxel))
    phantom = make_phantom(spec)
    nifti = phantom.write_nifti(workdir / f"subject-{seed}.nii.gz")
    return f"phantom seed {seed}, {voxel} mm", nifti, phantom.truth


def scan_input(path: Path, workdir: Path, i: int) -> tuple[str, Path, None]:
    if path.is_dir():
        from ketanode.imaging.convert import convert_series

        files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
        return str(path), Path(convert_series(files, workdir / f"scan-{i}.nii.gz").path), None
    return str(path), path, None


def _errors(m: dict[str, Any], truth: dict[str, Any]) -> dict[str, Any]:
    errors = {
        name: round(100 * (m["regions"][name]["gm_ml"] / t_["gm_ml"] - 1), 2)
        for name, t_ in truth["regions"].items()
        if t_["gm_ml"] > 1
    }
    return {
        "gm_error_pct": errors,
        "median_abs_gm_error_pct": round(statistics.median(abs(e) for e in errors.values()), 2),
        "key_region_error_pct": {k: errors[k] for k in KEY_REGIONS},
        "tiv_error_pct": round(100 * (m["tiv_ml"] / truth["tiv_ml"] - 1), 2),
        "true_tiv_ml": round(truth["tiv_ml"], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--subjects",
        type=int,
        default=None,
        help="phantom subjects (default 1 without --input/--real-head)",
    )
    parser.add_argument("--voxel", type=float, default=1.0)
    parser.add_argument(
        "--input",
        type=Path,
        action="append",
        default=[],
        help="a real scan: NIfTI file or DICOM folder (repeatable)",
    )
    parser.add_argument("--real-head", action="store_true", help=f"add {REAL_HEAD}")
    parser.add_argument(
        "--concurrent",
        type=int,
        default=1,
        help="jobs at a time, as pipeline.workers (each input run N times)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [pipeline] setting, e.g. --set atropos_iterations=3 --set registration=syn",
    )
    args = parser.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    PipelineSettings(**overrides)  # validate before any work
    scans = list(args.input) + ([REAL_HEAD] if args.real_head else [])
    n_phantoms = args.subjects if args.subjects is not None else (0 if scans else 1)
    with tempfile.TemporaryDirectory(prefix="ketanode-bench-") as tmp:
        work = Path(tmp)
        inputs: list[tuple[str, Path, dict[str, Any] | None]] = [
            scan_input(p, work, i) for i, p in enumerate(scans)
        ]
        inputs += [phantom_input(1000 + s, args.voxel, work) for s in range(n_phantoms)]
        inputs = [x for x in inputs for _ in range(args.concurrent)]
        lines = run_batch(inputs, work, overrides, args.concurrent)
        for line in lines:
            line["settings"] = overrides
            print(json.dumps(line), flush=True)
    ok = [x for x in lines if "median_abs_gm_error_pct" in x]
    summary = {
        "bench": "pipeline",
        "summary": True,
        "runs": len(lines),
        "with_truth": len(ok),
        "concurrent": args.concurrent,
        "median_total_s": statistics.median(x["total_s"] for x in lines),
        "max_peak_rss_mb": max(x["peak_rss_mb"] for x in lines),
    }
    if ok:
        summary |= {
            "median_abs_gm_error_pct": statistics.median(x["median_abs_gm_error_pct"] for x in ok),
            "worst_key_region_error_pct": max(
                abs(e) for x in ok for e in x["key_region_error_pct"].values()
            ),
            "worst_tiv_error_pct": max(abs(x["tiv_error_pct"]) for x in ok),
        }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
