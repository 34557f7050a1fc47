"""Issue 12, item 2: a model's metadata is covered by its hash, the demonstration model is
synthetic whatever its JSON says, the registry's flag counts at prediction, and tampered
metadata or untrusted types are refused."""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import skops.io as sio
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from ketanode.config import ModelSettings
from ketanode.db.migrate import upgrade
from ketanode.db.models import Job, ModelRecord, Series, Study
from ketanode.db.session import make_engine, make_session_factory
from ketanode.imaging.features import default_spec
from ketanode.model import registry
from ketanode.model.classifier import fit_model
from ketanode.model.files import (
    DEMO_MODEL,
    KNOWN_SYNTHETIC,
    METADATA_MEMBER,
    ModelRefused,
    estimator_sha256,
    file_sha256,
    load_model,
    make_metadata,
    metadata_path,
    read_sealed,
    save_model,
    seal,
)
from ketanode.process.predict import predict_job
from ketanode.report.secondary_capture import build_report_image
from ketanode.report.sr import build_sr, read_sr
from ketanode.synthetic.cohort import SyntheticCohort, feature_cohort
from ketanode.texts import DEMO_LABEL
from tests.unit._report_case import make_case


def _copy_demo(where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    dst = where / "clinical-looking.skops"
    shutil.copyfile(DEMO_MODEL, dst)
    shutil.copyfile(metadata_path(DEMO_MODEL), metadata_path(dst))
    return dst


def _relabel_json(path: Path) -> None:
    meta = json.loads(metadata_path(path).read_text())
    meta |= {"synthetic": False, "label": "", "name": "site-model"}
    metadata_path(path).write_text(json.dumps(meta))


def _rebuild(path: Path, change: dict[str, Any], keep_estimator_sha: bool = True) -> None:
    """Rewrite the archive with its sealed metadata changed, and the JSON's SHA-256 fixed
    (what someone who knows the format would do)."""
    with zipfile.ZipFile(path) as zf:
        members = [(n, zf.read(n)) for n in zf.namelist() if n != METADATA_MEMBER]
        sealed = json.loads(zf.read(METADATA_MEMBER))
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    sealed |= change
    if not keep_estimator_sha:
        sealed["estimator_sha256"] = "0" * 64
    seal(tmp, sealed)
    tmp.replace(path)
    beside = sealed | {"file": path.name, "sha256": file_sha256(path)}
    metadata_path(path).write_text(json.dumps(beside))


def _job(sessions: sessionmaker[Session]) -> tuple[int, int]:
    with sessions.begin() as s:
        study = Study(study_uid="1.2.3")
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid="1.2.3.4")
        s.add(series)
        s.flush()
        job = Job(series_id=series.id)
        s.add(job)
        s.flush()
        return job.id, series.id


def test_shipped_demonstration_model_is_known_by_its_hashes() -> None:
    loaded = load_model(DEMO_MODEL)
    assert loaded.sha256 in KNOWN_SYNTHETIC and loaded.estimator_sha256 in KNOWN_SYNTHETIC
    assert loaded.synthetic and loaded.synthetic_reasons == ("known demonstration model",)
    sealed = read_sealed(DEMO_MODEL)
    assert sealed is not None and sealed["synthetic"] is True
    assert sealed["estimator_sha256"] == estimator_sha256(DEMO_MODEL)
    rule = loaded.decision_rule()
    assert 0 < rule["threshold"] < 1 and rule["margin"] == 0.05
    assert rule["training_response_rate"] == 0.5


def test_relabelled_copy_of_the_demo_model_is_synthetic_everywhere(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The JSON beside a copy says ``"synthetic": false, "label": ""``: load, registry,
    prediction, SR and report page all still say it is the demonstration model."""
    path = _copy_demo(tmp_path / "copy")
    _relabel_json(path)
    loaded = load_model(path)  # the JSON's edits are ignored, not trusted
    assert loaded.synthetic and loaded.label == DEMO_LABEL
    assert {"synthetic", "label", "name"} <= set(loaded.ignored_metadata)
    assert loaded.metadata["name"] == "ketanode-demo"

    engine = make_engine(sqlite_url)
    upgrade(engine)
    row = registry.activate(engine, str(path))
    assert row["synthetic"] and row["label"] == DEMO_LABEL
    sessions = make_session_factory(engine)
    job_id, series_id = _job(sessions)
    source, case = make_case(tmp_path / "case")
    out = predict_job(
        sessions,
        ModelSettings(),
        job_id=job_id,
        series_id=series_id,
        feature_spec_sha256=default_spec().sha256,
        names=list(default_spec().features),
        vector=[float(case.volumes.get(f, 50.0)) for f in default_spec().features],
    ).as_dict()
    assert out["demo"] is True and out["model"]["synthetic"] is True
    assert out["model"]["label"] == DEMO_LABEL

    rule = out["decision_rule"]
    result = replace(
        case,
        predicted_class=out["predicted_class"],
        probability=out["probability"],
        decision_value=out["decision_value"],
        contributions=out["contributions"],
        model_name=out["model"]["name"],
        model_sha256=out["model"]["sha256"],
        model_synthetic=out["model"]["synthetic"],
        model_label=out["model"]["label"],
        decision_threshold=rule["threshold"],
        indeterminate_margin=rule["margin"],
        training_response_rate=rule["training_response_rate"],
    )
    sr = build_sr(source, result)
    assert str(sr.SeriesDescription).startswith("DEMO ")
    values = read_sr(sr)
    assert values.model_synthetic and values.demo
    assert DEMO_LABEL in values.texts["Model label"]
    page = build_report_image(source, result)
    assert str(page.SeriesDescription).startswith("DEMO ")
    assert str(page.ImageComments).startswith("DEMO: DEMONSTRATION MODEL")


def test_demo_estimator_rebuilt_with_other_sealed_metadata_is_still_synthetic(
    tmp_path: Path,
) -> None:
    path = _copy_demo(tmp_path)
    _rebuild(path, {"synthetic": False, "label": ""})
    loaded = load_model(path)
    assert loaded.sha256 not in KNOWN_SYNTHETIC  # another file ...
    assert loaded.estimator_sha256 in KNOWN_SYNTHETIC  # ... around the same estimator
    assert loaded.synthetic and loaded.label == DEMO_LABEL


def test_tampered_metadata_is_refused_or_ignored(tmp_path: Path) -> None:
    X, y, names = feature_cohort(SyntheticCohort(n=30, seed=3))
    model = fit_model(X, y, names)
    path = tmp_path / "real.skops"
    cohort = {"n": 30, "responders": int(y.sum())}
    meta = make_metadata(model, name="real", cohort=cohort, validation=None, synthetic=False)
    save_model(model, path, meta)
    assert load_model(path).synthetic is False
    # the JSON beside it says something else: ignored
    beside = json.loads(metadata_path(path).read_text())
    metadata_path(path).write_text(json.dumps(beside | {"decision_rule": {"threshold": 0.1}}))
    assert load_model(path).ignored_metadata == ("decision_rule",)
    metadata_path(path).write_text(json.dumps(beside))
    # the sealed metadata rewritten for another estimator, or another threshold: refused
    for change, keep in (
        ({}, False),
        ({"decision_rule": {"threshold": 0.9, "margin": 0.05}}, True),
    ):
        other = tmp_path / f"t{len(change)}" / "real.skops"
        other.parent.mkdir()
        shutil.copyfile(path, other)
        _rebuild(other, change, keep_estimator_sha=keep)
        with pytest.raises(ModelRefused) as exc:
            load_model(other)
        assert exc.value.reason == "metadata_mismatch", exc.value
    # the sealed flag of a real model set to synthetic stays synthetic (never the reverse)
    flagged = tmp_path / "flagged" / "real.skops"
    flagged.parent.mkdir()
    shutil.copyfile(path, flagged)
    _rebuild(flagged, {"synthetic": True, "label": ""})
    assert load_model(flagged).label == DEMO_LABEL
    # a model without sealed metadata (format 1: flags only in the JSON): refused
    legacy = tmp_path / "legacy" / "old.skops"
    legacy.parent.mkdir()
    sio.dump(model.estimator, legacy)
    old = {k: v for k, v in beside.items() if k != "estimator_sha256"} | {"format_version": 1}
    metadata_path(legacy).write_text(json.dumps(old | {"sha256": file_sha256(legacy)}))
    with pytest.raises(ModelRefused, match="not sealed") as exc:
        load_model(legacy)
    assert exc.value.reason == "unsealed_metadata"


class Gadget:
    """A type no model archive may hold."""

    def __init__(self) -> None:
        self.command = "rm -rf /"


def test_untrusted_types_in_a_skops_file_are_refused(tmp_path: Path) -> None:
    X, y, names = feature_cohort(SyntheticCohort(n=30, seed=4))
    model = fit_model(X, y, names)
    meta = make_metadata(model, name="m", cohort={"n": 30}, validation=None, synthetic=False)
    path = tmp_path / "m.skops"
    sio.dump({"estimator": model.estimator, "extra": Gadget()}, path)
    sealed = meta | {"estimator_sha256": estimator_sha256(path)}
    seal(path, sealed)
    metadata_path(path).write_text(json.dumps(sealed | {"sha256": file_sha256(path)}))
    with pytest.raises(ModelRefused, match="untrusted types") as exc:
        load_model(path)
    assert exc.value.reason == "untrusted_types"
    assert "Gadget" in str(exc.value)


def test_the_registry_flag_is_used_at_prediction(tmp_path: Path, sqlite_url: str) -> None:
    X, y, names = feature_cohort(SyntheticCohort(n=30, seed=5))
    model = fit_model(X, y, names)
    path = tmp_path / "m.skops"
    meta = make_metadata(model, name="m", cohort={"n": 30}, validation=None, synthetic=False)
    save_model(model, path, meta)
    engine = make_engine(sqlite_url)
    upgrade(engine)
    registry.activate(engine, str(path))
    assert registry.load_active(engine).synthetic is False
    # the registry knows it as synthetic (e.g. registered when its metadata said so)
    with make_session_factory(engine).begin() as s:
        s.execute(update(ModelRecord).values(synthetic=True))
    loaded = registry.load_active(engine)
    assert loaded.synthetic and "registry" in loaded.synthetic_reasons
    assert loaded.label == DEMO_LABEL
    # registering it again never clears the flag
    registry.register(engine, path)
    assert registry.active_record(engine)["synthetic"] is True  # type: ignore[index]


def test_a_synthetic_cohort_cannot_produce_a_model_marked_real(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``model synth`` -> ``model train``: the model is synthetic with its synthetic.json,
    with the CSV alone (its rows are marked), and ``--not-synthetic`` no longer exists."""
    from typer.testing import CliRunner

    from ketanode.cli.model import model_app
    from ketanode.synthetic.cohort import SYNTHETIC_COLUMN, is_synthetic_cohort

    monkeypatch.setenv("KETANODE__DATABASE__URL", f"sqlite:///{tmp_path / 'k.db'}")
    monkeypatch.setenv("KETANODE__PIPELINE__WORK_DIR", str(tmp_path / "work"))
    monkeypatch.delenv("KETANODE_CONFIG", raising=False)
    runner = CliRunner()
    synth = ["synth", str(tmp_path / "c"), "--n", "40", "--seed", "2", "--features-only"]
    res = runner.invoke(model_app, synth)
    assert res.exit_code == 0, res.output
    cohort = tmp_path / "c" / "cohort.csv"
    alone = tmp_path / "elsewhere" / "renamed.csv"  # without its synthetic.json
    alone.parent.mkdir()
    shutil.copyfile(cohort, alone)
    assert SYNTHETIC_COLUMN in alone.read_text().splitlines()[0].split(",")
    assert is_synthetic_cohort(cohort) and is_synthetic_cohort(alone)
    fast = ["--repeats", "1", "--permutations", "0", "--no-register", "--json"]
    res = runner.invoke(model_app, ["train", str(alone), "--not-synthetic", *fast])
    assert res.exit_code != 0 and "No such option" in res.output
    for csv_path in (cohort, alone):
        out = tmp_path / f"{csv_path.stem}.skops"
        res = runner.invoke(model_app, ["train", str(csv_path), "--out", str(out), *fast])
        assert res.exit_code == 0, res.output
        loaded = load_model(out)
        assert loaded.synthetic and loaded.label == DEMO_LABEL
        assert read_sealed(out)["synthetic"] is True  # type: ignore[index]
