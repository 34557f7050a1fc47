"""The two workflows behind ``ketanode model train`` and ``ketanode model evaluate``.

:func:`train`: nested CV (:mod:`ketanode.model.validation`) for the honest estimate, then the
final model fitted on every subject, saved (skops + metadata, :mod:`ketanode.model.files`),
with an HTML report beside it (``NAME.report.html``).

:func:`evaluate`: a saved model applied unchanged to a new cohort (external validation):
same metrics with bootstrap CIs, a label-permutation p-value, calibration of its
probabilities (Brier score, intercept, slope), per-subject predictions (CSV) and the same
report. The cohort's features are checked to come from the model's feature spec
(precomputed rows carry the spec's name and hash, :mod:`ketanode.model.cohort`; the model
file is refused on a spec mismatch, :mod:`ketanode.model.files`). A cohort with two
treatment arms gets metrics per arm and the arm x prediction interaction
(:mod:`ketanode.model.arms`).
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ketanode.model.arms import interaction, reference_arm
from ketanode.model.classifier import fit_model, predict
from ketanode.model.cohort import FeatureTable
from ketanode.model.covariates import by_class
from ketanode.model.files import load_model, make_metadata, save_model
from ketanode.model.html_report import write_report
from ketanode.model.validation import CVResult, Protocol, external_validation, nested_cv

logger = logging.getLogger(__name__)


def report_path(model_path: str | Path, suffix: str = "report") -> Path:
    p = Path(model_path)
    return p.with_name(f"{p.stem}.{suffix}.html")


def train(
    table: FeatureTable,
    out: str | Path,
    *,
    protocol: Protocol | None = None,
    name: str | None = None,
    synthetic: bool = False,
    label: str | None = None,
    extra_metadata: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Validate, fit, save and report; returns the saved metadata (plus timings)."""
    p = protocol or Protocol()
    names = list(table.spec.features)
    t0 = time.perf_counter()
    cv = nested_cv(
        table.X,
        table.y,
        names,
        p,
        sites=table.sites,
        covariates=table.covariates(),
        site_problem=table.site_problem,
        progress=progress,
    )
    t_cv = time.perf_counter() - t0
    if progress:
        progress("fitting the final model on every subject")
    model = fit_model(
        table.X,
        table.y,
        names,
        tiv=p.tiv,
        c_grid=p.c_grid,
        inner_folds=p.inner_folds,
        seed=p.seed,
    )
    validation = cv.summary() | {"final_c": final_c_note(cv, model.C)}
    validation["covariates_by_class"] = by_class(
        table.y, table.ages, table.sexes, table.sites, table.arms
    )
    cohort = table.summary() | {"excluded_subjects": len(table.excluded)}
    out_path = Path(out)
    meta = make_metadata(
        model,
        name=name or out_path.stem,
        cohort=cohort,
        validation=validation,
        synthetic=synthetic,
        spec=table.spec,
        label=label,
        extra=extra_metadata,
    )
    meta = save_model(model, out_path, meta)
    rep = write_report(
        report_path(out_path),
        title=f"ketanode model {meta['name']}: training and nested cross-validation",
        label=meta["label"],
        summary=validation | {"cohort": cohort},
        y=cv.y,
        decision=cv.decision,
        pred=cv.pred,
        proba=cv.probability,
        weights=model.weights(),
        excluded=table.excluded,
        permutation_null=cv.permutation_null,
    )
    seconds = round(time.perf_counter() - t0, 2)
    logger.info("training done in %.1f s (nested CV %.1f s)", seconds, t_cv)
    return meta | {"report": str(rep), "seconds": {"total": seconds, "nested_cv": round(t_cv, 2)}}


def final_c_note(cv: CVResult, final_c: float) -> dict[str, Any]:
    """The final model's C against the C the outer folds chose, with a sentence when they
    differ (the validated performance is that of the procedure, C search included)."""
    c_mode, count, total = cv.most_chosen_c()
    out: dict[str, Any] = {
        "final_model_C": final_c,
        "most_chosen_by_outer_folds": c_mode,
        "outer_folds_choosing_it": f"{count} of {total}",
    }
    if abs(final_c - c_mode) > 1e-12 * max(1.0, abs(c_mode)):
        out["note"] = (
            f"The final model's C ({final_c:g}, chosen by the inner CV on every subject) "
            f"differs from the C most outer folds chose ({c_mode:g}, {count} of {total} "
            "folds): the choice of C is unstable on this cohort, and the cross-validated "
            "metrics describe the procedure (C search included), not this exact C."
        )
    return out


def evaluate(
    model_path: str | Path,
    table: FeatureTable,
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """External validation of a saved model on a cohort; writes predictions CSV and report
    (into ``out_dir``, default: next to the model)."""
    loaded = load_model(model_path, table.spec)
    results = predict(loaded.model, table.X)
    decision = np.array([r["decision_value"] for r in results])
    proba = np.array([r["probability"] for r in results])
    pred = (decision >= 0).astype(np.int_)
    summary = external_validation(table.y, decision, seed=seed, proba=proba)
    summary["feature_provenance"] = {
        "spec": table.spec.name,
        "version": table.spec.version,
        "sha256": table.spec.sha256,
        "checked": "precomputed rows carry this spec's name and hash (else refused); image "
        "rows measured by this pipeline; the model's spec hash matches",
    }
    arms = arm_analysis(table, pred, decision, seed)
    if arms is not None:
        summary["arms"] = arms
    mp = Path(model_path)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    where = Path(out_dir) if out_dir is not None else mp.parent
    where.mkdir(parents=True, exist_ok=True)
    pred_csv = where / f"{mp.stem}.evaluation-{stamp}.predictions.csv"
    with open(pred_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "label", "predicted_class", "probability", "decision_value"])
        for sid, yy, r in zip(table.subjects, table.y, results, strict=True):
            w.writerow([sid, int(yy), r["predicted_class"], r["probability"], r["decision_value"]])
    cohort = table.summary()
    rep = write_report(
        where / report_path(mp, f"evaluation-{stamp}").name,
        title=f"ketanode model {loaded.metadata.get('name')}: external validation",
        label=loaded.label,
        summary=summary | {"cohort": cohort},
        y=table.y,
        decision=decision,
        pred=pred,
        proba=proba,
        weights=loaded.model.weights(),
        excluded=table.excluded,
        external=True,
    )
    return {
        "model": str(mp),
        "model_sha256": loaded.sha256,
        "label": loaded.label,
        "synthetic_model": loaded.synthetic,
        "cohort": cohort,
        "excluded": table.excluded,
        **summary,
        "predictions": str(pred_csv),
        "report": str(rep),
    }


def arm_analysis(
    table: FeatureTable, pred: Any, decision: Any, seed: int = 0
) -> dict[str, Any] | None:
    """Metrics per treatment arm and, with two arms, the arm x prediction interaction."""
    names = table.arm_names
    if len(names) < 2:
        return None
    arms = [a or "" for a in table.arms]
    if "" in arms:
        return {"skipped": f"{arms.count('')} subjects have no arm"}
    per_arm: dict[str, Any] = {}
    for name in names:
        idx = np.flatnonzero(np.asarray(arms) == name)
        y = table.y[idx]
        if y.min() == y.max():
            per_arm[name] = {"n": int(len(idx)), "skipped": "one class only"}
            continue
        res = external_validation(y, decision[idx], n_permutations=2000, seed=seed)
        per_arm[name] = {
            "n": int(len(idx)),
            "responders": int(y.sum()),
            "metrics": res["metrics"],
            "permutation_p": res["permutation"]["p_value"],
        }
    out: dict[str, Any] = {"per_arm": per_arm}
    if len(names) == 2:
        out["interaction"] = interaction(table.y, pred, arms, reference_arm(names))
    else:
        out["interaction"] = {"skipped": f"{len(names)} arms: the interaction needs two"}
    return out
