"""The model registry and prediction rows, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from ketanode.db.migrate import upgrade
from ketanode.db.models import Job, ModelRecord, Prediction, Series, Study
from ketanode.db.session import make_engine, make_session_factory
from ketanode.model.classifier import fit_model, predict
from ketanode.model.files import ModelRefused, make_metadata, save_model
from ketanode.model.registry import (
    RegistryError,
    activate,
    active_record,
    list_models,
    load_active,
    record_prediction,
    register,
)
from ketanode.synthetic.cohort import SyntheticCohort, feature_cohort
from ketanode.texts import DEMO_LABEL


def _model(path: Path, seed: int, synthetic: bool) -> str:
    X, y, names = feature_cohort(SyntheticCohort(n=30, seed=seed))
    model = fit_model(X, y, names)
    meta = make_metadata(
        model, name=path.stem, cohort={"n": 30}, validation=None, synthetic=synthetic
    )
    return str(save_model(model, path, meta)["sha256"])


def test_register_activate_list_and_predict(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    a_sha = _model(tmp_path / "a.skops", 1, synthetic=True)
    b_sha = _model(tmp_path / "b.skops", 2, synthetic=False)
    assert list_models(engine) == [] and active_record(engine) is None
    with pytest.raises(RegistryError, match="no active model"):
        load_active(engine)
    register(engine, tmp_path / "a.skops")
    register(engine, tmp_path / "a.skops")  # idempotent
    assert [m["sha256"] for m in list_models(engine)] == [a_sha]
    row = activate(engine, str(tmp_path / "b.skops"))  # registers, then activates
    assert row["sha256"] == b_sha and row["active"] and not row["synthetic"]
    row = activate(engine, a_sha[:10])
    assert row["active"] and row["synthetic"] and row["label"] == DEMO_LABEL
    models = list_models(engine)
    assert [m["active"] for m in models] == [True, False]
    assert active_record(engine)["sha256"] == a_sha  # type: ignore[index]
    with pytest.raises(RegistryError, match="no registered model"):
        activate(engine, "ffffffff")

    loaded = load_active(engine)
    assert loaded.sha256 == a_sha
    X, _, _ = feature_cohort(SyntheticCohort(n=30, seed=3))
    result = predict(loaded.model, X[:1])[0]
    factory = make_session_factory(engine)
    with factory.begin() as s:
        study = Study(study_uid="1.2.3")
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid="1.2.3.4")
        s.add(series)
        s.flush()
        job = Job(series_id=series.id)
        s.add(job)
        s.flush()
        record_prediction(s, job_id=job.id, series_id=series.id, model=loaded, result=result)
    with factory() as s:
        pred = s.scalars(select(Prediction)).one()
        assert pred.model_sha256 == a_sha and pred.synthetic and pred.label == DEMO_LABEL
        assert pred.predicted_class == result["predicted_class"]
        assert set(pred.contributions) == set(result["contributions"])
        assert s.scalars(select(ModelRecord).where(ModelRecord.active)).one().sha256 == a_sha

    # the active file is replaced on disk: refused on load and on (re)activation
    (tmp_path / "a.skops").write_bytes((tmp_path / "b.skops").read_bytes())
    with pytest.raises(ModelRefused, match="SHA-256"):
        load_active(engine)
    with pytest.raises(ModelRefused, match="SHA-256"):
        activate(engine, a_sha)
    engine.dispose()
