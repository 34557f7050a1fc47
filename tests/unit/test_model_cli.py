"""``ketanode model ...`` commands (the typer sub-app), on a precomputed-feature cohort."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ketanode.model.files import DEMO_LABEL
from ketanode.model.synthetic import SyntheticCohort, feature_cohort
from ketanode.model_cli import model_app


def _cohort(path: Path, seed: int, n: int = 40) -> Path:
    X, y, names = feature_cohort(SyntheticCohort(n=n, seed=seed))
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "label", "site", *names])
        for i in range(n):
            w.writerow([f"s{i}", "responder" if y[i] else "non-responder", f"site-{i % 2}", *X[i]])
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
        ["evaluate", str(model), str(_cohort(tmp_path / "ext.csv", 2)), "--json", "--out-dir",
         str(tmp_path / "eval")],
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
