"""Model files: skops round trip, metadata, and every refusal rule; the HTML report."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ketanode.imaging.features import default_spec
from ketanode.model.classifier import fit_model, predict
from ketanode.model.cohort import FeatureTable
from ketanode.model.files import (
    ModelRefused,
    file_sha256,
    load_model,
    make_metadata,
    metadata_path,
    save_model,
)
from ketanode.model.training import evaluate, train
from ketanode.model.validation import Protocol
from ketanode.synthetic.cohort import SyntheticCohort, feature_cohort
from ketanode.texts import DEMO_LABEL


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    X, y, names = feature_cohort(SyntheticCohort(n=40, seed=8))
    model = fit_model(X, y, names)
    path = tmp_path_factory.mktemp("model") / "m.skops"
    meta = make_metadata(model, name="m", cohort={"n": 40}, validation=None, synthetic=True)
    save_model(model, path, meta)
    return path, X


def _copy(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / src.name
    dst.write_bytes(src.read_bytes())
    metadata_path(dst).write_text(metadata_path(src).read_text())
    return dst


def test_round_trip(saved: tuple[Path, np.ndarray]) -> None:
    path, X = saved
    loaded = load_model(path)
    meta = json.loads(metadata_path(path).read_text())
    assert meta["sha256"] == file_sha256(path) == loaded.sha256
    assert meta["feature_spec"]["sha256"] == default_spec().sha256
    assert meta["synthetic"] is True and meta["label"] == DEMO_LABEL == loaded.label
    assert "research use only" in meta["intended_use"].lower()
    assert {"scikit-learn", "skops", "numpy"} <= set(meta["libraries"])
    assert meta["classifier"]["tiv"] == "proportion"
    fresh = fit_model(*feature_cohort(SyntheticCohort(n=40, seed=8)))
    assert predict(loaded.model, X[:3]) == predict(fresh, X[:3])


def test_tampered_file_is_refused(saved: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path = _copy(saved[0], tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(ModelRefused, match="SHA-256 mismatch") as exc:
        load_model(path)
    assert exc.value.reason == "sha256_mismatch"


def test_replaced_file_is_refused(saved: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    X, y, names = feature_cohort(SyntheticCohort(n=40, seed=9))
    model = fit_model(X, y, names)
    other = other_dir / "m.skops"
    save_model(
        model, other, make_metadata(model, name="o", cohort={}, validation=None, synthetic=True)
    )
    path = _copy(saved[0], tmp_path)
    path.write_bytes(other.read_bytes())  # a valid skops model, but not the recorded one
    with pytest.raises(ModelRefused) as exc:
        load_model(path)
    assert exc.value.reason == "sha256_mismatch"
    assert "SHA-256 mismatch" in str(exc.value)


def test_mismatched_spec_is_refused(saved: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path = _copy(saved[0], tmp_path)
    spec = default_spec()
    with pytest.raises(ModelRefused) as exc:
        load_model(path, replace(spec, version="99"))
    assert exc.value.reason == "spec_mismatch"
    assert "feature spec mismatch" in str(exc.value)
    # the message names the difference: the pipeline's features changed (version)
    assert f"version '{spec.version}' != '99'" in str(exc.value)
    with pytest.raises(ModelRefused) as exc:
        load_model(path, replace(spec, features=spec.features[:-1] + ("gm_new_region",)))
    assert "features: missing ['gm_new_region'], extra ['tiv']" in str(exc.value)
    # the JSON beside the file is a copy: another spec written there is ignored (the sealed
    # metadata inside the file is what counts); tests/unit/test_model_provenance.py seals one
    meta = json.loads(metadata_path(path).read_text())
    meta["feature_spec"]["sha256"] = "0" * 64
    metadata_path(path).write_text(json.dumps(meta))
    assert load_model(path).ignored_metadata == ("feature_spec",)


def test_pickle_file_is_refused(saved: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path = _copy(saved[0], tmp_path)
    loaded = load_model(path)
    path.write_bytes(pickle.dumps(loaded.model.estimator))
    meta = json.loads(metadata_path(path).read_text())
    meta["sha256"] = file_sha256(path)  # even with a matching hash
    metadata_path(path).write_text(json.dumps(meta))
    with pytest.raises(ModelRefused, match="pickle file") as exc:
        load_model(path)
    assert exc.value.reason == "not_skops"
    path.write_bytes(b"not a model at all")
    meta["sha256"] = file_sha256(path)
    metadata_path(path).write_text(json.dumps(meta))
    with pytest.raises(ModelRefused, match="not a skops model file"):
        load_model(path)


def test_missing_metadata_is_refused(saved: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path = _copy(saved[0], tmp_path)
    metadata_path(path).unlink()
    with pytest.raises(ModelRefused, match="no metadata") as exc:
        load_model(path)
    assert exc.value.reason == "no_metadata"


def _table(seed: int, n: int = 40, null: bool = False) -> FeatureTable:
    X, y, _ = feature_cohort(SyntheticCohort(n=n, seed=seed, null=null))
    return FeatureTable(
        spec=default_spec(),
        subjects=[f"s{i}" for i in range(n)],
        X=X,
        y=y,
        sites=[f"site-{i % 2}" for i in range(n)],
        excluded=[{"subject": "s-bad", "reason": "QC failed: snr"}],
    )


def test_train_and_evaluate_write_model_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "trained.skops"
    p = Protocol(repeats=2, n_permutations=5, n_boot=200)
    meta = train(_table(10), out, protocol=p, synthetic=True)
    assert out.is_file() and metadata_path(out).is_file()
    html = Path(meta["report"]).read_text()
    # ROC, confusion, calibration, weights and the permutation null (issue 12 item 6)
    assert html.count("data:image/png;base64,") == 5
    assert DEMO_LABEL in html and "s-bad" in html
    v = meta["validation"]
    assert v["leave_site_out"] is not None and v["permutation"]["n_permutations"] == 5
    assert meta["training_cohort"]["n"] == 40 and meta["training_cohort"]["excluded"] == 1
    result = evaluate(out, _table(11))
    assert result["metrics"]["balanced_accuracy"]["mean"] > 0.7
    assert Path(result["report"]).is_file() and Path(result["predictions"]).is_file()
    assert result["synthetic_model"] is True and result["model_sha256"] == meta["sha256"]


def test_shipped_demonstration_model_loads_and_says_what_it_is() -> None:
    from ketanode.synthetic.demo_model import DEMO_MODEL

    loaded = load_model(DEMO_MODEL)
    meta = loaded.metadata
    assert loaded.synthetic and meta["synthetic"] is True
    assert loaded.label == DEMO_LABEL == meta["label"]
    assert meta["recipe"]["command"].startswith("ketanode model demo-train")
    assert meta["validation"]["metrics"]["balanced_accuracy"]["mean"] >= 0.8
    readme = (DEMO_MODEL.parent / "README.md").read_text()
    assert DEMO_LABEL in readme and "scripts/make_demo_model.py" in readme
    w = loaded.model.weights()
    assert w["gm_left_frontal"] > 0 > w["gm_right_cerebellum"]
