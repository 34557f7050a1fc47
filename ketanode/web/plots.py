"""The dashboard's figures, drawn on the server as SVG with matplotlib (no JavaScript, nothing
fetched at run time): results per day, the probability distribution, time per pipeline step
over time, and the ingest rate (instances per hour and per day).

Each function takes plain rows (``ketanode/web/queries.py``) and returns SVG bytes. Figures
are built with the object API (no pyplot state); a lock serialises drawing because
matplotlib's font and text caches are shared.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import defaultdict
from io import BytesIO
from typing import Any, cast

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_lock = threading.Lock()

OUTCOME_COLOURS = {
    "responder": "#2f9e44",
    "non-responder": "#e8590c",
    "indeterminate": "#f59f00",
    "not scored": "#868e96",
}
STEP_ORDER = (
    "convert",
    "qc_input",
    "preprocess",
    "qc_registration",
    "segment",
    "measure",
    "qc",
    "predict",
    "report",
)


def _figure(height: float = 3.0) -> Figure:
    fig = Figure(figsize=(8.0, height), dpi=100)
    fig.patch.set_facecolor("white")
    return fig


def _svg(fig: Figure) -> bytes:
    buf = BytesIO()
    with _lock:
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buf.getvalue()


def _nothing(fig: Figure, title: str) -> bytes:
    ax = fig.add_subplot()
    ax.set_title(title, loc="left", fontsize=11)
    ax.text(0.5, 0.5, "no data yet", ha="center", va="center", color="#868e96", fontsize=12)
    ax.set_axis_off()
    return _svg(fig)


def _colour(outcome: str, i: int) -> str:
    return OUTCOME_COLOURS.get(outcome, f"C{i % 10}")


def _sparse_ticks(labels: list[str], every: int) -> tuple[list[int], list[str]]:
    idx = list(range(0, len(labels), max(1, every)))
    return idx, [labels[i] for i in idx]


def results_per_day(
    rows: list[tuple[str, str, int]], days: int, today: dt.date | None = None
) -> bytes:
    """Stacked bars: results per UTC day by outcome (class, or not scored)."""
    title = f"Results per day (last {days} days, UTC)"
    fig = _figure()
    if not rows:
        return _nothing(fig, title)
    today = today or dt.datetime.now(dt.UTC).date()
    labels = [(today - dt.timedelta(days=days - 1 - i)).isoformat() for i in range(days)]
    index = {d: i for i, d in enumerate(labels)}
    counts: dict[str, list[int]] = defaultdict(lambda: [0] * days)
    for day, outcome, n in rows:
        if day in index:
            counts[outcome][index[day]] += n
    ax = fig.add_subplot()
    bottom = [0] * days
    outcomes = [o for o in OUTCOME_COLOURS if o in counts] + sorted(
        o for o in counts if o not in OUTCOME_COLOURS
    )
    for i, outcome in enumerate(outcomes):
        values = counts[outcome]
        ax.bar(range(days), values, bottom=bottom, color=_colour(outcome, i), label=outcome)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ticks, names = _sparse_ticks([d[5:] for d in labels], 5)
    ax.set_xticks(ticks, names, fontsize=8)
    ax.set_ylabel("results")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, loc="left", fontsize=11)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def probability_distribution(rows: list[tuple[float, str]]) -> bytes:
    """Histogram of the predicted probability of response, by predicted class."""
    title = "Probability of response (scored results)"
    fig = _figure()
    if not rows:
        return _nothing(fig, title)
    ax = fig.add_subplot()
    by_class: dict[str, list[float]] = defaultdict(list)
    for p, cls in rows:
        by_class[cls].append(p)
    classes = sorted(by_class)
    bins = [i / 20 for i in range(21)]
    ax.hist(
        [by_class[c] for c in classes],
        bins=bins,
        stacked=True,
        color=[_colour(c, i) for i, c in enumerate(classes)],
        label=classes,
    )
    # no line at 0.5: each model's threshold is its training cohort's response rate
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability of response")
    ax.set_ylabel("results")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{title}, n = {len(rows)}", loc="left", fontsize=11)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def step_times(rows: list[tuple[dt.datetime, str, float]], days: int) -> bytes:
    """Seconds per pipeline step over time (one series of points per step)."""
    title = f"Processing time per step (last {days} days)"
    fig = _figure(3.4)
    if not rows:
        return _nothing(fig, title)
    by_step: dict[str, list[tuple[dt.datetime, float]]] = defaultdict(list)
    for at, name, seconds in rows:
        by_step[name].append((at, seconds))
    names = [s for s in STEP_ORDER if s in by_step] + sorted(
        s for s in by_step if s not in STEP_ORDER
    )
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        points = sorted(by_step[name])
        ax.plot(
            cast(Any, [p[0] for p in points]),  # datetimes: matplotlib's date units
            [max(p[1], 1e-3) for p in points],
            marker="o",
            markersize=4,
            linewidth=1,
            color=f"C{i % 10}",
            label=name,
        )
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log)")
    ax.set_title(title, loc="left", fontsize=11)
    ax.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.spines[["top", "right"]].set_visible(False)
    fig.autofmt_xdate()
    return _svg(fig)


def ingest_rate(
    hourly: list[tuple[str, int]],
    daily: list[tuple[str, int]],
    hours: int,
    days: int,
    now: dt.datetime | None = None,
) -> bytes:
    """Instances received per hour (last ``hours``) and per day (last ``days``)."""
    title = "Instances received"
    fig = _figure(3.4)
    if not hourly and not daily:
        return _nothing(fig, title)
    now = now or dt.datetime.now(dt.UTC)
    hour_labels = [
        (now - dt.timedelta(hours=hours - 1 - i)).strftime("%Y-%m-%d %H:00") for i in range(hours)
    ]
    day_labels = [(now.date() - dt.timedelta(days=days - 1 - i)).isoformat() for i in range(days)]
    per_hour = dict(hourly)
    per_day = dict(daily)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    left.bar(range(hours), [per_hour.get(h, 0) for h in hour_labels], color="#1971c2")
    ticks, names = _sparse_ticks([h[11:16] for h in hour_labels], 6)
    left.set_xticks(ticks, names, fontsize=8)
    left.set_title(f"{title} per hour (last {hours} h, UTC)", loc="left", fontsize=10)
    right.bar(range(days), [per_day.get(d, 0) for d in day_labels], color="#1864ab")
    ticks, names = _sparse_ticks([d[5:] for d in day_labels], 7)
    right.set_xticks(ticks, names, fontsize=8)
    right.set_title(f"per day (last {days} days)", loc="left", fontsize=10)
    for ax in (left, right):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.spines[["top", "right"]].set_visible(False)
    left.set_ylabel("instances")
    return _svg(fig)
