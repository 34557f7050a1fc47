"""The HTML report written next to a model (training) or an evaluation: numbers and figures.

Figures are PNGs drawn with matplotlib's Agg backend and embedded as data URIs, so the
report is one self-contained file: ROC curve (each CV repeat, or the one external run),
confusion matrix (counts summed over repeats, shown as row percentages), calibration curve
(out-of-fold calibrated probabilities in quantile bins, with Brier score, intercept and
slope), the SVC weight of each region, and the permutation null distribution with the
observed (headline) statistic marked.

Sections in words and tables: the headline, the metrics and what their intervals are
conditional on, the final C against the folds' choices, covariates (age, sex, site, arm) by
class, the covariates-only baseline and its verdict, adjusted analyses, per-arm metrics and
the arm x prediction interaction (external validation), leave-site-out, protocol, cohort.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from numpy.typing import NDArray  # noqa: E402

from ketanode.texts import RESEARCH_USE_ONLY  # noqa: E402

logger = logging.getLogger(__name__)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _roc_points(y: NDArray[Any], score: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
    order = np.argsort(-score, kind="mergesort")
    ys = y[order]
    tps = np.concatenate([[0], np.cumsum(ys == 1)])
    fps = np.concatenate([[0], np.cumsum(ys == 0)])
    return fps / max(1, fps[-1]), tps / max(1, tps[-1])


def roc_figure(y: NDArray[Any], decision: NDArray[Any], auc: float | None) -> str:
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    dec = np.atleast_2d(decision)
    for k, row in enumerate(dec):
        fpr, tpr = _roc_points(y, row)
        ax.plot(
            fpr,
            tpr,
            color="C0",
            alpha=0.35 if len(dec) > 1 else 1.0,
            lw=1.2,
            label="CV repeat" if k == 0 and len(dec) > 1 else None,
        )
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC (AUC {auc:.2f})" if auc is not None else "ROC")
    if len(dec) > 1:
        ax.legend(loc="lower right")
    return _png(fig)


def confusion_figure(y: NDArray[Any], pred: NDArray[Any]) -> str:
    p = np.atleast_2d(pred)
    yy = np.broadcast_to(y, p.shape)
    m = np.array([[np.sum((yy == t) & (p == q)) for q in (0, 1)] for t in (0, 1)], dtype=float)
    pct = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.0, 3.6))
    ax.imshow(pct, cmap="Blues", vmin=0, vmax=1)
    for t in (0, 1):
        for q in (0, 1):
            ax.text(
                q,
                t,
                f"{100 * pct[t, q]:.0f}%\n({int(m[t, q])})",
                ha="center",
                va="center",
                color="white" if pct[t, q] > 0.5 else "black",
            )
    ax.set_xticks([0, 1], ["non-responder", "responder"])
    ax.set_yticks([0, 1], ["non-responder", "responder"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix" + (f" (sum of {p.shape[0]} repeats)" if len(p) > 1 else ""))
    return _png(fig)


def calibration_figure(
    y: NDArray[Any], proba: NDArray[Any], bins: int = 5, stats: dict[str, Any] | None = None
) -> str:
    pr = np.atleast_2d(proba).ravel()
    yy = np.broadcast_to(y, np.atleast_2d(proba).shape).ravel()
    ok = np.isfinite(pr)
    pr, yy = pr[ok], yy[ok]
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect")
    if len(pr):
        edges = np.unique(np.quantile(pr, np.linspace(0, 1, bins + 1)))
        idx = np.clip(np.searchsorted(edges, pr, side="right") - 1, 0, len(edges) - 2)
        xs = [pr[idx == b].mean() for b in range(len(edges) - 1) if np.any(idx == b)]
        ys = [yy[idx == b].mean() for b in range(len(edges) - 1) if np.any(idx == b)]
        ax.plot(xs, ys, "o-", color="C1", label="observed")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability of response")
    ax.set_ylabel("observed fraction of responders")
    title = "Calibration"
    if stats and stats.get("brier") is not None:
        title += (
            f"\nBrier {stats['brier']:.3f}, intercept {stats['intercept']:+.2f}, "
            f"slope {stats['slope']:.2f}"
        )
    ax.set_title(title)
    ax.legend(loc="upper left")
    return _png(fig)


def permutation_figure(null: NDArray[Any], observed: float, p_value: float | None) -> str:
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    ax.hist(null, bins=min(40, max(10, len(null) // 20)), color="C7", edgecolor="white")
    ax.axvline(observed, color="C3", lw=2, label=f"observed {observed:.3f}")
    ax.axvline(0.5, color="grey", lw=1, ls="--", label="chance 0.5")
    ax.set_xlabel("mean balanced accuracy over CV repeats")
    ax.set_ylabel("permutations")
    title = f"Permutation null ({len(null)} permutations)"
    if p_value is not None:
        title += f"\np = {p_value:.4g}"
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def weights_figure(weights: dict[str, float]) -> str:
    names = list(weights)
    vals = np.array([weights[n] for n in names])
    order = np.argsort(vals)
    fig, ax = plt.subplots(figsize=(5.5, 0.28 * len(names) + 1.2))
    colours = ["C3" if v < 0 else "C2" for v in vals[order]]
    ax.barh([names[i].removeprefix("gm_") for i in order], vals[order], color=colours)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("SVC weight (standardised; > 0 favours response)")
    ax.set_title("Regional weights")
    return _png(fig)


def _table(d: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in d.items()
    )
    return f"<table>{rows}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, dict | list):
        return json.dumps(v)
    return "" if v is None else str(v)


def _metrics_table(metrics: dict[str, dict[str, Any]]) -> str:
    if not metrics:
        return ""
    head = "<tr><th>metric</th><th>estimate</th><th>95% CI</th></tr>"
    rows = "".join(
        f"<tr><td>{html.escape(k.replace('_', ' '))}</td><td>{m['mean']:.3f}</td>"
        f"<td>{m['ci95'][0]:.3f} - {m['ci95'][1]:.3f}</td></tr>"
        for k, m in metrics.items()
    )
    return f"<table>{head}{rows}</table>"


def write_report(
    path: str | Path,
    *,
    title: str,
    label: str,
    summary: dict[str, Any],
    y: NDArray[Any],
    decision: NDArray[Any],
    pred: NDArray[Any],
    proba: NDArray[Any],
    weights: dict[str, float],
    excluded: Sequence[dict[str, str]] = (),
    permutation_null: NDArray[Any] | None = None,
    external: bool = False,
) -> Path:
    """Write the self-contained HTML report; returns its path."""
    metrics = summary.get("metrics") or {}
    auc = (metrics.get("auc") or {}).get("mean")
    perm = summary.get("permutation") or {}
    figures = [
        roc_figure(y, decision, auc),
        confusion_figure(y, pred),
        calibration_figure(y, proba, stats=summary.get("calibration")),
        weights_figure(weights),
    ]
    if permutation_null is not None and len(permutation_null) and perm:
        figures.append(permutation_figure(permutation_null, perm["observed"], perm["p_value"]))
    imgs = "".join(f'<img src="{f}" alt="figure">' for f in figures)
    sections = _sections(summary, external)
    extra = ""
    for key in ("permutation", "calibration", "leave_site_out", "protocol", "cohort"):
        if summary.get(key):
            extra += f"<h2>{html.escape(key.replace('_', ' '))}</h2>{_table(summary[key])}"
    excl = ""
    if excluded:
        items = "".join(
            f"<li>{html.escape(e['subject'])}: {html.escape(e['reason'])}</li>" for e in excluded
        )
        excl = f"<h2>Excluded subjects ({len(excluded)})</h2><ul>{items}</ul>"
    ci_method = str(
        summary.get("ci_method") or (summary.get("protocol") or {}).get("ci_method", "")
    )
    banner = html.escape(label)
    if RESEARCH_USE_ONLY not in label:
        banner += "<br>" + html.escape(RESEARCH_USE_ONLY)
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
.banner{{background:#fde2e1;border:2px solid #c0392b;padding:.6em;font-weight:bold}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top;font-size:90%}}img{{margin:.4em;max-width:48%}}
.headline{{font-size:115%;font-weight:bold}}.verdict{{font-weight:bold;background:#eef;padding:.4em}}
.note{{background:#fff6d6;padding:.4em}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<p class="banner">{banner}</p>
{sections["headline"]}
<h2>{"External validation metrics" if external else "Cross-validated metrics"}</h2>
{_metrics_table(metrics)}
<p>{html.escape(ci_method)}</p>
{sections["final_c"]}{sections["covariates"]}{sections["arms"]}
{imgs}{extra}{excl}
</body></html>
"""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc)
    logger.info("report written: %s", out.name)
    return out


def _p(text: str, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{html.escape(text)}</p>"


def _sections(summary: dict[str, Any], external: bool) -> dict[str, str]:
    """The report's sections in words (headline, final C, covariates, arms)."""
    out = {"headline": "", "final_c": "", "covariates": "", "arms": ""}
    ba = (summary.get("metrics") or {}).get("balanced_accuracy")
    perm = summary.get("permutation") or {}
    if ba:
        text = (
            f"Headline: balanced accuracy {ba['mean']:.3f} "
            f"(95% CI {ba['ci95'][0]:.3f} - {ba['ci95'][1]:.3f})"
        )
        if not external:
            reps = (summary.get("protocol") or {}).get("repeats")
            text = text.replace("Headline: ", f"Headline: mean over {reps} CV repeats of the ")
        if perm:
            text += (
                f"; permutation p = {perm['p_value']:.4g} ({perm['n_permutations']} "
                f"permutations, {perm.get('shuffled', 'labels shuffled')})"
            )
        out["headline"] = _p(text + ".", "headline")
    final_c = summary.get("final_c") or {}
    if final_c.get("note"):
        out["final_c"] = _p(final_c["note"], "note")
    cov_html = ""
    by_class = summary.get("covariates_by_class") or {}
    if by_class:
        head = "<tr><th></th><th>responders</th><th>non-responders</th><th>p</th></tr>"
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v.get('responders', '')))}</td>"
            f"<td>{html.escape(str(v.get('non_responders', '')))}</td>"
            f"<td>{html.escape(str(v.get('p_value', '')))}"
            f"{' (' + html.escape(v['test']) + ')' if v.get('test') else ''}</td></tr>"
            for k, v in by_class.items()
        )
        cov_html += f"<h2>Covariates by class</h2><table>{head}{rows}</table>"
    cov = summary.get("covariates") or {}
    base = cov.get("baseline") or {}
    if base.get("skipped"):
        cov_html += "<h2>Covariates-only baseline</h2>" + _p(f"Not run: {base['skipped']}.")
    elif base:
        cov_html += (
            "<h2>Covariates-only baseline</h2>"
            + _p(
                f"{base['model']}, inputs {', '.join(base['covariates'])}, the same outer and "
                "inner splits as the imaging model."
            )
            + _metrics_table(base["metrics"])
            + _p(base["verdict"], "verdict")
        )
    adj = cov.get("adjusted") or {}
    if adj.get("skipped"):
        cov_html += "<h2>Adjusted imaging model</h2>" + _p(f"Not run: {adj['skipped']}.")
    elif adj:
        d = adj["difference_from_unadjusted"]
        cov_html += (
            "<h2>Adjusted imaging model (sensitivity analysis)</h2>"
            + _p(f"{'; '.join(adj['steps'])}; fitted {adj['fitted']}. {adj['note']}.")
            + _metrics_table(adj["metrics"])
            + _p(
                f"Balanced accuracy minus the unadjusted model's: {d['mean']:+.3f} "
                f"(95% CI {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})."
            )
        )
    out["covariates"] = cov_html
    arms = summary.get("arms") or {}
    if arms.get("skipped"):
        out["arms"] = "<h2>Treatment arms</h2>" + _p(f"Not analysed: {arms['skipped']}.")
    elif arms:
        rows = ""
        for name, a in arms["per_arm"].items():
            if "metrics" not in a:
                rows += (
                    f"<tr><td>{html.escape(name)}</td><td colspan=4>{a.get('skipped')}</td></tr>"
                )
                continue
            m = a["metrics"]
            rows += (
                f"<tr><td>{html.escape(name)}</td><td>{a['n']} ({a['responders']} responders)"
                f"</td><td>{m['balanced_accuracy']['mean']:.3f} "
                f"({m['balanced_accuracy']['ci95'][0]:.3f} - "
                f"{m['balanced_accuracy']['ci95'][1]:.3f})</td>"
                f"<td>{m['auc']['mean']:.3f}</td><td>{a['permutation_p']}</td></tr>"
            )
        head = (
            "<tr><th>arm</th><th>n</th><th>balanced accuracy (95% CI)</th><th>AUC</th>"
            "<th>permutation p</th></tr>"
        )
        inter = arms.get("interaction") or {}
        text = (
            f"Arm x prediction interaction ({inter.get('model')}; arm coded 1 = "
            f"{inter.get('arm_coded_1')}): b3 = "
            f"{(inter.get('coefficients') or {}).get('b3_interaction')}, "
            f"{inter.get('test')}: p = {inter.get('p_value')}."
            if "p_value" in inter
            else f"Interaction not tested: {inter.get('skipped')}."
        )
        out["arms"] = f"<h2>Treatment arms</h2><table>{head}{rows}</table>" + _p(text)
    return out
