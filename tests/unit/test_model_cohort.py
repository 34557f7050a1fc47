"""Cohort CSV files and cached, parallel feature extraction with QC exclusions."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from ketanode.config import PipelineSettings
from ketanode.imaging.features import default_spec
from ketanode.model.cohort import CohortError, extract_features, read_cohort
from ketanode.synthetic.cohort import SyntheticCohort, feature_cohort
from ketanode.synthetic.phantom import PhantomSpec, make_phantom, slab_spec

FAST_PIPELINE = PipelineSettings(registration_resolution_mm=4.0)


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_feature_columns_and_labels(tmp_path: Path) -> None:
    X, y, names = feature_cohort(SyntheticCohort(n=6, seed=1))
    labels = ["responder", "non-responder", "1", "0", "Yes", "false"]
    spec = default_spec()
    rows = [
        {"subject": f"s{i}", "label": labels[i], "site": "A", "age": 40 + i, "sex": "F"}
        | {"feature_spec": spec.name, "feature_spec_sha256": spec.sha256}
        | dict(zip(names, X[i], strict=True))
        for i in range(6)
    ]
    subjects = read_cohort(_write(tmp_path / "c.csv", rows))
    assert [s.label for s in subjects] == [1, 0, 1, 0, 1, 0]
    table = extract_features(subjects, progress=False)
    assert table.X.shape == (6, len(default_spec().features)) and table.excluded == []
    assert table.summary()["responders"] == 3 and table.summary()["sites"] == {"A": 6}
    # covariates are kept, not dropped
    assert table.ages == [40.0 + i for i in range(6)] and table.sexes == ["F"] * 6
    cov_names, cov = table.covariates()
    assert cov_names == ["age", "sex", "site"] and cov[0].tolist() == [40.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"subject": "a", "path": "x.nii.gz"}], "no 'label' column"),
        ([{"subject": "a", "label": "maybe", "path": "x"}], "is not responder"),
        (
            [
                {"subject": "a", "label": "1", "path": "x"},
                {"subject": "a", "label": "0", "path": "y"},
            ],
            "appears twice",
        ),
        ([{"subject": "a", "label": "1"}], "needs a 'path' column"),
    ],
)
def test_cohort_errors_name_file_and_line(
    tmp_path: Path, rows: list[dict[str, object]], message: str
) -> None:
    with pytest.raises(CohortError, match=message):
        read_cohort(_write(tmp_path / "c.csv", rows))


def test_images_are_measured_once_and_qc_failures_excluded(tmp_path: Path) -> None:
    make_phantom(PhantomSpec(seed=3, voxel_mm=(3.0, 3.0, 3.0))).write_nifti(tmp_path / "a.nii.gz")
    make_phantom(slab_spec(seed=4, slice_mm=6.0, n_slices=20)).write_nifti(tmp_path / "b.nii.gz")
    csv_path = _write(
        tmp_path / "c.csv",
        [
            {"subject": "a", "path": "a.nii.gz", "label": "responder"},
            {"subject": "b", "path": "b.nii.gz", "label": "non-responder"},
            {"subject": "c", "path": "missing.nii.gz", "label": "0"},
        ],
    )
    cache = tmp_path / "cache"
    first = extract_features(
        read_cohort(csv_path), settings=FAST_PIPELINE, cache_dir=cache, n_jobs=2, progress=False
    )
    assert first.subjects == ["a"] and first.computed == 2 and first.from_cache == 0
    reasons = {e["subject"]: e["reason"] for e in first.excluded}
    assert set(reasons) == {"b", "c"}
    assert "voxel" in reasons["b"].lower() and "not found" in reasons["c"]
    again = extract_features(
        read_cohort(csv_path), settings=FAST_PIPELINE, cache_dir=cache, progress=False
    )
    assert again.from_cache == 2 and again.computed == 0
    assert (again.X == first.X).all()
    # other pipeline settings are another cache entry
    other = extract_features(
        read_cohort(csv_path)[:1],
        settings=PipelineSettings(registration_resolution_mm=3.0),
        cache_dir=cache,
        progress=False,
    )
    assert other.computed == 1
