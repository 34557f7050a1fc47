"""The model registry in the database: which model files the node knows, which one is active.

A model is registered only after :func:`ketanode.model.files.load_model` accepted it (skops,
SHA-256 matching its metadata, the pipeline's feature spec); activation re-checks the file
and makes it the only active row in one statement. :func:`load_active` loads the active
model and refuses it when the file on disk no longer has the registered SHA-256.
The registry's ``synthetic`` flag only ever goes from false to true (a model once seen as
synthetic stays so), and :func:`load_active` adds it to the loaded model, so a prediction is
synthetic when the file, the known demonstration hashes or the registry say so.
:func:`record_prediction` writes a prediction row (with the model's SHA-256 and the
synthetic flag and label) in the caller's transaction.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from ketanode.db.models import ModelRecord, Prediction, utcnow
from ketanode.db.session import make_session_factory
from ketanode.model.files import LoadedModel, ModelRefused, load_model

logger = logging.getLogger(__name__)


class RegistryError(Exception):
    """No such model, an ambiguous SHA-256 prefix, or no active model."""


def _row(m: ModelRecord) -> dict[str, Any]:
    val = (m.model_metadata or {}).get("validation") or {}
    ba = (val.get("metrics") or {}).get("balanced_accuracy") or {}
    return {
        "sha256": m.sha256,
        "name": m.name,
        "path": m.path,
        "active": m.active,
        "synthetic": m.synthetic,
        "label": m.label,
        "spec": m.spec_name,
        "spec_sha256": m.spec_sha256,
        "cv_balanced_accuracy": ba.get("mean"),
        "created_at": m.created_at.isoformat(timespec="seconds"),
        "activated_at": m.activated_at.isoformat(timespec="seconds") if m.activated_at else None,
    }


def _created(meta: dict[str, Any]) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(str(meta.get("created_at")))
    except ValueError:
        return utcnow()


def register(engine: Engine, path: str | Path) -> dict[str, Any]:
    """Check the file and add (or refresh the path of) its registry row."""
    return register_loaded(engine, load_model(path))


def register_loaded(engine: Engine, loaded: LoadedModel) -> dict[str, Any]:
    """Add (or refresh the path of) the registry row of a model already checked by
    :func:`ketanode.model.files.load_model`."""
    meta = loaded.metadata
    spec = meta["feature_spec"]
    factory = make_session_factory(engine)
    with factory.begin() as s:
        row = s.scalars(select(ModelRecord).where(ModelRecord.sha256 == loaded.sha256)).first()
        if row is None:
            row = ModelRecord(
                sha256=loaded.sha256,
                path=str(loaded.path.resolve()),
                name=str(meta.get("name") or loaded.path.stem),
                spec_name=f"{spec.get('name')} v{spec.get('version')}",
                spec_sha256=str(spec.get("sha256")),
                synthetic=loaded.synthetic,
                label=loaded.label,
                model_metadata=meta,
                created_at=_created(meta),
                active=False,
            )
            s.add(row)
        else:
            row.path = str(loaded.path.resolve())
            if loaded.synthetic and not row.synthetic:  # never the other way round
                row.synthetic, row.label = True, loaded.label
        s.flush()
        out = _row(row)
    logger.info("model registered: sha256 %s", loaded.sha256[:12])
    return out


def _find(s: Session, ref: str) -> ModelRecord:
    ref = ref.strip()
    if Path(ref).suffix == ".skops" or "/" in ref:
        resolved = str(Path(ref).resolve())
        rows = list(s.scalars(select(ModelRecord).where(ModelRecord.path == resolved)))
    else:
        rows = list(
            s.scalars(select(ModelRecord).where(ModelRecord.sha256.startswith(ref.lower())))
        )
    if not rows:
        raise RegistryError(f"no registered model matches {ref!r}")
    if len(rows) > 1:
        raise RegistryError(f"{ref!r} matches {len(rows)} models; give more of the SHA-256")
    return rows[0]


def activate(engine: Engine, ref: str) -> dict[str, Any]:
    """Make one model (SHA-256 prefix, or a .skops path: registered first) the active one.

    The file is checked again (hash, spec, format) before it becomes active.
    """
    if Path(ref).suffix == ".skops" and Path(ref).is_file():
        register(engine, ref)
    factory = make_session_factory(engine)
    with factory() as s:
        row = _find(s, ref)
        path, sha = row.path, row.sha256
    loaded = load_model(path)
    if loaded.sha256 != sha:
        raise ModelRefused(
            "sha256_mismatch",
            f"refused {path}: its SHA-256 is {loaded.sha256}, the registry records {sha}",
        )
    with factory.begin() as s:
        row = _find(s, sha)
        # one statement: exactly this row active, every other row inactive
        s.execute(update(ModelRecord).values(active=ModelRecord.id == row.id))
        row.activated_at = utcnow()
        s.flush()
        s.refresh(row)
        out = _row(row)
    logger.info("model activated: sha256 %s", sha[:12])
    return out


def deactivate(engine: Engine) -> None:
    with make_session_factory(engine).begin() as s:
        s.execute(update(ModelRecord).values(active=False))


def list_models(engine: Engine) -> list[dict[str, Any]]:
    with make_session_factory(engine)() as s:
        rows = s.scalars(select(ModelRecord).order_by(ModelRecord.id))
        return [_row(r) for r in rows]


def active_record(engine: Engine) -> dict[str, Any] | None:
    with make_session_factory(engine)() as s:
        row = s.scalars(select(ModelRecord).where(ModelRecord.active.is_(True))).first()
        return _row(row) if row is not None else None


def load_active(engine: Engine) -> LoadedModel:
    """The active model, checked (format, SHA-256 against metadata and registry, spec)."""
    record = active_record(engine)
    if record is None:
        raise RegistryError("no active model (ketanode model activate SHA256|FILE.skops)")
    loaded = load_model(record["path"])
    if loaded.sha256 != record["sha256"]:
        raise ModelRefused(
            "sha256_mismatch",
            f"refused {record['path']}: its SHA-256 is {loaded.sha256}, the registry records "
            f"{record['sha256']}",
        )
    if record["synthetic"] and "registry" not in loaded.synthetic_reasons:
        loaded = replace(loaded, synthetic_reasons=(*loaded.synthetic_reasons, "registry"))
    return loaded


def record_prediction(
    session: Session,
    *,
    job_id: int,
    series_id: int,
    model: LoadedModel,
    result: dict[str, Any],
) -> Prediction:
    """Add a prediction row (one of :func:`ketanode.model.classifier.predict`'s results)."""
    row = Prediction(
        job_id=job_id,
        series_id=series_id,
        model_sha256=model.sha256,
        predicted_class=str(result["predicted_class"]),
        probability=float(result["probability"]),
        decision_value=float(result["decision_value"]),
        contributions=dict(result["contributions"]),
        synthetic=model.synthetic,
        label=model.label,
    )
    session.add(row)
    return row
