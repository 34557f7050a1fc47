"""Cohort files and feature extraction (parallel, cached).

A cohort CSV has one row per subject:

- ``subject`` (required): a research ID (kept out of logs);
- ``label`` (required): ``responder`` / ``non-responder`` (also ``1``/``0``, ``yes``/``no``,
  ``true``/``false``);
- either ``path`` (a DICOM series folder or a NIfTI file; relative to the CSV's folder) or
  every feature of the spec as a column (precomputed, named as in
  :func:`ketanode.imaging.features.default_spec`, in mL); a row may use either;
- precomputed rows carry their provenance: ``feature_spec_sha256`` (required) and
  ``feature_spec`` (the spec's name, optional), as :func:`write_feature_csv` writes them. A
  row whose spec differs from the pipeline's is refused, naming both (features of another
  pipeline version or atlas would otherwise pass on their column names alone);
- optional covariates ``site``, ``age`` (years), ``sex`` (``F``/``M``, also
  ``female``/``male``; ``O``/``other`` is kept but left out of covariate models) and
  ``arm`` (treatment arm, e.g. ``ketamine``/``saline``). They are kept in the
  :class:`FeatureTable` (never fed to the imaging model itself): the training report shows
  them by class, fits a covariates-only baseline and, when asked, adjusts for them.

The same input under two subject IDs (the same SHA-256 of the image's content, or identical
precomputed feature values) is refused, naming both subjects: it would otherwise sit in a
training fold and a test fold at once.

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
    arm: str | None = None


#: Covariate columns of a cohort CSV, in the order of :meth:`FeatureTable.covariates`.
COVARIATES = ("age", "sex", "site")


@dataclass
class FeatureTable:
    """The usable subjects' features (spec order), labels and covariates, plus exclusions.

    ``ages``, ``sexes`` (``F``/``M``/``O``) and ``arms`` are per subject (``None`` when not
    given); empty lists (the default, for tables built in code) mean "not given" for all.
    """

    spec: FeatureSpec
    subjects: list[str]
    X: NDArray[np.float64]
    y: NDArray[np.int_]
    sites: list[str | None]
    excluded: list[dict[str, str]] = field(default_factory=list)
    qc: dict[str, str] = field(default_factory=dict)  # subject -> QC outcome (image rows)
    from_cache: int = 0
    computed: int = 0
    ages: list[float | None] = field(default_factory=list)
    sexes: list[str | None] = field(default_factory=list)
    arms: list[str | None] = field(default_factory=list)
    content: list[str] = field(default_factory=list)  # SHA-256 of each input (or its values)

    def __post_init__(self) -> None:
        n = len(self.subjects)
        for name in ("ages", "sexes", "arms"):
            values = getattr(self, name)
            if not values:
                setattr(self, name, [None] * n)
            elif len(values) != n:
                raise ValueError(f"{name}: {len(values)} values for {n} subjects")

    @property
    def has_sites(self) -> bool:
        return all(s for s in self.sites) and len(set(self.sites)) >= 2

    @property
    def site_problem(self) -> str | None:
        """Why leave-site-out cannot run (None when it can)."""
        missing = sum(1 for s in self.sites if not s)
        if missing == len(self.sites):
            return "no site column (or no site values): leave-site-out not run"
        if missing:
            return (
                f"{missing} of {len(self.sites)} subjects have no site: leave-site-out not run "
                "(give every subject a site)"
            )
        if len(set(self.sites)) < 2:
            return "one site only: leave-site-out not run"
        return None

    @property
    def arm_names(self) -> list[str]:
        return sorted({a for a in self.arms if a})

    def covariates(self) -> tuple[list[str], NDArray[np.float64]]:
        """Covariate columns (age, sex as 1 = F / 0 = M, site code) with NaN where missing.

        Site codes are the index of the site in sorted order (NaN without a site); the
        column is for models that treat it as categorical (one-hot, ComBat batches).
        """
        sites = sorted({s for s in self.sites if s})
        sex_code = {"F": 1.0, "M": 0.0}
        cols = np.full((len(self.subjects), len(COVARIATES)), np.nan)
        for i in range(len(self.subjects)):
            age, sex, site = self.ages[i], self.sexes[i], self.sites[i]
            cols[i, 0] = np.nan if age is None else float(age)
            cols[i, 1] = sex_code.get(sex or "", np.nan)
            cols[i, 2] = float(sites.index(site)) if site else np.nan
        return list(COVARIATES), cols

    def with_covariates(self) -> tuple[list[str], NDArray[np.float64]]:
        """Feature names and X with the covariate columns appended (for covariate models)."""
        names, cov = self.covariates()
        return [*self.spec.features, *names], np.hstack([self.X, cov])

    def summary(self) -> dict[str, Any]:
        sites = sorted({s for s in self.sites if s})
        out = {
            "n": len(self.subjects),
            "responders": int(self.y.sum()),
            "non_responders": int(len(self.y) - self.y.sum()),
            "sites": {s: self.sites.count(s) for s in sites},
            "excluded": len(self.excluded),
        }
        if any(self.arms):
            out["arms"] = {a: self.arms.count(a) for a in self.arm_names}
        return out


def parse_label(value: str) -> int:
    v = value.strip().lower()
    if v in _POSITIVE:
        return 1
    if v in _NEGATIVE:
        return 0
    raise ValueError(f"label {value!r} is not responder/non-responder (or 1/0)")


_SEX = {"f": "F", "female": "F", "w": "F", "m": "M", "male": "M", "o": "O", "other": "O"}


def parse_sex(value: str) -> str | None:
    v = value.strip().lower()
    if not v:
        return None
    if v in _SEX:
        return _SEX[v]
    raise ValueError(f"sex {value!r} is not F/M (female/male) or O (other)")


def parse_age(value: str) -> float | None:
    v = value.strip()
    if not v:
        return None
    try:
        age = float(v)
    except ValueError:
        raise ValueError(f"age {value!r} is not a number of years") from None
    if not 0 <= age < 130:
        raise ValueError(f"age {value!r} is not a plausible age in years")
    return age


#: Provenance columns of precomputed features (see :func:`write_feature_csv`).
SPEC_NAME_COLUMN, SPEC_HASH_COLUMN = "feature_spec", "feature_spec_sha256"


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
                _check_provenance(path, line, row, spec)
                try:
                    features = [float(row[f]) for f in spec.features]
                except ValueError as exc:
                    raise CohortError(f"{path}:{line}: feature value: {exc}") from exc
            else:
                raise CohortError(f"{path}:{line}: neither a path nor every feature value")
            try:
                age = parse_age(row.get("age", ""))
                sex = parse_sex(row.get("sex", ""))
            except ValueError as exc:
                raise CohortError(f"{path}:{line}: {exc}") from exc
            subjects.append(
                Subject(
                    subject=sid,
                    label=label,
                    path=image,
                    features=features,
                    site=row.get("site") or None,
                    age=age,
                    sex=sex,
                    arm=(row.get("arm") or "").lower() or None,
                )
            )
    if not subjects:
        raise CohortError(f"{path}: no subjects")
    return subjects


def _check_provenance(path: Path, line: int, row: dict[str, str], spec: FeatureSpec) -> None:
    """Precomputed features must name the spec they were measured with (name and hash)."""
    theirs = row.get(SPEC_HASH_COLUMN, "")
    name = row.get(SPEC_NAME_COLUMN, "")
    if not theirs:
        raise CohortError(
            f"{path}:{line}: precomputed features without provenance: add the columns "
            f"{SPEC_NAME_COLUMN!r} and {SPEC_HASH_COLUMN!r} (this pipeline: {spec.name}, "
            f"{spec.sha256}); features matched by column name alone could come from another "
            "pipeline version or atlas"
        )
    if theirs != spec.sha256 or (name and name != spec.name):
        raise CohortError(
            f"{path}:{line}: feature spec mismatch: the row's features were measured with "
            f"{name or '(unnamed spec)'} ({theirs[:12]}), this pipeline emits {spec.name} "
            f"v{spec.version} ({spec.sha256[:12]})"
        )


def write_feature_csv(table: FeatureTable, path: str | Path) -> Path:
    """A cohort CSV of precomputed features with their provenance and covariates (one row
    per usable subject), readable by :func:`read_cohort`."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "subject",
                "label",
                "site",
                "age",
                "sex",
                "arm",
                SPEC_NAME_COLUMN,
                SPEC_HASH_COLUMN,
                *table.spec.features,
            ]
        )
        for i, sid in enumerate(table.subjects):
            age = table.ages[i]
            w.writerow(
                [
                    sid,
                    "responder" if table.y[i] == 1 else "non-responder",
                    table.sites[i] or "",
                    "" if age is None else f"{age:g}",
                    table.sexes[i] or "",
                    table.arms[i] or "",
                    table.spec.name,
                    table.spec.sha256,
                    *[repr(float(v)) for v in table.X[i]],
                ]
            )
    return out


def _values_sha256(values: Sequence[float]) -> str:
    return hashlib.sha256(np.asarray(values, dtype=np.float64).tobytes()).hexdigest()


def _refuse_duplicates(subjects: Sequence[Subject], content: dict[int, str]) -> None:
    seen: dict[str, str] = {}
    for i, sha in sorted(content.items()):
        other = seen.setdefault(sha, subjects[i].subject)
        if other != subjects[i].subject:
            what = "image" if subjects[i].features is None else "feature values"
            raise CohortError(
                f"subjects {other!r} and {subjects[i].subject!r} have the same {what} "
                f"(SHA-256 {sha[:12]}): one input under two subject IDs would sit in a "
                "training fold and a test fold at once; remove one of them"
            )


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
    content: dict[int, str] = {}
    excluded: list[dict[str, str]] = []
    from_cache = 0
    todo: list[int] = []
    for i, s in enumerate(subjects):
        if s.features is not None:
            content[i] = _values_sha256(s.features)
            continue
        assert s.path is not None
        if s.path.exists():
            content[i] = content_sha256(s.path)
    _refuse_duplicates(subjects, content)
    for i, s in enumerate(subjects):
        if s.features is not None:
            results[i] = {"names": list(spec.features), "vector": s.features, "qc": None}
            continue
        assert s.path is not None
        if i not in content:
            excluded.append({"subject": s.subject, "reason": f"input not found: {s.path}"})
            continue
        keys[i] = cache_key(content[i], spec, settings, code)
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
    ages: list[float | None] = []
    sexes: list[str | None] = []
    arms: list[str | None] = []
    hashes: list[str] = []
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
        ages.append(s.age)
        sexes.append(s.sex)
        arms.append(s.arm)
        hashes.append(content[i])
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
        ages=ages,
        sexes=sexes,
        arms=arms,
        content=hashes,
    )
