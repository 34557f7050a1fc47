"""Synthetic cohorts built on the phantom generator, with the study's direction planted.

Each subject is a realistic phantom (:func:`ketanode.synthetic.phantom.make_phantom`) with
ordinary between-subject variation: head size (``head_scale_range``), per-region GM
variation (``region_sd``, the SD of the log GM factor of every region), pose, warp, bias
field, noise and tissue intensities (all seeded per subject), and a scanner per site
(signal-to-noise ratio).

The planted effect (effect size ``d``): a *responder-like* subject gets its frontal GM
(left and right) multiplied by ``exp(d * region_sd)``; a *non-responder-like* subject gets
its cerebellar GM multiplied by the same factor. For each of those four regions the true
log GM of the two groups therefore differs by ``d`` between-subject SDs (Cohen's d on the
true volumes; the measured features add pipeline error, which lowers it). TIV is unchanged
(GM is exchanged with WM), so the effect survives TIV normalisation.

Covariates: ages are drawn uniformly from 20-65 years and sex at random, independent of the
images and labels, unless ``age_effect_years`` (hidden responder-like subjects are that
many years older on average) and ``age_gm_slope`` (every region's log GM changes by that
much per year of age, relative to 45 years; e.g. -0.005 = -0.5 % a year) plant an age
effect. With ``effect_d=0`` and both set, the images carry the group only through age: an
imaging model can then do no better than age itself (the covariates-only baseline).

Treatment arms: ``arms=2`` assigns subjects alternately to ``ketamine`` and ``saline``
(column ``arm``). ``effect_in="ketamine"`` plants the effect in the ketamine arm only: a
saline subject's image is drawn with its hidden group as usual, but its label is drawn
independently of it (a response to saline unrelated to the brain), as in the study where
the model was at chance in the saline arm. ``effect_in="all"`` (default) keeps the labels
of both arms tied to the images.

``null=True``: each subject's image is drawn exactly as above (its hidden group at the
responder rate), but its *label* is drawn independently of the image, so labels carry no
signal. With the same seed a null cohort has the same images (and feature-cache entries)
as the planted cohort; only the labels differ.

:func:`feature_table` is the same design at the feature level (no images, seconds), as a
:class:`~ketanode.model.cohort.FeatureTable` with covariates and arms.

Output folder: ``images/sub-NNNN.nii.gz`` (or ``images/sub-NNNN/`` DICOM series),
``cohort.csv`` (subject, path, label, site, age, sex, and arm when two arms) and
``synthetic.json`` (settings and, per subject, the hidden group, GM factors and true
volumes).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ketanode.synthetic.phantom import PhantomSpec

logger = logging.getLogger(__name__)

FRONTAL = ("left_frontal", "right_frontal")
CEREBELLAR = ("left_cerebellum", "right_cerebellum")
SITE_SNR = (30.0, 22.0, 40.0, 26.0, 34.0)  # scanner signal-to-noise per site (cycled)
ARMS = ("ketamine", "saline")
AGE_CENTRE = 45.0


@dataclass(frozen=True)
class SyntheticCohort:
    """Everything that determines a synthetic cohort (same settings, same files)."""

    n: int = 40
    responder_rate: float = 0.5
    effect_d: float = 1.5
    seed: int = 0
    null: bool = False
    voxel_mm: float = 3.0
    region_sd: float = 0.08
    head_scale_range: float = 0.08
    sites: int = 1
    fmt: Literal["nifti", "dicom"] = "nifti"
    age_effect_years: float = 0.0
    age_gm_slope: float = 0.0
    arms: int = 1
    effect_in: Literal["all", "ketamine"] = "all"

    def __post_init__(self) -> None:
        if self.arms not in (1, 2):
            raise ValueError("arms must be 1 or 2")
        if self.effect_in not in ("all", "ketamine"):
            raise ValueError("effect_in must be 'all' or 'ketamine'")
        if self.effect_in == "ketamine" and self.arms != 2:
            raise ValueError("effect_in='ketamine' needs arms=2")
        if self.n < 4:
            raise ValueError("a cohort needs at least 4 subjects")
        if not 0 < self.responder_rate < 1:
            raise ValueError("responder_rate must be between 0 and 1")
        if self.sites < 1:
            raise ValueError("sites must be at least 1")

    def groups_and_labels(self) -> tuple[list[int], list[int]]:
        """Hidden (image) group and label of every subject (1 = responder)."""
        rng = np.random.default_rng([self.seed, 1])
        n_resp = int(round(self.n * self.responder_rate))
        groups = rng.permutation([1] * n_resp + [0] * (self.n - n_resp)).tolist()
        if self.null:
            labels = np.random.default_rng([self.seed, 2]).permutation(groups).tolist()
            return groups, labels
        labels = list(groups)
        if self.effect_in == "ketamine":
            saline = [i for i in range(self.n) if self.arm(i) == "saline"]
            drawn = np.random.default_rng([self.seed, 5]).permutation([groups[i] for i in saline])
            for i, g in zip(saline, drawn, strict=True):
                labels[i] = int(g)
        return groups, labels

    def arm(self, index: int) -> str | None:
        """Treatment arm of subject ``index`` (None for a one-arm cohort)."""
        return ARMS[index % 2] if self.arms == 2 else None

    def ages_and_sexes(self) -> tuple[list[float], list[str]]:
        """Age (years) and sex of every subject (see the module docstring)."""
        rng = np.random.default_rng([self.seed, 3])
        ages = rng.integers(20, 66, size=self.n).astype(float)
        sexes = rng.choice(["F", "M"], size=self.n)
        if self.age_effect_years:
            groups, _ = self.groups_and_labels()
            ages = ages + self.age_effect_years * (np.asarray(groups) - 0.5)
        return [round(float(a), 1) for a in ages], [str(x) for x in sexes]

    def age_factor(self, age: float) -> float:
        """The GM factor of every region at ``age`` (1 without an age slope)."""
        return math.exp(self.age_gm_slope * (age - AGE_CENTRE))

    def phantom_spec(self, index: int, group: int, age: float | None = None) -> PhantomSpec:
        """The phantom of subject ``index`` with hidden group ``group`` (1 responder-like) and
        ``age`` (used only with an ``age_gm_slope``)."""
        factor = math.exp(self.effect_d * self.region_sd)
        regions = FRONTAL if group == 1 else CEREBELLAR
        factors = {r: factor for r in regions}
        if self.age_gm_slope and age is not None:
            aged = self.age_factor(age)
            factors = {r: factors.get(r, 1.0) * aged for r in _regions()}
        v = float(self.voxel_mm)
        site = index % self.sites
        return PhantomSpec(
            seed=self.seed * 100_000 + index,
            voxel_mm=(v, v, v),
            gm_factors=factors,
            region_sd=self.region_sd,
            head_scale_range=self.head_scale_range,
            snr=SITE_SNR[site % len(SITE_SNR)],
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Every row of a cohort CSV written here carries this column, so that a CSV kept apart
#: from its synthetic.json is still known as synthetic (:func:`is_synthetic_cohort`).
SYNTHETIC_COLUMN, SYNTHETIC_VALUE = "synthetic", "ketanode phantom"


def mark_synthetic(csv_path: Path) -> Path:
    """Add the :data:`SYNTHETIC_COLUMN` to every row of a cohort CSV (rewritten in place)."""
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f for f in reader.fieldnames or [] if f != SYNTHETIC_COLUMN]
        rows = list(reader)
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*fields, SYNTHETIC_COLUMN])
        writer.writeheader()
        writer.writerows([r | {SYNTHETIC_COLUMN: SYNTHETIC_VALUE} for r in rows])
    return csv_path


def is_synthetic_cohort(csv_path: str | Path) -> bool:
    """Whether a cohort CSV was built by ``ketanode model synth``: a synthetic.json beside it,
    or any row marked in its :data:`SYNTHETIC_COLUMN` (the CSV moved or copied alone)."""
    path = Path(csv_path)
    if (path.parent / "synthetic.json").is_file():
        return True
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if SYNTHETIC_COLUMN not in [c.strip() for c in reader.fieldnames or []]:
            return False
        return any(
            (row.get(SYNTHETIC_COLUMN) or "").strip().lower() not in ("", "no", "false", "0")
            for row in reader
        )


def _regions() -> list[str]:
    from ketanode.imaging.features import default_spec

    return [f[3:] for f in default_spec().features if f.startswith("gm_") and f != "gm_total"]


def _subject_id(index: int) -> str:
    return f"sub-{index + 1:04d}"


def _write_one(spec: PhantomSpec, target: str, fmt: str, sid: str) -> dict[str, Any]:
    from ketanode.synthetic.phantom import make_phantom
    from ketanode.synthetic.series_writer import SeriesSpec

    phantom = make_phantom(spec)
    path = Path(target)
    if fmt == "dicom":
        phantom.write_dicom(
            path,
            SeriesSpec(
                patient_name=f"SYNTHETIC^{sid}",
                patient_id=sid,
                accession_number="",
                series_description="T1 MPRAGE synthetic",
            ),
        )
    else:
        phantom.write_nifti(path)
    truth = phantom.truth
    return {
        "tiv_ml": round(truth["tiv_ml"], 3),
        "gm_ml": {k: round(v["gm_ml"], 3) for k, v in truth["regions"].items()},
        "region_factors": {k: round(v, 5) for k, v in truth["region_factors"].items()},
    }


def write_cohort(
    cfg: SyntheticCohort,
    out_dir: str | Path,
    n_jobs: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the phantoms and ``cohort.csv``; returns the CSV path. Existing files are reused
    (a phantom is a pure function of its spec)."""
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    groups, labels = cfg.groups_and_labels()
    ages, sexes = cfg.ages_and_sexes()
    rows: list[dict[str, Any]] = []
    jobs: dict[int, tuple[PhantomSpec, str]] = {}
    for i in range(cfg.n):
        sid = _subject_id(i)
        rel = f"images/{sid}" + (".nii.gz" if cfg.fmt == "nifti" else "")
        spec = cfg.phantom_spec(i, groups[i], ages[i])
        rows.append(
            {
                "subject": sid,
                "path": rel,
                "label": "responder" if labels[i] == 1 else "non-responder",
                "site": f"site-{i % cfg.sites + 1}",
                "age": f"{ages[i]:g}",
                "sex": sexes[i],
            }
            | ({"arm": cfg.arm(i)} if cfg.arms == 2 else {})
        )
        jobs[i] = (spec, str(out / rel))
    truths: dict[int, dict[str, Any]] = {}
    meta_path = out / "synthetic.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old.get("settings") == cfg.as_dict():
            truths = {int(k): v for k, v in old.get("truth", {}).items()}
    todo = [i for i in range(cfg.n) if not (i in truths and Path(jobs[i][1]).exists())]
    done = cfg.n - len(todo)
    if progress:
        progress(done, cfg.n)
    if todo:
        workers = max(1, min(n_jobs, len(todo)))
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {i: pool.submit(_write_one, *jobs[i], cfg.fmt, _subject_id(i)) for i in todo}
            for i, fut in futures.items():
                truths[i] = fut.result()
                done += 1
                if progress:
                    progress(done, cfg.n)
    with open(out / "cohort.csv", "w", newline="") as fh:
        fields = ["subject", "path", "label", "site", "age", "sex"]
        fields += ["arm"] if cfg.arms == 2 else []
        writer = csv.DictWriter(fh, fieldnames=[*fields, SYNTHETIC_COLUMN])
        writer.writeheader()
        writer.writerows([r | {SYNTHETIC_COLUMN: SYNTHETIC_VALUE} for r in rows])
    meta = {
        "kind": "ketanode synthetic cohort",
        "synthetic": True,
        "settings": cfg.as_dict(),
        "planted": planted_text(cfg),
        "groups": {_subject_id(i): g for i, g in enumerate(groups)},
        "truth": {str(i): truths[i] for i in sorted(truths)},
    }
    tmp = meta_path.with_name(f".{os.getpid()}.synthetic.json")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, meta_path)
    logger.info("synthetic cohort: %d subjects written", cfg.n)
    return out / "cohort.csv"


def planted_text(cfg: SyntheticCohort) -> str:
    """What the cohort's labels and images carry, in words."""
    if cfg.null:
        return "none (null: labels independent of images)"
    parts = [
        f"responders: frontal GM x exp(d*region_sd); non-responders: cerebellar GM "
        f"x exp(d*region_sd); d={cfg.effect_d}"
    ]
    if cfg.effect_in == "ketamine":
        parts.append("ketamine arm only (saline labels independent of the images)")
    if cfg.age_effect_years:
        parts.append(f"responder-like subjects {cfg.age_effect_years:g} years older")
    if cfg.age_gm_slope:
        parts.append(f"GM x exp({cfg.age_gm_slope:g} * (age - {AGE_CENTRE:g}))")
    return "; ".join(parts)


def feature_cohort(
    cfg: SyntheticCohort, measurement_sd: float = 0.03
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], list[str]]:
    """A fast, feature-level stand-in for unit tests of the learning code (no images).

    Regional GM = template-like mean x head size^3 x the subject's GM factors (the same
    planted effect and variation as the images) x a multiplicative measurement error.
    Returns X in :func:`default_spec` order, labels, and the feature names.
    """
    from ketanode.imaging.features import default_spec

    spec = default_spec()
    names = list(spec.features)
    regions = [f[3:] for f in names if f.startswith("gm_") and f != "gm_total"]
    base = {r: (120.0 if "frontal" in r else 70.0 if "cerebellum" in r else 40.0) for r in regions}
    groups, labels = cfg.groups_and_labels()
    ages, _ = cfg.ages_and_sexes()
    rng = np.random.default_rng([cfg.seed, 4])
    X = np.zeros((cfg.n, len(names)))
    factor = math.exp(cfg.effect_d * cfg.region_sd)
    for i, g in enumerate(groups):
        aged = cfg.age_factor(ages[i])
        head = (1 + rng.uniform(-cfg.head_scale_range, cfg.head_scale_range)) ** 3
        tiv = 1500.0 * head
        gm = {}
        for r in regions:
            planted = factor if (g == 1 and r in FRONTAL) or (g == 0 and r in CEREBELLAR) else 1
            noise = math.exp(cfg.region_sd * rng.normal() + measurement_sd * rng.normal())
            gm[r] = base[r] * head * planted * noise * aged
        total_gm = sum(gm.values())
        values = {f"gm_{r}": v for r, v in gm.items()} | {
            "gm_total": total_gm,
            "wm_total": 0.35 * tiv,
            "csf_total": tiv - total_gm - 0.35 * tiv,
            "tiv": tiv,
        }
        X[i] = [values[f] for f in names]
    return X, np.asarray(labels, dtype=np.int_), names


def feature_table(cfg: SyntheticCohort, measurement_sd: float = 0.03) -> Any:
    """:func:`feature_cohort` as a :class:`~ketanode.model.cohort.FeatureTable` with the
    cohort's sites, ages, sexes and arms (subject IDs as in :func:`write_cohort`)."""
    from ketanode.imaging.features import default_spec
    from ketanode.model.cohort import FeatureTable

    X, y, _ = feature_cohort(cfg, measurement_sd)
    ages, sexes = cfg.ages_and_sexes()
    return FeatureTable(
        spec=default_spec(),
        subjects=[_subject_id(i) for i in range(cfg.n)],
        X=X,
        y=y,
        sites=[f"site-{i % cfg.sites + 1}" for i in range(cfg.n)],
        ages=list(ages),
        sexes=list(sexes),
        arms=[cfg.arm(i) for i in range(cfg.n)],
        content=[f"synthetic-{cfg.seed}-{i}" for i in range(cfg.n)],
    )


def write_feature_cohort(
    cfg: SyntheticCohort, out_dir: str | Path, measurement_sd: float = 0.03
) -> Path:
    """:func:`feature_table` written as a cohort CSV of precomputed features (with their
    spec's provenance and the covariates) plus ``synthetic.json``; returns the CSV path.
    Seconds instead of hours: for trying the learning code, not the measurement."""
    from ketanode.model.cohort import write_feature_csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = feature_table(cfg, measurement_sd)
    path = mark_synthetic(write_feature_csv(table, out / "cohort.csv"))
    groups, _ = cfg.groups_and_labels()
    meta = {
        "kind": "ketanode synthetic cohort (feature level, no images)",
        "synthetic": True,
        "settings": cfg.as_dict() | {"measurement_sd": measurement_sd},
        "planted": planted_text(cfg),
        "groups": {_subject_id(i): g for i, g in enumerate(groups)},
    }
    (out / "synthetic.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return path
