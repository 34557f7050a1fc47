"""ComBat site harmonisation as a scikit-learn transformer, fitted inside the CV folds.

ComBat (Johnson, Li and Rabinovic 2007, Biostatistics 8:118; for imaging features Fortin et
al. 2018, NeuroImage 167:104) removes additive and multiplicative site effects from each
feature, with empirical-Bayes shrinkage of the per-site estimates across features, while
keeping the effects of biological covariates (here age and sex) in the data:

1. on the training subjects, each feature is regressed on site indicators and the
   covariates; the grand mean (site means weighted by site size), the covariate effects and
   the pooled residual variance are kept;
2. standardised data ``z = (x - grand mean - covariate effects) / pooled SD``; per site the
   mean ``gamma`` and variance ``delta`` of ``z`` are estimated, then shrunk towards their
   across-feature priors (normal for gamma, inverse gamma for delta; parametric EB,
   iterated to convergence as in the reference implementation);
3. ``transform``: ``x* = (z - gamma*_site) / sqrt(delta*_site) * pooled SD + grand mean +
   covariate effects``, with the *training* estimates, so a test fold is harmonised by the
   parameters of its training folds only. A site absent from the training subjects is left
   unadjusted (standardised and put back), which is said in the report's protocol text.

Why not a package: ``neuroHarmonize`` 2.5 requires numpy < 2 (installing it would downgrade
numpy 2.3 to 1.26 and add pandas), and ``neuroCombat`` 0.2.12 (2021, an sdist) needs pandas
(not a ketanode dependency) and has no fit/transform split to apply training estimates to a
test fold without refitting. The method is short; this module follows neuroCombat's
parametric path, and its unit test checks the site effect is removed and covariate effects
kept.

The transformer works on the whole feature row (spec features plus covariate columns, see
:meth:`ketanode.model.cohort.FeatureTable.with_covariates`) and returns it with the model's
inputs harmonised. With TIV as proportion, the proportions (input / TIV) are harmonised and
multiplied back by TIV, so the pipeline's TIV step then sees harmonised proportions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.base import BaseEstimator, TransformerMixin

F64 = NDArray[np.float64]


def to_model_scale(
    x: F64, names: Sequence[str], inputs: Sequence[str], tiv_mode: str, tiv_name: str = "tiv"
) -> tuple[F64, F64, list[int]]:
    """The inputs on the scale the model sees (proportions of TIV, or volumes), TIV and the
    input column indices."""
    cols = [list(names).index(f) for f in inputs]
    tiv = x[:, list(names).index(tiv_name)]
    values = x[:, cols]
    if tiv_mode == "proportion":
        values = values / tiv[:, None]
    return np.asarray(values, dtype=np.float64), tiv, cols


def from_model_scale(x: F64, values: F64, tiv: F64, cols: list[int], tiv_mode: str) -> F64:
    out = np.array(x, dtype=np.float64, copy=True)
    out[:, cols] = values * tiv[:, None] if tiv_mode == "proportion" else values
    return out


class ComBat(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """ComBat harmonisation of ``inputs`` across the ``site`` column (see the module)."""

    def __init__(
        self,
        feature_names: Sequence[str] = (),
        inputs: Sequence[str] = (),
        site_name: str = "site",
        covariates: Sequence[str] = ("age", "sex"),
        tiv_mode: str = "proportion",
        tiv_name: str = "tiv",
    ) -> None:
        self.feature_names = feature_names
        self.inputs = inputs
        self.site_name = site_name
        self.covariates = covariates
        self.tiv_mode = tiv_mode
        self.tiv_name = tiv_name

    def _parts(self, X: Any) -> tuple[F64, F64, F64, list[int], NDArray[Any], F64]:
        x = np.asarray(X, dtype=np.float64)
        names = list(self.feature_names)
        values, tiv, cols = to_model_scale(x, names, self.inputs, self.tiv_mode, self.tiv_name)
        site = x[:, names.index(self.site_name)]
        cov = x[:, [names.index(c) for c in self.covariates]] if self.covariates else None
        if not np.all(np.isfinite(site)) or (cov is not None and not np.all(np.isfinite(cov))):
            raise ValueError("ComBat needs a site and every covariate for each subject")
        covs = np.zeros((len(x), 0)) if cov is None else cov
        return x, values, tiv, cols, site, covs

    def fit(self, X: Any, y: Any = None) -> ComBat:
        _, values, _, _, site, cov = self._parts(X)
        n, p = values.shape
        self.sites_ = np.unique(site)
        onehot = (site[:, None] == self.sites_[None, :]).astype(float)
        self.cov_mean_ = cov.mean(axis=0)
        cc = cov - self.cov_mean_
        design = np.hstack([onehot, cc])
        beta, *_ = np.linalg.lstsq(design, values, rcond=None)
        k = len(self.sites_)
        weights = onehot.sum(axis=0) / n
        self.grand_mean_ = weights @ beta[:k]
        self.cov_beta_ = beta[k:]
        resid = values - design @ beta
        self.var_pooled_ = np.maximum(np.mean(resid**2, axis=0), 1e-12)
        z = (values - self.grand_mean_ - cc @ self.cov_beta_) / np.sqrt(self.var_pooled_)
        gamma_hat = np.zeros((k, p))
        delta_hat = np.ones((k, p))
        for b in range(k):
            zb = z[onehot[:, b] == 1]
            gamma_hat[b] = zb.mean(axis=0)
            if len(zb) > 1:
                delta_hat[b] = np.maximum(zb.var(axis=0, ddof=1), 1e-8)
        self.gamma_, self.delta_ = gamma_hat.copy(), delta_hat.copy()
        if p > 1:
            for b in range(k):
                nb = int(onehot[:, b].sum())
                if nb < 2:
                    continue
                self.gamma_[b], self.delta_[b] = _eb_shrink(
                    z[onehot[:, b] == 1], gamma_hat[b], delta_hat[b]
                )
        self.n_features_in_ = values.shape[1]
        return self

    def transform(self, X: Any) -> F64:
        x, values, tiv, cols, site, cov = self._parts(X)
        z = (values - self.grand_mean_ - (cov - self.cov_mean_) @ self.cov_beta_) / np.sqrt(
            self.var_pooled_
        )
        for b, s in enumerate(self.sites_):
            rows = site == s
            z[rows] = (z[rows] - self.gamma_[b]) / np.sqrt(self.delta_[b])
        adj = (
            z * np.sqrt(self.var_pooled_)
            + self.grand_mean_
            + (cov - self.cov_mean_) @ self.cov_beta_
        )
        return from_model_scale(x, adj, tiv, cols, self.tiv_mode)


def _eb_shrink(zb: F64, g_hat: F64, d_hat: F64, tol: float = 1e-4) -> tuple[F64, F64]:
    """Parametric empirical-Bayes estimates of one site's gamma and delta (ComBat)."""
    n = zb.shape[0]
    g_bar = float(g_hat.mean())
    t2 = float(g_hat.var(ddof=1)) if len(g_hat) > 1 else 1.0
    t2 = max(t2, 1e-12)
    m = float(d_hat.mean())
    s2 = float(d_hat.var(ddof=1)) if len(d_hat) > 1 else 0.0
    if s2 <= 1e-12:  # no spread to shrink with: keep the per-feature estimates
        return g_hat, d_hat
    a = (2 * s2 + m**2) / s2
    b = (m * s2 + m**3) / s2
    g_old, d_old = g_hat.copy(), d_hat.copy()
    for _ in range(1000):
        g_new = (n * t2 * g_hat + d_old * g_bar) / (n * t2 + d_old)
        sum2 = ((zb - g_new) ** 2).sum(axis=0)
        d_new = (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)
        change = max(
            float(np.max(np.abs(g_new - g_old) / np.maximum(np.abs(g_old), 1e-12))),
            float(np.max(np.abs(d_new - d_old) / np.maximum(np.abs(d_old), 1e-12))),
        )
        g_old, d_old = g_new, d_new
        if change < tol:
            break
    return g_old, d_old
