"""Cohort files and feature extraction (parallel, cached).

A cohort CSV has one row per subject:

- ``subject`` (required): a research ID (kept out of logs);
- ``label`` (required): ``responder`` / ``non-responder`` (also ``1``/``0``, ``yes``/``no``,
  ``true``/``false``);
- either ``path`` (a DICOM series folder or a NIfTI file; relative to the CSV's folder) or
  every feature of the spec as a column (precomputed, named as in
  :func:`ketanode.imaging.features.default_spec`, in mL); a row may use either;
- optional ``site``, ``age``, ``sex``.

Features of image rows are computed by the node's own pipeline
(:func:`ketanode.imaging.analysis.analyse_path`) in worker processes (``n_jobs``; spawned,
one ITK thread each), with a Rich progress bar. Each result is cached as JSON under
``cache_dir``, keyed by the SHA-256 of the input's content (every file of a folder), the
feature spec's hash, the pipeline settings that change the numbers, and a hash of the
imaging code, so a second run of the same cohort reads the cache. QC failures are cached
too (they are deterministic); crashes are not. Subjects that fail QC or crash are excluded
and reported with their reason.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ketanode.config import PipelineSettings
from ketanode.imaging.features import FeatureSpec, default_spec

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
_POSITIVE = {"responder", "1", "yes", "true", "r"}
_NEGATIVE = {"non-responder", "nonresponder", "non_responder", "0", "no", "false", "nr"}


class CohortError(ValueError):
    """A cohort file problem, naming the file and the line."""


@dataclass
class Subject:
    subject: str
    label: int
    path: Path | None = None
    features: list[float] | None = None
    site: str | None = None
    age: float | None = None
    sex: str | None = None


@dataclass
class FeatureTable:
    """The usable subjects' features (spec order), labels and covariates, plus exclusions."""

    spec: FeatureSpec
    subjects: list[str]
    X: NDArray[np.float64]
    y: NDArray[np.int_]
    sites: list[str | None]
    excluded: list[dict[str, str]] = field(default_factory=list)
    qc: dict[str, str] = field(default_factory=dict)  # subject -> QC outcome (image rows)
    from_cache: int = 0
    computed: int = 0

    @property
    def has_sites(self) -> bool:
        return all(s for s in self.sites) and len(set(self.sites)) >= 2

    def summary(self) -> dict[str, Any]:
        sites = sorted({s for s in self.sites if s})
        return {
            "n": len(self.subjects),
            "responders": int(self.y.sum()),
            "non_responders": int(len(self.y) - self.y.sum()),
            "sites": {s: self.sites.count(s) for s in sites},
            "excluded": len(self.excluded),
        }


def parse_label(value: str) -> int:
    v = value.strip().lower()
    if v in _POSITIVE:
        return 1
    if v in _NEGATIVE:
        return 0
    raise ValueError(f"label {value!r} is not responder/non-responder (or 1/0)")


def read_cohort(csv_path: str | Path, spec: FeatureSpec | None = None) -> list[Subject]:
    """Parse and check a cohort CSV (see the module docstring)."""
    spec = spec or default_spec()
    path = Path(csv_path)
    base = path.resolve().parent
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        for need in ("subject", "label"):
            if need not in columns:
                raise CohortError(f"{path}: no {need!r} column (columns: {columns})")
        has_features = all(f in columns for f in spec.features)
        if "path" not in columns and not has_features:
            missing = [f for f in spec.features if f not in columns]
            raise CohortError(
                f"{path}: needs a 'path' column or every feature of spec {spec.name} "
                f"(missing {missing})"
            )
        subjects: list[Subject] = []
        seen: set[str] = set()
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            sid = row.get("subject", "")
            if not sid:
                raise CohortError(f"{path}:{line}: empty subject")
            if sid in seen:
                raise CohortError(f"{path}:{line}: subject {sid!r} appears twice")
            seen.add(sid)
            try:
                label = parse_label(row.get("label", ""))
            except ValueError as exc:
                raise CohortError(f"{path}:{line}: {exc}") from exc
            features: list[float] | None = None
            image: Path | None = None
            if row.get("path"):
                image = Path(row["path"])
                image = image if image.is_absolute() else base / image
            elif has_features and all(row.get(f) for f in spec.features):
                try:
                    features = [float(row[f]) for f in spec.features]
                except ValueError as exc:
                    raise CohortError(f"{path}:{line}: feature value: {exc}") from exc
            else:
                raise CohortError(f"{path}:{line}: neither a path nor every feature value")
            age = row.get("age") or None
            subjects.append(
                Subject(
                    subject=sid,
                    label=label,
                    path=image,
                    features=features,
                    site=row.get("site") or None,
                    age=float(age) if age else None,
                    sex=row.get("sex") or None,
                )
            )
    if not subjects:
        raise CohortError(f"{path}: no subjects")
    return subjects


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def content_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and contents, sorted)."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            h.update(str(f.relative_to(path)).encode() + b"\0" + _file_sha256(f).encode())
    else:
        h.update(_file_sha256(path).encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: Imaging modules that do not take part in measuring a scan (phantoms, DICOM writing).
NOT_MEASUREMENT_CODE = frozenset({"phantom.py", "series_writer.py"})


def code_sha256() -> str:
    """A hash of the measurement code (a changed pipeline must not reuse old features)."""
    root = Path(__file__).resolve().parents[1] / "imaging"
    h = hashlib.sha256()
    for f in sorted(root.glob("*.py")):
        if f.name not in NOT_MEASUREMENT_CODE:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


#: Pipeline settings that do not change the numbers (left out of the cache key).
OPERATIONAL_SETTINGS = frozenset(
    {"workers", "work_dir", "lease_seconds", "max_attempts", "job_timeout_seconds", "measure"}
)


def settings_key(settings: PipelineSettings) -> dict[str, Any]:
    """Every pipeline setting that can change the numbers (all but the operational ones)."""
    return {
        k: v for k, v in settings.model_dump(mode="json").items() if k not in OPERATIONAL_SETTINGS
    }


def cache_key(content: str, spec: FeatureSpec, settings: PipelineSettings, code: str) -> str:
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "content": content,
            "spec": spec.sha256,
            "settings": settings_key(settings),
            "code": code,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_cache(cache_dir: Path, key: str) -> dict[str, Any] | None:
    f = cache_dir / key[:2] / f"{key}.json"
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def _write_cache(cache_dir: Path, key: str, entry: dict[str, Any]) -> None:
    f = cache_dir / key[:2] / f"{key}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f".{os.getpid()}.{f.name}")
    tmp.write_text(json.dumps({"key": key, **entry}))
    os.replace(tmp, f)


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------


def _init_worker(threads: int) -> None:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def _extract_one(path: str, settings_json: str) -> dict[str, Any]:
    """Run the node's measurement on one input, in a worker process."""
    from ketanode.imaging.analysis import analyse_path

    settings = PipelineSettings.model_validate_json(settings_json)
    work = Path(tempfile.mkdtemp(prefix="ketanode-features-"))
    try:
        result = analyse_path(path, work, settings)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out: dict[str, Any] = {"qc": result.get("qc", {}).get("outcome"), "seconds": result["seconds"]}
    if "features" in result:
        out |= {
            "names": result["features"]["names"],
            "vector": result["features"]["vector"],
            "spec": result["features"]["spec"],
        }
    if "error" in result:
        out["error"] = str(result["error"])
    return out


def extract_features(
    subjects: Sequence[Subject],
    *,
    spec: FeatureSpec | None = None,
    settings: PipelineSettings | None = None,
    cache_dir: str | Path | None = None,
    n_jobs: int = 1,
    progress: bool = True,
) -> FeatureTable:
    """Features of every subject (precomputed or measured), QC failures excluded."""
    spec = spec or default_spec()
    settings = settings or PipelineSettings()
    cache = Path(cache_dir) if cache_dir is not None else None
    code = code_sha256()
    results: dict[int, dict[str, Any]] = {}
    keys: dict[int, str] = {}
    excluded: list[dict[str, str]] = []
    from_cache = 0
    todo: list[int] = []
    for i, s in enumerate(subjects):
        if s.features is not None:
            results[i] = {"names": list(spec.features), "vector": s.features, "qc": None}
            continue
        assert s.path is not None
        if not s.path.exists():
            excluded.append({"subject": s.subject, "reason": f"input not found: {s.path}"})
            continue
        keys[i] = cache_key(content_sha256(s.path), spec, settings, code)
        hit = _read_cache(cache, keys[i]) if cache is not None else None
        if hit is not None:
            results[i] = hit
            from_cache += 1
        else:
            todo.append(i)
    logger.info(
        "features: %d subjects, %d from cache, %d to compute", len(subjects), from_cache, len(todo)
    )
    if todo:
        workers = max(1, min(n_jobs, len(todo)))
        threads = max(1, (os.cpu_count() or 1) // workers)
        settings_json = settings.model_dump_json()
        columns = (
            TextColumn("features"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with (
            Progress(*columns, disable=not progress) as bar,
            ProcessPoolExecutor(
                workers,
                mp_context=get_context("spawn"),
                initializer=_init_worker,
                initargs=(threads,),
            ) as pool,
        ):
            task = bar.add_task("features", total=len(todo))
            futures = {
                pool.submit(_extract_one, str(subjects[i].path), settings_json): i for i in todo
            }
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    res = fut.result()
                except Exception as exc:  # a crash excludes the subject, is not cached
                    logger.warning("feature extraction failed (row %d): %s", i + 1, type(exc))
                    res = {"qc": None, "crash": f"{type(exc).__name__}: {exc}"}
                else:
                    if cache is not None:
                        _write_cache(cache, keys[i], res)
                results[i] = res
                bar.advance(task)
    names, X, y, sids, sites, qc = list(spec.features), [], [], [], [], {}
    for i, s in enumerate(subjects):
        got = results.get(i)
        if got is None:
            continue
        res = got
        if res.get("qc"):
            qc[s.subject] = str(res["qc"])
        reason = res.get("crash") or (res.get("error") if res.get("qc") == "fail" else None)
        if reason is None and "vector" not in res:
            reason = res.get("error") or "no features"
        if reason is None and list(res["names"]) != names:
            reason = "features do not match the spec"
        if reason is not None:
            excluded.append({"subject": s.subject, "reason": str(reason)})
            continue
        sids.append(s.subject)
        X.append([float(v) for v in res["vector"]])
        y.append(s.label)
        sites.append(s.site)
    if excluded:
        logger.warning("features: %d subjects excluded (QC or errors)", len(excluded))
    return FeatureTable(
        spec=spec,
        subjects=sids,
        X=np.asarray(X, dtype=np.float64).reshape(len(X), len(names)),
        y=np.asarray(y, dtype=np.int_),
        sites=sites,
        excluded=excluded,
        qc=qc,
        from_cache=from_cache,
        computed=len(todo),
    )
