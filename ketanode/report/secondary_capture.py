"""The result as a report page: a DICOM Secondary Capture (RGB) for viewers that show SR
content poorly.

The page (1536 x 2048, portrait, the shape of a reading-room display) shows, top to bottom:
a "RESEARCH USE ONLY" title, the "DEMO" demonstration-model warning when the model is
synthetic (then the series description starts with "DEMO" too), the result (class:
responder, non-responder or indeterminate; the probability; the decision rule with its
threshold and margin; the training cohort's response rate, on which the probability
depends; the decision value), the model (name, version, SHA-256 prefix), the
QC outcome and flagged checks, two rows of axial/coronal/sagittal slices of the T1 with the
grey-matter map overlaid and the territories of the regions that drive the decision outlined,
a bar chart of all regional contributions, and the disclaimer. No patient identifiers are
drawn (the viewer shows them from the header).

Images come from :class:`~ketanode.report.content.ResultForReport`: ``t1_path``,
``gm_path`` and, when given, ``territories_path`` (an integer map on a native grid, region k =
``region_names[k-1]``; the measure step writes it) and ``brain_mask_path`` (the preprocess
step's intracranial mask). Every map is resampled onto the T1's grid (the pipeline writes
them all on its working grid, so they are usually on it already). With a brain mask the
panels are cropped to the brain plus :data:`BRAIN_MARGIN_MM` (a real head's neck, face and
shoulders stay off the page) and every slice passes through the brain (a driving region's
slices through its part inside the mask); without one, to the head. Without territories the
slices show the GM map and the driving regions are listed in text only. Without a T1 the
page has no slices. :func:`slice_geometry` gives the crop and the slice positions a page
draws.

A *not scored* result (no prediction: e.g. quality control failed) gets its own page: the
title, a red "NOT SCORED" headline with its cause ("quality control failed"), the reason, the
failing and warning QC checks, the software (and model, if any), the T1 slices (with the GM
map when given) and the disclaimer; no result, no contributions. Its slices show the image
as received, cropped to the head, not to the brain mask: the mask is outlined instead (the
failure may be that mask), and the slices pass through it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import matplotlib

matplotlib.use("Agg")

import nibabel as nib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.uid import generate_uid

from ketanode.report.content import (
    DISCLAIMER,
    INDETERMINATE,
    NOT_SCORED,
    RESPONDER,
    ResultForReport,
    check_text,
    class_text,
    display_name,
    not_scored_cause,
    not_scored_headline,
    percent,
    rate_text,
    region_of,
)
from ketanode.report.source_header import clean_source_header
from ketanode.texts import DEMO, DEMO_LABEL, RESEARCH_USE_ONLY

logger = logging.getLogger(__name__)
# Body Part Examined defined terms (PS3.16 CID 4031) of the head, none of them paired
HEAD_BODY_PARTS = frozenset({"BRAIN", "HEAD", "HEADNECK", "SKULL"})

SERIES_DESCRIPTION = f"{RESEARCH_USE_ONLY} ketanode ketamine response report"


def series_description(result: ResultForReport) -> str:
    """The page's series description; ``DEMO ...`` for a demonstration model's result."""
    return f"{DEMO} {SERIES_DESCRIPTION}" if result.demo else SERIES_DESCRIPTION


DEFAULT_SERIES_NUMBER = 9902
WIDTH, HEIGHT = 1536, 2048
N_DRIVERS = 4

F32 = NDArray[np.float32]
# colours: dark page, light text
BG = "#111111"
FG = "#f2f2f2"
DIM = "#b0b0b0"
WARN = "#ffb000"
FAIL = "#ff4d4d"
OK = "#5fd35f"
TOWARD_RESPONDER = "#4aa3ff"
TOWARD_NON = "#ff8c42"
REGION_COLOURS = ("#00e5ff", "#ff3df5", "#b6ff00", "#ffffff", "#ffe600", "#ff5e5e")
QC_COLOURS = {"pass": OK, "warn": WARN, "fail": FAIL}
MASK_COLOUR = "#4aa3ff"  # the brain mask's outline on a not-scored page


# --- volumes -----------------------------------------------------------------------------


class _Volumes:
    """T1, GM, territories and brain mask on one closest-canonical (RAS) grid (the T1's),
    cropped to the brain (mask plus :data:`BRAIN_MARGIN_MM`) when a mask is given and
    ``crop_to_brain``, else to the head; ``box`` is that crop, in voxels of the uncropped
    grid. Without the brain crop, a given mask is outlined on the slices (``outline_mask``):
    a page that quality control stopped shows the image as received and what the node took
    for the brain, which may be what went wrong."""

    def __init__(self, result: ResultForReport, crop_to_brain: bool = True) -> None:
        assert result.t1_path is not None
        t1 = _canonical(result.t1_path)
        self.zooms = tuple(float(z) for z in t1.header.get_zooms()[:3])
        self.t1 = np.asarray(t1.get_fdata(dtype=np.float32), dtype=np.float32)
        if self.t1.ndim > 3:
            self.t1 = np.ascontiguousarray(self.t1.reshape(*self.t1.shape[:3], -1)[..., 0])
        self.gm: F32 | None = None
        self.terr: NDArray[np.int16] | None = None
        self.mask: NDArray[np.bool_] | None = None
        if result.gm_path is not None and Path(result.gm_path).is_file():
            gm = _on_grid(_canonical(result.gm_path), t1, order=1)
            self.gm = np.clip(gm, 0.0, 1.0).astype(np.float32)
        if result.territories_path is not None and Path(result.territories_path).is_file():
            terr = _on_grid(_canonical(result.territories_path), t1, order=0)
            self.terr = np.rint(terr).astype(np.int16)
        if result.brain_mask_path is not None and Path(result.brain_mask_path).is_file():
            mask = _on_grid(_canonical(result.brain_mask_path), t1, order=0) > 0.5
            self.mask = mask if mask.any() else None
        # crop every volume to the brain (or the head) plus a margin, so the slices fill their
        # panels and a real head's neck and shoulders stay off the page; the grey levels of a
        # brain crop come from what is drawn (the neck's fat would set them otherwise)
        brain_crop = crop_to_brain and self.mask is not None
        self.outline_mask = self.mask is not None and not brain_crop
        if brain_crop:
            self.box = _crop_box(self.t1, self.mask, self.zooms)
        else:
            t1n = _window(self.t1)
            self.box = _crop_box(t1n, None, self.zooms)
        box = tuple(slice(a, b) for a, b in self.box)
        self.t1 = self.t1[box]
        self.t1n = _window(self.t1) if brain_crop else t1n[box]
        if self.gm is not None:
            self.gm = self.gm[box]
        if self.terr is not None:
            self.terr = self.terr[box]
        if self.mask is not None:
            self.mask = self.mask[box]

    def centroid(self, mask: NDArray[np.bool_]) -> tuple[int, int, int]:
        idx = np.argwhere(mask)
        if len(idx) == 0:
            idx = np.argwhere(self.mask if self.mask is not None else self.t1n > 0.2)
        if len(idx) == 0:
            return tuple(int(s // 2) for s in self.t1.shape)  # type: ignore[return-value]
        c = np.rint(idx.mean(axis=0)).astype(int)
        return int(c[0]), int(c[1]), int(c[2])

    def in_brain(
        self, c: tuple[int, int, int], near: NDArray[np.bool_] | None = None
    ) -> tuple[int, int, int]:
        """``c`` clipped to the grid and, with a brain mask, moved to the nearest voxel (in
        mm) of the brain (of ``near`` within the brain, when that is not empty) if it lies
        outside it: every slice through it then cuts the brain."""
        p = np.clip(np.asarray(c, dtype=int), 0, np.array(self.t1.shape[:3]) - 1)
        point = (int(p[0]), int(p[1]), int(p[2]))
        if self.mask is None or self.mask[point]:
            return point
        target = self.mask & near if near is not None else self.mask
        idx = np.argwhere(target if target.any() else self.mask)
        d = np.sum(((idx - p) * np.asarray(self.zooms[:3])) ** 2, axis=1)
        q = idx[int(np.argmin(d))]
        return int(q[0]), int(q[1]), int(q[2])


BRAIN_MARGIN_MM = 10.0


def _window(t1: F32) -> F32:
    """``t1`` scaled to [0, 1] between the 1st and 99.5th percentiles of its voxels > 0."""
    values = t1[t1 > 0]
    lo, hi = np.percentile(values, (1.0, 99.5)) if values.size else (0.0, 1.0)
    out: F32 = np.clip((t1 - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)
    return out


def _crop_box(
    t1n: F32, mask: NDArray[np.bool_] | None, zooms: tuple[float, ...]
) -> tuple[tuple[int, int], ...]:
    """(start, stop) per axis: the brain mask's bounding box plus BRAIN_MARGIN_MM, or, without
    a mask, what is brighter than the background (``t1n`` > 0.08, ``t1n`` scaled to [0, 1])
    plus 3-4 voxels; the whole grid if that is empty."""
    shape = t1n.shape[:3]
    if mask is not None:
        idx = np.argwhere(mask)
        margin = np.ceil(BRAIN_MARGIN_MM / np.asarray(zooms[:3], dtype=float)).astype(int)
        a, b = idx.min(axis=0) - margin, idx.max(axis=0) + 1 + margin
    else:
        idx = np.argwhere(t1n > 0.08)
        if not len(idx):
            return tuple((0, int(n)) for n in shape)
        a, b = idx.min(axis=0) - 3, idx.max(axis=0) + 4
    a, b = np.maximum(a, 0), np.minimum(b, shape)
    return tuple((int(i), int(j)) for i, j in zip(a, b, strict=True))


def _canonical(path: str | Path) -> nib.Nifti1Image:
    img = nib.load(str(path))
    canon = nib.as_closest_canonical(img)
    assert isinstance(canon, nib.Nifti1Image)
    return canon


def _on_grid(img: nib.Nifti1Image, ref: nib.Nifti1Image, order: int) -> F32:
    data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    if data.ndim > 3:
        data = data[..., 0]
    if data.shape == ref.shape[:3] and np.allclose(img.affine, ref.affine, atol=1e-3):
        return data
    from nibabel.processing import resample_from_to

    out = resample_from_to(nib.Nifti1Image(data, img.affine), (ref.shape[:3], ref.affine), order)
    return np.asarray(out.get_fdata(dtype=np.float32), dtype=np.float32)


def _slice(vol: NDArray[Any], view: str, idx: int) -> NDArray[Any]:
    """A 2D slice in display orientation (row 0 at the top): radiological left-right for
    axial and coronal (patient right on the viewer's left), anterior left for sagittal."""
    if view == "axial":
        s = vol[:, :, idx].T  # rows: A-P index, cols: R-L index (x increases to the right)
        return np.asarray(s[::-1, ::-1])  # anterior at the top, patient right on the left
    if view == "coronal":
        s = vol[:, idx, :].T
        return np.asarray(s[::-1, ::-1])  # superior at the top, patient right on the left
    s = vol[idx, :, :].T
    return np.asarray(s[::-1, ::-1])  # superior at the top, anterior on the left


def _aspect(zooms: tuple[float, ...], view: str) -> float:
    """Height/width of one displayed pixel."""
    x, y, z = zooms[:3]
    return {"axial": y / x, "coronal": z / x, "sagittal": z / y}[view]


_VIEW_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
_VIEW_MARKS = {"axial": ("R", "L"), "coronal": ("R", "L"), "sagittal": ("A", "P")}


# --- page --------------------------------------------------------------------------------


def _driver_regions(result: ResultForReport) -> list[tuple[str, float, int | None]]:
    """(feature, contribution, territory label or None) of the top drivers."""
    index = {f"gm_{name}": k for k, name in enumerate(result.region_names, start=1)}
    return [(f, c, index.get(f)) for f, c in result.drivers(N_DRIVERS)]


def _slice_centres(
    vols: _Volumes, drivers: Sequence[tuple[str, float, int | None]]
) -> list[tuple[int, int, int]]:
    """Two slice positions: through the top driver, and through the next driver whose
    territory centre is >= 25 mm away (or above/below the brain centre). A territory's
    centre is taken within the brain mask when there is one, and every position is moved
    into the brain if it falls outside it (a C-shaped territory, a label that spills)."""
    if vols.mask is not None:
        brain = vols.mask
    else:
        brain = vols.gm > 0.3 if vols.gm is not None else vols.t1n > 0.3
    if vols.terr is None or not any(k for _, _, k in drivers):
        c = vols.centroid(brain)
        dz = int(round(20.0 / vols.zooms[2]))
        return [vols.in_brain((c[0], c[1], c[2] + dz)), vols.in_brain((c[0], c[1], c[2] - dz))]
    centres = []
    for _, _, k in drivers:
        if not k:
            continue
        region = vols.terr == k
        inside = region & vols.mask if vols.mask is not None else region
        centres.append(vols.in_brain(vols.centroid(inside if inside.any() else region), region))
    first = centres[0]
    mm = np.array(vols.zooms)
    for c in centres[1:]:
        if np.linalg.norm((np.array(c) - np.array(first)) * mm) >= 25.0:
            return [first, c]
    c = vols.in_brain(vols.centroid(brain))
    return [first, c if c != first else vols.in_brain((c[0], c[1], max(0, c[2] - 10)))]


@dataclass(frozen=True)
class SliceGeometry:
    """Where the page's slices are, in voxels of the T1 it draws after reorientation to the
    closest canonical (RAS) grid: ``box`` is the (start, stop) crop of each axis, ``centres``
    the points the axial, coronal and sagittal slices of each row pass through (uncropped
    grid), ``brain_box`` the brain mask's (start, stop) bounding box (``None`` without one)."""

    box: tuple[tuple[int, int], ...]
    centres: tuple[tuple[int, int, int], ...]
    brain_box: tuple[tuple[int, int], ...] | None
    zooms: tuple[float, ...]


def slice_geometry(result: ResultForReport) -> SliceGeometry:
    """The crop and the slice positions that :func:`render_report_page` draws for ``result``
    (the two rows of three views; a thin slab's page draws its own plane instead): a scored
    page is cropped to the brain mask, a not-scored page to the head (its slices still pass
    through the brain mask)."""
    if result.t1_path is None:
        raise ValueError("no T1: the page has no slices")
    vols = _Volumes(result, crop_to_brain=result.scored)
    drivers = _driver_regions(result) if result.scored else []
    start = np.array([a for a, _ in vols.box])
    centres = tuple(
        (int(c[0] + start[0]), int(c[1] + start[1]), int(c[2] + start[2]))
        for c in _slice_centres(vols, drivers)
    )
    brain_box = None
    if vols.mask is not None:
        idx = np.argwhere(vols.mask) + start
        brain_box = tuple(
            (int(a), int(b) + 1) for a, b in zip(idx.min(axis=0), idx.max(axis=0), strict=True)
        )
    return SliceGeometry(vols.box, centres, brain_box, vols.zooms)


def _draw_slices(
    fig: Figure,
    vols: _Volumes,
    drivers: Sequence[tuple[str, float, int | None]],
    top: float,
    height: float,
) -> None:
    centres = _slice_centres(vols, drivers)
    views = ("axial", "coronal", "sagittal")
    rows = len(centres)
    cell_h = height / rows
    # panel widths follow each view's displayed width/height so the slices fill the row
    shape = vols.t1.shape
    dims = {
        "axial": (shape[0], shape[1]),
        "coronal": (shape[0], shape[2]),
        "sagittal": (shape[1], shape[2]),
    }  # (columns, rows) of the displayed slice
    ratios = [dims[v][0] / (dims[v][1] * _aspect(vols.zooms, v)) for v in views]
    gap = 12.0
    h_px = min((cell_h * HEIGHT) - gap, (0.96 * WIDTH - gap * (len(views) - 1)) / sum(ratios))
    widths = [r * h_px / WIDTH for r in ratios]
    x0 = 0.5 - (sum(widths) + gap * (len(views) - 1) / WIDTH) / 2
    lefts = [x0 + sum(widths[:i]) + i * gap / WIDTH for i in range(len(views))]
    for r, centre in enumerate(centres):
        for c, view in enumerate(views):
            y0 = top - (r + 1) * cell_h + (cell_h - h_px / HEIGHT) / 2
            ax = fig.add_axes((lefts[c], y0, widths[c], h_px / HEIGHT))
            idx = int(np.clip(centre[_VIEW_AXIS[view]], 0, vols.t1.shape[_VIEW_AXIS[view]] - 1))
            _draw_panel(ax, vols, view, idx, drivers)


def _draw_panel(
    ax: Axes,
    vols: _Volumes,
    view: str,
    idx: int,
    drivers: Sequence[tuple[str, float, int | None]],
) -> None:
    """One slice: the T1, the GM map overlaid, the drivers' territories outlined."""
    from matplotlib.colors import LinearSegmentedColormap

    gm_cmap = LinearSegmentedColormap.from_list("gm", ["#ffd000", "#ff3000"])
    ax.set_facecolor("black")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#333333")
    t1 = _slice(vols.t1n, view, idx)
    aspect = _aspect(vols.zooms, view)
    ax.imshow(t1, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="bilinear")
    if vols.gm is not None:
        gm = _slice(vols.gm, view, idx)
        rgba = gm_cmap(gm)
        rgba[..., 3] = np.where(gm > 0.25, 0.55 * gm, 0.0)
        ax.imshow(rgba, aspect=aspect, interpolation="bilinear")
    if vols.outline_mask and vols.mask is not None:
        brain = _slice(vols.mask, view, idx).astype(np.float32)
        if brain.any():
            ax.contour(brain, levels=[0.5], colors=[MASK_COLOUR], linewidths=2.0)
    if vols.terr is not None:
        terr = _slice(vols.terr, view, idx)
        for i, (_, _, k) in enumerate(drivers):
            if not k:
                continue
            mask = (terr == k).astype(np.float32)
            if mask.any():
                ax.contour(
                    mask,
                    levels=[0.5],
                    colors=[REGION_COLOURS[i % len(REGION_COLOURS)]],
                    linewidths=2.6,
                )
    left, right = _VIEW_MARKS[view]
    for x, mark, ha in ((0.01, left, "left"), (0.99, right, "right")):
        ax.text(
            x,
            0.5,
            mark,
            color=FG,
            fontsize=20,
            weight="bold",
            ha=ha,
            va="center",
            transform=ax.transAxes,
            bbox={"facecolor": "black", "edgecolor": "none", "alpha": 0.6, "pad": 2},
        )
    ax.text(
        0.02,
        0.97,
        view,
        color=DIM,
        fontsize=18,
        transform=ax.transAxes,
        va="top",
        ha="left",
    )


def _thin_axis(vols: _Volumes) -> int | None:
    """The axis along which the image is a thin slab (extent < 40 % of the largest), if any."""
    extent = np.array(vols.t1.shape[:3], dtype=float) * np.array(vols.zooms[:3])
    axis = int(np.argmin(extent))
    return axis if extent[axis] < 0.4 * float(extent.max()) else None


def _draw_slab(fig: Figure, vols: _Volumes, axis: int, top: float, height: float) -> None:
    """Up to three slices in the slab's plane (through its quarter, middle, three quarters)
    side by side: a thin slab's other views would be slivers."""
    view = {v: k for k, v in _VIEW_AXIS.items()}[axis]
    n = vols.t1.shape[axis]
    picks = sorted({int(round(q * (n - 1))) for q in (0.25, 0.5, 0.75)})
    dims = {
        "axial": (vols.t1.shape[0], vols.t1.shape[1]),
        "coronal": (vols.t1.shape[0], vols.t1.shape[2]),
        "sagittal": (vols.t1.shape[1], vols.t1.shape[2]),
    }[view]
    ratio = dims[0] / (dims[1] * _aspect(vols.zooms, view))
    gap = 12.0
    k = len(picks)
    h_px = min(height * HEIGHT - gap, (0.96 * WIDTH - gap * (k - 1)) / (k * ratio))
    w = ratio * h_px / WIDTH
    x0 = 0.5 - (k * w + gap * (k - 1) / WIDTH) / 2
    y0 = top - height + (height - h_px / HEIGHT) / 2
    for i, idx in enumerate(picks):
        ax = fig.add_axes((x0 + i * (w + gap / WIDTH), y0, w, h_px / HEIGHT))
        _draw_panel(ax, vols, view, idx, [])


def _draw_contributions(
    fig: Figure,
    result: ResultForReport,
    drivers: Sequence[tuple[str, float, int | None]],
    rect: tuple[float, float, float, float],
) -> None:
    items = sorted(result.contributions.items(), key=lambda kv: kv[1])
    if not items:
        return
    colour_of = {f: REGION_COLOURS[i % len(REGION_COLOURS)] for i, (f, _, _) in enumerate(drivers)}
    ax = fig.add_axes(rect)
    ax.set_facecolor(BG)
    names = [display_name(f) for f, _ in items]
    values = [v for _, v in items]
    colours = [TOWARD_RESPONDER if v >= 0 else TOWARD_NON for v in values]
    ypos = np.arange(len(items))
    ax.barh(ypos, values, color=colours, height=0.72)
    ax.axvline(0, color=DIM, linewidth=1.2)
    ax.set_yticks(ypos)
    ax.set_yticklabels(names, fontsize=17, color=DIM)
    for tick, (f, _) in zip(ax.get_yticklabels(), items, strict=True):
        if f in colour_of:
            tick.set_color(colour_of[f])
            tick.set_fontweight("bold")
    ax.tick_params(axis="x", colors=FG, labelsize=14)
    ax.tick_params(axis="y", length=0)
    for spine in ("top", "right", "left"):
        ax.spines[spine].set_visible(False)
    ax.spines["bottom"].set_color(DIM)
    ax.set_xlabel(
        "contribution to the SVC decision value  (+ toward responder, - toward non-responder)",
        color=FG,
        fontsize=15,
    )
    ax.set_title("Regional contributions", color=FG, fontsize=20, loc="left", pad=10)
    lim = max(abs(v) for v in values) * 1.15 or 1.0
    ax.set_xlim(-lim, lim)


def _title(fig: Figure, result: ResultForReport) -> float:
    """Title, subtitle and the demonstration-model banner; returns the y below them."""
    fig.text(
        0.5,
        0.985,
        f"{RESEARCH_USE_ONLY}  -  ketamine response estimate",
        ha="center",
        va="top",
        fontsize=34,
        weight="bold",
        color=FG,
    )
    fig.text(
        0.5,
        0.956,
        "ketanode: regional grey matter from the 3D T1 and a linear SVC",
        ha="center",
        va="top",
        fontsize=20,
        color=DIM,
    )
    y = 0.935
    if result.model_synthetic:
        fig.patches.append(
            Rectangle(
                (0.02, y - 0.043), 0.96, 0.043, transform=fig.transFigure, color=WARN, zorder=0
            )
        )
        fig.text(
            0.5,
            y - 0.0215,
            f"{DEMO}: {DEMO_LABEL}",
            ha="center",
            va="center",
            fontsize=21,
            weight="bold",
            color="black",
        )
        y -= 0.055
    return y


def _text_block(
    fig: Figure,
    result: ResultForReport,
    has_territories: bool,
    drivers: Sequence[tuple[str, float, int | None]],
) -> float:
    """Title, warnings, result, model and QC lines; returns the y below them."""
    assert result.probability is not None and result.decision_value is not None
    y = _title(fig, result)
    cls = class_text(result)
    colour = (
        WARN
        if result.predicted_class == INDETERMINATE
        else TOWARD_RESPONDER
        if result.predicted_class == RESPONDER
        else TOWARD_NON
    )
    fig.text(0.03, y, "Predicted:", fontsize=30, color=DIM, va="top")
    fig.text(0.21, y, cls, fontsize=34, weight="bold", color=colour, va="top")
    fig.text(
        0.60,
        y,
        f"P(response) = {percent(result.probability)}",
        fontsize=30,
        weight="bold",
        color=FG,
        va="top",
    )
    y -= 0.032
    for line in _rule_lines(result):
        fig.text(0.03, y, _fit(line, 118), fontsize=17, color=DIM, va="top")
        y -= 0.022
    y -= 0.006
    fig.text(
        0.03, y, _model_line(result), fontsize=20, color=FG, va="top", family="DejaVu Sans Mono"
    )
    y -= 0.026
    qc_colour = QC_COLOURS[result.qc_outcome]
    fig.text(0.03, y, "QC:", fontsize=22, color=FG, va="top")
    fig.text(
        0.075, y, result.qc_outcome.upper(), fontsize=22, weight="bold", color=qc_colour, va="top"
    )
    flagged = result.flagged_checks()
    shown = (
        "; ".join(check_text(c) for c in flagged[:3])
        if flagged
        else (f"all {len(result.qc_checks)} checks passed")
    )
    if len(flagged) > 3:
        shown += f"; +{len(flagged) - 3} more"
    fig.text(0.16, y + 0.001, _fit(shown, 100), fontsize=18, color=DIM, va="top")
    y -= 0.03
    # the driving regions, in their outline colours
    fig.text(
        0.03,
        y,
        "Regions driving the decision"
        + ("" if has_territories else " (outlines not available)")
        + ":",
        fontsize=20,
        color=FG,
        va="top",
    )
    y -= 0.025
    for i, (f, c, _) in enumerate(drivers):
        colour_i = REGION_COLOURS[i % len(REGION_COLOURS)] if has_territories else FG
        label = f"{i + 1}. {display_name(f)}  {c:+.2f}"
        fig.text(
            0.05 + 0.47 * (i % 2),
            y - 0.026 * (i // 2),
            label,
            fontsize=21,
            weight="bold",
            color=colour_i,
            va="top",
        )
    y -= 0.026 * ((len(drivers) + 1) // 2) + 0.006
    return y


def _rule_lines(result: ResultForReport) -> list[str]:
    """The decision rule and the training cohort's response rate, short enough for a line."""
    d = f"SVC decision value {result.decision_value:+.3f}"
    t, m = result.decision_threshold, result.indeterminate_margin
    if t is None or m is None:
        return [f"Class from the sign of the SVC decision value; {d}.", rate_text(result)]
    r = result.training_response_rate
    rate = percent(r) if r is not None else "not recorded"
    return [
        f"Rule: responder if P >= {percent(t + m)}, non-responder if P <= {percent(t - m)}, "
        f"else indeterminate; {d}.",
        f"P depends on the training cohort's response rate ({rate}); threshold {percent(t)} = "
        "P at the SVC's balanced boundary.",
    ]


def _model_line(result: ResultForReport) -> str:
    software = f"software {result.software_version}"
    if result.model_name is None and result.model_sha256 is None:
        return f"Model: none applied   {software}"
    version = f" ({result.model_version})" if result.model_version else ""
    sha = f"   SHA-256 {result.model_sha256[:16]}" if result.model_sha256 else ""
    return f"Model: {result.model_name or 'unnamed'}{version}{sha}   {software}"


def _not_scored_block(fig: Figure, result: ResultForReport) -> float:
    """Title, the NOT SCORED headline, the reason, the flagged QC checks and the software
    line of a not-scored result; returns the y below them."""
    y = _title(fig, result)
    box = 0.105
    fig.patches.append(
        Rectangle((0.02, y - box), 0.96, box, transform=fig.transFigure, color=FAIL, zorder=0)
    )
    fig.text(
        0.5,
        y - 0.037,
        NOT_SCORED,
        ha="center",
        va="center",
        fontsize=70,
        weight="bold",
        color="black",
    )
    fig.text(
        0.5,
        y - 0.083,
        _fit(not_scored_cause(result), 48),
        ha="center",
        va="center",
        fontsize=36,
        weight="bold",
        color="black",
    )
    y -= box + 0.014
    fig.text(
        0.03,
        y,
        "No prediction was made for this series.",
        fontsize=26,
        weight="bold",
        color=FG,
        va="top",
    )
    y -= 0.034
    fig.text(0.03, y, "Reason:", fontsize=22, color=DIM, va="top")
    lines = _wrap((result.not_scored_reason or "").strip(), 78).splitlines() or ["-"]
    if len(lines) > 4:
        lines = [*lines[:3], _fit(lines[3] + " ...", 78)]
    fig.text(0.15, y, "\n".join(lines), fontsize=22, color=FG, va="top", linespacing=1.25)
    y -= 0.0195 * len(lines) + 0.012
    fig.text(0.03, y, "QC:", fontsize=22, color=FG, va="top")
    fig.text(
        0.075,
        y,
        result.qc_outcome.upper(),
        fontsize=22,
        weight="bold",
        color=QC_COLOURS[result.qc_outcome],
        va="top",
    )
    flagged = result.flagged_checks()
    if not flagged:
        fig.text(0.16, y, "no failing or warning check recorded", fontsize=20, color=DIM, va="top")
        y -= 0.024
    for i, check in enumerate(flagged[:5]):
        colour = QC_COLOURS.get(str(check.get("outcome")), DIM)
        fig.text(0.16, y, _fit(check_text(check), 88), fontsize=20, color=colour, va="top")
        y -= 0.024
        if i == 4 and len(flagged) > 5:
            fig.text(0.16, y, f"+{len(flagged) - 5} more", fontsize=20, color=DIM, va="top")
            y -= 0.024
    y -= 0.006
    fig.text(
        0.03, y, _model_line(result), fontsize=18, color=DIM, va="top", family="DejaVu Sans Mono"
    )
    y -= 0.03
    return y


def _fit(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def render_report_page(result: ResultForReport) -> NDArray[np.uint8]:
    """The report page as an RGB array (HEIGHT x WIDTH x 3, uint8)."""
    fig = Figure(figsize=(WIDTH / 100, HEIGHT / 100), dpi=100, facecolor=BG)
    canvas = FigureCanvasAgg(fig)
    if not result.scored:
        _not_scored_page(fig, result)
        return _pixels(canvas)
    has_t1 = result.t1_path is not None and Path(result.t1_path).is_file()
    vols = _Volumes(result) if has_t1 else None
    drivers = _driver_regions(result)
    has_terr = vols is not None and vols.terr is not None
    y = _text_block(fig, result, has_terr, drivers)
    legend_y = 0.3
    if vols is not None:
        _draw_slices(fig, vols, drivers, top=y, height=y - legend_y - 0.005)
        fig.text(
            0.03,
            legend_y,
            "T1 with grey-matter probability (yellow-red) "
            + ("and the driving regions' territories outlined" if has_terr else ""),
            fontsize=16,
            color=DIM,
            va="top",
        )
    else:
        fig.text(0.5, (y + legend_y) / 2, "no image available", ha="center", fontsize=24, color=DIM)
    _draw_contributions(fig, result, drivers, (0.22, 0.085, 0.74, 0.175))
    _disclaimer(fig)
    return _pixels(canvas)


def _not_scored_page(fig: Figure, result: ResultForReport) -> None:
    y = _not_scored_block(fig, result)
    legend_y = 0.1
    vols: _Volumes | None = None
    if result.t1_path is not None and Path(result.t1_path).is_file():
        try:  # the series failed QC: its image may be odd; the page must still be made
            vols = _Volumes(result, crop_to_brain=False)
            axis = _thin_axis(vols)
            if axis is None:
                _draw_slices(fig, vols, [], top=y, height=y - legend_y - 0.005)
            else:
                _draw_slab(fig, vols, axis, top=y, height=y - legend_y - 0.005)
        except Exception:
            logger.warning("report page: T1 slices not drawn", exc_info=True)
            for ax in list(fig.axes):
                ax.remove()
            vols = None
    if vols is not None:
        gm = " with grey-matter probability (yellow-red)" if vols.gm is not None else ""
        brain = ", brain mask in blue" if vols.outline_mask else ""
        legend = f"T1 as received{gm}{brain}; {not_scored_headline(result)}, no prediction was made"
        fig.text(0.03, legend_y, _fit(legend, 140), fontsize=16, color=DIM, va="top")
    else:
        fig.text(0.5, (y + legend_y) / 2, "no image available", ha="center", fontsize=24, color=DIM)
    _disclaimer(fig)


def _disclaimer(fig: Figure) -> None:
    fig.text(
        0.5,
        0.012,
        _wrap(DISCLAIMER, 120),
        ha="center",
        va="bottom",
        fontsize=16,
        color=FG,
        weight="bold",
        linespacing=1.3,
    )


def _pixels(canvas: FigureCanvasAgg) -> NDArray[np.uint8]:
    canvas.draw()  # type: ignore[no-untyped-call]
    rgba = np.asarray(canvas.buffer_rgba())  # type: ignore[no-untyped-call]
    return np.ascontiguousarray(rgba[..., :3]).astype(np.uint8)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


# --- DICOM -------------------------------------------------------------------------------


def build_report_image(
    source: Sequence[Dataset],
    result: ResultForReport,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = DEFAULT_SERIES_NUMBER,
    instance_number: int = 1,
    device_model_name: str = "ketanode DICOM node",
    institution_name: str | None = None,
) -> hd.sc.SCImage:
    """A single-frame RGB Secondary Capture of the report page, in the source's study."""
    if not source:
        raise ValueError("no source instances")
    if len({str(ds.StudyInstanceUID) for ds in source}) != 1:
        raise ValueError("source instances belong to more than one study")
    pixels = render_report_page(result)
    now = dt.datetime.now()
    # patient and study attributes from the first instance, invalid values left empty
    ref = clean_source_header(source[0]).dataset
    kwargs: dict[str, Any] = {}
    if "SpecificCharacterSet" in ref:
        kwargs["specific_character_set"] = ref.SpecificCharacterSet
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer="ketanode",
        patient_orientation=("L", "P"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",  # explicit VR little endian
        series_description=series_description(result),
        manufacturer_model_name=device_model_name,
        software_versions=result.software_version,
        institution_name=institution_name,
        content_date=now.date(),
        content_time=now.time(),
        series_date=now.date(),
        series_time=now.time(),
        **kwargs,
    )
    # a report page has no patient orientation (Type 2C: present, empty)
    del sc.PatientOrientation
    sc.add_new("PatientOrientation", "CS", None)
    # the source's body part when it is one of the head's (all unpaired, so General Series
    # Laterality, Type 2C, is then absent); anything else (another defined term, a paired
    # part, or a value that is none: '45Y' was seen) is not what this page shows: BRAIN
    body = str(ref.get("BodyPartExamined") or "").strip().upper()
    sc.BodyPartExamined = body if body in HEAD_BODY_PARTS else "BRAIN"
    sc.BurnedInAnnotation = "NO"  # text is drawn, but no patient identifiers
    comment = "" if result.scored else f": {not_scored_headline(result)}"
    demo = f"{DEMO}: {DEMO_LABEL}. " if result.demo else ""
    sc.ImageComments = (
        f"{demo}{RESEARCH_USE_ONLY}. ketanode report page{comment}; see the SR of this study."
    )
    sc.DerivationDescription = "Report page rendered from the source series' T1"
    logger.info(
        "report image built: SOP instance %s, series %s, study %s (%dx%d)",
        sc.SOPInstanceUID,
        sc.SeriesInstanceUID,
        sc.StudyInstanceUID,
        sc.Columns,
        sc.Rows,
    )
    return sc


def write_png(result_or_ds: ResultForReport | Dataset, path: str | Path) -> Path:
    """Save the report page (from a result, or from a built SC's pixel data) as PNG."""
    from PIL import Image

    if isinstance(result_or_ds, ResultForReport):
        pixels = render_report_page(result_or_ds)
    else:
        pixels = np.asarray(result_or_ds.pixel_array, dtype=np.uint8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="RGB").save(out, optimize=True)
    return out


__all__ = [
    "SliceGeometry",
    "build_report_image",
    "render_report_page",
    "slice_geometry",
    "write_png",
    "region_of",
]
