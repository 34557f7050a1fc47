"""The node's prediction step: the active model (or the shipped demonstration model) applied
to one job's measured features, stored as a prediction row.

The model file is loaded and checked on every job (skops format, SHA-256 against its
metadata and the registry, feature spec hash against the pipeline's), so a file swapped on
disk or a model made for another pipeline is refused with its reason, never used.

With no active model the step raises :class:`NoModel` unless ``model.demo_when_none_active``
is on (off by default; ``ketanode demo`` turns it on): the pipeline then reports the series
as NOT SCORED with the reason "no active model" (``reports.not_scored``), and the job fails
with that reason. The demonstration model never scores a scan unless an admin switched it
on; when it does, its result is marked DEMO everywhere (``demo`` in the step's output).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Engine, delete
from sqlalchemy.orm import Session, sessionmaker

from ketanode.config import ModelSettings
from ketanode.db.models import Prediction
from ketanode.imaging.features import default_spec
from ketanode.model import registry
from ketanode.model.classifier import predict
from ketanode.model.files import DEMO_MODEL, LoadedModel, load_model

logger = logging.getLogger(__name__)


NO_MODEL_REASON = "no active model"


class NoModel(RuntimeError):
    """No model to score with: the series is reported NOT SCORED with this reason."""


@dataclass(frozen=True)
class ModelUsed:
    """The model a prediction was made with, as the report names it."""

    sha256: str
    name: str
    synthetic: bool
    synthetic_reasons: list[str]
    label: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "name": self.name,
            "synthetic": self.synthetic,
            "synthetic_reasons": list(self.synthetic_reasons),
            "label": self.label,
        }


@dataclass(frozen=True)
class Predicted:
    """The predict step's result: class, probability, the regional contributions, the
    model's decision rule (threshold, margin, training response rate, as the model file
    states them) and the model; ``prediction_id`` is its row."""

    prediction_id: int
    predicted_class: str
    probability: float
    decision_value: float
    contributions: dict[str, float]
    decision_rule: dict[str, Any]
    model: ModelUsed

    @property
    def demo(self) -> bool:
        """A result of a synthetic (demonstration) model: DEMO in every output."""
        return self.model.synthetic

    def as_dict(self) -> dict[str, Any]:
        return {
            "prediction_id": self.prediction_id,
            "predicted_class": self.predicted_class,
            "probability": self.probability,
            "decision_value": self.decision_value,
            "contributions": self.contributions,
            "decision_rule": self.decision_rule,
            "demo": self.demo,
            "model": self.model.as_dict(),
        }


def model_for_node(sessions: sessionmaker[Session], settings: ModelSettings) -> LoadedModel:
    """The registry's active model; else the demonstration model when the settings allow."""
    with sessions() as session:
        engine = cast(Engine, session.get_bind())
    if registry.active_record(engine) is not None:
        return registry.load_active(engine)
    if not settings.demo_when_none_active:
        raise NoModel(
            f"{NO_MODEL_REASON}: no model is active on this node (ketanode model activate "
            "FILE.skops) and the demonstration model is not used for real scans "
            "(model.demo_when_none_active = false)"
        )
    demo = load_model(DEMO_MODEL)  # checked once, then registered (not activated)
    registry.register_loaded(engine, demo)
    logger.info("no active model: using the shipped demonstration model (synthetic data)")
    return demo


def predict_job(
    sessions: sessionmaker[Session],
    settings: ModelSettings,
    *,
    job_id: int,
    series_id: int,
    feature_spec_sha256: str,
    names: Sequence[str],
    vector: Sequence[float],
    hold: Callable[[Session], None] | None = None,
) -> Predicted:
    """Predict from the measured feature vector (``names`` and ``vector`` in the order of
    the feature spec whose hash is ``feature_spec_sha256``); one prediction row per job (a
    re-run job replaces its row). ``hold`` runs first in the transaction that writes it: the
    lease check (a worker that lost its job writes no prediction)."""
    spec = default_spec()
    if feature_spec_sha256 != spec.sha256 or list(names) != list(spec.features):
        raise ValueError("the measured features were made under another feature spec")
    model = model_for_node(sessions, settings)
    (result,) = predict(model.model, [list(vector)])
    with sessions.begin() as session:
        if hold is not None:
            hold(session)
        session.execute(delete(Prediction).where(Prediction.job_id == job_id))
        row = registry.record_prediction(
            session, job_id=job_id, series_id=series_id, model=model, result=result
        )
        session.flush()
        prediction_id = row.id
    rule = model.decision_rule()
    logger.info(
        "job %s: predicted %s (p=%.3f, threshold %.3f) with model %s%s",
        job_id,
        result["predicted_class"],
        result["probability"],
        rule["threshold"],
        model.sha256[:12],
        " (demonstration model, synthetic data)" if model.synthetic else "",
    )
    return Predicted(
        prediction_id=prediction_id,
        predicted_class=result["predicted_class"],
        probability=result["probability"],
        decision_value=result["decision_value"],
        contributions=result["contributions"],
        decision_rule=rule,
        model=ModelUsed(
            sha256=model.sha256,
            name=str(model.metadata.get("name") or model.path.stem),
            synthetic=model.synthetic,
            synthetic_reasons=list(model.synthetic_reasons),
            label=model.label,
        ),
    )
