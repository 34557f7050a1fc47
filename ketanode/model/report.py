"""The HTML report written next to a model (training) or an evaluation: numbers and figures.

Figures are PNGs drawn with matplotlib's Agg backend and embedded as data URIs, so the
report is one self-contained file: ROC curve (each CV repeat, or the one external run),
confusion matrix (counts summed over repeats, shown as row percentages), calibration curve
(out-of-fold calibrated probabilities in quantile bins), and the SVC weight of each region.
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

from ketanode import RESEARCH_USE_ONLY  # noqa: E402

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


def calibration_figure(y: NDArray[Any], proba: NDArray[Any], bins: int = 5) -> str:
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
    ax.set_title("Calibration")
    ax.legend(loc="upper left")
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
) -> Path:
    """Write the self-contained HTML report; returns its path."""
    metrics = summary.get("metrics") or {}
    auc = (metrics.get("auc") or {}).get("mean")
    figures = [
        roc_figure(y, decision, auc),
        confusion_figure(y, pred),
        calibration_figure(y, proba),
        weights_figure(weights),
    ]
    imgs = "".join(f'<img src="{f}" alt="figure">' for f in figures)
    extra = ""
    for key in ("permutation", "leave_site_out", "protocol", "cohort"):
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
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
.banner{{background:#fde2e1;border:2px solid #c0392b;padding:.6em;font-weight:bold}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top;font-size:90%}}img{{margin:.4em;max-width:48%}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<p class="banner">{html.escape(label)}<br>{html.escape(RESEARCH_USE_ONLY)}</p>
<h2>Metrics</h2>{_metrics_table(metrics)}
<p>{html.escape(ci_method)}</p>
{imgs}{extra}{excl}
</body></html>
"""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc)
    logger.info("report written: %s", out.name)
    return out
