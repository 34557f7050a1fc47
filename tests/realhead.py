"""The real head of the shared data (UIH uMR 770, 3 T, 0.5 x 0.5 x 1 mm sagittal, whole head
with neck and face) and acquisition variants of it, written back as DICOM series.

A variant is the same head seen by another acquisition: the source image (converted by the
node's own converter) is resampled into a new scanner grid (orientation, voxel size, field
of view) with the head moved by a rigid pose, then written by the node's series writer.
Rigid motion and resampling keep every volume, so each variant must measure what the
original measures, within the tolerance of the method (issue 11: frontal and cerebellar GM
within 3 %, TIV within 2 %).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from ketanode.imaging.convert import convert_series
from ketanode.synthetic.phantom import PhantomSpec, grid_affine
from ketanode.synthetic.series_writer import SeriesSpec, write_series
from tests.e2e.conftest import Db
from tests.peers import Orthanc
from tests.support import SHARED, wait_for
from tests.unit._report_case import dciodvfy

UIH_DIR = SHARED / "data" / "dicom" / "uih-t1-3d-sag"


def uih_files() -> list[Path]:
    files = sorted(p for p in UIH_DIR.iterdir() if p.is_file() and not p.name.startswith("."))
    assert len(files) == 160, f"expected the 160 files of {UIH_DIR}, found {len(files)}"
    return files


def convert_uih(out: Path) -> Path:
    return Path(convert_series(uih_files(), out).path)


@dataclass(frozen=True)
class Variant:
    name: str
    orientation: str
    voxel_mm: tuple[float, float, float]  # (slice, row, col)
    # (slice, row, col) extent: axial (S-I, A-P, L-R), sagittal (L-R, S-I, A-P)
    fov_mm: tuple[float, float, float]
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)  # about x, y, z (RAS)
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # of the head, RAS
    # keep only what lies above this height (RAS z) relative to the lowest brain voxel
    crop_below_brain_mm: float | None = None


VARIANTS = (
    Variant("axial_1mm", "axial", (1.0, 1.0, 1.0), (256.0, 256.0, 192.0)),
    Variant(
        "rotated_shifted",
        "sagittal",
        (1.0, 1.0, 1.0),
        (176.0, 256.0, 256.0),
        rotation_deg=(15.0, 0.0, 0.0),
        shift_mm=(8.0, 15.0, -10.0),  # |shift| = 19.7 mm
    ),
    Variant("no_neck", "sagittal", (1.0, 0.5, 0.5), (176.0, 0.0, 240.0), crop_below_brain_mm=8.0),
)


def _rotation(deg: tuple[float, float, float]) -> NDArray[np.float64]:
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def write_variant(
    source: Path, variant: Variant, out_dir: Path, brain_mask: Path | None = None
) -> list[Path]:
    """Resample ``source`` (NIfTI) into the variant's grid and write it as a DICOM series.
    ``brain_mask`` (a mask on the source's grid) places the crop of ``no_neck``."""
    src = nib.load(str(source))
    assert isinstance(src, nib.Nifti1Image)
    data = np.asarray(src.dataobj, dtype=np.float32)
    centre = src.affine @ np.append((np.asarray(data.shape) - 1) / 2.0, 1.0)
    fov = list(variant.fov_mm)
    shift_ras = centre[:3].copy()
    if variant.crop_below_brain_mm is not None:
        assert brain_mask is not None, "no_neck needs the brain mask of the source"
        mask = np.asarray(nib.load(str(brain_mask)).dataobj) > 0
        idx = np.argwhere(mask).T
        z = (src.affine[:3, :3] @ idx + src.affine[:3, 3:4])[2]
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in data.shape], indexing="ij"))
        z_top = float((src.affine[:3, :3] @ corners.reshape(3, -1) + src.affine[:3, 3:4])[2].max())
        z_low = float(z.min()) - variant.crop_below_brain_mm
        assert variant.orientation == "sagittal"  # rows run S -> I
        fov[1] = z_top - z_low
        shift_ras[2] = (z_top + z_low) / 2.0
    spec = PhantomSpec(
        orientation=variant.orientation,
        voxel_mm=variant.voxel_mm,
        fov_mm=(fov[0], fov[1], fov[2]),
        fov_shift_mm=(float(shift_ras[0]), float(shift_ras[1]), float(shift_ras[2])),
    )
    target = grid_affine(spec)
    # the head moves by x -> R (x - c) + c + t: a target voxel shows the source at the inverse
    pose = np.eye(4)
    rot = _rotation(variant.rotation_deg)
    pose[:3, :3] = rot
    pose[:3, 3] = centre[:3] - rot @ centre[:3] + np.asarray(variant.shift_mm)
    m = np.linalg.inv(src.affine) @ np.linalg.inv(pose) @ target
    out = ndimage.affine_transform(
        data, m[:3, :3], m[:3, 3], output_shape=spec.grid_shape(), order=1, mode="constant"
    )
    pixels = np.clip(np.rint(out), 0, 65535).astype(np.uint16)
    lps_origin = target[:3, 3] * np.array([-1.0, -1.0, 1.0])
    series = SeriesSpec(
        patient_id="UIH-VARIANT",
        series_description=f"t1_gre_fsp_3d ({variant.name})",
        vendor="siemens",
        orientation=variant.orientation,
        origin_mm=(float(lps_origin[0]), float(lps_origin[1]), float(lps_origin[2])),
    )
    return write_series(pixels, variant.voxel_mm, out_dir, series)


def reports_in_pacs(pacs: Orthanc, db_reader: Db, study: str, out: Path) -> dict[str, Path]:
    """Once every outbox row is sent: the node's SR and report image found in ``pacs`` in
    ``study`` (exactly one each), saved as ``out/sr.dcm`` and ``out/sc.dcm``, each without a
    dciodvfy error."""
    wait_for(
        lambda: {r["state"] for r in db_reader.rows("SELECT state FROM outbox")} == {"sent"},
        120,
        interval=0.5,
        what="the SR and the report image sent",
    )
    (sr_id,) = pacs.find("Instance", StudyInstanceUID=study, Modality="SR")
    (sc_id,) = pacs.find("Instance", StudyInstanceUID=study, Modality="OT")
    paths = {}
    for kind, orthanc_id in (("sr", sr_id), ("sc", sc_id)):
        path = out / f"{kind}.dcm"
        path.write_bytes(pacs.get_bytes(f"/instances/{orthanc_id}/file"))
        errors, _ = dciodvfy(path)
        assert errors == [], (kind, errors)
        paths[kind] = path
    return paths
