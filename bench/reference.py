"""The node's volumes on a real head next to an independent reference: FreeSurfer's SAMSEG.

    python bench/reference.py                       # the UIH head in ../shared/data/dicom/
    python bench/reference.py PATH                  # a DICOM folder or a NIfTI file
    python bench/reference.py --no-cache --threads 2
    python bench/reference.py --keep bench/out/reference   # keep the NIfTI and node output

SAMSEG (``samseg==0.4a0`` from PyPI, MIT, atlas inside the wheel; Puonti et al. 2016) is a
whole-head Bayesian segmentation that shares nothing with the node: its own atlas (20
manually labelled subjects), its own affine and mesh deformation, its own bias field and
intensity model. Its pins (numpy<2) clash with the node's, so it runs in its own virtual
environment, created when missing under ``${KETANODE_CACHE:-~/.cache/ketanode}/samseg-venv``
(``python -m venv`` + ``pip install samseg==0.4a0``; nothing else is downloaded, at run time
nothing at all), through its command-line entry ``run_samseg --threads N`` (default 1: about
10-20 minutes a scan). Its output is cached under ``<cache>/samseg/<SHA-256 of the input
NIfTI>/`` (written to a temporary folder and renamed when complete), so a re-run only runs
the node; ``--no-cache`` runs SAMSEG again.

A DICOM folder is converted once with the node's own converter
(``ketanode.imaging.convert.convert_series``) and both tools read that same NIfTI. The node
runs as ``ketanode.imaging.analysis.analyse`` in a child process (its peak RSS is the
node's); only ``features.measurement`` of its result is read.

Pairs (node | SAMSEG, SAMSEG names from its ``samseg.stats``, volumes in mL):

- ``tiv``: node ``tiv_ml`` (its brain mask: GM + WM + CSF posteriors) | SAMSEG
  ``Intra-Cranial`` of ``sbtiv.stats`` (SAMSEG's own sum of every intracranial structure:
  brain, ventricles, CSF, vessels, choroid plexus, optic chiasm; not skull, soft tissue or
  eyes). Goal (issue 11): within 7 %.
- ``total_gm``: node ``gm_ml`` (the GM posterior summed over the whole brain mask) | SAMSEG
  Left/Right-Cerebral-Cortex + Left/Right-Cerebellum-Cortex + the deep grey that the node's
  ``*_deep_grey`` regions are made of: Thalamus, Caudate, Putamen, Pallidum, Hippocampus,
  Amygdala, Accumbens-area, each side. Ventral DC is left out: the node's atlas has no region
  for it (nor for the brain stem), it is mostly white-matter tracts on a T1, and FreeSurfer's
  own "TotalGray" is the only convention that adds it; the line also gives its volume
  (``samseg_ventral_dc_ml``) so the FreeSurfer convention can be read off. Goal: within 10 %.
- ``left_cerebellar_cortex`` / ``right_...``: node ``left_cerebellum`` / ``right_cerebellum``
  region GM (territory of FreeSurfer label 8 / 47, GM posterior only) |
  Left/Right-Cerebellum-Cortex. Goal: each within 10 %.
- ``left_cerebral_cortex`` / ``right_...``: node GM summed over every region of that side
  except ``*_cerebellum`` and ``*_deep_grey`` (with the vendored Desikan-Killiany table:
  frontal, parietal, temporal, occipital, cingulate, insula; the line names the regions it
  summed) | Left/Right-Cerebral-Cortex. No goal in issue 11; reported.
- ``left_deep_grey`` / ``right_...``: node region ``*_deep_grey`` GM | the seven structures
  above of that side. No goal; reported because it is where the two definitions differ
  most: SAMSEG counts whole structures, the node counts GM probability (a T1's pallidum and
  much of the thalamus look like white matter).

One JSON line per pair (node_ml, samseg_ml, diff_pct = 100 (node - samseg) / samseg, and
the seconds of each tool), then a summary line: the seconds of each tool (SAMSEG's as
recorded when its cached output was made), the node's QC outcome or error, and the three
goals of issue 11 with whether each holds. If the node fails (QC, an exception, a crash),
SAMSEG's figures are still printed, with ``node_ml`` null and the reason in the summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_INPUT = REPO.parent / "shared" / "data" / "dicom" / "uih-t1-3d-sag"
SAMSEG_VERSION = "0.4a0"
SIDES = ("left", "right")
# SAMSEG structures making up the node's *_deep_grey regions (FreeSurfer labels 10 11 12 13
# 17 18 26 / 49 50 51 52 53 54 58 in ketanode/data/atlases/desikan_killiany_regions.csv)
DEEP_GREY = ("Thalamus", "Caudate", "Putamen", "Pallidum", "Hippocampus", "Amygdala",
             "Accumbens-area")  # fmt: skip
NODE_NOT_CORTEX = ("cerebellum", "deep_grey")  # node regions of a side that are not cortex
GOALS_PCT = {"total_gm": 10.0, "cerebellar_gm": 10.0, "tiv": 7.0}  # issue 11, "It must show"

_MEASURE = re.compile(r"^#\s*Measure\s+(?P<name>[^,]+?)\s*,.*?(?P<value>[-+0-9.eE]+)\s*,\s*mm\^3")


# ---------------------------------------------------------------- pure parts (unit-tested)


def parse_stats(text: str) -> dict[str, float]:
    """``# Measure NAME, VALUE, mm^3`` lines of SAMSEG's samseg.stats / sbtiv.stats -> mL."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _MEASURE.match(line.strip())
        if m:
            out[m["name"]] = float(m["value"]) / 1000.0
    return out


def samseg_quantities(
    structures: Mapping[str, float], icv_ml: float | None = None
) -> dict[str, Any]:
    """SAMSEG's side of each pair (mL) from its structure volumes (see the module docstring).

    ``icv_ml`` is sbtiv.stats' Intra-Cranial; samseg.stats' own line is used without it."""

    def s(name: str) -> float:
        if name not in structures:
            raise KeyError(f"SAMSEG stats have no {name!r}")
        return float(structures[name])

    q: dict[str, Any] = {"tiv": icv_ml if icv_ml is not None else s("Intra-Cranial")}
    for side in SIDES:
        fs = side.capitalize()
        q[f"{side}_cerebral_cortex"] = s(f"{fs}-Cerebral-Cortex")
        q[f"{side}_cerebellar_cortex"] = s(f"{fs}-Cerebellum-Cortex")
        q[f"{side}_deep_grey"] = sum(s(f"{fs}-{k}") for k in DEEP_GREY)
    q["total_gm"] = sum(
        q[f"{side}_{part}"]
        for side in SIDES
        for part in ("cerebral_cortex", "cerebellar_cortex", "deep_grey")
    )
    q["ventral_dc"] = sum(structures.get(f"{fs}-VentralDC", 0.0) for fs in ("Left", "Right"))
    return q


def node_quantities(measurement: Mapping[str, Any]) -> dict[str, Any]:
    """The node's side of each pair (mL) from ``features.measurement``; ``regions`` lists
    the node regions each regional quantity sums. A quantity whose regions are missing from
    the node's atlas is left out."""
    regions: Mapping[str, Mapping[str, float]] = measurement["regions"]
    q: dict[str, Any] = {
        "tiv": float(measurement["tiv_ml"]),
        "total_gm": float(measurement["gm_ml"]),
    }
    used: dict[str, list[str]] = {"tiv": ["tiv_ml"], "total_gm": ["gm_ml"]}
    for side in SIDES:
        pick = {
            f"{side}_cerebellar_cortex": [f"{side}_cerebellum"],
            f"{side}_deep_grey": [f"{side}_deep_grey"],
            f"{side}_cerebral_cortex": sorted(
                r
                for r in regions
                if r.startswith(f"{side}_") and r.removeprefix(f"{side}_") not in NODE_NOT_CORTEX
            ),
        }
        for quantity, names in pick.items():
            if names and all(n in regions for n in names):
                q[quantity] = sum(float(regions[n]["gm_ml"]) for n in names)
                used[quantity] = names
    q["regions"] = used
    q["regions_gm"] = sum(float(r["gm_ml"]) for r in regions.values())
    return q


def rel_diff_pct(node: float | None, ref: float | None) -> float | None:
    """100 (node - ref) / ref, or None when either is missing or ref is 0."""
    if node is None or ref is None or ref == 0:
        return None
    return round(100.0 * (node - ref) / ref, 2)


QUANTITIES = (
    "total_gm", "left_cerebellar_cortex", "right_cerebellar_cortex", "left_cerebral_cortex",
    "right_cerebral_cortex", "tiv", "left_deep_grey", "right_deep_grey",
)  # fmt: skip


def pairs(node: Mapping[str, Any] | None, ref: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One dict per quantity: node_ml (None without a node measurement), samseg_ml, diff_pct."""
    out = []
    for quantity in QUANTITIES:
        n = None if node is None else node.get(quantity)
        line: dict[str, Any] = {
            "quantity": quantity,
            "node_ml": None if n is None else round(n, 1),
            "samseg_ml": round(ref[quantity], 1),
            "diff_pct": rel_diff_pct(n, ref[quantity]),
        }
        if node is not None and quantity in node["regions"]:
            line["node_from"] = node["regions"][quantity]
        if quantity == "total_gm":
            # the node's GM in its atlas regions (no brain stem), FreeSurfer's TotalGray part
            if node is not None:
                line["node_regions_sum_ml"] = round(node["regions_gm"], 1)
            line["samseg_ventral_dc_ml"] = round(ref["ventral_dc"], 1)
        out.append(line)
    return out


def goals(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Issue 11: total GM and cerebellar GM (left and right each) within 10 %, TIV within 7 %.
    ``holds`` is None when the node gave no figure."""
    by = {x["quantity"]: x["diff_pct"] for x in lines}
    parts = {
        "total_gm": ["total_gm"],
        "cerebellar_gm": ["left_cerebellar_cortex", "right_cerebellar_cortex"],
        "tiv": ["tiv"],
    }
    out = {}
    for goal, limit in GOALS_PCT.items():
        diffs = [by.get(q) for q in parts[goal]]
        known = [d for d in diffs if d is not None]
        worst = max(known, key=abs) if known else None
        out[goal] = {
            "limit_pct": limit,
            "diff_pct": worst,
            "holds": None if len(known) < len(diffs) else all(abs(d) <= limit for d in known),
        }
    return out


# ---------------------------------------------------------------- files, SAMSEG, the node


def cache_root() -> Path:
    root = os.environ.get("KETANODE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ketanode"
    )
    return Path(root)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def log(msg: str) -> None:
    print(f"reference: {msg}", file=sys.stderr, flush=True)


def ensure_samseg(venv: Path) -> Path:
    """The ``run_samseg`` of a virtual environment holding samseg==0.4a0 (created if missing)."""
    exe, py = venv / "bin" / "run_samseg", venv / "bin" / "python"
    probe = [str(py), "-c", "import importlib.metadata as m; print(m.version('samseg'))"]
    if exe.is_file() and py.is_file():
        got = subprocess.run(probe, capture_output=True, text=True)
        if got.returncode == 0 and got.stdout.strip() == SAMSEG_VERSION:
            return exe
    log(f"installing samseg=={SAMSEG_VERSION} into {venv} (once)")
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, f"samseg=={SAMSEG_VERSION}"], check=True)
    got = subprocess.run(probe, capture_output=True, text=True, check=True)
    if got.stdout.strip() != SAMSEG_VERSION or not exe.is_file():
        raise RuntimeError(f"{venv}: samseg {got.stdout.strip()!r}, expected {SAMSEG_VERSION}")
    return exe


def prepare_input(src: Path, work: Path) -> Path:
    """A NIfTI file as is; a DICOM folder converted with the node's converter."""
    if not src.is_dir():
        return src
    from ketanode.imaging.convert import convert_series

    files = sorted(f for f in src.rglob("*") if f.is_file() and not f.name.startswith("."))
    return Path(convert_series(files, work / "t1.nii.gz").path)


def run_samseg(
    nifti: Path, digest: str, root: Path, threads: int, use_cache: bool, source: str = ""
) -> dict[str, Any]:
    """SAMSEG's structure volumes (mL) and ICV for ``nifti``, from the cache when there."""
    out = root / "samseg" / digest
    done = out / "run.json"
    cached = use_cache and done.is_file() and (out / "samseg.stats").is_file()
    if not cached:
        exe = ensure_samseg(root / "samseg-venv")
        tmp = out.with_name(f".{digest}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        n = str(threads)
        env = os.environ | {
            "OMP_NUM_THREADS": n, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": n,
            "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n,
        }  # fmt: skip
        cmd = [str(exe), "-i", str(nifti.resolve()), "-o", str(tmp), "--threads", n]
        log(f"running SAMSEG ({threads} thread(s), 10-20 min); log: {tmp / 'samseg.log'}")
        t = time.perf_counter()
        with (tmp / "samseg.log").open("w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp, env=env)
        seconds = round(time.perf_counter() - t, 1)
        if proc.returncode != 0 or not (tmp / "samseg.stats").is_file():
            tail = (tmp / "samseg.log").read_text(errors="replace").splitlines()[-5:]
            raise RuntimeError(f"run_samseg exited {proc.returncode}: {' | '.join(tail)}")
        meta = {
            "samseg": SAMSEG_VERSION, "threads": threads, "seconds": seconds,
            "input_sha256": digest, "input": source or str(nifti), "command": cmd[1:],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }  # fmt: skip
        (tmp / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    meta = json.loads(done.read_text())
    structures = parse_stats((out / "samseg.stats").read_text())
    icv = parse_stats((out / "sbtiv.stats").read_text()).get("Intra-Cranial")
    return {
        "quantities": samseg_quantities(structures, icv),
        "seconds": meta["seconds"], "threads": meta["threads"], "cached": cached,
        "dir": str(out),
    }  # fmt: skip


def _node_child(nifti: str, out_dir: str, queue: Any) -> None:
    started = time.perf_counter()
    try:
        from ketanode.imaging.analysis import analyse

        result = analyse(nifti, out_dir)
        line: dict[str, Any] = {
            "steps_s": result.get("seconds"),
            "qc": (result.get("qc") or {}).get("outcome"),
            "error": result.get("error"),
            "measurement": (result.get("features") or {}).get("measurement"),
        }
    except Exception as exc:  # the node is being rewritten: report, do not stop SAMSEG's
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(tb.filename).name}:{tb.lineno}"
        line = {"error": f"{type(exc).__name__} at {where}: {exc}", "measurement": None}
    line["seconds"] = round(time.perf_counter() - started, 1)
    line["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    queue.put(line)


def run_node(nifti: Path, out_dir: Path) -> dict[str, Any]:
    """``analyse`` in a spawned child; a crash of the child is reported, not raised."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    t = time.perf_counter()
    proc = ctx.Process(target=_node_child, args=(str(nifti), str(out_dir), queue))
    proc.start()
    result: dict[str, Any] | None = None
    while result is None and (proc.is_alive() or not queue.empty()):
        try:
            result = queue.get(timeout=1.0)
        except Exception:  # queue.Empty
            continue
    proc.join()
    if result is None:
        result = {
            "error": f"node process died (exit code {proc.exitcode})", "measurement": None,
            "seconds": round(time.perf_counter() - t, 1),
        }  # fmt: skip
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "input", nargs="?", type=Path, default=DEFAULT_INPUT,
        help=f"DICOM folder (one series) or NIfTI file; default {DEFAULT_INPUT}",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="SAMSEG threads (default 1)")
    parser.add_argument("--no-cache", action="store_true", help="run SAMSEG even when cached")
    parser.add_argument("--skip-node", action="store_true", help="SAMSEG only (fills the cache)")
    parser.add_argument("--keep", type=Path, help="keep the NIfTI and the node's output here")
    args = parser.parse_args()
    if not args.input.exists():
        parser.error(f"{args.input} does not exist")
    root = cache_root()
    with tempfile.TemporaryDirectory(prefix="ketanode-reference-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        nifti = prepare_input(args.input, work)
        convert_s = round(time.perf_counter() - t, 1)
        digest = sha256_file(nifti)
        ref = run_samseg(
            nifti, digest, root, args.threads, not args.no_cache, str(args.input.resolve())
        )
        node = None if args.skip_node else run_node(nifti, work / "node")
    measurement = None if node is None else node.get("measurement")
    nq = None if measurement is None else node_quantities(measurement)
    lines = pairs(nq, ref["quantities"])
    node_s = None if node is None else node.get("seconds")
    for line in lines:
        line = {"bench": "reference"} | line | {"node_s": node_s, "samseg_s": ref["seconds"]}
        print(json.dumps(line), flush=True)
    summary: dict[str, Any] = {
        "bench": "reference", "summary": True, "input": str(args.input),
        "nifti_sha256": digest, "convert_s": convert_s,
        "samseg": SAMSEG_VERSION, "samseg_s": ref["seconds"], "samseg_threads": ref["threads"],
        "samseg_cached": ref["cached"], "samseg_dir": ref["dir"],
        "node_s": node_s,
    }  # fmt: skip
    if measurement is not None:
        summary["node_tissue_ml"] = {k: measurement[f"{k}_ml"] for k in ("gm", "wm", "csf", "tiv")}
    if node is not None:
        summary |= {
            "node_steps_s": node.get("steps_s"), "node_peak_rss_mb": node.get("peak_rss_mb"),
            "node_qc": node.get("qc"), "node_error": node.get("error"),
        }  # fmt: skip
    summary["goals"] = goals(lines)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
