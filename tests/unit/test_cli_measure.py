"""`ketanode measure PATH`: a researcher's entry to the measurement steps, on a DICOM folder
or a NIfTI file, as JSON or as tables; exit 1 when QC fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ketanode.imaging.features import default_spec
from ketanode.process import pipeline
from ketanode.synthetic.phantom import PhantomSpec, make_phantom, slab_spec


def _measure(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ketanode", "measure", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def test_measure_a_dicom_folder_as_json(tmp_path: Path) -> None:
    phantom = make_phantom(PhantomSpec(seed=8, voxel_mm=(2.0, 2.0, 2.0)))
    phantom.write_dicom(tmp_path / "series")
    proc = _measure(str(tmp_path / "series"), "--out-dir", str(tmp_path / "out"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    spec = default_spec()
    assert result["features"]["names"] == list(spec.features)
    assert result["features"]["spec"]["sha256"] == spec.sha256
    values = dict(zip(result["features"]["names"], result["features"]["vector"], strict=True))
    assert abs(values["tiv"] / phantom.truth["tiv_ml"] - 1) <= 0.05
    assert result["qc"]["outcome"] in ("pass", "warn")
    # every measurement step (the node's steps but convert, done here, predict and report)
    assert set(result["seconds"]) == {name for name, _ in pipeline.MEASUREMENT}
    # the images a researcher wants to look at are kept in --out-dir
    for name in ("t1.nii.gz", "t1_n4.nii.gz", "brain_mask.nii.gz", "gm_prob.nii.gz"):
        assert (tmp_path / "out" / name).is_file(), name


def test_measure_fails_a_slab_with_its_reason_as_a_table(tmp_path: Path) -> None:
    slab = make_phantom(slab_spec(seed=2, slice_mm=5.0, n_slices=8))
    path = slab.write_nifti(tmp_path / "slab.nii.gz")
    proc = _measure(str(path))
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert "voxel_size" in proc.stdout and "coverage" in proc.stdout
    assert "QC: fail" in proc.stdout
    assert "reason: QC failed: voxel_size = 5 mm" in proc.stdout
