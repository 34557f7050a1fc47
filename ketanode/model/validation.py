"""Validation with the study's protocol: repeated stratified nested cross-validation.

Outer loop: ``repeats`` x stratified ``folds``-fold CV (repeat r shuffles with seed
``seed + r``). Inner loop, on the outer training subjects only: C chosen by a stratified
``inner_folds``-fold grid search (balanced accuracy), then the calibrated pipeline (Platt
scaling on inner held-out folds, see :mod:`ketanode.model.classifier`) fitted on all outer
training subjects and applied to the outer test fold. Every subject so gets one
out-of-fold decision value, class and probability per repeat.

Metrics: balanced accuracy, sensitivity (recall of responders) and specificity (recall of
non-responders) per repeat on the pooled out-of-fold classes (each fold model's own
balanced decision, so classes are comparable across folds), averaged over repeats; ROC AUC
is computed **per outer fold** (decision values of different fold models are on different
scales, so pooling them would rank subjects of one model against another's) and averaged
over folds, then repeats. The headline statistic is the mean balanced accuracy over repeats.

**95 % intervals** are percentile intervals of a stratified bootstrap over *subjects* of the
fixed out-of-fold predictions (``n_boot`` resamples of responders and non-responders
separately; each resample's metric again the mean over repeats). They are *conditional on
the fitted fold models*: they show how much the estimate moves with which subjects are
scored, not how much it would move if the models were refitted on another sample of
training subjects, so they are narrower than a full interval by an unknown amount (a refit
bootstrap costs ``n_boot`` nested CVs). The spread between CV repeats is ``repeat_sd``.

**Permutation test** of the headline statistic: labels shuffled *within site* (subjects
without a site form one stratum), ``n_permutations`` times (1,000 by default), the whole
nested CV (every repeat, same splits' seeds, same inner search over C; no calibration, which
does not change the classes) rerun on each; p = (1 + #{permuted >= observed}) /
(1 + n_permutations). The null distribution is kept for the report's figure.

**Covariates** (when given, :mod:`ketanode.model.covariates`): a covariates-only baseline
(age, sex, site) and, when asked, the imaging model adjusted for age and sex and/or ComBat
harmonised across sites (:mod:`ketanode.model.harmonise`), every fitted step inside the
folds, on the same outer and inner splits as the imaging model; the paired difference in
balanced accuracy (imaging - baseline) with its bootstrap interval.

**Leave-site-out** (every subject has a site, >= 2 sites): each site in turn is the test
set; C is chosen by the inner CV on the other sites and the (uncalibrated) SVC fitted on
them; classes from the sign of its decision value. Balanced accuracy pooled over sites,
AUC the mean of per-site AUCs, bootstrap intervals as above, and a permutation p-value
(labels shuffled within site, every site model refitted). When some subjects lack a site, or
there is one site, it is not run and the summary says why.

Everything is seeded: the same inputs and seed give the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from scipy.stats import rankdata
from sklearn import config_context
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.svm import _libsvm
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
from ketanode.model.stats import calibration

logger = logging.getLogger(__name__)

F64 = NDArray[np.float64]
I64 = NDArray[np.int_]
METRICS = ("balanced_accuracy", "sensitivity", "specificity", "auc")
CI_METHOD = (
    "95% percentile interval of a stratified bootstrap over subjects of the fixed "
    "out-of-fold predictions (metric = mean over CV repeats; AUC per outer fold, averaged). "
    "Conditional on the fitted fold models: it reflects which subjects were scored, not "
    "refitting on other training samples, so it is narrower than a full interval"
)
EXTERNAL_CI_METHOD = (
    "95% percentile interval of a stratified bootstrap over the subjects of this cohort, "
    "conditional on the fixed model (the model's own training variability is not included)"
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
    n_permutations: int = 1000
    permutation_repeats: int | None = None  # None: every repeat (the headline statistic)
    n_jobs: int = 1
    baseline: bool = True  # covariates-only baseline (when covariates are given)
    adjust: tuple[str, ...] = ()  # covariates regressed out in the adjusted analysis
    harmonise: bool = False  # ComBat across sites in the adjusted analysis
    show_progress: bool = False  # Rich progress bars (permutations) on stderr

    def as_dict(self) -> dict[str, Any]:
        k = self.permutation_repeats or self.repeats
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
            "auc": "per outer fold (one model each), averaged over folds and repeats",
            "n_boot": self.n_boot,
            "n_permutations": self.n_permutations,
            "permutation_repeats": k,
            "permutation_scheme": "labels shuffled within site; whole nested CV rerun",
            "baseline": self.baseline,
            "adjust": list(self.adjust),
            "harmonise": "ComBat across sites, fitted inside the folds" if self.harmonise else None,
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


def _class_metrics(y: NDArray[Any], pred: NDArray[Any]) -> dict[str, F64]:
    """Balanced accuracy, sensitivity, specificity along the last axis (y broadcasts)."""
    pos = y == 1
    neg = ~pos
    sens = ((pred == 1) & pos).sum(axis=-1) / pos.sum(axis=-1)
    spec = ((pred == 0) & neg).sum(axis=-1) / neg.sum(axis=-1)
    return {"balanced_accuracy": (sens + spec) / 2, "sensitivity": sens, "specificity": spec}


def _grouped_auc(y: I64, decision: F64, groups: NDArray[Any], counts: F64) -> F64:
    """Mean over groups (outer folds, or sites) of the within-group AUC, for each row of
    ``counts`` (bootstrap multiplicities of the subjects; ones for the observed value)."""
    aucs = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        pos, neg = idx[y[idx] == 1], idx[y[idx] == 0]
        if len(pos) == 0 or len(neg) == 0:
            continue
        d1, d0 = decision[pos][:, None], decision[neg][None, :]
        h = (d1 > d0) + 0.5 * (d1 == d0)
        wp, wn = counts[:, pos], counts[:, neg]
        num = np.einsum("bi,ij,bj->b", wp, h, wn)
        den = wp.sum(axis=1) * wn.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs.append(np.where(den > 0, num / np.where(den > 0, den, 1), np.nan))
    if not aucs:
        return np.full(counts.shape[0], np.nan)
    with np.errstate(all="ignore"):
        stacked = np.vstack(aucs)
        ok = np.isfinite(stacked)
        return np.asarray(
            np.where(
                ok.any(axis=0), np.nansum(stacked, axis=0) / np.maximum(ok.sum(axis=0), 1), np.nan
            ),
            dtype=np.float64,
        )


def _bootstrap_indices(y: I64, n_boot: int, seed: int, stream: int = 7) -> I64:
    rng = np.random.default_rng([seed, stream])
    pos_idx, neg_idx = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    return np.concatenate(
        [
            pos_idx[rng.integers(0, len(pos_idx), size=(n_boot, len(pos_idx)))],
            neg_idx[rng.integers(0, len(neg_idx), size=(n_boot, len(neg_idx)))],
        ],
        axis=1,
    )


def _counts(idx: I64, n: int) -> F64:
    counts = np.zeros((idx.shape[0], n))
    np.add.at(counts, (np.repeat(np.arange(idx.shape[0]), idx.shape[1]), idx.ravel()), 1.0)
    return counts


def summarise(
    y: I64,
    pred: I64,
    decision: F64,
    n_boot: int,
    seed: int,
    folds: NDArray[Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Mean over repeats (rows of pred/decision) with a bootstrap CI and the repeat SD.

    ``folds`` (same shape): the outer fold of each out-of-fold value; AUC is then the mean of
    per-fold AUCs. Without it (one model, e.g. external validation) AUC is pooled.
    """
    pred2 = np.atleast_2d(pred)
    dec2 = np.atleast_2d(decision)
    n = len(y)
    idx = _bootstrap_indices(y, n_boot, seed)
    per_repeat = _class_metrics(y[None, :], pred2)
    boot = _class_metrics(y[idx][None, :, :], pred2[:, idx])  # (R, B)
    if folds is None:
        per_repeat["auc"] = _auc(np.broadcast_to(y, dec2.shape), dec2)
        boot["auc"] = _auc(np.broadcast_to(y[idx], (len(dec2), *idx.shape)), dec2[:, idx])
    else:
        f2 = np.atleast_2d(folds)
        counts = _counts(idx, n)
        ones = np.ones((1, n))
        per_repeat["auc"] = np.array(
            [_grouped_auc(y, d, f, ones)[0] for d, f in zip(dec2, f2, strict=True)]
        )
        boot["auc"] = np.vstack(
            [_grouped_auc(y, d, f, counts) for d, f in zip(dec2, f2, strict=True)]
        )
    out: dict[str, dict[str, Any]] = {}
    for name in METRICS:
        reps = per_repeat[name]
        b = np.nanmean(boot[name], axis=0) if name == "auc" else boot[name].mean(axis=0)
        lo, hi = np.nanpercentile(b, [2.5, 97.5])
        out[name] = {
            "mean": round(float(reps.mean()), 4),
            "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "repeat_sd": round(float(reps.std(ddof=1)) if len(reps) > 1 else 0.0, 4),
            "repeat_range": [round(float(reps.min()), 4), round(float(reps.max()), 4)],
        }
    return out


def paired_difference(y: I64, pred_a: I64, pred_b: I64, n_boot: int, seed: int) -> dict[str, Any]:
    """Mean balanced accuracy of A minus B (same subjects, same splits) with a paired
    bootstrap interval (the same resamples for both, conditional on the fitted models)."""
    a, b = np.atleast_2d(pred_a), np.atleast_2d(pred_b)
    idx = _bootstrap_indices(y, n_boot, seed, stream=17)
    obs = _ba(y[None, :], a).mean() - _ba(y[None, :], b).mean()
    boot = _ba(y[idx][None], a[:, idx]).mean(axis=0) - _ba(y[idx][None], b[:, idx]).mean(axis=0)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"mean": round(float(obs), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)]}


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
    folds: I64 | None = None  # (repeats, n): outer fold of each out-of-fold value
    permutation_null: F64 | None = None
    calibration: dict[str, Any] | None = None
    covariates: dict[str, Any] | None = None  # baseline, adjusted analyses, comparison

    def summary(self) -> dict[str, Any]:
        values, counts = np.unique(np.asarray(self.chosen_c), return_counts=True)
        out = {
            "protocol": self.protocol.as_dict(),
            "n": int(len(self.y)),
            "metrics": self.metrics,
            "permutation": self.permutation,
            "leave_site_out": self.leave_site_out,
            "chosen_c": {f"{v:g}": int(c) for v, c in zip(values, counts, strict=True)},
            "calibration": self.calibration,
        }
        if self.covariates is not None:
            out["covariates"] = self.covariates
        return out

    def most_chosen_c(self) -> tuple[float, int, int]:
        """The C most outer folds chose (smallest on ties), its count and the fold count."""
        values, counts = np.unique(np.asarray(self.chosen_c), return_counts=True)
        best = int(np.argmax(counts))
        return float(values[best]), int(counts[best]), len(self.chosen_c)


def _linear_svc(a: F64, y: I64, c: float) -> tuple[F64, float]:
    """Weights and offset of ``SVC(kernel="linear", C=c, class_weight="balanced")`` fitted on
    standardised ``a``, from libsvm directly: the same solver and parameters as
    :class:`~sklearn.svm.SVC` (tests check the decision values agree), without its input
    checks, which take ~85 % of the time of a fit this small. Permutation tests refit the
    nested CV thousands of times; the observed run uses the sklearn pipeline itself."""
    counts = np.bincount(y, minlength=2)
    weights = np.array([len(y) / (2 * counts[0]), len(y) / (2 * counts[1])], dtype=np.float64)
    _libsvm.set_verbosity_wrap(0)  # libsvm's default prints every fit (SVC sets it per fit)
    _, sv, _, dual, intercept, *_ = _libsvm.fit(
        np.ascontiguousarray(a, dtype=np.float64),
        y.astype(np.float64),
        svm_type=0,
        kernel="linear",
        C=float(c),
        class_weight=weights,
        sample_weight=np.empty(0),
        tol=1e-3,
        cache_size=200.0,
        shrinking=True,
        probability=0,
        max_iter=-1,
        random_seed=0,
    )
    return -(np.asarray(dual) @ np.asarray(sv)).ravel(), -float(intercept[0])


def _fast_fold(
    template: Pipeline, X: F64, y: I64, p: Protocol, fold_seed: int
) -> tuple[Callable[[F64], F64], float]:
    """C by the inner grid search and the fitted SVC's decision function, as
    :func:`~ketanode.model.classifier.select_c` and the pipeline would give them, with the
    SVC fitted by :func:`_linear_svc`."""
    c = select_c(template, X, y, p.c_grid, p.inner_folds, fold_seed, fit_linear=_linear_svc)
    pre = Pipeline(template.steps[:-2])
    fitted = clone(pre).fit(X, y)
    a = fitted.transform(X)
    mu, sd = a.mean(axis=0), a.std(axis=0)
    sd[sd == 0] = 1.0
    w, off = _linear_svc((a - mu) / sd, y, c)

    def decision(Z: F64) -> F64:
        return np.asarray(((fitted.transform(Z) - mu) / sd) @ w + off, dtype=np.float64)

    return decision, c


def _outer_fold(
    X: F64,
    y: I64,
    train: I64,
    test: I64,
    template: Pipeline,
    p: Protocol,
    fold_seed: int,
    with_probability: bool,
    fast: bool = False,
) -> tuple[I64, F64, F64, float]:
    if fast:
        decide, c = _fast_fold(template, X[train], y[train], p, fold_seed)
        return test, decide(X[test]), np.full(len(test), np.nan), c
    pipe = clone(template)
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
    template: Pipeline,
    p: Protocol,
    repeats: int,
    with_probability: bool,
    n_jobs: int,
    fast: bool = False,
) -> tuple[F64, F64, list[float], I64]:
    n = len(y)
    tasks = []
    for r in range(repeats):
        outer = StratifiedKFold(p.folds, shuffle=True, random_state=p.seed + r)
        for k, (train, test) in enumerate(outer.split(X, y)):
            tasks.append((r, k, train, test, (p.seed + r) * 100 + k))
    run = delayed(_outer_fold)
    results = Parallel(n_jobs=n_jobs)(
        run(X, y, tr, te, template, p, fs, with_probability, fast) for _, _, tr, te, fs in tasks
    )
    decision = np.zeros((repeats, n))
    proba = np.zeros((repeats, n))
    folds = np.zeros((repeats, n), dtype=np.int_)
    chosen: list[float] = []
    for (r, k, *_), (test, d, pr, c) in zip(tasks, results, strict=True):
        decision[r, test] = d
        proba[r, test] = pr
        folds[r, test] = k
        chosen.append(c)
    return decision, proba, chosen, folds


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
    sites: Sequence[str | None] | None = None,
    covariates: tuple[Sequence[str], F64] | None = None,
    site_problem: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> CVResult:
    """Repeated stratified nested CV, bootstrap CIs, permutation test (within site),
    covariate analyses, leave-site-out.

    ``sites``: one per subject (``None`` where unknown); leave-site-out runs only when every
    subject has one and there are >= 2 (else ``site_problem``, or a reason made here, is
    recorded). ``covariates``: names and columns (NaN = missing) as
    :meth:`ketanode.model.cohort.FeatureTable.covariates` gives them.
    """
    p = protocol or Protocol()
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int_)
    _check_labels(y, p.folds)
    if not np.all(np.isfinite(X)):
        raise ValueError("features have missing or non-finite values")
    if sites is not None and len(sites) != len(y):
        raise ValueError(f"{len(sites)} sites for {len(y)} subjects")
    # inputs are checked above once; sklearn's per-fit checks dominate the run time otherwise
    with config_context(assume_finite=True, skip_parameter_validation=True):
        return _nested_cv(X, y, feature_names, p, inputs, sites, covariates, site_problem, progress)


def _strata(sites: Sequence[str | None] | None, n: int) -> list[I64]:
    if sites is None:
        return [np.arange(n)]
    keys = ["" if s is None else str(s) for s in sites]
    return [np.flatnonzero(np.asarray(keys) == k) for k in sorted(set(keys))]


def permute_within(y: I64, strata: list[I64], rng: np.random.Generator) -> I64:
    """``y`` with its labels shuffled inside each stratum (site)."""
    out = y.copy()
    for idx in strata:
        out[idx] = y[rng.permutation(idx)]
    return out


def _permutation_null(
    fn: Callable[..., float],
    args: Callable[[I64], tuple[Any, ...]],
    y: I64,
    strata: list[I64],
    p: Protocol,
    stream: int,
    label: str,
) -> F64:
    """``fn(*args(y_perm))`` for ``p.n_permutations`` label permutations within ``strata``
    (seeded by ``p.seed`` and ``stream``), with a progress bar."""
    rng = np.random.default_rng([p.seed, stream])
    perms = [permute_within(y, strata, rng) for _ in range(p.n_permutations)]
    with config_context(assume_finite=True, skip_parameter_validation=True):
        return _progress_map(fn, (args(yp) for yp in perms), len(perms), label, p)


def permutation_p(null: F64, observed: float) -> float:
    """(k + 1) / (n + 1): k of the n null statistics at least the observed one."""
    return (1 + int(np.sum(null >= observed - 1e-12))) / (1 + len(null))


def _progress_map(
    fn: Callable[..., float],
    args: Iterable[tuple[Any, ...]],
    total: int,
    label: str,
    p: Protocol,
) -> F64:
    """Run ``fn(*a)`` for each ``a`` (joblib, in order), with a Rich progress bar."""
    run = delayed(fn)
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    out: list[float] = []
    with Progress(
        *columns, console=Console(stderr=True), transient=True, disable=not p.show_progress
    ) as bar:
        task = bar.add_task(label, total=total)
        for value in Parallel(n_jobs=p.n_jobs, return_as="generator")(run(*a) for a in args):
            out.append(float(value))
            bar.advance(task)
    return np.asarray(out, dtype=np.float64)


def _nested_cv(
    X: F64,
    y: I64,
    feature_names: Sequence[str],
    p: Protocol,
    inputs: Sequence[str] | None,
    sites: Sequence[str | None] | None,
    covariates: tuple[Sequence[str], F64] | None,
    site_problem: str | None,
    progress: Callable[[str], None] | None,
) -> CVResult:
    used = list(inputs) if inputs is not None else default_inputs(feature_names)
    template = build_pipeline(feature_names, used, p.tiv)
    say = progress or (lambda _msg: None)
    say(f"nested CV: {p.repeats} x {p.folds}-fold")
    decision, proba, chosen, folds = _run_repeats(X, y, template, p, p.repeats, True, p.n_jobs)
    pred = (decision >= 0).astype(np.int_)
    result = CVResult(p, y, decision, proba, pred, chosen, folds=folds)
    result.metrics = summarise(y, pred, decision, p.n_boot, p.seed, folds)
    result.calibration = _oof_calibration(y, proba)
    logger.info(
        "nested CV on %d subjects: balanced accuracy %.3f",
        len(y),
        result.metrics["balanced_accuracy"]["mean"],
    )
    strata = _strata(sites, len(y))
    if p.n_permutations > 0:
        say(f"permutation test: {p.n_permutations} permutations (within site)")
        result.permutation, result.permutation_null = permutation_test(
            X, y, template, p, pred, strata
        )
    if covariates is not None:
        say("covariates: baseline and adjusted analyses")
        result.covariates = covariate_analyses(X, y, feature_names, used, covariates, p, pred)
    problem = site_problem or _site_problem(sites)
    if problem is None and sites is not None:
        say("leave-site-out")
        result.leave_site_out = leave_site_out(X, y, template, [str(s) for s in sites], p)
    else:
        logger.warning("leave-site-out: %s", problem)
        result.leave_site_out = {"skipped": problem}
    return result


def _site_problem(sites: Sequence[str | None] | None) -> str | None:
    if sites is None:
        return "no sites given: leave-site-out not run"
    missing = sum(1 for s in sites if not s)
    if missing:
        return (
            f"{missing} of {len(sites)} subjects have no site: leave-site-out not run "
            "(give every subject a site)"
        )
    if len(set(sites)) < 2:
        return "one site only: leave-site-out not run"
    return None


def _oof_calibration(y: I64, proba: F64) -> dict[str, Any]:
    """Brier score, calibration intercept and slope of the out-of-fold probabilities (each
    the mean over repeats)."""
    rows = [calibration(y, row) for row in np.atleast_2d(proba)]
    keys = ("brier", "brier_of_base_rate", "intercept", "slope")
    out: dict[str, Any] = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = round(float(np.mean(vals)), 4) if vals else None
    out["method"] = "out-of-fold calibrated probabilities, mean over repeats; " + str(
        rows[0].get("method")
    )
    return out


def _ba(y: NDArray[Any], pred: NDArray[Any]) -> F64:
    """Balanced accuracy along the last axis (y broadcasts against pred)."""
    pos = y == 1
    sens = ((pred == 1) & pos).sum(axis=-1) / pos.sum(axis=-1)
    spec = ((pred == 0) & ~pos).sum(axis=-1) / (~pos).sum(axis=-1)
    return np.asarray((sens + spec) / 2, dtype=np.float64)


def _permuted_statistic(X: F64, y: I64, template: Pipeline, p: Protocol, repeats: int) -> float:
    decision, _, _, _ = _run_repeats(X, y, template, p, repeats, False, 1, fast=True)
    return float(_ba(y[None, :], (decision >= 0).astype(np.int_)).mean())


def permutation_test(
    X: F64,
    y: I64,
    template: Pipeline,
    p: Protocol,
    observed_pred: I64,
    strata: list[I64] | None = None,
) -> tuple[dict[str, Any], F64]:
    """Labels permuted within site, the nested CV rerun (see the module docstring)."""
    k = min(p.permutation_repeats or observed_pred.shape[0], observed_pred.shape[0])
    observed = float(_ba(y[None, :], observed_pred[:k]).mean())
    strata = strata if strata is not None else [np.arange(len(y))]
    null = _permutation_null(
        _permuted_statistic, lambda yp: (X, yp, template, p, k), y, strata, p, 11, "permutations"
    )
    p_value = permutation_p(null, observed)
    headline = k == observed_pred.shape[0]
    return {
        "n_permutations": int(len(null)),
        "statistic": f"mean balanced accuracy over {k} nested-CV repeat(s)"
        + (" (the headline statistic)" if headline else " (NOT the headline: fewer repeats)"),
        "shuffled": "within site" if len(strata) > 1 else "across all subjects (one site)",
        "observed": round(observed, 4),
        "null_mean": round(float(null.mean()), 4),
        "null_95th_percentile": round(float(np.percentile(null, 95)), 4),
        "p_value": round(p_value, 4),
        "p_value_floor": round(1 / (1 + len(null)), 4),
    }, null


def covariate_analyses(
    X: F64,
    y: I64,
    feature_names: Sequence[str],
    inputs: Sequence[str],
    covariates: tuple[Sequence[str], F64],
    p: Protocol,
    imaging_pred: I64,
) -> dict[str, Any]:
    """Covariates-only baseline and the adjusted imaging model, same splits (module doc)."""
    from ketanode.model.covariates import (
        adjusted_pipeline,
        baseline_pipeline,
        comparison_text,
        usable,
    )

    cov_names, cov = list(covariates[0]), np.asarray(covariates[1], dtype=np.float64)
    names = [*feature_names, *cov_names]
    Xc = np.hstack([X, cov])
    numeric, with_site, why = usable(cov_names, cov)
    out: dict[str, Any] = {}
    if p.baseline:
        used_cov = numeric + (["site"] if with_site else [])
        if not used_cov:
            out["baseline"] = {"skipped": why or "no covariates given"}
        else:
            template = baseline_pipeline(names, numeric, with_site)
            dec, _, chosen, folds = _run_repeats(Xc, y, template, p, p.repeats, False, p.n_jobs)
            pred = (dec >= 0).astype(np.int_)
            diff = paired_difference(y, imaging_pred, pred, p.n_boot, p.seed)
            out["baseline"] = {
                "covariates": used_cov,
                "model": "the same linear SVC (C by inner CV) on the covariates only",
                "metrics": summarise(y, pred, dec, p.n_boot, p.seed, folds),
                "difference_in_balanced_accuracy": diff,
                "verdict": comparison_text(diff, used_cov),
                **({"not_used": why} if why else {}),
            }
    if p.adjust or p.harmonise:
        missing = [c for c in p.adjust if c not in numeric]
        if missing:
            out["adjusted"] = {"skipped": f"not every subject has {missing}"}
        elif p.harmonise and not with_site:
            out["adjusted"] = {"skipped": "ComBat needs every subject's site and >= 2 sites"}
        else:
            template = adjusted_pipeline(names, p.tiv, p.adjust, p.harmonise, inputs, keep=numeric)
            dec, _, _, folds = _run_repeats(Xc, y, template, p, p.repeats, False, p.n_jobs)
            pred = (dec >= 0).astype(np.int_)
            kept = f" ({', '.join(numeric)} kept)" if numeric else ""
            steps = ([f"ComBat across sites{kept}"] if p.harmonise else []) + (
                [f"{', '.join(p.adjust)} regressed out of each input"] if p.adjust else []
            )
            out["adjusted"] = {
                "steps": steps,
                "fitted": "inside every inner and outer training fold",
                "metrics": summarise(y, pred, dec, p.n_boot, p.seed, folds),
                "difference_from_unadjusted": paired_difference(
                    y, pred, imaging_pred, p.n_boot, p.seed
                ),
                "note": "a sensitivity analysis: the saved model is the unadjusted one",
            }
    return out


def leave_site_out(
    X: F64,
    y: I64,
    template: Pipeline,
    sites: list[str],
    p: Protocol,
) -> dict[str, Any]:
    """Each site held out in turn; C by inner CV and the SVC fitted on the others (no
    calibration: classes from the sign of the decision value). CI and permutation p-value."""
    site_arr = np.asarray(sites)
    decision, skipped, per_site = _lso_decisions(X, y, template, site_arr, p, with_info=True)
    ok = np.isfinite(decision)
    yk, dk, sk = y[ok], decision[ok], site_arr[ok]
    predk = (dk >= 0).astype(np.int_)
    pooled: dict[str, Any] = {}
    if ok.any() and len(np.unique(yk)) == 2:
        idx = _bootstrap_indices(yk, p.n_boot, p.seed, stream=19)
        ba = float(_ba(yk, predk))
        boot_ba = _ba(yk[idx], predk[idx])
        site_codes = np.unique(sk, return_inverse=True)[1]
        auc = float(_grouped_auc(yk, dk, site_codes, np.ones((1, len(yk))))[0])
        boot_auc = _grouped_auc(yk, dk, site_codes, _counts(idx, len(yk)))
        m = binary_metrics(yk, predk, dk)
        pooled = {
            "balanced_accuracy": round(ba, 4),
            "balanced_accuracy_ci95": [
                round(float(v), 4) for v in np.percentile(boot_ba, [2.5, 97.5])
            ],
            "sensitivity": None if m["sensitivity"] is None else round(m["sensitivity"], 4),
            "specificity": None if m["specificity"] is None else round(m["specificity"], 4),
            "auc": round(auc, 4) if np.isfinite(auc) else None,
            "auc_ci95": [round(float(v), 4) for v in np.nanpercentile(boot_auc, [2.5, 97.5])]
            if np.isfinite(boot_auc).any()
            else None,
            "auc_method": "mean of per-site AUCs (one model per site)",
            "ci_method": "95% percentile interval of a stratified bootstrap over subjects, "
            "conditional on the fitted site models",
        }
        if p.n_permutations > 0:
            strata = _strata(sites, len(y))
            null = _permutation_null(
                _lso_statistic,
                lambda yp: (X, yp, template, site_arr, p),
                y,
                strata,
                p,
                23,
                "leave-site-out permutations",
            )
            finite = null[np.isfinite(null)]
            pooled["permutation"] = {
                "n_permutations": int(len(finite)),
                "statistic": "pooled balanced accuracy of the site-held-out models",
                "shuffled": "within site; every site model refitted",
                "p_value": round(permutation_p(finite, ba), 4),
            }
    return {"sites": per_site, "pooled": pooled, "skipped_sites": skipped}


def _lso_decisions(
    X: F64,
    y: I64,
    template: Pipeline,
    site_arr: NDArray[Any],
    p: Protocol,
    with_info: bool = False,
    fast: bool = False,
) -> tuple[F64, list[str], dict[str, Any]]:
    decision = np.full(len(y), np.nan)
    per_site: dict[str, Any] = {}
    skipped: list[str] = []
    for k, site in enumerate(sorted(set(site_arr.tolist()))):
        test = np.flatnonzero(site_arr == site)
        train = np.flatnonzero(site_arr != site)
        if min(np.bincount(y[train], minlength=2)) < 2:
            skipped.append(site)
            per_site[site] = {"n": int(len(test)), "skipped": "training sites lack a class"}
            continue
        _, d, _, c = _outer_fold(X, y, train, test, template, p, p.seed + k, False, fast)
        decision[test] = d
        if with_info:
            m = binary_metrics(y[test], (d >= 0).astype(np.int_), d)
            per_site[site] = {
                "n": int(len(test)),
                "responders": int(y[test].sum()),
                "C": c,
                **{key: None if v is None else round(v, 4) for key, v in m.items()},
            }
    return decision, skipped, per_site


def _lso_statistic(
    X: F64, y: I64, template: Pipeline, site_arr: NDArray[Any], p: Protocol
) -> float:
    decision, _, _ = _lso_decisions(X, y, template, site_arr, p, fast=True)
    ok = np.isfinite(decision)
    if not ok.any() or len(np.unique(y[ok])) < 2:
        return float("nan")
    return float(_ba(y[ok], (decision[ok] >= 0).astype(np.int_)))


def external_validation(
    y: I64,
    decision: F64,
    n_boot: int = 2000,
    n_permutations: int = 10000,
    seed: int = 0,
    proba: F64 | None = None,
) -> dict[str, Any]:
    """Metrics of a fixed model on a new cohort: bootstrap CIs, label-permutation p-value,
    and (with ``proba``) calibration: Brier score, intercept and slope."""
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
    out: dict[str, Any] = {
        "n": int(len(y)),
        "metrics": metrics,
        "ci_method": EXTERNAL_CI_METHOD,
        "permutation": {
            "n_permutations": n_permutations,
            "statistic": "balanced accuracy of the fixed model's predictions",
            "observed": round(observed, 4),
            "p_value": round(permutation_p(null, observed), 4),
        },
    }
    if proba is not None:
        out["calibration"] = calibration(y, proba)
    return out
