"""Compressed and deflated transfer syntaxes: accepted, stored byte for byte as sent, and
(for 3D T1s) converted to a NIfTI whose voxels equal those of the uncompressed series."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from ketanode.imaging.convert import convert_series
from tests.integration.conftest import RunningNode
from tests.integration.dicomtools import (
    DCMCJPEG,
    DCMCJPLS,
    DCMCRLE,
    dataset_bytes,
    dcmtk_compress,
    send,
    sha256,
    t1_series,
    transfer_syntax,
)
from tests.support import storescu

N_SLICES = 24
SEED = 1


@dataclass
class Reference:
    files: list[Path]
    data: NDArray[np.float64]
    affine: NDArray[np.float64]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """An uncompressed 3D T1 and its NIfTI, converted here with the node's own converter."""
    base = tmp_path_factory.mktemp("reference")
    files = t1_series(base / "dicom", n_slices=N_SLICES, seed=SEED)
    convert_series(files, base / "reference.nii.gz")
    img = nib.load(base / "reference.nii.gz")
    return Reference(files, np.asarray(img.get_fdata()), img.affine)


def _dcmtk(tool: str, *args: str) -> Callable[[Reference, Path], list[Path]]:
    def make(ref: Reference, out: Path) -> list[Path]:
        return [dcmtk_compress(tool, f, out / f.name, *args) for f in ref.files]

    return make


def _writer(ts: str, **spec: object) -> Callable[[Reference, Path], list[Path]]:
    def make(_ref: Reference, out: Path) -> list[Path]:
        return t1_series(out, n_slices=N_SLICES, seed=SEED, transfer_syntax=ts, **spec)

    return make


#: name -> (how the series is made, the transfer syntax it must arrive in)
COMPRESSED: dict[str, tuple[Callable[[Reference, Path], list[Path]], str]] = {
    "jpeg-lossless-sv1-dcmcjpeg": (_dcmtk(DCMCJPEG, "+e1"), JPEGLosslessSV1),
    "jpeg-lossless-p14-dcmcjpeg": (_dcmtk(DCMCJPEG, "+el"), JPEGLossless),
    "jpeg-ls-lossless-dcmcjpls": (_dcmtk(DCMCJPLS, "+el"), JPEGLSLossless),
    "rle-dcmcrle": (_dcmtk(DCMCRLE), RLELossless),
    "jpeg-2000-lossless-pydicom": (_writer(JPEG2000Lossless), JPEG2000Lossless),
    "rle-pydicom": (_writer(RLELossless), RLELossless),
    "deflated-pydicom": (_writer(DeflatedExplicitVRLittleEndian), DeflatedExplicitVRLittleEndian),
    "enhanced-mr-jpeg-2000": (_writer(JPEG2000Lossless, enhanced=True), JPEG2000Lossless),
}


def _assert_stored_byte_exact(node: RunningNode, sent: list[Path], ts: str) -> None:
    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in sent}
    rows = node.instances()
    assert sorted(r.sop_instance_uid for r in rows) == sorted(by_uid)
    for row in rows:
        stored = node.spool_file(row.spool_path)
        assert row.transfer_syntax_uid == ts
        assert transfer_syntax(stored) == ts
        assert dataset_bytes(stored) == dataset_bytes(by_uid[row.sop_instance_uid])
        assert sha256(stored) == row.sha256 and stored.stat().st_size == row.size_bytes


def _assert_converted_like_reference(
    node: RunningNode, series_uid: str, ref: Reference, n_files: int
) -> None:
    series, job = node.wait_job_done(series_uid)
    assert series.n_frames == N_SLICES
    (step,) = node.steps(job.id)
    assert step.name == "convert" and step.ok and step.detail["n_files"] == n_files
    img = nib.load(step.detail["path"])
    assert list(img.shape) == step.detail["shape"] == list(ref.data.shape)
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
    assert np.array_equal(np.asarray(img.get_fdata()), ref.data), "voxels differ (lossless?)"


@pytest.mark.parametrize("case", list(COMPRESSED))
def test_compressed_t1_is_stored_byte_exact_and_converted(
    node: RunningNode, reference: Reference, tmp_path: Path, case: str
) -> None:
    make, ts = COMPRESSED[case]
    files = make(reference, tmp_path / case)
    assert {transfer_syntax(f) for f in files} == {ts}
    assert send(node.port, files) == [0] * len(files)
    _assert_stored_byte_exact(node, files, ts)
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    _assert_converted_like_reference(node, uid, reference, n_files=len(files))
    assert node.failures() == []


def test_enhanced_mr_uncompressed_converts_with_the_right_shape(
    node: RunningNode, reference: Reference, tmp_path: Path
) -> None:
    (enhanced,) = t1_series(tmp_path / "enh", n_slices=N_SLICES, seed=SEED, enhanced=True)
    assert send(node.port, [enhanced]) == [0]
    uid = str(dcmread(enhanced, stop_before_pixels=True).SeriesInstanceUID)
    series = node.wait_state(uid, ("queued", "processing", "done", "failed"))
    assert series.completion_trigger == "expected_count"  # one Enhanced MR object = all
    assert (series.n_instances, series.n_frames, series.expected_instances) == (1, N_SLICES, 1)
    _assert_converted_like_reference(node, uid, reference, n_files=1)


def test_dcmtk_storescu_sends_jpeg_ls_through_to_nifti(
    node: RunningNode, reference: Reference, tmp_path: Path
) -> None:
    """A real DCMTK peer (storescu, TCP_NODELAY=1) proposing JPEG-LS lossless (-xt) for
    the SOP classes of its files (-R), as one does to send a compressed series."""
    files = [dcmtk_compress(DCMCJPLS, f, tmp_path / "jls" / f.name) for f in reference.files]
    proc = storescu(node.port, files, calling_ae="STORESCU", extra=["-xt", "-R"])
    assert proc.returncode == 0
    _assert_stored_byte_exact(node, files, JPEGLSLossless)
    rows = node.instances()
    assert len(rows) == N_SLICES and {r.transfer_syntax_uid for r in rows} == {JPEGLSLossless}
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    _assert_converted_like_reference(node, uid, reference, n_files=N_SLICES)


def test_objects_encoded_by_other_toolkits_are_stored_byte_exact(
    node: RunningNode, tmp_path: Path
) -> None:
    """pydicom's test files: a deflated and an RLE (RGB) Secondary Capture and a JPEG 2000
    MR image. The same MR image in RLE (same SOP Instance UID) is a duplicate: first kept."""
    names = {
        "image_dfl.dcm": DeflatedExplicitVRLittleEndian,
        "SC_rgb_rle.dcm": RLELossless,
        "MR_small_jp2klossless.dcm": JPEG2000Lossless,
    }
    files = [
        Path(shutil.copy(get_testdata_file(n), tmp_path / n))  # type: ignore[arg-type]
        for n in [*names, "MR_small_RLE.dcm"]
    ]
    assert send(node.port, files) == [0, 0, 0, 0]
    for f, ts in zip(files, names.values(), strict=False):
        uid = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        (row,) = node.instances(sop_uid=uid)
        assert row.transfer_syntax_uid == ts
        assert dataset_bytes(node.spool_file(row.spool_path)) == dataset_bytes(f)
        ds = dcmread(node.spool_file(row.spool_path))  # the stored file decodes like the original
        assert np.array_equal(ds.pixel_array, dcmread(f).pixel_array)
    assert len(node.instances()) == 3
    (assoc,) = node.wait_association_ended(1)
    assert (assoc.n_stored, assoc.n_duplicate) == (3, 1)
    for f in files[:2]:
        sc = node.wait_state(
            str(dcmread(f, stop_before_pixels=True).SeriesInstanceUID), ("ignored",)
        )
        assert "modality OT" in sc.reason
    assert node.failures() == []
