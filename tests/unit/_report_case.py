"""A small, fast case for the SR and report-image tests: a 3 mm phantom series, a fake GM
map and fake territories derived from its intensity (no pipeline run), a hand-made result."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom import Dataset

from ketanode.report.content import ResultForReport
from ketanode.synthetic.phantom import PhantomSpec, make_phantom
from ketanode.texts import DEMO_LABEL

DCIODVFY = "/usr/bin/dciodvfy"
DSRDUMP = "/usr/bin/dsrdump"
SHA = "d18664ba14776111dd4394996452001fd878f06b246579f1c14296d82a12fc78"
REGIONS = (
    "left_frontal",
    "right_frontal",
    "left_cerebellum",
    "right_cerebellum",
    "left_cingulate",
    "right_deep_grey",
)


# the header checks of a 3 mm phantom: one warning, one pass
HEADER_CHECKS: tuple[dict[str, object], ...] = (
    {
        "name": "voxel_size",
        "value": 3.0,
        "outcome": "warn",
        "unit": " mm",
        "description": "largest voxel dimension",
    },
    {
        "name": "coverage",
        "value": 175.5,
        "outcome": "pass",
        "unit": " mm",
        "description": "smallest field-of-view extent",
    },
)


def make_case(root: Path) -> tuple[list[Dataset], ResultForReport]:
    phantom = make_phantom(PhantomSpec(seed=1, voxel_mm=(3.0, 3.0, 3.0)))
    files = phantom.write_dicom(root / "dicom")
    source: list[Dataset] = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    t1_path = phantom.write_nifti(root / "t1.nii.gz")
    img = nib.load(str(t1_path))
    assert isinstance(img, nib.Nifti1Image)
    data = np.asarray(img.get_fdata(), dtype=np.float32)
    # fake GM: intensities between CSF and WM (a band of the brain's histogram)
    lo, hi = np.percentile(data[data > 0], (60.0, 85.0))
    gm = np.clip(1.0 - np.abs(data - (lo + hi) / 2) / ((hi - lo) / 2), 0.0, 1.0)
    nib.save(nib.Nifti1Image(gm.astype(np.float32), img.affine), str(root / "gm_prob.nii.gz"))
    # fake territories: octants of the head, labels 1..6
    terr = np.zeros(data.shape, dtype=np.int16)
    head = data > np.percentile(data, 50)
    idx = np.indices(data.shape)
    mid = [s // 2 for s in data.shape]
    octant = (idx[0] >= mid[0]) * 1 + (idx[1] >= mid[1]) * 2 + (idx[2] >= mid[2]) * 4
    terr[head] = (octant[head] % 6 + 1).astype(np.int16)
    nib.save(nib.Nifti1Image(terr, img.affine), str(root / "territories.nii.gz"))
    contributions = {
        "gm_left_frontal": -0.48,
        "gm_right_frontal": 0.15,
        "gm_left_cerebellum": -0.42,
        "gm_right_cerebellum": -0.34,
        "gm_left_cingulate": 0.47,
        "gm_right_deep_grey": 0.87,
    }
    volumes = {
        "gm_left_frontal": 89.781,
        "gm_right_frontal": 86.895,
        "gm_left_cerebellum": 49.883,
        "gm_right_cerebellum": 50.032,
        "gm_left_cingulate": 9.883,
        "gm_right_deep_grey": 24.46,
        "gm_total": 650.923,
        "wm_total": 408.299,
        "csf_total": 144.792,
        "tiv": 1204.014,
    }
    result = ResultForReport(
        predicted_class="responder",
        probability=0.731234,
        decision_value=0.41296,
        contributions=contributions,
        volumes=volumes,
        qc_outcome="warn",
        qc_checks=list(HEADER_CHECKS),
        model_name="ketanode-demo",
        model_version="1",
        model_sha256=SHA,
        model_synthetic=True,
        model_label=DEMO_LABEL,
        decision_threshold=0.5,
        indeterminate_margin=0.05,
        training_response_rate=0.5,
        feature_spec_name="ketanode-regional-volumes",
        feature_spec_sha256="066ea8d9583cfa7dbbba64ceab3040fdd9a7934002b81b5dc64875daee7af4d4",
        software_version="0.1.0",
        t1_path=t1_path,
        gm_path=root / "gm_prob.nii.gz",
        territories_path=root / "territories.nii.gz",
        region_names=REGIONS,
    )
    return source, result


def clinical(result: ResultForReport) -> ResultForReport:
    """The same result from a (pretend) non-synthetic model."""
    return replace(
        result,
        model_synthetic=False,
        model_label="RESEARCH USE ONLY",
        model_name="site-model",
        qc_outcome="pass",
        qc_checks=[],
    )


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) lines of dciodvfy on a file."""
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return (
        [x for x in lines if x.startswith("Error")],
        [x for x in lines if x.startswith("Warning")],
    )


def have(tool: str) -> bool:
    return Path(tool).is_file() and shutil.which(tool) is not None


NOT_SCORED_REASON = (
    "QC failed: registration = 0.11 (fail): correlation with the template inside its brain"
)


def not_scored(result: ResultForReport) -> ResultForReport:
    """The same series, examined but not scored: QC failed (the image is not a head), no
    model applied, no measurements; the T1 is given, the GM map and territories are not."""
    return replace(
        result,
        predicted_class=None,
        probability=None,
        decision_value=None,
        contributions={},
        volumes={},
        qc_outcome="fail",
        qc_checks=[
            {
                "name": "registration",
                "value": 0.11,
                "outcome": "fail",
                "warn": 0.5,
                "fail": 0.3,
                "description": "correlation with the template inside its brain",
            },
            *HEADER_CHECKS,
        ],
        model_name=None,
        model_version=None,
        model_sha256=None,
        model_synthetic=False,
        model_label=None,
        not_scored_reason=NOT_SCORED_REASON,
        gm_path=None,
        territories_path=None,
        region_names=(),
    )


def saved(ds: Dataset, path: Path | None = None) -> Dataset:
    """The object as written to a file (what reporting does) and read back; also written to
    ``path`` when given."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    if path is not None:
        path.write_bytes(buf.getvalue())
    buf.seek(0)
    return pydicom.dcmread(buf)


def small_page(result: ResultForReport) -> np.ndarray:
    """A stand-in for the rendered report page (the header tests do not need the drawing)."""
    return np.full((32, 32, 3), 128, dtype=np.uint8)
