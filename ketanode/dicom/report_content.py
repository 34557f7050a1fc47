"""What the SR and the report image say about one job: the input of the report builders.

The builders (:func:`ketanode.dicom.sr.build_sr`,
:func:`ketanode.dicom.report_image.build_report_image`) take the source series' datasets and
one :class:`ResultForReport`; nothing else (no database, no settings). The pipeline fills it
from the prediction (``ketanode.model.classifier.predict``), the measurement step's feature
vector, the QC step's check table and the loaded model (``ketanode.model.files.LoadedModel``).

Feature names are those of the feature spec (``gm_left_frontal``, ..., ``gm_total``, ``tiv``;
see :func:`ketanode.imaging.features.default_spec`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESPONDER, NON_RESPONDER = "responder", "non-responder"
QC_OUTCOMES = ("pass", "warn", "fail")
RESEARCH_USE_ONLY = "RESEARCH USE ONLY"
DEMO_TEXT = "DEMONSTRATION MODEL trained on synthetic data - not a clinical prediction"
DISCLAIMER = (
    "RESEARCH USE ONLY. Not a medical device; not for diagnosis or treatment decisions. "
    "The estimate comes from regional grey-matter volumes of one T1 MRI and a research "
    "model; it has not been validated for clinical use."
)


@dataclass(frozen=True)
class ResultForReport:
    """One job's result, as the SR and the report image show it.

    ``contributions`` are the per-input terms of the SVC decision value
    (``coef * scaled value``, model inputs only); ``volumes`` are measured volumes in mL by
    feature name (the regional GM volumes, and optionally ``gm_total``/``wm_total``/
    ``csf_total``/``tiv``). ``qc_checks`` are the QC step's check table rows
    (``name``, ``value``, ``outcome`` and ``description``; ``unit``, ``warn``, ``fail``
    optional). The NIfTI paths are used by the report image only: the native T1 (the
    pipeline's ``t1.nii.gz`` or ``t1_n4.nii.gz``), the GM posterior (``gm_prob.nii.gz``) and,
    when available, the atlas territories pulled into the same native grid (integer labels,
    k = 1-based index into ``region_names``; see
    :func:`ketanode.dicom.report_image.write_native_territories`).
    """

    predicted_class: str
    probability: float
    decision_value: float
    contributions: Mapping[str, float]
    volumes: Mapping[str, float]
    qc_outcome: str
    qc_checks: Sequence[Mapping[str, Any]]
    model_name: str
    model_version: str
    model_sha256: str
    model_synthetic: bool
    model_label: str
    feature_spec_name: str
    feature_spec_sha256: str
    software_version: str
    t1_path: Path | None = None
    gm_path: Path | None = None
    territories_path: Path | None = None
    region_names: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.predicted_class not in (RESPONDER, NON_RESPONDER):
            raise ValueError(f"predicted_class must be {RESPONDER!r} or {NON_RESPONDER!r}")
        if not (math.isfinite(self.probability) and 0.0 <= self.probability <= 1.0):
            raise ValueError("probability must be within [0, 1]")
        if not math.isfinite(self.decision_value):
            raise ValueError("decision_value must be finite")
        if self.qc_outcome not in QC_OUTCOMES:
            raise ValueError(f"qc_outcome must be one of {QC_OUTCOMES}")
        sha = self.model_sha256
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError("model_sha256 must be 64 lower-case hex digits")
        for name, v in {**self.volumes, **self.contributions}.items():
            if not math.isfinite(float(v)):
                raise ValueError(f"{name} is not finite")

    def drivers(self, n: int | None = None) -> list[tuple[str, float]]:
        """Model inputs by decreasing |contribution| (the regions that drive the decision)."""
        ranked = sorted(self.contributions.items(), key=lambda kv: (-abs(kv[1]), kv[0]))
        return ranked if n is None else ranked[:n]

    def flagged_checks(self) -> list[Mapping[str, Any]]:
        """QC checks whose outcome is not ``pass`` (failing first)."""
        order = {"fail": 0, "warn": 1}
        bad = [c for c in self.qc_checks if str(c.get("outcome")) in order]
        return sorted(bad, key=lambda c: order[str(c.get("outcome"))])


def region_of(feature: str) -> str:
    """``gm_left_frontal`` -> ``left_frontal``; other names unchanged."""
    return feature[3:] if feature.startswith("gm_") else feature


def display_name(feature: str) -> str:
    """Human-readable feature name: ``gm_left_deep_grey`` -> ``Left deep grey``."""
    special = {
        "gm_total": "Total grey matter",
        "wm_total": "Total white matter",
        "csf_total": "Total CSF",
        "tiv": "Total intracranial volume",
    }
    if feature in special:
        return special[feature]
    text = region_of(feature).replace("_", " ")
    return text[:1].upper() + text[1:]


def check_text(check: Mapping[str, Any]) -> str:
    """One QC check as a line of text: ``voxel_size = 1.5 mm (warn): largest voxel ...``."""
    value = check.get("value")
    if isinstance(value, int | float) and math.isfinite(float(value)):
        shown = f"{float(value):.4g}{str(check.get('unit') or '')}"
    else:
        shown = "n/a"
    desc = str(check.get("description") or "").strip()
    text = f"{check.get('name')} = {shown} ({check.get('outcome')})"
    return f"{text}: {desc}" if desc else text
