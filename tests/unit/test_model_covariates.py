"""Issue 12 items 4-9: covariates, baseline, adjustment, ComBat, arms, permutation test on the
headline, calibration, per-fold AUC, leave-site-out, final C, duplicates, provenance.

Feature-level synthetic cohorts (no images); small repeat and permutation counts.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from ketanode.imaging.features import default_spec
from ketanode.model.arms import interaction
from ketanode.model.classifier import build_pipeline
from ketanode.model.cohort import (
    CohortError,
    FeatureTable,
    extract_features,
    read_cohort,
    write_feature_csv,
)
from ketanode.model.covariates import CovariateResidualiser, by_class
from ketanode.model.harmonise import ComBat
from ketanode.model.stats import calibration, likelihood_ratio_test, logistic_fit
from ketanode.model.training import evaluate, final_c_note, train
from ketanode.model.validation import (
    CVResult,
    Protocol,
    _run_repeats,
    _strata,
    nested_cv,
    permute_within,
    summarise,
)
from ketanode.synthetic.cohort import SyntheticCohort, feature_table

QUICK = Protocol(repeats=2, n_permutations=0, n_boot=300, seed=3)


def _cv(table: FeatureTable, p: Protocol = QUICK) -> CVResult:
    return nested_cv(
        table.X,
        table.y,
        list(table.spec.features),
        p,
        sites=table.sites,
        covariates=table.covariates(),
        site_problem=table.site_problem,
    )


# ---------------------------------------------------------------------------- covariates


def test_planted_age_effect_only_baseline_matches_imaging_and_report_says_so(
    tmp_path: Path,
) -> None:
    """Labels carry age only; the images carry age only (GM falls with age): the imaging
    model finds something, the covariates-only baseline does as well, and the report says
    the imaging model does no better than the covariates."""
    cfg = SyntheticCohort(n=100, effect_d=0.0, age_effect_years=22, age_gm_slope=-0.006, seed=21)
    table = feature_table(cfg)
    meta = train(
        table, tmp_path / "age.skops", protocol=Protocol(repeats=3, n_permutations=5, n_boot=500)
    )
    v = meta["validation"]
    imaging = v["metrics"]["balanced_accuracy"]["mean"]
    base = v["covariates"]["baseline"]
    baseline = base["metrics"]["balanced_accuracy"]["mean"]
    assert imaging > 0.6, imaging  # the imaging model picked up age through GM
    assert baseline >= imaging - 0.05, (baseline, imaging)  # matches (or beats) it
    assert base["difference_in_balanced_accuracy"]["ci95"][0] <= 0
    assert "does NO better than the covariates alone" in base["verdict"]
    html = Path(meta["report"]).read_text()
    assert "does NO better than the covariates alone" in html
    assert "Covariates by class" in html and "Covariates-only baseline" in html
    age_row = v["covariates_by_class"]["age, mean (SD)"]
    assert age_row["p_value"] < 0.001


def test_planted_imaging_effect_beats_the_baseline() -> None:
    cv = _cv(feature_table(SyntheticCohort(n=80, effect_d=1.5, seed=2, sites=2)))
    assert cv.covariates is not None
    base = cv.covariates["baseline"]
    assert base["covariates"] == ["age", "sex", "site"]
    assert base["metrics"]["balanced_accuracy"]["mean"] < 0.65
    assert "does better than the covariates alone" in base["verdict"]


def test_adjusted_and_harmonised_analyses_run_inside_the_folds() -> None:
    table = feature_table(SyntheticCohort(n=60, effect_d=1.5, seed=4, sites=2))
    p = Protocol(repeats=2, n_permutations=0, n_boot=300, adjust=("age", "sex"), harmonise=True)
    cv = _cv(table, p)
    assert cv.covariates is not None
    adj = cv.covariates["adjusted"]
    assert "ComBat" in adj["steps"][0] and "age, sex" in adj["steps"][1]
    assert adj["metrics"]["balanced_accuracy"]["mean"] > 0.75
    # missing covariates: said, not crashed
    table.ages[0] = None
    cv = _cv(table, p)
    assert cv.covariates is not None and "age" in cv.covariates["adjusted"]["skipped"]


def test_residualiser_removes_age_from_the_inputs_on_the_model_scale() -> None:
    table = feature_table(SyntheticCohort(n=80, effect_d=0.0, age_gm_slope=-0.008, seed=5))
    names, X = table.with_covariates()
    inputs = [f for f in table.spec.features if f.startswith("gm_") and f != "gm_total"]
    age = X[:, names.index("age")]
    prop = X[:, names.index(inputs[0])] / X[:, names.index("tiv")]
    assert np.corrcoef(prop, age)[0, 1] < -0.3
    adj = CovariateResidualiser(tuple(names), tuple(inputs)).fit(X).transform(X)
    prop = adj[:, names.index(inputs[0])] / adj[:, names.index("tiv")]
    assert abs(np.corrcoef(prop, age)[0, 1]) < 1e-8
    assert adj.shape == X.shape and np.array_equal(adj[:, -3:], X[:, -3:])


def test_combat_removes_a_site_shift_and_keeps_the_age_effect() -> None:
    rng = np.random.default_rng(0)
    n, p = 120, 6
    names = [f"gm_r{i}" for i in range(p)] + ["tiv", "age", "sex", "site"]
    site = np.repeat([0.0, 1.0, 2.0], n // 3)
    age = rng.uniform(20, 65, n)
    sex = rng.integers(0, 2, n).astype(float)
    shift = np.array([0.0, 0.5, -0.4])[site.astype(int)][:, None]
    scale = np.array([1.0, 1.8, 0.6])[site.astype(int)][:, None]
    values = 5 - 0.03 * age[:, None] + scale * rng.normal(size=(n, p)) + shift
    X = np.column_stack([values, np.ones(n), age, sex, site])
    train = rng.permutation(n)[:90]
    cb = ComBat(tuple(names), tuple(names[:p]), tiv_mode="none").fit(X[train])
    out = cb.transform(X)
    resid = out[:, :p] + 0.03 * age[:, None]
    means = np.array([resid[site == s].mean() for s in range(3)])
    sds = np.array([resid[site == s].std() for s in range(3)])
    assert (
        np.ptp(means)
        < 0.25
        < np.ptp([(values + 0.03 * age[:, None])[site == s].mean() for s in range(3)])
    )
    assert sds.max() / sds.min() < 1.4
    slope = np.polyfit(age, out[:, 0], 1)[0]
    assert slope == pytest.approx(-0.03, abs=0.01)  # the biological effect is kept


def test_covariates_by_class_table() -> None:
    y = np.array([1, 1, 1, 0, 0, 0])
    out = by_class(y, [60, 62, 64, 30, 32, 34], ["F", "F", "M", "M", "M", "F"], ["a"] * 6)
    assert out["age, mean (SD)"]["responders"].startswith("62.0 (2.0)")
    assert out["sex"]["responders"] == "F: 2, M: 1" and "p_value" in out["sex"]


# ----------------------------------------------------------------------------- arms


def _train_ketamine_model(tmp_path: Path) -> Path:
    out = tmp_path / "ket.skops"
    train(
        feature_table(SyntheticCohort(n=60, effect_d=1.5, seed=30)),
        out,
        protocol=Protocol(repeats=1, n_permutations=0, n_boot=200),
        synthetic=True,
    )
    return out


def test_two_arm_evaluation_effect_in_ketamine_only_and_in_both(tmp_path: Path) -> None:
    model = _train_ketamine_model(tmp_path)
    ket_only = feature_table(
        SyntheticCohort(n=240, effect_d=1.5, seed=31, arms=2, effect_in="ketamine")
    )
    res = evaluate(model, ket_only, out_dir=tmp_path / "e1")
    arms = res["arms"]
    ket = arms["per_arm"]["ketamine"]["metrics"]["balanced_accuracy"]
    sal = arms["per_arm"]["saline"]["metrics"]["balanced_accuracy"]
    assert ket["mean"] > 0.8 and ket["ci95"][0] > 0.5
    assert sal["ci95"][0] <= 0.5 <= sal["ci95"][1]
    assert arms["per_arm"]["saline"]["permutation_p"] > 0.05
    assert arms["interaction"]["p_value"] < 0.001
    assert arms["interaction"]["arm_coded_1"] == "ketamine"
    html = Path(res["report"]).read_text()
    assert "Treatment arms" in html and "interaction" in html
    assert "External validation metrics" in html and "Cross-validated metrics" not in html
    both = feature_table(SyntheticCohort(n=240, effect_d=1.5, seed=31, arms=2))
    res = evaluate(model, both, out_dir=tmp_path / "e2")
    for arm in ("ketamine", "saline"):
        assert res["arms"]["per_arm"][arm]["metrics"]["balanced_accuracy"]["mean"] > 0.8
    assert res["arms"]["interaction"]["p_value"] > 0.05
    # external calibration
    cal = res["calibration"]
    assert cal["brier"] < cal["brier_of_base_rate"] and cal["slope"] > 0


def test_logistic_fit_agrees_with_statsmodels() -> None:
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(1)
    n = 200
    arm = rng.integers(0, 2, n).astype(float)
    pred = rng.integers(0, 2, n).astype(float)
    y = (rng.random(n) < 1 / (1 + np.exp(-(-0.5 + 0.3 * arm + 0.8 * pred * arm)))).astype(int)
    X = np.column_stack([np.ones(n), arm, pred, arm * pred])
    ours = logistic_fit(X, y)
    theirs = sm.Logit(y, X).fit(disp=0)
    assert np.allclose(ours.coef, theirs.params, atol=1e-5)
    assert ours.loglik == pytest.approx(theirs.llf, abs=1e-6)
    reduced = sm.Logit(y, X[:, :3]).fit(disp=0)
    from scipy.stats import chi2

    p_sm = chi2.sf(2 * (theirs.llf - reduced.llf), 1)
    assert likelihood_ratio_test(ours, logistic_fit(X[:, :3], y)) == pytest.approx(p_sm, rel=1e-4)
    res = interaction(y, pred, ["ketamine" if a else "saline" for a in arm], "ketamine")
    assert res["p_value"] == pytest.approx(p_sm, rel=1e-2)


def test_calibration_of_calibrated_probabilities() -> None:
    rng = np.random.default_rng(2)
    p = rng.uniform(0.05, 0.95, 4000)
    y = (rng.random(4000) < p).astype(int)
    cal = calibration(y, p)
    assert cal["slope"] == pytest.approx(1.0, abs=0.15)
    assert cal["intercept"] == pytest.approx(0.0, abs=0.1)
    over = calibration(y, 1 / (1 + np.exp(-3 * np.log(p / (1 - p)))))  # too extreme
    assert over["slope"] < 0.5


# ------------------------------------------------------------------ permutation, AUC, LSO


def test_permutation_test_is_on_the_headline_statistic_within_site() -> None:
    table = feature_table(SyntheticCohort(n=40, effect_d=1.5, seed=6, sites=2))
    p = Protocol(repeats=3, n_permutations=9, n_boot=200, baseline=False)
    cv = _cv(table, p)
    assert cv.permutation is not None and cv.permutation_null is not None
    assert cv.permutation["observed"] == cv.metrics["balanced_accuracy"]["mean"]
    assert (
        "headline" in cv.permutation["statistic"] and "3 nested-CV" in cv.permutation["statistic"]
    )
    assert cv.permutation["shuffled"] == "within site" and len(cv.permutation_null) == 9
    assert cv.permutation["p_value"] == pytest.approx(0.1)
    # shuffling within site keeps every site's responder count
    y = table.y
    strata = _strata(table.sites, len(y))
    yp = permute_within(y, strata, np.random.default_rng(0))
    for idx in strata:
        assert y[idx].sum() == yp[idx].sum()
    assert not np.array_equal(y, yp)
    assert Protocol().n_permutations == 1000 and Protocol().permutation_repeats is None


def test_fast_permutation_path_equals_the_sklearn_pipeline() -> None:
    table = feature_table(SyntheticCohort(n=50, effect_d=1.0, seed=7))
    names = list(table.spec.features)
    tpl = build_pipeline(names)
    slow = _run_repeats(table.X, table.y, tpl, QUICK, 2, False, 1)
    fast = _run_repeats(table.X, table.y, tpl, QUICK, 2, False, 1, fast=True)
    assert np.allclose(slow[0], fast[0], atol=1e-8) and slow[2] == fast[2]


def test_auc_is_per_fold_not_pooled_over_models_of_different_scales() -> None:
    rng = np.random.default_rng(3)
    y = np.tile([0, 1], 20)
    folds = np.repeat(np.arange(4), 10)
    decision = (y - 0.5) + rng.normal(0, 0.8, 40)
    shifted = decision + folds * 3.0  # each fold model on its own scale
    per_fold = summarise(y, (decision >= 0)[None], decision[None], 200, 0, folds[None])
    per_fold_shifted = summarise(y, (decision >= 0)[None], shifted[None], 200, 0, folds[None])
    pooled_shifted = summarise(y, (decision >= 0)[None], shifted[None], 200, 0)
    assert per_fold["auc"] == per_fold_shifted["auc"]
    assert abs(pooled_shifted["auc"]["mean"] - per_fold["auc"]["mean"]) > 0.05


def test_leave_site_out_has_ci_and_p_value_and_says_when_it_cannot_run() -> None:
    table = feature_table(SyntheticCohort(n=40, effect_d=1.5, seed=8, sites=2))
    p = Protocol(repeats=1, n_permutations=9, n_boot=200, baseline=False)
    cv = _cv(table, p)
    lso = cv.leave_site_out
    assert lso is not None and set(lso["sites"]) == {"site-1", "site-2"}
    pooled = lso["pooled"]
    assert len(pooled["balanced_accuracy_ci95"]) == 2 and "per-site" in pooled["auc_method"]
    assert pooled["permutation"]["n_permutations"] == 9
    assert pooled["permutation"]["p_value"] == pytest.approx(0.1)
    table.sites[3] = None
    cv = _cv(table, Protocol(repeats=1, n_permutations=0, n_boot=100, baseline=False))
    assert cv.leave_site_out == {
        "skipped": "1 of 40 subjects have no site: leave-site-out not run (give every subject "
        "a site)"
    }
    cv = nested_cv(table.X, table.y, list(table.spec.features), QUICK)
    assert cv.leave_site_out is not None and "not run" in cv.leave_site_out["skipped"]


def test_final_c_differing_from_the_folds_is_said() -> None:
    cv = CVResult(
        QUICK,
        np.zeros(2, dtype=int),
        np.zeros((1, 2)),
        np.zeros((1, 2)),
        np.zeros((1, 2), dtype=int),
        [0.01] * 38 + [1.0] * 12,
    )
    note = final_c_note(cv, 1.0)
    assert note["most_chosen_by_outer_folds"] == 0.01
    assert note["outer_folds_choosing_it"] == "38 of 50" and "differs" in note["note"]
    assert "note" not in final_c_note(cv, 0.01)


# ----------------------------------------------------------------- duplicates, provenance


def test_the_same_input_under_two_subject_ids_is_refused(tmp_path: Path) -> None:
    table = feature_table(SyntheticCohort(n=8, seed=9))
    csv_path = write_feature_csv(table, tmp_path / "c.csv")
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows.append(rows[2] | {"subject": "copy-of-3"})
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(CohortError, match="'sub-0003' and 'copy-of-3' have the same feature"):
        extract_features(read_cohort(csv_path), progress=False)
    # images: the content hash, before anything is measured
    (tmp_path / "a.nii.gz").write_bytes(b"not really an image")
    shutil.copy(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")
    img = tmp_path / "img.csv"
    img.write_text("subject,path,label\nA,a.nii.gz,1\nB,b.nii.gz,0\n")
    with pytest.raises(CohortError, match="'A' and 'B' have the same image"):
        extract_features(read_cohort(img), progress=False)


def test_precomputed_features_must_carry_their_spec(tmp_path: Path) -> None:
    table = feature_table(SyntheticCohort(n=6, seed=10, arms=2))
    csv_path = write_feature_csv(table, tmp_path / "c.csv")
    back = extract_features(read_cohort(csv_path), progress=False)
    assert np.array_equal(back.X, table.X) and back.arms == table.arms
    assert back.ages == table.ages and back.sexes == table.sexes
    text = csv_path.read_text()
    spec = default_spec()
    (tmp_path / "other.csv").write_text(text.replace(spec.sha256, "0" * 64))
    with pytest.raises(CohortError, match="feature spec mismatch.*000000000000"):
        read_cohort(tmp_path / "other.csv")
    lines = text.splitlines()
    cols = lines[0].split(",")
    drop = cols.index("feature_spec_sha256")
    stripped = "\n".join(
        ",".join(v for j, v in enumerate(line.split(",")) if j != drop) for line in lines
    )
    (tmp_path / "bare.csv").write_text(stripped + "\n")
    with pytest.raises(CohortError, match="without provenance"):
        read_cohort(tmp_path / "bare.csv")


def test_permuted_fits_print_nothing_in_a_fresh_process() -> None:
    """libsvm prints every fit unless told not to; sklearn's SVC tells it, our direct call
    must too (a permutation worker's first fit would otherwise fill the terminal)."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from ketanode.model.validation import _linear_svc\n"
        "rng = np.random.default_rng(0)\n"
        "_linear_svc(rng.normal(size=(30, 4)), np.tile([0, 1], 15), 1.0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == ""
