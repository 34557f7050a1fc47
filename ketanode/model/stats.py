"""Small statistics the validation needs: unpenalised logistic regression with a
likelihood-ratio test, and calibration of probabilities (Brier score, intercept, slope).

Logistic regression is fitted by Newton-Raphson (iteratively reweighted least squares) with
step halving, in numpy, so that it is deterministic and needs no extra dependency
(statsmodels is present only as a dependency of antspyx; the unit tests compare the two).
Under (quasi-)separation the coefficients grow without bound while the log-likelihood
converges; likelihood-ratio tests stay valid then, and the fit says ``separation: true``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import chi2

F64 = NDArray[np.float64]
_EPS = 1e-12


@dataclass
class LogitFit:
    coef: F64
    loglik: float
    converged: bool
    separation: bool


def _loglik(eta: F64, y: F64) -> float:
    # sum y*eta - log(1 + exp(eta)), stable
    return float(np.sum(y * eta - np.logaddexp(0.0, eta)))


def logistic_fit(
    X: F64, y: NDArray[Any], offset: F64 | None = None, max_iter: int = 100
) -> LogitFit:
    """Maximum-likelihood logistic regression of ``y`` (0/1) on the columns of ``X`` (give
    the intercept column yourself), with an optional fixed ``offset`` in the linear part."""
    X = np.asarray(X, dtype=np.float64)
    yy = np.asarray(y, dtype=np.float64)
    off = np.zeros(len(yy)) if offset is None else np.asarray(offset, dtype=np.float64)
    beta = np.zeros(X.shape[1])
    ll = _loglik(X @ beta + off, yy)
    converged = False
    for _ in range(max_iter):
        eta = X @ beta + off
        p = 1.0 / (1.0 + np.exp(-eta))
        w = np.clip(p * (1 - p), 1e-10, None)
        grad = X.T @ (yy - p)
        hess = X.T @ (X * w[:, None]) + 1e-9 * np.eye(X.shape[1])
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:
            new = beta + t * step
            new_ll = _loglik(X @ new + off, yy)
            if new_ll >= ll - 1e-10 or t < 1e-6:
                break
            t /= 2
        gain = new_ll - ll
        beta, ll = new, new_ll
        if abs(gain) < 1e-10 and np.max(np.abs(t * step)) < 1e-6:
            converged = True
            break
        if abs(gain) < 1e-12:
            converged = True
            break
    separation = bool(np.max(np.abs(beta), initial=0.0) > 15)
    return LogitFit(beta, ll, converged, separation)


def likelihood_ratio_test(full: LogitFit, reduced: LogitFit, df: int = 1) -> float:
    """p-value of the likelihood-ratio test of nested logistic models (chi-squared, df)."""
    stat = max(0.0, 2 * (full.loglik - reduced.loglik))
    return float(chi2.sf(stat, df))


def logit(p: NDArray[Any]) -> F64:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.asarray(np.log(q / (1 - q)), dtype=np.float64)


def calibration(y: NDArray[Any], proba: NDArray[Any]) -> dict[str, Any]:
    """Brier score and the logistic calibration intercept and slope of probabilities.

    Slope: the coefficient of logit(p) in a logistic regression of the outcome on it (1 is
    ideal; < 1 means too extreme probabilities). Intercept: calibration-in-the-large, the
    intercept of a logistic regression with logit(p) as a fixed offset (0 is ideal; > 0 means
    the probabilities are too low on average).
    """
    yy = np.asarray(y, dtype=np.float64)
    p = np.asarray(proba, dtype=np.float64)
    ok = np.isfinite(p)
    yy, p = yy[ok], p[ok]
    if len(yy) == 0 or yy.min() == yy.max():
        return {"brier": None, "intercept": None, "slope": None, "n": int(len(yy))}
    lp = logit(p)
    ones = np.ones((len(yy), 1))
    slope_fit = logistic_fit(np.column_stack([ones, lp]), yy)
    intercept_fit = logistic_fit(ones, yy, offset=lp)
    return {
        "brier": round(float(np.mean((p - yy) ** 2)), 4),
        "brier_of_base_rate": round(float(np.mean((yy.mean() - yy) ** 2)), 4),
        "intercept": round(float(intercept_fit.coef[0]), 4),
        "slope": round(float(slope_fit.coef[1]), 4),
        "n": int(len(yy)),
        "method": "Brier = mean (p - y)^2; intercept: logistic regression of y with logit(p) "
        "as offset (ideal 0); slope: coefficient of logit(p) (ideal 1)",
    }
