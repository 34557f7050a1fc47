"""A real scanner series end to end: DCMTK storescu -> ``ketanode serve`` -> NIfTI.

The node is a subprocess with its own config; the series is the 130-file GE SIGNA
Pioneer 3D T1 (oblique, int16). Results are read through the CLI (``--json``) and the
database; the NIfTI the node wrote is checked against dcm2niix, an independent converter.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import dcm2niix
import nibabel as nib
import numpy as np

from ketanode.roots import Root
from tests.e2e.conftest import (
    Db,
    cli_json,
    copy_ge,
    ge_files,
    nifti_arrays_equal,
    pixel_sha256,
    sha256_file,
    sop_uid,
    spool_files,
    wait_series_final,
)
from tests.support import NodeProcess, storescu

AFFINE_TOLERANCE_MM = 1e-3


def dcm2niix_reference(series_dir: Path, out_dir: Path) -> nib.Nifti1Image:
    """Convert with the dcm2niix binary from the PyPI package; exactly one volume expected."""
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            str(dcm2niix.bin),
            "-z",
            "n",
            "-b",
            "n",
            "-f",
            "reference",
            "-o",
            str(out_dir),
            str(series_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"dcm2niix failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    assert "Found 130 DICOM file(s)" in proc.stdout, proc.stdout
    outputs = sorted(out_dir.glob("*.nii"))
    assert [p.name for p in outputs] == ["reference.nii"], (
        f"dcm2niix split the series: {[p.name for p in outputs]}"
    )
    img = nib.load(str(outputs[0]))
    assert isinstance(img, nib.Nifti1Image)
    return img


def test_ge_series_stored_selected_and_converted(
    db_url: str, db_reader: Db, tmp_path: Path, node_process: list[NodeProcess]
) -> None:
    node = NodeProcess(tmp_path / "node", db_url)
    node_process.append(node)
    node.start()

    sources = ge_files()
    storescu(node.port, sources)

    series_rows = wait_series_final(node, db_reader, 1, timeout=60)

    # -- one series, complete, selected as a structural 3D T1, processed -----------------
    assert len(series_rows) == 1, series_rows
    listed = series_rows[0]
    assert listed["state"] == "done", listed
    assert listed["n_instances"] == 130
    assert listed["completed_at"] is not None
    # The GE headers carry Images in Acquisition = 130: the expected-count path completes it.
    assert listed["completion_trigger"] == "expected_count", listed
    assert listed["generation"] == 1

    detail = cli_json(node, "series", "show", str(listed["id"]))
    assert detail["selection"]["selected"] is True, detail["selection"]
    assert detail["reason"].startswith("structural 3D T1"), detail["reason"]
    assert all(check["ok"] for check in detail["selection"]["checks"])
    assert detail["mr_acquisition_type"] == "3D"
    assert "patient" not in detail  # identifiers only with --patient

    jobs = cli_json(node, "jobs", "list")
    assert len(jobs) == 1, jobs
    job = jobs[0]
    assert (job["series_id"], job["state"], job["attempt"]) == (listed["id"], "done", 1), job
    assert [s["name"] for s in job["steps"]] == ["convert"]
    step = job["steps"][0]
    assert step["ok"] is True and step["error"] is None
    out = step["detail"]
    assert out["n_files"] == 130

    # -- 130 instance rows and 130 intact files in the spool ----------------------------
    rows = db_reader.rows(
        "SELECT sop_instance_uid, spool_path, sha256, size_bytes, series_id FROM instance"
    )
    assert len(rows) == 130
    assert {r["series_id"] for r in rows} == {listed["id"]}
    by_uid = {r["sop_instance_uid"]: r for r in rows}
    assert len(by_uid) == 130, "duplicate SOP Instance UIDs in the instance table"
    source_by_uid = {sop_uid(p): p for p in sources}
    assert set(by_uid) == set(source_by_uid)
    for uid, row in by_uid.items():
        spooled = Root.at(node.spool).resolve(row["spool_path"])
        assert spooled.is_file(), f"missing spool file for {uid}"
        assert row["sha256"] == sha256_file(spooled)
        assert row["size_bytes"] == spooled.stat().st_size
        assert pixel_sha256(spooled) == pixel_sha256(source_by_uid[uid]), f"pixels differ: {uid}"
    assert len(spool_files(node)) == 130

    assocs = cli_json(node, "associations")
    assert len(assocs) == 1, assocs
    assert assocs[0]["outcome"] == "released" and assocs[0]["stored"] == 130, assocs[0]
    assert cli_json(node, "failures") == []

    # -- the NIfTI agrees with dcm2niix (geometry within 1e-3 mm, voxels identical) ------
    mine = nib.load(out["path"])
    assert isinstance(mine, nib.Nifti1Image)
    assert list(mine.shape) == out["shape"]
    assert np.allclose(mine.affine, np.array(out["affine"]), atol=1e-5)
    assert np.allclose(mine.header.get_zooms()[:3], out["zooms_mm"], atol=1e-6)

    copy_ge(tmp_path / "ge-copy")
    reference = dcm2niix_reference(tmp_path / "ge-copy", tmp_path / "dcm2niix")
    mine_c = nib.as_closest_canonical(mine)
    ref_c = nib.as_closest_canonical(reference)
    assert mine_c.shape == ref_c.shape == (256, 256, 130), (mine_c.shape, ref_c.shape)
    max_diff = float(np.abs(mine_c.affine - ref_c.affine).max())
    assert max_diff <= AFFINE_TOLERANCE_MM, (
        f"affines differ by {max_diff:.6f} mm\nketanode:\n{mine_c.affine}\n"
        f"dcm2niix:\n{ref_c.affine}"
    )
    # The GE files have no Rescale Slope/Intercept and int16 pixels, so neither converter
    # scales: both store the raw stored values, which must then be identical.
    for name, img in (("ketanode", mine_c), ("dcm2niix", ref_c)):
        slope, inter = img.header.get_slope_inter()
        assert slope in (None, 1.0) and inter in (None, 0.0), f"{name} scaled: {slope}, {inter}"
    mine_voxels = np.asarray(mine_c.dataobj)
    ref_voxels = np.asarray(ref_c.dataobj)
    assert nifti_arrays_equal(mine_voxels, ref_voxels), (
        "voxel values differ from dcm2niix: max abs diff "
        f"{np.abs(mine_voxels.astype(np.int64) - ref_voxels.astype(np.int64)).max()}"
    )
    assert int(mine_voxels.max()) > 0

    assert node.stop() == 0


# The GE series with measurement on (refused by QC at qc_registration, reported as NOT
# SCORED, sent to the PACS): tests/e2e/test_pacs_roundtrip.py.
