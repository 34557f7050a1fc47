"""The two workflows behind ``ketanode model train`` and ``ketanode model evaluate``.

:func:`train`: nested CV (:mod:`ketanode.model.validation`) for the honest estimate, then the
final model fitted on every subject, saved (skops + metadata, :mod:`ketanode.model.files`),
with an HTML report beside it (``NAME.report.html``).

:func:`evaluate`: a saved model applied unchanged to a new cohort (external validation):
same metrics with bootstrap CIs, a label-permutation p-value, per-subject predictions
(CSV) and the same report.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ketanode.model.classifier import fit_model, predict
from ketanode.model.cohort import FeatureTable
from ketanode.model.files import load_model, make_metadata, save_model
from ketanode.model.report import write_report
from ketanode.model.validation import Protocol, external_validation, nested_cv

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
    sites = [str(s) for s in table.sites] if table.has_sites else None
    t0 = time.perf_counter()
    cv = nested_cv(table.X, table.y, names, p, sites=sites, progress=progress)
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
    validation = cv.summary()
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
    )
    seconds = round(time.perf_counter() - t0, 2)
    logger.info("training done in %.1f s (nested CV %.1f s)", seconds, t_cv)
    return meta | {"report": str(rep), "seconds": {"total": seconds, "nested_cv": round(t_cv, 2)}}


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
    summary = external_validation(table.y, decision, seed=seed)
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
