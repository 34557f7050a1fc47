"""Validation with the study's protocol: repeated stratified nested cross-validation.

Outer loop: ``repeats`` x stratified ``folds``-fold CV (repeat r shuffles with seed
``seed + r``). Inner loop, on the outer training subjects only: C chosen by a stratified
``inner_folds``-fold grid search (balanced accuracy), then the calibrated pipeline (Platt
scaling on inner held-out folds, see :mod:`ketanode.model.classifier`) fitted on all outer
training subjects and applied to the outer test fold. Every subject so gets one
out-of-fold decision value, class and probability per repeat.

Metrics (balanced accuracy, sensitivity = recall of responders, specificity = recall of
non-responders, ROC AUC of the decision value) are computed per repeat on the pooled
out-of-fold predictions and averaged over repeats. **95 % confidence intervals** are
percentile intervals of a stratified bootstrap over *subjects* (``n_boot`` resamples of
responders and non-responders separately; each resample's metric is again the mean over
repeats). They therefore reflect sampling variability of the cohort, not only the (much
smaller) variability between CV repeats, which is reported separately (``repeat_sd``).

Permutation test: labels permuted ``n_permutations`` times, the nested CV rerun on each
with the same outer/inner protocol (first ``permutation_repeats`` repeats, no calibration
needed for the statistic); statistic = mean balanced accuracy over those repeats;
p = (1 + #{permuted >= observed}) / (1 + n_permutations).

Leave-site-out (when sites are given, >= 2): each site in turn is the test set, the model
(inner CV for C, calibration) is trained on the others; metrics per site and pooled.

Everything is seeded: the same inputs and seed give the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import rankdata
from sklearn import config_context
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.parallel import Parallel, delayed

from ketanode.model.classifier import (
    DEFAULT_C_GRID,
    TIV_DESCRIPTION,
    build_pipeline,
    calibrated,
    decision_and_probability,
    default_inputs,
    select_c,
)

logger = logging.getLogger(__name__)

F64 = NDArray[np.float64]
I64 = NDArray[np.int_]
METRICS = ("balanced_accuracy", "sensitivity", "specificity", "auc")
CI_METHOD = (
    "95% percentile interval of a stratified bootstrap over subjects "
    "(metric = mean over CV repeats of the pooled out-of-fold metric)"
)


@dataclass(frozen=True)
class Protocol:
    """The nested CV settings (recorded in the model metadata)."""

    folds: int = 5
    repeats: int = 10
    inner_folds: int = 5
    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    tiv: str = "proportion"
    seed: int = 0
    n_boot: int = 2000
    n_permutations: int = 100
    permutation_repeats: int = 1
    n_jobs: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "outer": f"{self.repeats} x stratified {self.folds}-fold",
            "inner": f"stratified {self.inner_folds}-fold grid search over C (balanced accuracy)",
            "folds": self.folds,
            "repeats": self.repeats,
            "inner_folds": self.inner_folds,
            "c_grid": list(self.c_grid),
            "tiv": self.tiv,
            "tiv_handling": TIV_DESCRIPTION.get(self.tiv, self.tiv),
            "seed": self.seed,
            "ci_method": CI_METHOD,
            "n_boot": self.n_boot,
            "n_permutations": self.n_permutations,
            "permutation_repeats": self.permutation_repeats,
        }


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def binary_metrics(y: I64, pred: I64, decision: F64) -> dict[str, float | None]:
    """Balanced accuracy, sensitivity, specificity, AUC (None when a class is absent)."""
    y = np.asarray(y)
    pred = np.asarray(pred)
    pos, neg = y == 1, y == 0
    sens = float(np.mean(pred[pos] == 1)) if pos.any() else None
    spec = float(np.mean(pred[neg] == 0)) if neg.any() else None
    ba = (sens + spec) / 2 if sens is not None and spec is not None else None
    auc = (
        float(_auc(y[None, :], np.asarray(decision)[None, :])[0])
        if pos.any() and neg.any()
        else None
    )
    return {"balanced_accuracy": ba, "sensitivity": sens, "specificity": spec, "auc": auc}


def _auc(y: NDArray[Any], score: NDArray[Any]) -> F64:
    """ROC AUC along the last axis (Mann-Whitney with mid-ranks for ties)."""
    ranks = rankdata(score, axis=-1)
    pos = y == 1
    n1 = pos.sum(axis=-1)
    n0 = y.shape[-1] - n1
    return np.asarray(((ranks * pos).sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0), dtype=float)


def _metric_arrays(y: NDArray[Any], pred: NDArray[Any], decision: NDArray[Any]) -> dict[str, F64]:
    """Metrics along the last axis; y broadcasts against pred/decision."""
    pos = y == 1
    neg = ~pos
    sens = ((pred == 1) & pos).sum(axis=-1) / pos.sum(axis=-1)
    spec = ((pred == 0) & neg).sum(axis=-1) / neg.sum(axis=-1)
    yb = np.broadcast_to(y, decision.shape)
    return {
        "balanced_accuracy": (sens + spec) / 2,
        "sensitivity": sens,
        "specificity": spec,
        "auc": _auc(yb, decision),
    }


def summarise(
    y: I64, pred: I64, decision: F64, n_boot: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Mean over repeats (rows of pred/decision) with a bootstrap CI and the repeat SD."""
    pred2 = np.atleast_2d(pred)
    dec2 = np.atleast_2d(decision)
    per_repeat = _metric_arrays(y[None, :], pred2, dec2)
    rng = np.random.default_rng([seed, 7])
    pos_idx, neg_idx = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    idx = np.concatenate(
        [
            pos_idx[rng.integers(0, len(pos_idx), size=(n_boot, len(pos_idx)))],
            neg_idx[rng.integers(0, len(neg_idx), size=(n_boot, len(neg_idx)))],
        ],
        axis=1,
    )
    boot = _metric_arrays(y[idx][None, :, :], pred2[:, idx], dec2[:, idx])  # (R, B)
    out: dict[str, dict[str, Any]] = {}
    for name in METRICS:
        reps = per_repeat[name]
        b = boot[name].mean(axis=0)
        lo, hi = np.percentile(b, [2.5, 97.5])
        out[name] = {
            "mean": round(float(reps.mean()), 4),
            "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "repeat_sd": round(float(reps.std(ddof=1)) if len(reps) > 1 else 0.0, 4),
            "repeat_range": [round(float(reps.min()), 4), round(float(reps.max()), 4)],
        }
    return out


# --------------------------------------------------------------------------------------
# Nested CV
# --------------------------------------------------------------------------------------


@dataclass
class CVResult:
    """Out-of-fold predictions of every repeat and their summary."""

    protocol: Protocol
    y: I64
    decision: F64  # (repeats, n)
    probability: F64  # (repeats, n)
    pred: I64  # (repeats, n)
    chosen_c: list[float]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    permutation: dict[str, Any] | None = None
    leave_site_out: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        values, counts = np.unique(np.asarray(self.chosen_c), return_counts=True)
        return {
            "protocol": self.protocol.as_dict(),
            "n": int(len(self.y)),
            "metrics": self.metrics,
            "permutation": self.permutation,
            "leave_site_out": self.leave_site_out,
            "chosen_c": {f"{v:g}": int(c) for v, c in zip(values, counts, strict=True)},
        }


def _outer_fold(
    X: F64,
    y: I64,
    train: I64,
    test: I64,
    feature_names: Sequence[str],
    inputs: Sequence[str],
    p: Protocol,
    fold_seed: int,
    with_probability: bool,
) -> tuple[I64, F64, F64, float]:
    pipe = build_pipeline(feature_names, inputs, p.tiv)
    c = select_c(pipe, X[train], y[train], p.c_grid, p.inner_folds, fold_seed)
    pipe.set_params(svc__C=c)
    if with_probability:
        est = calibrated(pipe, y[train], p.inner_folds, fold_seed)
        est.fit(X[train], y[train])
        decision, proba = decision_and_probability(est, X[test])
    else:
        pipe.fit(X[train], y[train])
        decision = np.asarray(pipe.decision_function(X[test]), dtype=np.float64)
        proba = np.full(len(test), np.nan)
    return test, decision, proba, c


def _run_repeats(
    X: F64,
    y: I64,
    feature_names: Sequence[str],
    inputs: Sequence[str],
    p: Protocol,
    repeats: int,
    with_probability: bool,
    n_jobs: int,
) -> tuple[F64, F64, list[float]]:
    n = len(y)
    tasks = []
    for r in range(repeats):
        outer = StratifiedKFold(p.folds, shuffle=True, random_state=p.seed + r)
        for k, (train, test) in enumerate(outer.split(X, y)):
            tasks.append((r, train, test, (p.seed + r) * 100 + k))
    run = delayed(_outer_fold)
    results = Parallel(n_jobs=n_jobs)(
        run(X, y, tr, te, feature_names, inputs, p, fs, with_probability) for _, tr, te, fs in tasks
    )
    decision = np.zeros((repeats, n))
    proba = np.zeros((repeats, n))
    chosen: list[float] = []
    for (r, *_), (test, d, pr, c) in zip(tasks, results, strict=True):
        decision[r, test] = d
        proba[r, test] = pr
        chosen.append(c)
    return decision, proba, chosen


def _check_labels(y: I64, folds: int) -> None:
    counts = np.bincount(y, minlength=2)
    if len(counts) > 2 or counts.min() < folds:
        raise ValueError(
            f"need at least {folds} responders and {folds} non-responders "
            f"(have {int(counts[1])} and {int(counts[0])})"
        )


def nested_cv(
    X: F64,
    y: I64,
    feature_names: Sequence[str],
    protocol: Protocol | None = None,
    *,
    inputs: Sequence[str] | None = None,
    sites: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> CVResult:
    """Repeated stratified nested CV, bootstrap CIs, permutation test, leave-site-out."""
    p = protocol or Protocol()
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int_)
    _check_labels(y, p.folds)
    if not np.all(np.isfinite(X)):
        raise ValueError("features have missing or non-finite values")
    # inputs are checked above once; sklearn's per-fit checks dominate the run time otherwise
    with config_context(assume_finite=True, skip_parameter_validation=True):
        return _nested_cv(X, y, feature_names, p, inputs, sites, progress)


def _nested_cv(
    X: F64,
    y: I64,
    feature_names: Sequence[str],
    p: Protocol,
    inputs: Sequence[str] | None,
    sites: Sequence[str] | None,
    progress: Callable[[str], None] | None,
) -> CVResult:
    used = list(inputs) if inputs is not None else default_inputs(feature_names)
    say = progress or (lambda _msg: None)
    say(f"nested CV: {p.repeats} x {p.folds}-fold")
    decision, proba, chosen = _run_repeats(X, y, feature_names, used, p, p.repeats, True, p.n_jobs)
    pred = (decision >= 0).astype(np.int_)
    result = CVResult(p, y, decision, proba, pred, chosen)
    result.metrics = summarise(y, pred, decision, p.n_boot, p.seed)
    logger.info(
        "nested CV on %d subjects: balanced accuracy %.3f",
        len(y),
        result.metrics["balanced_accuracy"]["mean"],
    )
    if p.n_permutations > 0:
        say(f"permutation test: {p.n_permutations} permutations")
        result.permutation = permutation_test(X, y, feature_names, p, used, pred)
    if sites is not None and len(set(sites)) >= 2:
        say("leave-site-out")
        result.leave_site_out = leave_site_out(X, y, feature_names, list(sites), p, used)
    return result


def _ba(y: NDArray[Any], pred: NDArray[Any]) -> F64:
    """Balanced accuracy along the last axis (y broadcasts against pred)."""
    pos = y == 1
    sens = ((pred == 1) & pos).sum(axis=-1) / pos.sum(axis=-1)
    spec = ((pred == 0) & ~pos).sum(axis=-1) / (~pos).sum(axis=-1)
    return np.asarray((sens + spec) / 2, dtype=np.float64)


def _permuted_statistic(
    X: F64, y: I64, feature_names: Sequence[str], inputs: Sequence[str], p: Protocol
) -> float:
    decision, _, _ = _run_repeats(X, y, feature_names, inputs, p, p.permutation_repeats, False, 1)
    return float(_ba(y[None, :], (decision >= 0).astype(np.int_)).mean())


def permutation_test(
    X: F64,
    y: I64,
    feature_names: Sequence[str],
    p: Protocol,
    inputs: Sequence[str],
    observed_pred: I64,
) -> dict[str, Any]:
    """Labels permuted, nested CV rerun (see the module docstring)."""
    k = min(p.permutation_repeats, observed_pred.shape[0])
    observed = float(_ba(y[None, :], observed_pred[:k]).mean())
    rng = np.random.default_rng([p.seed, 11])
    perms = [rng.permutation(y) for _ in range(p.n_permutations)]
    q = Protocol(**{**p.__dict__, "permutation_repeats": k})
    run = delayed(_permuted_statistic)
    null = np.asarray(
        Parallel(n_jobs=p.n_jobs)(run(X, yp, feature_names, inputs, q) for yp in perms),
        dtype=np.float64,
    )
    p_value = (1 + int(np.sum(null >= observed - 1e-12))) / (1 + len(null))
    return {
        "n_permutations": int(len(null)),
        "statistic": f"mean balanced accuracy over the first {k} nested-CV repeat(s)",
        "observed": round(observed, 4),
        "null_mean": round(float(null.mean()), 4),
        "null_95th_percentile": round(float(np.percentile(null, 95)), 4),
        "p_value": round(p_value, 4),
    }


def leave_site_out(
    X: F64,
    y: I64,
    feature_names: Sequence[str],
    sites: list[str],
    p: Protocol,
    inputs: Sequence[str],
) -> dict[str, Any]:
    """Each site held out in turn; the model is trained (inner CV, calibration) on the rest."""
    site_arr = np.asarray(sites)
    decision = np.zeros(len(y))
    per_site: dict[str, Any] = {}
    for k, site in enumerate(sorted(set(sites))):
        test = np.flatnonzero(site_arr == site)
        train = np.flatnonzero(site_arr != site)
        if min(np.bincount(y[train], minlength=2)) < 2:
            per_site[site] = {"n": int(len(test)), "skipped": "training sites lack a class"}
            decision[test] = np.nan
            continue
        _, d, _, c = _outer_fold(X, y, train, test, feature_names, inputs, p, p.seed + k, False)
        decision[test] = d
        m = binary_metrics(y[test], (d >= 0).astype(np.int_), d)
        per_site[site] = {
            "n": int(len(test)),
            "responders": int(y[test].sum()),
            "C": c,
            **{key: None if v is None else round(v, 4) for key, v in m.items()},
        }
    ok = np.isfinite(decision)
    pooled = binary_metrics(y[ok], (decision[ok] >= 0).astype(np.int_), decision[ok])
    return {
        "sites": per_site,
        "pooled": {key: None if v is None else round(v, 4) for key, v in pooled.items()},
    }


def external_validation(
    y: I64, decision: F64, n_boot: int = 2000, n_permutations: int = 10000, seed: int = 0
) -> dict[str, Any]:
    """Metrics of a fixed model on a new cohort: bootstrap CIs, label-permutation p-value."""
    y = np.asarray(y, dtype=np.int_)
    decision = np.asarray(decision, dtype=np.float64)
    pred = (decision >= 0).astype(np.int_)
    metrics = summarise(y, pred[None, :], decision[None, :], n_boot, seed)
    for m in metrics.values():
        m.pop("repeat_sd"), m.pop("repeat_range")
    observed = float(_ba(y, pred))
    rng = np.random.default_rng([seed, 13])
    perms = np.stack([rng.permutation(y) for _ in range(n_permutations)])
    null = _ba(perms, pred[None, :])
    return {
        "n": int(len(y)),
        "metrics": metrics,
        "ci_method": "95% percentile interval of a stratified bootstrap over subjects",
        "permutation": {
            "n_permutations": n_permutations,
            "statistic": "balanced accuracy of the fixed model's predictions",
            "observed": round(observed, 4),
            "p_value": round((1 + int(np.sum(null >= observed - 1e-12))) / (1 + n_permutations), 4),
        },
    }
