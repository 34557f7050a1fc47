"""Which series are processed: the structural 3D T1 rules."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ketanode.config import ENHANCED_MR_IMAGE_STORAGE, SelectionRules


@dataclass
class SeriesView:
    """What selection looks at, whichever table or file it came from."""

    modality: str | None
    sop_class_uid: str | None
    description: str | None
    protocol_name: str | None
    image_type: str | None
    mr_acquisition_type: str | None
    pixel_spacing_row: float | None
    pixel_spacing_col: float | None
    slice_thickness: float | None
    spacing_between_slices: float | None
    n_instances: int
    n_frames: int


@dataclass
class Decision:
    selected: bool
    reason: str
    checks: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"selected": self.selected, "reason": self.reason, "checks": self.checks}


def _slices(view: SeriesView) -> int:
    if view.sop_class_uid == ENHANCED_MR_IMAGE_STORAGE:
        return view.n_frames
    return view.n_instances


def decide(view: SeriesView, rules: SelectionRules) -> Decision:
    """Apply every rule; the reason names the first that failed (all are kept in checks)."""
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"rule": name, "ok": ok, "detail": detail})

    check(
        "modality",
        (view.modality or "") in rules.modalities,
        f"modality {view.modality or 'missing'}"
        + (
            ""
            if (view.modality or "") in rules.modalities
            else f", not one of {', '.join(rules.modalities)}"
        ),
    )
    check(
        "sop_class",
        (view.sop_class_uid or "") in rules.sop_classes,
        f"SOP class {view.sop_class_uid}",
    )
    slices = _slices(view)
    is_3d = (view.mr_acquisition_type or "").upper() == "3D"
    enough = slices >= rules.min_slices or (rules.accept_3d_acquisition and is_3d and slices >= 2)
    check(
        "volume",
        enough,
        f"{view.mr_acquisition_type or 'unknown'} acquisition with {slices} slices"
        + ("" if enough else f" (needs 3D or at least {rules.min_slices})"),
    )
    through = view.spacing_between_slices or view.slice_thickness
    sizes = [view.pixel_spacing_row, view.pixel_spacing_col, through]
    known = [s for s in sizes if s is not None]
    voxel_ok = len(known) == 3 and max(known) <= rules.max_voxel_mm
    size_text = "x".join("?" if s is None else f"{s:.3g}" for s in sizes)
    check(
        "voxel_size",
        voxel_ok,
        f"voxel {size_text} mm"
        + ("" if voxel_ok else f" (each axis must be known and <= {rules.max_voxel_mm} mm)"),
    )
    types = {t.strip().upper() for t in (view.image_type or "").split("\\") if t.strip()}
    bad_types = sorted(types & {t.upper() for t in rules.excluded_image_types})
    check(
        "image_type",
        not bad_types,
        f"image type {view.image_type or 'missing'}"
        + (f" (excluded: {', '.join(bad_types)})" if bad_types else ""),
    )
    text = " | ".join(t for t in (view.description, view.protocol_name) if t)
    excluded = re.search(rules.exclude_pattern, text, re.IGNORECASE) if text else None
    included = re.search(rules.include_pattern, text, re.IGNORECASE) if text else None
    check(
        "exclude_pattern",
        excluded is None,
        f"description/protocol {text!r}"
        + (f" matches excluded {excluded.group(0)!r}" if excluded else ""),
    )
    check(
        "include_pattern",
        included is not None,
        f"description/protocol {text!r}"
        + (f" matches {included.group(0)!r}" if included else " matches no T1 pattern"),
    )
    failed = [c for c in checks if not c["ok"]]
    if failed:
        return Decision(False, f"not a structural 3D T1: {failed[0]['detail']}", checks)
    return Decision(
        True,
        "structural 3D T1: "
        + "; ".join(
            c["detail"] for c in checks if c["rule"] in ("volume", "voxel_size", "include_pattern")
        ),
        checks,
    )
