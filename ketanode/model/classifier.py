"""The ketamine-response classifier: a scikit-learn Pipeline over the node's feature spec.

Input: feature vectors in :func:`ketanode.imaging.features.default_spec` order (regional GM,
tissue totals and TIV, all in mL). Label 1 = responder, 0 = non-responder.

Steps (:func:`build_pipeline`):

1. ``tiv`` (:class:`TIVAdjust`): selects the model's inputs (by default the regional GM
   volumes, ``gm_<region>``) and handles head size *explicitly*:

   - ``"proportion"`` (default): each regional GM volume divided by the subject's TIV (a
     proportion of intracranial volume). No parameters are learnt, so nothing leaks across
     cross-validation folds and a live scan is adjusted exactly like a training scan.
   - ``"regress"``: each regional GM volume residualised on TIV with a straight line fitted
     on the training subjects only (inside each CV fold), plus the training mean.
   - ``"none"``: raw volumes (head size then confounds the model).

2. ``scale``: :class:`~sklearn.preprocessing.StandardScaler` (fitted on training subjects).
3. ``svc``: :class:`~sklearn.svm.SVC` with a linear kernel and ``class_weight="balanced"``.

The trained model (:func:`fit_model`) picks C by an inner stratified CV (grid search,
balanced accuracy) and then wraps the pipeline in :class:`PriorAnchoredCalibratedCV` (a
:class:`~sklearn.calibration.CalibratedClassifierCV`, ``method="sigmoid"``,
``ensemble=False``): one SVC is fitted on every training subject and Platt's sigmoid is
fitted on the *held-out* decision values of a stratified k-fold, so probabilities come from
folds the SVC did not see; its intercept is fixed so that P at decision value 0 equals the
training cohort's response rate, and only its slope is fitted (:func:`anchored_sigmoid`).

A prediction (:func:`predict`) gives, per subject: the calibrated probability of response,
the class, the decision value, and the contribution of each input (``coef * scaled value``;
contributions plus the intercept equal the decision value).

**The decision rule** (one rule, stated in the model's metadata, ``decision_rule``): the class
follows the calibrated probability P. The threshold ``t`` is the probability the fitted
sigmoid gives at SVC decision value 0 (:func:`decision_threshold`): the balanced decision
boundary on which the cross-validated metrics are computed, and, with the anchored sigmoid,
the training cohort's response rate. The sigmoid is monotone, so ``P >= t`` is the same
subject set as ``decision >= 0`` whenever P rises with the decision value (Platt's
``a < 0``, the normal case; the metadata records it). A result with ``|P - t| < margin``
(:data:`INDETERMINATE_MARGIN`, 0.05 unless the model records another) is
``indeterminate``; above, ``responder``; below, ``non-responder``. So class and probability
never contradict each other: a responder always has a higher P than any non-responder of
the same model.

P depends on the training cohort's response rate: a model trained where 30 % responded
gives P = 0.30 on its boundary, one trained at 50 % gives 0.50, for the same evidence.
"Responder" means "more likely to respond than the training cohort's average patient".
Every output shows ``t`` and that rate. (A model calibrated by plain Platt, e.g. the
demonstration model of format 1, keeps its own ``t``, recorded when it was sealed.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize_scalar
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

logger = logging.getLogger(__name__)

F64 = NDArray[np.float64]
TIVMode = Literal["proportion", "regress", "none"]
TIV_MODES: tuple[str, ...] = ("proportion", "regress", "none")
DEFAULT_C_GRID: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)
RESPONDER, NON_RESPONDER = "responder", "non-responder"
INDETERMINATE = "indeterminate"
CLASS_NAMES = {1: RESPONDER, 0: NON_RESPONDER}
#: Half-width of the band around the threshold (in probability) whose results are
#: "indeterminate" (recorded in each model's metadata; a model may record another).
INDETERMINATE_MARGIN = 0.05
DECISION_RULE_TEXT = (
    "class from the calibrated probability P: responder when P >= threshold + margin, "
    "non-responder when P <= threshold - margin, indeterminate in between; the threshold is "
    "P at SVC decision value 0 (the balanced boundary the cross-validated metrics use)"
)
TIV_DESCRIPTION = {
    "proportion": "regional GM divided by total intracranial volume (TIV), no fitted parameters",
    "regress": "regional GM residualised on TIV (line fitted on training subjects) plus mean",
    "none": "raw regional GM volumes (mL), no head-size adjustment",
}


def default_inputs(feature_names: Sequence[str]) -> list[str]:
    """The model's inputs by default: every regional GM volume (``gm_*`` but ``gm_total``)."""
    return [f for f in feature_names if f.startswith("gm_") and f != "gm_total"]


class TIVAdjust(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """Select the input features and adjust them for head size (see the module docstring).

    ``feature_names``: the spec's ordered features (columns of X); ``inputs``: the features
    the model uses; ``mode``: ``proportion`` | ``regress`` | ``none``; ``tiv_name``: the TIV
    column.
    """

    def __init__(
        self,
        feature_names: Sequence[str] = (),
        inputs: Sequence[str] = (),
        mode: str = "proportion",
        tiv_name: str = "tiv",
    ) -> None:
        self.feature_names = feature_names
        self.inputs = inputs
        self.mode = mode
        self.tiv_name = tiv_name

    def _columns(self) -> tuple[list[int], int]:
        names = list(self.feature_names)
        missing = [f for f in [*self.inputs, self.tiv_name] if f not in names]
        if missing:
            raise ValueError(f"features {missing} are not in the feature spec")
        return [names.index(f) for f in self.inputs], names.index(self.tiv_name)

    def fit(self, X: Any, y: Any = None) -> TIVAdjust:
        if self.mode not in TIV_MODES:
            raise ValueError(f"TIV mode {self.mode!r} is not one of {TIV_MODES}")
        cols, tiv_col = self._columns()
        x = np.asarray(X, dtype=np.float64)
        self.n_features_in_ = x.shape[1]
        if self.mode == "regress":
            tiv = x[:, tiv_col]
            design = np.column_stack([np.ones_like(tiv), tiv - tiv.mean()])
            coef, *_ = np.linalg.lstsq(design, x[:, cols], rcond=None)
            self.tiv_mean_ = float(tiv.mean())
            self.slope_ = np.asarray(coef[1], dtype=np.float64)
        return self

    def transform(self, X: Any) -> F64:
        cols, tiv_col = self._columns()
        x = np.asarray(X, dtype=np.float64)
        if x.shape[1] != len(self.feature_names):
            raise ValueError(
                f"expected {len(self.feature_names)} features (the spec), got {x.shape[1]}"
            )
        values = x[:, cols]
        tiv = x[:, tiv_col : tiv_col + 1]
        if self.mode == "proportion":
            if np.any(tiv <= 0):
                raise ValueError("TIV must be positive")
            return np.asarray(values / tiv, dtype=np.float64)
        if self.mode == "regress":
            return np.asarray(values - (tiv - self.tiv_mean_) * self.slope_, dtype=np.float64)
        return np.asarray(values, dtype=np.float64)

    def get_feature_names_out(self, input_features: Any = None) -> NDArray[np.str_]:
        return np.asarray(list(self.inputs), dtype=np.str_)


def build_pipeline(
    feature_names: Sequence[str],
    inputs: Sequence[str] | None = None,
    tiv: str = "proportion",
    C: float = 1.0,
) -> Pipeline:
    """TIV adjustment -> StandardScaler -> linear SVC with balanced class weights."""
    used = list(inputs) if inputs is not None else default_inputs(feature_names)
    return Pipeline(
        [
            ("tiv", TIVAdjust(tuple(feature_names), tuple(used), tiv)),
            ("scale", StandardScaler()),
            ("svc", SVC(kernel="linear", C=C, class_weight="balanced")),
        ]
    )


def select_c(
    pipeline: Pipeline,
    X: F64,
    y: NDArray[np.int_],
    c_grid: Sequence[float],
    folds: int,
    seed: int,
    fit_linear: Callable[[F64, NDArray[np.int_], float], tuple[F64, float]] | None = None,
) -> float:
    """C with the best mean inner-CV balanced accuracy; ties go to the smaller C.

    A grid search like :class:`~sklearn.model_selection.GridSearchCV` (same folds, same
    score, mean over folds), written out so that the steps before the scaler and the SVC
    (TIV, and covariate adjustment or harmonisation when present) and the scaler are fitted
    once per inner fold instead of once per C (nested CV with permutations fits them many
    times). ``pipeline`` ends in ``scale`` and ``svc``. ``fit_linear(a, y, C)``, when
    given, fits that SVC as (weights, offset) instead of through :class:`~sklearn.svm.SVC`
    (the permutation test's direct libsvm call: the same decisions, faster).
    """
    grid = sorted(c_grid)
    pre = Pipeline(pipeline.steps[:-2])
    svc_params = pipeline.named_steps["svc"].get_params()
    scores = np.zeros(len(grid))
    inner = StratifiedKFold(_n_folds(y, folds), shuffle=True, random_state=seed)
    for train, test in inner.split(X, y):
        adjust = clone(pre).fit(X[train], y[train])
        a, b = adjust.transform(X[train]), adjust.transform(X[test])
        mu, sd = a.mean(axis=0), a.std(axis=0)
        sd[sd == 0] = 1.0
        a, b = (a - mu) / sd, (b - mu) / sd
        yt = y[test]
        params = dict(svc_params)
        if params.get("class_weight") == "balanced":  # the same weights, computed once
            counts = np.bincount(y[train], minlength=2)
            params["class_weight"] = {k: len(train) / (2 * counts[k]) for k in (0, 1)}
        for i, c in enumerate(grid):
            if fit_linear is None:
                decision = SVC(**{**params, "C": c}).fit(a, y[train]).decision_function(b)
            else:
                w, off = fit_linear(a, y[train], c)
                decision = b @ w + off
            pred = decision >= 0
            sens = np.mean(pred[yt == 1]) if np.any(yt == 1) else 0.0
            spec = np.mean(~pred[yt == 0]) if np.any(yt == 0) else 0.0
            scores[i] += (sens + spec) / 2
    best = int(np.flatnonzero(scores >= scores.max() - 1e-9)[0])
    return float(grid[best])


def _n_folds(y: NDArray[np.int_], folds: int) -> int:
    smallest = int(np.bincount(y, minlength=2).min())
    if smallest < 2:
        raise ValueError("each class needs at least 2 subjects")
    return max(2, min(folds, smallest))


def anchored_sigmoid(decision: F64, y: NDArray[np.int_]) -> tuple[float, float]:
    """Platt's sigmoid ``P = 1 / (1 + exp(a * d + b))`` with its intercept fixed so that
    P at decision value 0 is the cohort's response rate ``r`` (``b = log((1 - r) / r)``);
    only the slope ``a`` is fitted (maximum likelihood on Platt's smoothed targets).

    Why: the SVC's classes are weighted to balance, so decision value 0 is where the model
    cannot tell the classes apart, and there the probability of response is the cohort's
    rate. Fitting the intercept too (plain Platt) spent a parameter on 50-100 subjects and
    moved that point at random (0.37 and 0.57 in two demonstration models trained at 50 %).
    """
    y = np.asarray(y, dtype=np.int_)
    d = np.asarray(decision, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("calibration needs both classes")
    b = float(np.log(n_neg / n_pos))
    target = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

    def loss(a: float) -> float:
        z = a * d + b  # P = expit(-z)
        return float(np.sum(target * np.logaddexp(0, z) + (1 - target) * np.logaddexp(0, -z)))

    res = minimize_scalar(loss, bounds=(-1e4, 1e4), method="bounded", options={"xatol": 1e-8})
    return float(res.x), b


class PriorAnchoredCalibratedCV(CalibratedClassifierCV):  # type: ignore[misc]
    """:class:`~sklearn.calibration.CalibratedClassifierCV` (sigmoid, ``ensemble=False``)
    whose sigmoid is refitted by :func:`anchored_sigmoid` on the same held-out decision
    values: P at decision value 0 is the training cohort's response rate, so the decision
    rule's threshold is that rate."""

    def fit(self, X: Any, y: Any, **params: Any) -> PriorAnchoredCalibratedCV:
        super().fit(X, y, **params)
        yy = np.asarray(y, dtype=np.int_)
        held_out = cross_val_predict(
            clone(self.estimator), X, yy, cv=self.cv, method="decision_function"
        )
        a, b = anchored_sigmoid(np.asarray(held_out, dtype=np.float64), yy)
        calibrator = _sigmoid(self)
        calibrator.a_, calibrator.b_ = a, b
        self.response_rate_ = float(yy.mean())
        return self


def calibrated(pipeline: Pipeline, y: NDArray[np.int_], folds: int, seed: int) -> Any:
    """The pipeline wrapped for probabilities from held-out folds (one SVC; Platt's sigmoid
    anchored at the cohort's response rate, :class:`PriorAnchoredCalibratedCV`)."""
    return PriorAnchoredCalibratedCV(
        pipeline,
        method="sigmoid",
        cv=StratifiedKFold(_n_folds(y, folds), shuffle=True, random_state=seed),
        ensemble=False,
    )


@dataclass
class TrainedModel:
    """A fitted calibrated pipeline plus what it needs to explain a prediction."""

    estimator: Any  # CalibratedClassifierCV(ensemble=False) around the Pipeline
    feature_names: list[str]
    inputs: list[str]
    tiv: str
    C: float
    margin: float = INDETERMINATE_MARGIN

    @property
    def pipeline(self) -> Pipeline:
        pipe = self.estimator.calibrated_classifiers_[0].estimator
        assert isinstance(pipe, Pipeline)
        return pipe

    def weights(self) -> dict[str, float]:
        """The SVC weight of each input (on the standardised, TIV-adjusted scale)."""
        svc = self.pipeline.named_steps["svc"]
        return {n: float(w) for n, w in zip(self.inputs, np.ravel(svc.coef_), strict=True)}

    @property
    def threshold(self) -> float:
        """P(response) at SVC decision value 0 (see :func:`decision_threshold`)."""
        return decision_threshold(self.estimator)

    def decision_rule(self, training_response_rate: float | None = None) -> dict[str, Any]:
        """The rule as the metadata records it (and every output states it)."""
        slope = sigmoid_slope(self.estimator)
        return {
            "rule": DECISION_RULE_TEXT,
            "threshold": round(self.threshold, 6),
            "margin": self.margin,
            "training_response_rate": (
                None if training_response_rate is None else round(training_response_rate, 6)
            ),
            "sigmoid_slope": round(slope, 6),
            # P rises with the decision value: "P >= threshold" is "decision value >= 0"
            "same_as_svc_sign": slope > 0,
        }


def fit_model(
    X: F64,
    y: NDArray[np.int_],
    feature_names: Sequence[str],
    *,
    tiv: str = "proportion",
    inputs: Sequence[str] | None = None,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    inner_folds: int = 5,
    seed: int = 0,
) -> TrainedModel:
    """Pick C by inner CV, then fit the calibrated pipeline on every subject."""
    used = list(inputs) if inputs is not None else default_inputs(feature_names)
    pipe = build_pipeline(feature_names, used, tiv)
    c = select_c(pipe, X, y, c_grid, inner_folds, seed)
    pipe.set_params(svc__C=c)
    est = calibrated(pipe, y, inner_folds, seed)
    est.fit(X, y)
    logger.info("model fitted on %d subjects, C=%g, TIV %s", len(y), c, tiv)
    return TrainedModel(est, list(feature_names), used, tiv, c)


def _sigmoid(estimator: Any) -> Any:
    calibrators = estimator.calibrated_classifiers_[0].calibrators
    if len(calibrators) != 1 or not hasattr(calibrators[0], "a_"):
        raise ValueError("the model is not a binary Platt-calibrated classifier")
    return calibrators[0]


def decision_threshold(estimator: Any) -> float:
    """P(response) that the fitted Platt sigmoid gives at SVC decision value 0.

    Platt: ``P = 1 / (1 + exp(a * d + b))``, so at ``d = 0``, ``P = 1 / (1 + exp(b))``.
    """
    return float(1.0 / (1.0 + np.exp(float(_sigmoid(estimator).b_))))


def sigmoid_slope(estimator: Any) -> float:
    """The sigmoid's slope ``-a`` (positive: P rises with the decision value)."""
    return -float(_sigmoid(estimator).a_)


def classify(probability: float, threshold: float, margin: float) -> str:
    """The class of one calibrated probability under the decision rule (module docstring)."""
    if probability >= threshold + margin:
        return RESPONDER
    if probability <= threshold - margin:
        return NON_RESPONDER
    return INDETERMINATE


def decision_and_probability(estimator: Any, X: F64) -> tuple[F64, F64]:
    """SVC decision values and calibrated P(responder) of a fitted calibrated pipeline."""
    pipe = estimator.calibrated_classifiers_[0].estimator
    decision = np.asarray(pipe.decision_function(X), dtype=np.float64)
    proba = np.asarray(estimator.predict_proba(X)[:, 1], dtype=np.float64)
    return decision, proba


def predict(model: TrainedModel, X: Sequence[Sequence[float]] | F64) -> list[dict[str, Any]]:
    """Class (by the decision rule), probability, threshold, margin, decision value and
    per-input contributions for each row of X."""
    x = np.atleast_2d(np.asarray(X, dtype=np.float64))
    if x.shape[1] != len(model.feature_names):
        raise ValueError(
            f"expected {len(model.feature_names)} features in spec order, got {x.shape[1]}"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("feature vector has missing or non-finite values")
    pipe = model.pipeline
    decision, proba = decision_and_probability(model.estimator, x)
    scaled = pipe.named_steps["scale"].transform(pipe.named_steps["tiv"].transform(x))
    svc = pipe.named_steps["svc"]
    contributions = np.ravel(svc.coef_)[None, :] * scaled
    threshold = round(model.threshold, 6)
    out = []
    for d, p, c in zip(decision, proba, contributions, strict=True):
        probability = round(float(p), 6)  # the class follows the value that is shown
        out.append(
            {
                "predicted_class": classify(probability, threshold, model.margin),
                # the side of the threshold (1: P >= threshold), indeterminate or not
                "label": 1 if probability >= threshold else 0,
                "probability": probability,
                "threshold": threshold,
                "margin": model.margin,
                "decision_value": round(float(d), 6),
                "intercept": round(float(np.ravel(svc.intercept_)[0]), 6),
                "contributions": {
                    n: round(float(v), 6) for n, v in zip(model.inputs, c, strict=True)
                },
            }
        )
    return out
