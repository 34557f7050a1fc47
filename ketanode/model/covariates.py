"""Covariates (age, sex, site): the table by class, a covariates-only baseline model and
adjustment of the imaging inputs, each fitted inside the cross-validation folds.

Grey-matter volume tracks age (and sex, and scanner): an imaging model could be an age
proxy. Three analyses answer that, all on the *same* outer and inner splits as the imaging
model (:mod:`ketanode.model.validation`):

- **Covariates by class** (:func:`by_class`): age (mean, SD; Welch t-test), sex and site
  counts (chi-squared test) of responders and non-responders.
- **Covariates-only baseline** (:func:`baseline_pipeline`): the same linear SVC (class
  weights, StandardScaler, C chosen by the inner CV) on age, sex (1 = F) and site
  (one-hot, levels learnt from the training subjects). The report compares the two
  (:func:`comparison_text`): the imaging model is only credited with more than the
  covariates when the bootstrap interval of the paired difference in balanced accuracy lies
  above 0.
- **Adjusted imaging model** (:func:`adjusted_pipeline`, optional, a sensitivity analysis):
  :class:`CovariateResidualiser` regresses age and sex out of every model input (on the
  scale the model sees: proportions of TIV by default) with a straight line fitted on the
  training subjects of each fold, optionally after :class:`~ketanode.model.harmonise.ComBat`
  across sites. The saved model itself stays the unadjusted imaging model: a scan arriving
  at the node has no site the model knows and its covariates are not part of the feature
  spec, so the adjusted variants are reported, not deployed.

Covariate columns come after the spec's features in X
(:meth:`ketanode.model.cohort.FeatureTable.with_covariates`); the pipeline's TIV step picks
the imaging inputs by name, so it ignores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import chi2_contingency, ttest_ind
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from ketanode.model.classifier import build_pipeline, default_inputs
from ketanode.model.harmonise import ComBat, from_model_scale, to_model_scale

F64 = NDArray[np.float64]


class CovariateResidualiser(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """Regress ``covariates`` out of every input (line fitted on the training subjects);
    the inputs keep their training mean. Returns the whole row, inputs replaced."""

    def __init__(
        self,
        feature_names: Sequence[str] = (),
        inputs: Sequence[str] = (),
        covariates: Sequence[str] = ("age", "sex"),
        tiv_mode: str = "proportion",
        tiv_name: str = "tiv",
    ) -> None:
        self.feature_names = feature_names
        self.inputs = inputs
        self.covariates = covariates
        self.tiv_mode = tiv_mode
        self.tiv_name = tiv_name

    def _cov(self, x: F64) -> F64:
        names = list(self.feature_names)
        cov = x[:, [names.index(c) for c in self.covariates]]
        if not np.all(np.isfinite(cov)):
            raise ValueError(f"adjustment needs {list(self.covariates)} for every subject")
        return np.asarray(cov, dtype=np.float64)

    def fit(self, X: Any, y: Any = None) -> CovariateResidualiser:
        x = np.asarray(X, dtype=np.float64)
        values, _, _ = to_model_scale(
            x, self.feature_names, self.inputs, self.tiv_mode, self.tiv_name
        )
        cov = self._cov(x)
        self.cov_mean_ = cov.mean(axis=0)
        design = np.column_stack([np.ones(len(x)), cov - self.cov_mean_])
        coef, *_ = np.linalg.lstsq(design, values, rcond=None)
        self.slopes_ = np.asarray(coef[1:], dtype=np.float64)
        self.n_features_in_ = x.shape[1]
        return self

    def transform(self, X: Any) -> F64:
        x = np.asarray(X, dtype=np.float64)
        values, tiv, cols = to_model_scale(
            x, self.feature_names, self.inputs, self.tiv_mode, self.tiv_name
        )
        adj = values - (self._cov(x) - self.cov_mean_) @ self.slopes_
        return from_model_scale(x, adj, tiv, cols, self.tiv_mode)


class CovariateSelect(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """The baseline's inputs: numeric covariates as they are, ``site`` one-hot (the levels
    of the training subjects but the first; an unknown site is all zeros)."""

    def __init__(
        self,
        feature_names: Sequence[str] = (),
        covariates: Sequence[str] = ("age", "sex"),
        site_name: str | None = "site",
    ) -> None:
        self.feature_names = feature_names
        self.covariates = covariates
        self.site_name = site_name

    def fit(self, X: Any, y: Any = None) -> CovariateSelect:
        x = np.asarray(X, dtype=np.float64)
        names = list(self.feature_names)
        self.levels_ = (
            np.unique(x[:, names.index(self.site_name)])[1:] if self.site_name else np.array([])
        )
        self.n_features_in_ = x.shape[1]
        return self

    def transform(self, X: Any) -> F64:
        x = np.asarray(X, dtype=np.float64)
        names = list(self.feature_names)
        parts = [x[:, [names.index(c) for c in self.covariates]]]
        if self.site_name:
            site = x[:, names.index(self.site_name)]
            parts.append((site[:, None] == self.levels_[None, :]).astype(float))
        return np.asarray(np.hstack(parts), dtype=np.float64)


def baseline_pipeline(
    feature_names: Sequence[str], covariates: Sequence[str], with_site: bool
) -> Pipeline:
    """Covariates -> StandardScaler -> linear SVC with balanced class weights."""
    return Pipeline(
        [
            (
                "covariates",
                CovariateSelect(
                    tuple(feature_names), tuple(covariates), "site" if with_site else None
                ),
            ),
            ("scale", StandardScaler()),
            ("svc", SVC(kernel="linear", C=1.0, class_weight="balanced")),
        ]
    )


def adjusted_pipeline(
    feature_names: Sequence[str],
    tiv: str,
    adjust: Sequence[str] = ("age", "sex"),
    harmonise: bool = False,
    inputs: Sequence[str] | None = None,
    keep: Sequence[str] | None = None,
) -> Pipeline:
    """[ComBat across sites, ``keep`` (default ``adjust``) protected as biological effects
    ->] residualise ``adjust`` -> the imaging pipeline."""
    names = tuple(feature_names)
    used = tuple(inputs) if inputs is not None else tuple(default_inputs(names))
    protected = tuple(adjust if keep is None else keep)
    steps: list[tuple[str, Any]] = []
    if harmonise:
        steps.append(("harmonise", ComBat(names, used, "site", protected, tiv)))
    if adjust:
        steps.append(("adjust", CovariateResidualiser(names, used, tuple(adjust), tiv)))
    return Pipeline([*steps, *build_pipeline(names, used, tiv).steps])


def usable(names: Sequence[str], cov: F64) -> tuple[list[str], bool, str | None]:
    """The numeric covariates every subject has, whether site can be used, and why not."""
    numeric = [c for c in ("age", "sex") if np.all(np.isfinite(cov[:, list(names).index(c)]))]
    site = cov[:, list(names).index("site")]
    with_site = bool(np.all(np.isfinite(site)) and len(np.unique(site)) >= 2)
    missing = [c for c in ("age", "sex") if c not in numeric]
    why = f"not every subject has {' and '.join(missing)} (sex F or M)" if missing else None
    return numeric, with_site, why


def by_class(
    y: NDArray[Any],
    ages: Sequence[float | None],
    sexes: Sequence[str | None],
    sites: Sequence[str | None],
    arms: Sequence[str | None] = (),
) -> dict[str, Any]:
    """Covariates of responders and non-responders, with tests of the difference."""
    y = np.asarray(y)
    out: dict[str, Any] = {}
    age = np.array([np.nan if a is None else a for a in ages], dtype=float)
    if np.isfinite(age).any():
        row: dict[str, Any] = {}
        for k, name in ((1, "responders"), (0, "non_responders")):
            a = age[(y == k) & np.isfinite(age)]
            row[name] = (
                f"{a.mean():.1f} ({a.std(ddof=1):.1f}), n={len(a)}" if len(a) > 1 else f"n={len(a)}"
            )
        a1, a0 = age[(y == 1) & np.isfinite(age)], age[(y == 0) & np.isfinite(age)]
        if len(a1) > 1 and len(a0) > 1:
            row["p_value"] = float(f"{ttest_ind(a1, a0, equal_var=False).pvalue:.3g}")
            row["test"] = "Welch t-test"
        out["age, mean (SD)"] = row
    for label, values in (("sex", sexes), ("site", sites), ("arm", arms)):
        if not any(values):
            continue
        levels = sorted({v for v in values if v})
        counts = np.array(
            [
                [
                    sum(1 for v, t in zip(values, y, strict=True) if v == lv and t == k)
                    for lv in levels
                ]
                for k in (1, 0)
            ]
        )
        row = {
            "responders": ", ".join(f"{lv}: {c}" for lv, c in zip(levels, counts[0], strict=True)),
            "non_responders": ", ".join(
                f"{lv}: {c}" for lv, c in zip(levels, counts[1], strict=True)
            ),
        }
        if len(levels) > 1 and counts.sum(axis=1).min() > 0:
            row["p_value"] = float(f"{chi2_contingency(counts)[1]:.3g}")
            row["test"] = "chi-squared"
        out[label] = row
    return out


def comparison_text(diff: dict[str, Any], covariates: Sequence[str]) -> str:
    """The sentence the report prints about imaging model versus covariates-only baseline."""
    what = ", ".join(covariates)
    lo, hi = diff["ci95"]
    d = diff["mean"]
    if lo > 0:
        return (
            f"The imaging model does better than the covariates alone ({what}): balanced "
            f"accuracy {d:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}, paired over the same splits)."
        )
    return (
        f"The imaging model does NO better than the covariates alone ({what}): balanced "
        f"accuracy difference {d:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}, paired over the same "
        "splits). It may be a proxy for them."
    )
