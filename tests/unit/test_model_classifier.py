"""The classifier and its validation on feature-level synthetic cohorts (fast, no images)."""

from __future__ import annotations

import numpy as np
import pytest

from ketanode.model.classifier import (
    TIVAdjust,
    anchored_sigmoid,
    build_pipeline,
    fit_model,
    predict,
)
from ketanode.model.validation import Protocol, external_validation, nested_cv
from ketanode.synthetic.cohort import SyntheticCohort, feature_cohort

FAST = Protocol(repeats=3, n_permutations=30, n_boot=1000, seed=1)


def test_planted_effect_is_found_with_nested_cv() -> None:
    X, y, names = feature_cohort(SyntheticCohort(n=60, effect_d=1.5, seed=0))
    cv = nested_cv(X, y, names, FAST)
    ba = cv.metrics["balanced_accuracy"]
    assert ba["mean"] >= 0.80, cv.metrics
    assert ba["ci95"][0] > 0.5
    assert cv.permutation is not None and cv.permutation["p_value"] <= 0.05
    assert set(cv.metrics) == {"balanced_accuracy", "sensitivity", "specificity", "auc"}
    assert cv.decision.shape == (3, 60) and np.all(np.isfinite(cv.probability))


def test_null_cohort_is_at_chance() -> None:
    X, y, names = feature_cohort(SyntheticCohort(n=60, effect_d=1.5, seed=0, null=True))
    cv = nested_cv(X, y, names, FAST)
    lo, hi = cv.metrics["balanced_accuracy"]["ci95"]
    assert lo <= 0.5 <= hi, cv.metrics
    assert cv.permutation is not None and cv.permutation["p_value"] > 0.05


def test_nested_cv_is_reproducible_and_reports_sites() -> None:
    X, y, names = feature_cohort(SyntheticCohort(n=40, seed=5))
    sites = [f"s{i % 2}" for i in range(40)]
    p = Protocol(repeats=2, n_permutations=5, n_boot=200, seed=7)
    a = nested_cv(X, y, names, p, sites=sites)
    b = nested_cv(X, y, names, p, sites=sites)
    assert a.summary() == b.summary()
    assert np.array_equal(a.decision, b.decision)
    lso = a.leave_site_out
    assert lso is not None and set(lso["sites"]) == {"s0", "s1"}
    assert lso["pooled"]["balanced_accuracy"] is not None


def test_prediction_contributions_add_up_to_the_decision_value() -> None:
    X, y, names = feature_cohort(SyntheticCohort(n=50, seed=2))
    model = fit_model(X, y, names, seed=0)
    for row in predict(model, X[:5]):
        total = sum(row["contributions"].values()) + row["intercept"]
        assert total == pytest.approx(row["decision_value"], abs=1e-4)
        # the side of the threshold is the side of the SVC's balanced boundary
        assert row["label"] == (1 if row["decision_value"] >= 0 else 0)
        assert 0 <= row["probability"] <= 1
    w = model.weights()
    # the study's direction: frontal GM for response, cerebellar GM against it
    assert w["gm_left_frontal"] > 0 and w["gm_right_frontal"] > 0
    assert w["gm_left_cerebellum"] < 0 and w["gm_right_cerebellum"] < 0


def test_tiv_modes() -> None:
    X, y, names = feature_cohort(SyntheticCohort(n=30, seed=4))
    inputs = [n for n in names if n.startswith("gm_") and n != "gm_total"]
    prop = TIVAdjust(tuple(names), tuple(inputs), "proportion").fit(X).transform(X)
    tiv = X[:, names.index("tiv")]
    assert np.allclose(prop[:, 0], X[:, 0] / tiv)
    reg = TIVAdjust(tuple(names), tuple(inputs), "regress").fit(X).transform(X)
    assert abs(np.corrcoef(reg[:, 0], tiv)[0, 1]) < 1e-6
    with pytest.raises(ValueError, match="TIV mode"):
        TIVAdjust(tuple(names), tuple(inputs), "bogus").fit(X)
    pipe = build_pipeline(names, tiv="none")
    assert pipe.fit(X, y).decision_function(X).shape == (30,)


def test_external_validation_metrics() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 30)
    good = external_validation(y, (y - 0.5) + rng.normal(0, 0.3, 60), n_permutations=500)
    assert good["metrics"]["balanced_accuracy"]["mean"] > 0.9
    assert good["permutation"]["p_value"] < 0.01
    bad = external_validation(y, rng.normal(size=60), n_permutations=500)
    lo, hi = bad["metrics"]["balanced_accuracy"]["ci95"]
    assert lo <= 0.5 <= hi


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.7])
def test_class_and_probability_never_contradict_each_other(rate: float) -> None:
    """One decision rule over 1,000 generated subjects: the class follows the calibrated
    probability at the model's threshold (the training cohort's response rate), results
    within the margin are indeterminate. (Before issue 12 the class was the sign of the
    decision value and P came from a free Platt fit: 7-12 % of such subjects disagreed.)"""
    seed = int(rate * 10)
    X, y, names = feature_cohort(
        SyntheticCohort(n=60, responder_rate=rate, effect_d=1.0, seed=seed)
    )
    model = fit_model(X, y, names, seed=seed)
    assert model.threshold == pytest.approx(y.mean(), abs=1e-9)  # anchored at the rate
    rule = model.decision_rule(float(y.mean()))
    assert rule["same_as_svc_sign"] and rule["threshold"] == pytest.approx(y.mean())
    new, _, _ = feature_cohort(
        SyntheticCohort(n=1000, responder_rate=rate, effect_d=1.0, seed=seed + 100)
    )
    rows = predict(model, new)
    t, m = model.threshold, model.margin
    classes = {r["predicted_class"] for r in rows}
    assert classes <= {"responder", "non-responder", "indeterminate"}
    assert {"responder", "non-responder"} <= classes
    for r in rows:
        p = r["probability"]
        expected = "responder" if p >= t + m else "non-responder" if p <= t - m else "indeterminate"
        assert r["predicted_class"] == expected, r
        assert r["threshold"] == round(t, 6) and r["margin"] == m
        assert r["label"] == (1 if r["decision_value"] >= 0 else 0)  # same side as the SVC
    # every responder is more likely to respond than every non-responder
    resp = [r["probability"] for r in rows if r["predicted_class"] == "responder"]
    non = [r["probability"] for r in rows if r["predicted_class"] == "non-responder"]
    assert min(resp) > max(non)


def test_anchored_sigmoid_puts_the_rate_at_decision_zero() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(200) < 0.3).astype(np.int_)
    d = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1.0, 200)
    a, b = anchored_sigmoid(d, y)
    assert a < 0  # P rises with the decision value
    assert 1 / (1 + np.exp(b)) == pytest.approx(y.mean())
