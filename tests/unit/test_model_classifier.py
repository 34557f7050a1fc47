"""The classifier and its validation on feature-level synthetic cohorts (fast, no images)."""

from __future__ import annotations

import numpy as np
import pytest

from ketanode.model.classifier import TIVAdjust, build_pipeline, fit_model, predict
from ketanode.model.synthetic import SyntheticCohort, feature_cohort
from ketanode.model.validation import Protocol, external_validation, nested_cv

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
        assert row["predicted_class"] == (
            "responder" if row["decision_value"] >= 0 else "non-responder"
        )
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
