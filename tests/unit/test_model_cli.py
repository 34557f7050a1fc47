"""``ketanode model ...`` commands (the typer sub-app), on a precomputed-feature cohort."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ketanode.cli.model import model_app
from ketanode.imaging.features import default_spec
from ketanode.synthetic.cohort import SyntheticCohort, feature_cohort
from ketanode.texts import DEMO_LABEL


def _cohort(path: Path, seed: int, n: int = 40) -> Path:
    X, y, names = feature_cohort(SyntheticCohort(n=n, seed=seed))
    spec = default_spec()
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "label", "site", "feature_spec", "feature_spec_sha256", *names])
        for i in range(n):
            label = "responder" if y[i] else "non-responder"
            w.writerow([f"s{i}", label, f"site-{i % 2}", spec.name, spec.sha256, *X[i]])
    return path


def test_train_list_activate_evaluate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KETANODE__DATABASE__URL", f"sqlite:///{tmp_path / 'k.db'}")
    monkeypatch.setenv("KETANODE__PIPELINE__WORK_DIR", str(tmp_path / "work"))
    monkeypatch.delenv("KETANODE_CONFIG", raising=False)
    runner = CliRunner()
    model = tmp_path / "m.skops"
    res = runner.invoke(
        model_app,
        [
            "train",
            str(_cohort(tmp_path / "train.csv", 1)),
            "--out",
            str(model),
            "--repeats",
            "2",
            "--permutations",
            "5",
            "--synthetic",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    meta = json.loads(res.output[res.output.index("{") :])
    assert meta["synthetic"] and meta["label"] == DEMO_LABEL
    assert meta["validation"]["leave_site_out"] is not None
    res = runner.invoke(model_app, ["list", "--json"])
    rows = json.loads(res.output)
    assert [r["sha256"] for r in rows] == [meta["sha256"]] and not rows[0]["active"]
    res = runner.invoke(model_app, ["activate", meta["sha256"][:12]])
    assert res.exit_code == 0 and DEMO_LABEL in res.output, res.output
    res = runner.invoke(model_app, ["list"])
    assert res.exit_code == 0 and "*" in res.output
    res = runner.invoke(
        model_app,
        [
            "evaluate",
            str(model),
            str(_cohort(tmp_path / "ext.csv", 2)),
            "--json",
            "--out-dir",
            str(tmp_path / "eval"),
        ],
    )
    assert res.exit_code == 0, res.output
    ext = json.loads(res.output[res.output.index("{") :])
    assert ext["metrics"]["balanced_accuracy"]["mean"] > 0.7 and ext["synthetic_model"]
    assert Path(ext["report"]).parent == tmp_path / "eval" and Path(ext["report"]).is_file()
    # a tampered model is refused by evaluate and activate, with the reason
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")
    res = runner.invoke(model_app, ["evaluate", str(model), str(tmp_path / "ext.csv")])
    assert res.exit_code == 1 and "SHA-256 mismatch" in res.output
    res = runner.invoke(model_app, ["activate", str(model)])
    assert res.exit_code == 1 and "SHA-256 mismatch" in res.output


def test_synth_features_two_arms_train_and_evaluate_per_arm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KETANODE__DATABASE__URL", f"sqlite:///{tmp_path / 'k.db'}")
    monkeypatch.setenv("KETANODE__PIPELINE__WORK_DIR", str(tmp_path / "work"))
    monkeypatch.delenv("KETANODE_CONFIG", raising=False)
    runner = CliRunner()
    res = runner.invoke(
        model_app,
        [
            "synth",
            str(tmp_path / "train"),
            "--n",
            "60",
            "--seed",
            "3",
            "--features-only",
            "--age-effect",
            "5",
            "--sites",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "train" / "synthetic.json").is_file()
    res = runner.invoke(
        model_app,
        [
            "synth",
            str(tmp_path / "ext"),
            "--n",
            "160",
            "--seed",
            "4",
            "--features-only",
            "--arms",
            "2",
            "--effect-in",
            "ketamine",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "arm" in (tmp_path / "ext" / "cohort.csv").read_text().splitlines()[0].split(",")
    model = tmp_path / "m.skops"
    res = runner.invoke(
        model_app,
        [
            "train",
            str(tmp_path / "train" / "cohort.csv"),
            "--out",
            str(model),
            "--repeats",
            "2",
            "--permutations",
            "3",
            "--no-register",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "covariates-only baseline (age, sex, site)" in res.output
    assert "does better than the covariates alone" in res.output
    assert "permutation test of the headline" in res.output and "within site" in res.output
    res = runner.invoke(
        model_app,
        [
            "evaluate",
            str(model),
            str(tmp_path / "ext" / "cohort.csv"),
            "--out-dir",
            str(tmp_path / "eval"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "external validation metrics" in res.output
    assert "cross-validated metrics" not in res.output
    assert "arm ketamine (n=80)" in res.output and "arm saline (n=80)" in res.output
    assert "arm x prediction interaction" in res.output and "calibration: Brier" in res.output
    # one input under two subject IDs: refused with both names
    text = (tmp_path / "ext" / "cohort.csv").read_text().splitlines()
    dup = text[1].replace("sub-0001", "sub-9999", 1)
    (tmp_path / "dup.csv").write_text("\n".join([*text, dup]) + "\n")
    res = runner.invoke(model_app, ["evaluate", str(model), str(tmp_path / "dup.csv")])
    assert res.exit_code == 2 and "'sub-0001' and 'sub-9999'" in res.output
