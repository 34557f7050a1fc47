"""Quality control a radiographer would recognise.

Each check has a value, the thresholds it was judged by (from ``[pipeline.qc]``) and an
outcome: pass, warn or fail. A failed check stops the job (:class:`QCFailed`, whose message
lists the failed checks) instead of producing a number nobody should trust.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import ants
import numpy as np

from ketanode.config import QCSettings
from ketanode.imaging.measure import Measurement
from ketanode.imaging.preprocess import Registration, read, template_at, template_priors
from ketanode.imaging.segment import Segmentation

Outcome = Literal["pass", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    warn: Any
    fail: Any
    outcome: Outcome
    unit: str
    description: str

    def reason(self) -> str:
        value = f"{_fmt(self.value)}{self.unit}"
        return f"{self.name} = {value} ({self.description}; fail {_limit(self.fail)})"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["value"] = None if not math.isfinite(self.value) else round(self.value, 4)
        return d


class QCFailed(RuntimeError):
    def __init__(self, checks: Sequence[Check]) -> None:
        self.all_checks = list(checks)  # for the "not scored" report: every check of the step
        self.checks = [c for c in checks if c.outcome == "fail"]
        super().__init__("QC failed: " + "; ".join(c.reason() for c in self.checks))


def _fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.4g}"


def _limit(x: Any) -> str:
    if isinstance(x, tuple):
        return f"outside [{x[0]:g}, {x[1]:g}]"
    return f"past {x:g}"


def check_min(name: str, value: float, warn: float, fail: float, unit: str, desc: str) -> Check:
    out: Outcome = (
        "fail" if not math.isfinite(value) or value < fail else "warn" if value < warn else "pass"
    )
    return Check(name, float(value), warn, fail, out, unit, desc)


def check_max(name: str, value: float, warn: float, fail: float, unit: str, desc: str) -> Check:
    out: Outcome = (
        "fail" if not math.isfinite(value) or value > fail else "warn" if value > warn else "pass"
    )
    return Check(name, float(value), warn, fail, out, unit, desc)


def check_range(
    name: str,
    value: float,
    warn: tuple[float, float],
    fail: tuple[float, float],
    unit: str,
    desc: str,
) -> Check:
    def outside(r: tuple[float, float]) -> bool:
        return not (r[0] <= value <= r[1])

    out: Outcome = (
        "fail" if not math.isfinite(value) or outside(fail) else "warn" if outside(warn) else "pass"
    )
    return Check(name, float(value), tuple(warn), tuple(fail), out, unit, desc)


# --- the checks ----------------------------------------------------------------------------


def geometry_checks(t1_path: str | Path, qc: QCSettings) -> list[Check]:
    """Voxel size and field-of-view extent, from the header alone (cheap: run first)."""
    img = read(t1_path)
    spacing = np.asarray(img.spacing, dtype=float)
    extent = spacing * np.asarray(img.shape, dtype=float)
    return [
        check_max(
            "voxel_size",
            float(spacing.max()),
            qc.max_voxel_mm_warn,
            qc.max_voxel_mm_fail,
            " mm",
            "largest voxel dimension",
        ),
        check_min(
            "coverage",
            float(extent.min()),
            qc.min_extent_mm_warn,
            qc.min_extent_mm_fail,
            " mm",
            "smallest field-of-view extent",
        ),
    ]


def brain_volume_check(brain_ml: float, qc: QCSettings) -> Check:
    """The extracted brain's volume, judged by the TIV limits (the mask is intracranial):
    nearly nothing, or a blob that fills the field of view, means no head (noise, a test
    object, a slab that misses the brain)."""
    return check_range(
        "brain_volume",
        brain_ml,
        qc.tiv_ml_warn,
        qc.tiv_ml_fail,
        " mL",
        "volume of the extracted brain (intracranial)",
    )


def registration_checks(
    mask_path: str | Path, reg: Registration, brain_ml: float, qc: QCSettings
) -> list[Check]:
    """Brain found, brain in the field of view and registration quality: run right after
    registration, so that a non-brain or a half-covered brain stops before segmentation.

    Registration is judged by the overlap (Dice) of the subject's brain mask, carried into
    template space, with the template's intracranial mask: it does not depend on contrast
    (a correlation with the template's intensities did: 0.47 on a correctly registered
    gradient-echo head, 0.52-0.59 on other real heads that looked right)."""
    mask = read(mask_path)
    fixed = template_at(reg.resolution_mm)
    icv = ants.resample_image_to_target(template_priors()[0], fixed).numpy() > 0.5
    # field of view: a native "ones" image pushed into template space
    ones = mask.new_image_like(np.ones(mask.shape, dtype=np.float32))
    fov = ants.apply_transforms(fixed, ones, reg.to_template, interpolator="nearestNeighbor")
    in_fov = float((fov.numpy() > 0.5)[icv].mean())
    warped = ants.apply_transforms(fixed, mask, reg.to_template, interpolator="linear")
    brain = warped.numpy() > 0.5
    denom = float(brain.sum() + icv.sum())
    dice = 2.0 * float((brain & icv).sum()) / denom if denom > 0 else float("nan")
    return [
        brain_volume_check(brain_ml, qc),
        check_min(
            "brain_in_fov",
            in_fov,
            qc.min_brain_in_fov_warn,
            qc.min_brain_in_fov_fail,
            "",
            "fraction of the template brain inside the field of view",
        ),
        check_min(
            "registration",
            dice,
            qc.min_registration_dice_warn,
            qc.min_registration_dice_fail,
            "",
            "overlap (Dice) of the brain mask with the MNI152 brain after registration",
        ),
    ]


def tissue_checks(n4_path: str | Path, seg: Segmentation, qc: QCSettings) -> list[Check]:
    """Signal-to-noise and grey/white contrast, from the segmentation."""
    arr = read(n4_path).numpy()
    gm = read(seg.gm_path).numpy() > 0.9
    wm = read(seg.wm_path).numpy() > 0.9
    snr = contrast = float("nan")
    if wm.sum() > 50 and gm.sum() > 50:
        wm_mean, wm_sd, gm_mean = float(arr[wm].mean()), float(arr[wm].std()), float(arr[gm].mean())
        snr = wm_mean / wm_sd if wm_sd > 0 else float("inf")
        contrast = (wm_mean - gm_mean) / wm_mean if wm_mean > 0 else float("nan")
    return [
        check_min(
            "snr",
            snr,
            qc.min_snr_warn,
            qc.min_snr_fail,
            "",
            "white-matter mean / s.d.",
        ),
        check_min(
            "gm_wm_contrast",
            contrast,
            qc.min_gm_wm_contrast_warn,
            qc.min_gm_wm_contrast_fail,
            "",
            "(WM - GM) / WM mean intensity",
        ),
    ]


def measurement_checks(m: Measurement, qc: QCSettings) -> list[Check]:
    """Plausible tissue fractions and TIV."""
    tiv = m.tiv_ml
    gm_f = m.gm_ml / tiv if tiv > 0 else float("nan")
    wm_f = m.wm_ml / tiv if tiv > 0 else float("nan")
    return [
        check_range("gm_fraction", gm_f, qc.gm_fraction_warn, qc.gm_fraction_fail, "", "GM / TIV"),
        check_range("wm_fraction", wm_f, qc.wm_fraction_warn, qc.wm_fraction_fail, "", "WM / TIV"),
        check_range("tiv", tiv, qc.tiv_ml_warn, qc.tiv_ml_fail, " mL", "total intracranial volume"),
    ]


def outcome(checks: Sequence[Check]) -> Outcome:
    outs = {c.outcome for c in checks}
    return "fail" if "fail" in outs else "warn" if "warn" in outs else "pass"


def table(checks: Sequence[Check]) -> list[dict[str, Any]]:
    return [c.as_dict() for c in checks]


def raise_on_fail(checks: Sequence[Check]) -> None:
    if outcome(checks) == "fail":
        raise QCFailed(checks)
