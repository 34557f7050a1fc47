"""What the SR and the report image say about one job: the input of the report builders.

The builders (:func:`ketanode.report.sr.build_sr`,
:func:`ketanode.report.secondary_capture.build_report_image`) take the source series' datasets and
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

from ketanode.texts import RESEARCH_USE_ONLY

RESPONDER, NON_RESPONDER = "responder", "non-responder"
INDETERMINATE = "indeterminate"
CLASSES = (RESPONDER, NON_RESPONDER, INDETERMINATE)
QC_OUTCOMES = ("pass", "warn", "fail")
NOT_SCORED = "NOT SCORED"
DEMO_RESULT_TEXT = (
    "DEMO result: scored by a model trained on synthetic phantoms (the node's demonstration "
    "model), not on patients. It says nothing about this patient."
)
DISCLAIMER = (
    f"{RESEARCH_USE_ONLY}. Not a medical device; not for diagnosis or treatment decisions. "
    "The estimate comes from regional grey-matter volumes of one T1 MRI and a research "
    "model; it has not been validated for clinical use."
)


@dataclass(frozen=True, kw_only=True)
class ResultForReport:
    """One job's result, as the SR and the report image show it (keyword construction only).

    A result is either *scored* (``predicted_class`` set: probability, decision value and
    the model fields are then required) or *not scored*: the series was examined but no
    prediction was made (e.g. quality control failed); ``predicted_class``, ``probability``
    and ``decision_value`` are then ``None`` and ``not_scored_reason`` says why. The model
    fields may be ``None`` when no model was applied. The builders show neither
    contributions nor volumes of a not-scored result.

    The decision rule of a scored result (``decision_threshold``, ``indeterminate_margin``,
    ``training_response_rate``; see :mod:`ketanode.model.classifier`): when the threshold is
    given, ``predicted_class`` must be what the rule gives for ``probability`` (responder at
    or above threshold + margin, non-responder at or below threshold - margin, else
    indeterminate), so the outputs never show a class that contradicts its probability.

    ``contributions`` are the per-input terms of the SVC decision value
    (``coef * scaled value``, model inputs only); ``volumes`` are measured volumes in mL by
    feature name (the regional GM volumes, and optionally ``gm_total``/``wm_total``/
    ``csf_total``/``tiv``). ``qc_checks`` are the QC step's check table rows
    (``name``, ``value``, ``outcome`` and ``description``; ``unit``, ``warn``, ``fail``
    optional). The NIfTI paths are used by the report image only: the native T1 (the
    pipeline's ``t1.nii.gz`` or ``t1_n4.nii.gz``), the GM posterior (``gm_prob.nii.gz``) and,
    when available, the atlas territories pulled into the same native grid (integer labels,
    k = 1-based index into ``region_names``; see
    :func:`ketanode.imaging.analysis.step_measure`, ``territories_path``) and the brain
    (intracranial) mask of the preprocess step (``brain_mask.nii.gz``, ``mask_path``): with
    a mask, the slices are cropped to the brain and placed within it (a real head's neck
    and face stay off the page).
    """

    contributions: Mapping[str, float]
    volumes: Mapping[str, float]
    qc_outcome: str
    qc_checks: Sequence[Mapping[str, Any]]
    model_synthetic: bool
    feature_spec_name: str
    feature_spec_sha256: str
    software_version: str
    predicted_class: str | None = None
    probability: float | None = None
    decision_value: float | None = None
    model_name: str | None = None
    model_version: str | None = None
    model_sha256: str | None = None
    model_label: str | None = None
    not_scored_reason: str | None = None
    decision_threshold: float | None = None
    indeterminate_margin: float | None = None
    training_response_rate: float | None = None
    t1_path: Path | None = None
    gm_path: Path | None = None
    territories_path: Path | None = None
    brain_mask_path: Path | None = None
    region_names: Sequence[str] = field(default_factory=tuple)

    @property
    def scored(self) -> bool:
        """Whether a prediction was made (``predicted_class`` is set)."""
        return self.predicted_class is not None

    @property
    def demo(self) -> bool:
        """A result of a synthetic (demonstration) model: marked DEMO in every output."""
        return self.scored and self.model_synthetic

    @property
    def indeterminate(self) -> bool:
        return self.predicted_class == INDETERMINATE

    def __post_init__(self) -> None:
        if self.scored:
            self._check_scored()
        else:
            self._check_not_scored()
        if self.qc_outcome not in QC_OUTCOMES:
            raise ValueError(f"qc_outcome must be one of {QC_OUTCOMES}")
        sha = self.model_sha256
        if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
            raise ValueError("model_sha256 must be 64 lower-case hex digits")
        for name, v in {**self.volumes, **self.contributions}.items():
            if not math.isfinite(float(v)):
                raise ValueError(f"{name} is not finite")

    def _check_scored(self) -> None:
        if self.predicted_class not in CLASSES:
            raise ValueError(f"predicted_class must be one of {CLASSES}")
        if self.probability is None or not (
            math.isfinite(self.probability) and 0.0 <= self.probability <= 1.0
        ):
            raise ValueError("probability must be within [0, 1]")
        self._check_rule(self.probability)
        if self.decision_value is None or not math.isfinite(self.decision_value):
            raise ValueError("decision_value must be finite")
        for name in ("model_name", "model_version", "model_sha256", "model_label"):
            if getattr(self, name) is None:
                raise ValueError(f"a scored result needs {name}")
        if self.not_scored_reason is not None:
            raise ValueError("a scored result has no not_scored_reason")

    def _check_rule(self, p: float) -> None:
        t, m = self.decision_threshold, self.indeterminate_margin
        if t is None:
            if m is not None or self.predicted_class == INDETERMINATE:
                raise ValueError("an indeterminate class or a margin needs decision_threshold")
            return
        if not (0.0 < t < 1.0) or m is None or not (0.0 <= m < 0.5):
            raise ValueError("decision_threshold in (0, 1) and indeterminate_margin in [0, 0.5)")
        expected = RESPONDER if p >= t + m else NON_RESPONDER if p <= t - m else INDETERMINATE
        if self.predicted_class != expected:
            raise ValueError(
                f"predicted_class {self.predicted_class!r} contradicts probability {p} "
                f"(threshold {t}, margin {m}: {expected})"
            )
        r = self.training_response_rate
        if r is not None and not (0.0 < r < 1.0):
            raise ValueError("training_response_rate must be within (0, 1)")

    def _check_not_scored(self) -> None:
        given = [
            name for name in ("probability", "decision_value") if getattr(self, name) is not None
        ]
        if given:
            raise ValueError(f"a result without predicted_class has no {', '.join(given)}")
        if not (self.not_scored_reason or "").strip():
            raise ValueError("a result without predicted_class needs a not_scored_reason")

    def drivers(self, n: int | None = None) -> list[tuple[str, float]]:
        """Model inputs by decreasing |contribution| (the regions that drive the decision)."""
        ranked = sorted(self.contributions.items(), key=lambda kv: (-abs(kv[1]), kv[0]))
        return ranked if n is None else ranked[:n]

    def flagged_checks(self) -> list[Mapping[str, Any]]:
        """QC checks whose outcome is not ``pass`` (failing first)."""
        order = {"fail": 0, "warn": 1}
        bad = [c for c in self.qc_checks if str(c.get("outcome")) in order]
        return sorted(bad, key=lambda c: order[str(c.get("outcome"))])


def class_text(result: ResultForReport) -> str:
    """``RESPONDER`` / ``NON-RESPONDER`` / ``INDETERMINATE`` (empty when not scored)."""
    return (result.predicted_class or "").upper()


def percent(value: float) -> str:
    """A probability as a percentage: ``0.374939`` -> ``37.5 %``."""
    return f"{value * 100:.1f} %"


def rule_text(result: ResultForReport) -> str:
    """The decision rule in one sentence (empty without a threshold)."""
    t, m = result.decision_threshold, result.indeterminate_margin
    if t is None or m is None:
        return ""
    return (
        f"Responder when P(response) >= {percent(t + m)}, non-responder when <= "
        f"{percent(t - m)}, indeterminate in between (threshold {percent(t)} +- {percent(m)})."
    )


def rate_text(result: ResultForReport) -> str:
    """Why P depends on the training cohort, with its response rate."""
    r = result.training_response_rate
    shown = percent(r) if r is not None else "not recorded"
    return (
        f"P(response) depends on the training cohort's response rate ({shown}): it is the "
        "chance of response among patients like that cohort, not a rate for every population."
    )


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


def not_scored_cause(result: ResultForReport) -> str:
    """Why a result is not scored, in a few words: ``quality control failed`` when the QC
    outcome is ``fail``, else the reason's first part (up to its first colon)."""
    if result.qc_outcome == "fail":
        return "quality control failed"
    reason = (result.not_scored_reason or "").strip()
    first = reason.split(":", 1)[0].strip() or reason
    return first if len(first) <= 60 else first[:57] + "..."


def not_scored_headline(result: ResultForReport) -> str:
    """``NOT SCORED - quality control failed`` (or the reason's first part)."""
    return f"{NOT_SCORED} - {not_scored_cause(result)}"
