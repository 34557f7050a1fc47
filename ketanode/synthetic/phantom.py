"""Synthetic heads: a simple ellipsoid head and a realistic MNI152 phantom with known truth.

``simple_head`` (nested ellipsoids) is kept for the demo and the ingest tests.

``make_phantom(PhantomSpec(...))`` builds a T1-weighted head from the shipped ICBM152 2009a
GM/WM maps (see ``ketanode/data/templates/SOURCE.md``):

1. Template space (1 mm MNI grid, built once per process): tissue fractions GM, WM and CSF
   (CSF = intracranial mask minus GM and WM), a skull and a scalp shell from the distance to
   the intracranial mask, and a *territory* map that gives every intracranial voxel the
   nearest atlas region (cortical regions within the cerebrum, cerebellar regions within the
   cerebellum; :func:`ketanode.imaging.atlas.region_territories`).
2. Subject (seeded): GM scaled per region (chosen factors times a small random variation),
   grown or shrunk at the grey/white interface (WM exchanged; CSF and TIV unchanged); head
   size, a random rigid pose plus a small anisotropic scaling, and a smooth random warp.
3. Scanner: the head is pulled onto a scanner grid (orientation, voxel size, matrix, FOV
   shift), with a multiplicative bias field, Rician noise and integer (uint16-safe) values.
4. Truth: tissue fractions and territories are resampled through the same transform onto a
   native grid (linear / nearest) and summed (mL). The same numbers computed in template space
   weighted by the transform's Jacobian are stored as a cross-check.

Coordinates: world = scanner RAS mm (NIfTI); DICOM LPS is the same space with x, y negated.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from ketanode.imaging.atlas import (
    TEMPLATE_GM,
    TEMPLATE_T1,
    TEMPLATE_WM,
    Atlas,
    load_atlas,
    region_territories,
)
from ketanode.synthetic.series_writer import ORIENTATIONS, SeriesSpec, write_series

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]

# T1-weighted intensities (arbitrary units)
FAT, BONE, CSF, GM, WM = 900.0, 80.0, 150.0, 500.0, 750.0


def simple_head(
    shape: tuple[int, int, int] = (128, 128, 128), seed: int = 0, noise: float = 20.0
) -> NDArray[np.float32]:
    """A head volume ``[slice, row, col]``: scalp, skull, CSF, grey and white matter."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    z, y, x = np.meshgrid(*axes, indexing="ij")

    def ellipsoid(scale: float) -> NDArray[np.bool_]:
        return (x / (0.80 * scale)) ** 2 + (y / (0.92 * scale)) ** 2 + (
            z / (0.85 * scale)
        ) ** 2 <= 1

    vol = np.zeros(shape, dtype=np.float32)
    vol[ellipsoid(1.00)] = FAT
    vol[ellipsoid(0.93)] = BONE
    vol[ellipsoid(0.87)] = CSF
    vol[ellipsoid(0.83)] = GM
    vol[ellipsoid(0.68)] = WM
    ventricles = ((x / 0.12) ** 2 + (y / 0.30) ** 2 + (z / 0.18) ** 2) <= 1
    vol[ventricles] = CSF
    vol += rng.normal(0.0, noise, size=shape).astype(np.float32)
    return np.clip(vol, 0, None)


# --------------------------------------------------------------------------------------
# Realistic phantom
# --------------------------------------------------------------------------------------

#: T1 intensities relative to white matter (MP-RAGE like).
INTENSITY = {"wm": 1.0, "gm": 0.62, "csf": 0.16, "skull": 0.06, "scalp": 1.08}
#: Nominal white-matter signal; images are integers so DICOM uint16 storage is lossless.
WM_SIGNAL = 2000.0
#: Linear scale from the (large) ICBM152 head to an average adult head (TIV ~ 1.5 L).
REFERENCE_SCALE = 0.92
SKULL_MM = 5.5
SCALP_MM = 6.0
_PAD = 18  # voxels of padding around the intracranial box, for skull and scalp


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that determines a phantom; the same spec gives the same phantom."""

    seed: int = 0
    # a rescan of subject ``seed``: the same anatomy (head size, regional GM, warp) in a new
    # pose, with a new bias field and noise; None: the first scan
    scan_seed: int | None = None
    voxel_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (slice, row, col)
    shape: tuple[int, int, int] | None = None  # (slices, rows, cols); default fov_mm / voxel
    fov_mm: tuple[float, float, float] = (176.0, 240.0, 256.0)  # (slice, row, col) extent
    orientation: str = "sagittal"  # axial | sagittal | coronal
    fov_shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # grid centre, RAS mm
    gm_factors: dict[str, float] = field(default_factory=dict)  # region -> GM factor
    region_sd: float = 0.03  # random per-region GM variation (SD of the log factor)
    head_scale: float | None = None  # linear head size vs. an average head; None: seeded
    head_scale_range: float = 0.08  # seeded head size: uniform in 1 +- range
    aniso: float = 0.02  # seeded extra per-axis scaling, uniform in 1 +- aniso
    rotation_deg: float = 10.0  # max rotation about each axis
    translation_mm: float = 10.0  # max translation along each axis
    warp_mm: float = 3.0  # max displacement of the smooth random warp
    bias: float = 0.2  # bias field amplitude (multiplicative, 1 +- bias)
    snr: float = 30.0  # white-matter signal / noise sigma (Rician); 0 or inf: no noise
    intensity_sd: float = 0.03  # seeded per-tissue intensity variation
    slice_profile: bool = True  # integrate thick slices over their thickness

    def grid_shape(self) -> tuple[int, int, int]:
        if self.shape is not None:
            return self.shape
        n = [max(1, int(round(f / v))) for f, v in zip(self.fov_mm, self.voxel_mm, strict=True)]
        return (n[0], n[1], n[2])

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["grid_shape"] = list(self.grid_shape())
        return out

    def make(self, atlas: Atlas | None = None) -> Phantom:
        """The phantom of this spec (:func:`make_phantom`); a subclass brings its generator."""
        return _make_template_phantom(self, atlas)

    def default_series(self) -> SeriesSpec:
        """The DICOM series header :meth:`Phantom.write_dicom` uses by default."""
        return SeriesSpec()


def slab_spec(
    seed: int = 0, slice_mm: float = 5.0, n_slices: int | None = None, **kw: Any
) -> PhantomSpec:
    """A thick-slice variant (QC tests): ``slice_mm`` slices, 1 mm in plane by default.

    ``n_slices`` None keeps the head's coverage; a small number gives a thin slab.
    """
    base = PhantomSpec(seed=seed, **kw)
    in_plane = base.voxel_mm[1:]
    n = n_slices if n_slices is not None else max(1, int(round(base.fov_mm[0] / slice_mm)))
    rows, cols = (int(round(f / v)) for f, v in zip(base.fov_mm[1:], in_plane, strict=True))
    return replace(base, voxel_mm=(slice_mm, *in_plane), shape=(n, rows, cols))


# --------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------


def grid_affine(spec: PhantomSpec) -> F64:
    """The RAS affine of the scanner grid ``[slice, row, col]`` (as write_series lays it out)."""
    row_dir, col_dir = (np.array(v, dtype=float) for v in ORIENTATIONS[spec.orientation])
    normal = np.cross(row_dir, col_dir)
    slice_mm, row_mm, col_mm = spec.voxel_mm
    n_slices, n_rows, n_cols = spec.grid_shape()
    lps = np.eye(4)
    lps[:3, 0] = normal * slice_mm
    lps[:3, 1] = col_dir * row_mm
    lps[:3, 2] = row_dir * col_mm
    centre_idx = np.array([(n_slices - 1) / 2, (n_rows - 1) / 2, (n_cols - 1) / 2])
    shift_lps = np.array(spec.fov_shift_mm, dtype=float) * np.array([-1.0, -1.0, 1.0])
    lps[:3, 3] = shift_lps - lps[:3, :3] @ centre_idx
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return ras


def _world(affine: F64, idx: F64) -> F64:
    """World coordinates (3, N) of voxel indices (3, N)."""
    return affine[:3, :3] @ idx + affine[:3, 3:4]


def _grid_indices(shape: tuple[int, int, int], k0: int, k1: int) -> F64:
    k, r, c = np.meshgrid(
        np.arange(k0, k1, dtype=np.float64),
        np.arange(shape[1], dtype=np.float64),
        np.arange(shape[2], dtype=np.float64),
        indexing="ij",
    )
    return np.stack([k.ravel(), r.ravel(), c.ravel()])


# --------------------------------------------------------------------------------------
# Template-space model
# --------------------------------------------------------------------------------------


def _load_u8(path: Path) -> tuple[F32, F64]:
    img = nib.load(str(path))
    assert isinstance(img, nib.Nifti1Image)
    data = np.asanyarray(img.dataobj).astype(np.float32) / np.float32(255.0)
    return data, np.asarray(img.affine, dtype=np.float64)


@dataclass(frozen=True)
class _Model:
    """Template-space maps on a cropped, padded 1 mm MNI grid."""

    affine: F64  # RAS affine of the cropped grid
    gm: F32
    wm: F32
    csf: F32
    skull: F32
    scalp: F32
    territory: NDArray[np.int16]
    names: tuple[str, ...]
    centre: F64  # intracranial centroid (MNI mm)


_MODELS: dict[tuple[Any, ...], _Model] = {}
MODEL_VERSION = 1


def _cache_dir() -> Path | None:
    root = os.environ.get("KETANODE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ketanode"
    )
    return Path(root) / "phantom" if root else None


def _save_npz(path: Path, **arrays: NDArray[Any]) -> None:
    """A cache file written whole (tmp + rename); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{os.getpid()}-{path.name}")
        np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except OSError:
        pass


def _template_model(atlas: Atlas) -> _Model:
    """The template-space model, cached in memory and (best effort) on disk."""
    key = (str(atlas.image_path), atlas.regions)
    if key in _MODELS:
        return _MODELS[key]
    files = (TEMPLATE_GM, TEMPLATE_WM, TEMPLATE_T1, atlas.image_path)
    digest = hashlib.sha256(
        repr(
            (MODEL_VERSION, key, [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
        ).encode()
    ).hexdigest()[:16]
    cache = _cache_dir()
    path = cache / f"model-{digest}.npz" if cache else None
    arrays: dict[str, NDArray[Any]] | None = None
    if path is not None and path.is_file():
        try:
            with np.load(path) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, KeyError):
            arrays = None
    if arrays is None:
        arrays = _build_model_arrays(atlas)
        if path is not None:
            _save_npz(path, **arrays)
    model = _model_from_arrays(arrays, tuple(r.name for r in atlas.regions))
    _MODELS[key] = model
    return model


def _model_from_arrays(a: dict[str, NDArray[Any]], names: tuple[str, ...]) -> _Model:
    scale = np.float32(1.0 / 255.0)
    gm = a["gm"].astype(np.float32) * scale
    wm = a["wm"].astype(np.float32) * scale
    icv = a["icv"].astype(bool)
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.where(icv, np.float32(1.0) - gm - wm, np.float32(0.0)).astype(np.float32)
    np.clip(csf, 0, 1, out=csf)
    skull = a["skull"].astype(np.float32) * scale
    scalp = a["scalp"].astype(np.float32) * scale
    affine = a["affine"].astype(np.float64)
    centre = affine[:3, :3] @ np.argwhere(icv).mean(axis=0) + affine[:3, 3]
    return _Model(affine, gm, wm, csf, skull, scalp, a["territory"].astype(np.int16), names, centre)


def _build_model_arrays(atlas: Atlas) -> dict[str, NDArray[Any]]:
    gm, affine = _load_u8(TEMPLATE_GM)
    wm, _ = _load_u8(TEMPLATE_WM)
    t1, _ = _load_u8(TEMPLATE_T1)
    brain = ((gm + wm) > 0.1) | (t1 > 0)
    brain = ndi.binary_closing(brain, ndi.generate_binary_structure(3, 1), iterations=2)
    icv = ndi.binary_fill_holes(brain)
    del t1, brain
    # crop to the intracranial box plus padding for the skull and scalp
    nz = np.argwhere(icv)
    lo, hi = nz.min(axis=0), nz.max(axis=0) + 1
    pad_lo = lo - _PAD
    shape = tuple(int(h - lo_ + 2 * _PAD) for lo_, h in zip(lo, hi, strict=True))

    def crop(a: NDArray[Any]) -> NDArray[Any]:
        out = np.zeros(shape, dtype=a.dtype)
        src = tuple(
            slice(max(p, 0), min(p + s, n)) for p, s, n in zip(pad_lo, shape, a.shape, strict=True)
        )
        dst = tuple(slice(sl.start - p, sl.stop - p) for sl, p in zip(src, pad_lo, strict=True))
        out[dst] = a[src]
        return out

    gm, wm, icv = crop(gm), crop(wm), crop(icv)
    affine = affine.copy()
    affine[:3, 3] = affine[:3, :3] @ pad_lo + affine[:3, 3]
    gm[~icv] = 0
    wm[~icv] = 0
    # skull and scalp: shells outside the intracranial mask, with a smooth thickness variation
    dist = ndi.distance_transform_edt(~icv).astype(np.float32)
    ijk = np.indices(shape, dtype=np.float32)
    wobble = (
        np.sin(ijk[0] * 0.05 + 0.3) * np.cos(ijk[1] * 0.04 + 1.1) + np.sin(ijk[2] * 0.06 + 2.0)
    ).astype(np.float32)
    del ijk
    skull_out = SKULL_MM + 1.0 * wobble
    scalp_out = skull_out + SCALP_MM + 1.0 * wobble
    # soft (partial-volume) edges, 1 voxel wide
    skull = np.clip(np.minimum(dist, skull_out - dist + 0.5), 0, 1)
    scalp = np.clip(np.minimum(dist - skull_out + 0.5, scalp_out - dist + 0.5), 0, 1)
    skull[icv] = 0
    territory, _ = region_territories(atlas, nib.Nifti1Image(gm, affine), mask=icv)

    def u8(x: NDArray[Any]) -> NDArray[np.uint8]:
        return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)

    return {
        "gm": u8(gm),
        "wm": u8(wm),
        "icv": icv.astype(np.uint8),
        "skull": u8(skull),
        "scalp": u8(scalp),
        "territory": territory,
        "affine": affine,
    }


# --------------------------------------------------------------------------------------
# Subject: transform, warp, bias
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Waves:
    """A smooth field: sum of amplitude * sin(freq . (x - centre) + phase)."""

    amp: F64  # (K, C)
    freq: F64  # (K, 3) rad/mm
    phase: F64  # (K,)
    centre: F64  # (3,)

    def value(self, x: F64) -> F64:
        arg = self.freq @ (x - self.centre[:, None]) + self.phase[:, None]  # (K, N)
        return np.asarray(self.amp.T @ np.sin(arg), dtype=np.float64)  # (C, N)

    def jacobian(self, x: F64) -> F64:
        """d value / d x, (N, C, 3)."""
        cos = np.cos(self.freq @ (x - self.centre[:, None]) + self.phase[:, None])  # (K, N)
        return np.asarray(np.einsum("kc,kd,kn->ncd", self.amp, self.freq, cos), dtype=np.float64)

    def as_dict(self) -> dict[str, Any]:
        return {k: np.round(v, 6).tolist() for k, v in asdict(self).items()}


def _waves(
    rng: np.random.Generator,
    n: int,
    channels: int,
    wavelengths: tuple[float, float],
    total: float,
    centre: F64,
) -> _Waves:
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    wavelength = rng.uniform(*wavelengths, size=n)
    freq = direction * (2 * np.pi / wavelength)[:, None]
    amp = rng.normal(size=(n, channels))
    amp *= total / max(float(np.abs(amp).sum(axis=0).max()), 1e-12)  # |value| <= total
    return _Waves(amp, freq, rng.uniform(0, 2 * np.pi, size=n), centre)


def _rotation(deg: F64) -> F64:
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return np.asarray(rz @ ry @ rx, dtype=np.float64)


class _Posed(Protocol):
    """A phantom's placement: a subject here, an individual of the realistic phantom."""

    @property
    def linear(self) -> F64: ...  # 3x3: template offset (mm from centre) -> native
    @property
    def translation(self) -> F64: ...  # native position of the template centre
    @property
    def centre(self) -> F64: ...
    @property
    def rotation_deg(self) -> F64: ...
    @property
    def scales(self) -> F64: ...


def _matrix(p: _Posed) -> F64:
    """4x4 affine template MNI mm -> native RAS mm (without the warp)."""
    m = np.eye(4)
    m[:3, :3] = p.linear
    m[:3, 3] = p.translation - p.linear @ p.centre
    return m


def _pose(p: _Posed) -> dict[str, Any]:
    """The placement as the truth records it."""
    return {
        "rotation_deg": np.round(p.rotation_deg, 6).tolist(),
        "translation_mm": np.round(p.translation, 6).tolist(),
        "scales": np.round(p.scales, 6).tolist(),
        "template_to_native": np.round(_matrix(p), 6).tolist(),
        "jacobian": float(np.linalg.det(p.linear)),
    }


def _volume_ratio(linear: F64, warp_jacobian: F64) -> F64:
    """Native volume per template volume: the linear part's over the warp's determinant."""
    det = np.linalg.det(np.eye(3)[None] + warp_jacobian)
    return np.asarray(float(abs(np.linalg.det(linear))) / det, dtype=np.float64)


@dataclass(frozen=True)
class _Subject:
    linear: F64  # 3x3: template offset (mm from centre) -> native
    translation: F64  # native position of the template centre
    centre: F64
    warp: _Waves
    bias: _Waves
    factors: dict[str, float]
    intensity: dict[str, float]
    rotation_deg: F64
    scales: F64

    def to_template(self, x: F64) -> F64:
        """Pull-back: native RAS mm (3, N) -> template MNI mm (3, N)."""
        y0 = self.centre[:, None] + np.linalg.inv(self.linear) @ (x - self.translation[:, None])
        return y0 + self.warp.value(y0)

    def native_per_template_volume(self, y: F64) -> F64:
        """Native volume per template volume at template points y (3, N)."""
        y0 = y - self.warp.value(y - self.warp.value(y))  # invert the warp (fixed point)
        return _volume_ratio(self.linear, self.warp.jacobian(y0))

    def matrix(self) -> F64:
        return _matrix(self)


def _linear(spec: PhantomSpec, head: float, aniso: F64, rot: F64) -> tuple[F64, F64]:
    """(template offset -> native 3x3, the scales): the drawn head size unless the spec
    fixes it, times the anisotropy, rotated."""
    scales = REFERENCE_SCALE * (spec.head_scale if spec.head_scale is not None else head) * aniso
    return _rotation(rot) @ np.diag(scales), scales


def _gm_factors(spec: PhantomSpec, names: tuple[str, ...], z: F64) -> dict[str, float]:
    """Per region: the spec's GM factor times a log-normal spread (``z`` drawn per region)."""
    unknown = set(spec.gm_factors) - set(names)
    if unknown:
        raise ValueError(f"unknown atlas regions in gm_factors: {sorted(unknown)}")
    return {
        name: float(spec.gm_factors.get(name, 1.0) * math.exp(spec.region_sd * zi))
        for name, zi in zip(names, z, strict=True)
    }


def _subject(spec: PhantomSpec, model: _Model) -> _Subject:
    rng = np.random.default_rng(spec.seed)
    # draw everything in a fixed order so that changing one option leaves the rest alone
    head = 1.0 + rng.uniform(-spec.head_scale_range, spec.head_scale_range)
    aniso = 1.0 + rng.uniform(-spec.aniso, spec.aniso, size=3)
    rot = rng.uniform(-spec.rotation_deg, spec.rotation_deg, size=3)
    trans = rng.uniform(-spec.translation_mm, spec.translation_mm, size=3)
    region_noise = rng.normal(0.0, 1.0, size=len(model.names))
    tissue_noise = rng.normal(0.0, 1.0, size=len(INTENSITY))
    warp = _waves(rng, 6, 3, (90.0, 220.0), spec.warp_mm, model.centre)
    bias = _waves(rng, 4, 1, (250.0, 500.0), math.log1p(spec.bias), np.zeros(3))
    if spec.scan_seed is not None:
        scan = np.random.default_rng([spec.seed, spec.scan_seed, 3])
        rot = scan.uniform(-spec.rotation_deg, spec.rotation_deg, size=3)
        trans = scan.uniform(-spec.translation_mm, spec.translation_mm, size=3)
        bias = _waves(scan, 4, 1, (250.0, 500.0), math.log1p(spec.bias), np.zeros(3))
    linear, scales = _linear(spec, head, aniso, rot)
    factors = _gm_factors(spec, model.names, region_noise)
    intensity = {
        k: float(v * (1.0 + spec.intensity_sd * z))
        for (k, v), z in zip(INTENSITY.items(), tissue_noise, strict=True)
    }
    return _Subject(linear, trans, model.centre, warp, bias, factors, intensity, rot, scales)


def _scaled_tissues(model: _Model, factors: dict[str, float]) -> tuple[F32, F32, F32]:
    """GM scaled per territory by growing (or shrinking) it at the grey/white interface.

    Territory k's GM changes by (factor - 1) x its GM; the change is spread over the
    territory's voxels in proportion to GM x WM (the voxels where grey meets white) and
    exchanged with WM there, as a cortex that thickens from the inside would; CSF and TIV
    are unchanged. Where the interface cannot hold the change (a factor far from 1), the
    rest is exchanged with WM and CSF in proportion to their shares of each voxel.

    Why not scale every voxel's GM fraction: the tissue maps are the template's population
    probability maps, where much GM shares its voxel with both WM and CSF; a change spread
    thinly over such voxels barely moves their T1 intensity the way a GM change does, and
    a +8 % frontal change was measured as +4 % (docs/architecture.md, "Sensitivity").
    """
    n = len(model.names) + 1
    lut = np.ones(n, dtype=np.float64)
    for k, name in enumerate(model.names, start=1):
        lut[k] = factors[name]
    terr = model.territory.astype(np.intp)
    gm, wm, csf = model.gm, model.wm, model.csf
    icv = gm + wm + csf
    interface = gm.astype(np.float64) * wm
    sum_gm = np.bincount(terr.ravel(), weights=gm.ravel().astype(np.float64), minlength=n)
    sum_if = np.bincount(terr.ravel(), weights=interface.ravel(), minlength=n)
    alpha = np.divide((lut - 1.0) * sum_gm, sum_if, out=np.zeros(n), where=sum_if > 0)
    alpha[0] = 0.0
    # at most all of the voxel's WM (growth) or all of its GM (shrinkage)
    delta = np.clip(alpha[terr] * interface, -gm, wm).astype(np.float32)
    new_gm = gm + delta
    new_wm = wm - delta
    # the part the interface could not hold: proportional to WM and CSF shares
    placed = np.bincount(terr.ravel(), weights=delta.ravel().astype(np.float64), minlength=n)
    rest = np.divide((lut - 1.0) * sum_gm - placed, sum_gm, out=np.zeros(n), where=sum_gm > 0)
    rest[0] = 0.0
    extra = (rest[terr] * gm).astype(np.float32)
    others = new_wm + csf
    share_wm = np.divide(new_wm, others, out=np.ones_like(new_wm), where=others > 1e-6)
    extra = np.clip(extra, -new_gm, others)
    new_gm = new_gm + extra
    new_wm = np.clip(new_wm - extra * share_wm, 0.0, None).astype(np.float32)
    new_csf = np.clip(icv - new_gm - new_wm, 0.0, None).astype(np.float32)
    new_gm = (icv - new_wm - new_csf).astype(np.float32)  # exact bookkeeping
    return new_gm, new_wm, new_csf


# --------------------------------------------------------------------------------------
# Phantom
# --------------------------------------------------------------------------------------


@dataclass
class Phantom:
    spec: PhantomSpec
    data: F32  # scanner order [slice, row, col], integer valued
    affine: F64  # RAS affine of ``data``
    truth: dict[str, Any]

    @property
    def image(self) -> nib.Nifti1Image:
        """The volume as NIfTI (float32, closest-canonical RAS)."""
        img = nib.Nifti1Image(self.data, self.affine)
        img.header.set_xyzt_units("mm")
        canon = nib.as_closest_canonical(img)
        assert isinstance(canon, nib.Nifti1Image)
        return canon

    def write_nifti(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(self.image, str(path))
        return path

    def write_truth(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.truth, indent=2, sort_keys=True))
        return path

    def write_dicom(self, out_dir: Path, series_spec: SeriesSpec | None = None) -> list[Path]:
        """Write the volume as an MR series whose geometry matches :attr:`image`."""
        series = replace(series_spec) if series_spec is not None else self.spec.default_series()
        series.orientation = self.spec.orientation
        lps_origin = self.affine[:3, 3] * np.array([-1.0, -1.0, 1.0])
        series.origin_mm = (float(lps_origin[0]), float(lps_origin[1]), float(lps_origin[2]))
        return write_series(self.data, self.spec.voxel_mm, out_dir, series)


def _sub_slices(spec: PhantomSpec) -> F64:
    """Where a voxel's sub-slices sit across its slice thickness (in voxels, centred): thick
    slices are the average of thin ones when ``slice_profile``."""
    in_plane = min(spec.voxel_mm[1:])
    n_sub = max(1, int(math.ceil(spec.voxel_mm[0] / in_plane))) if spec.slice_profile else 1
    return np.asarray((np.arange(n_sub) + 0.5) / n_sub - 0.5, dtype=np.float64)


def _scan(
    spec: PhantomSpec,
    offsets: F64,
    chunk_voxels: int,
    to_template: Callable[[F64], F64],
    image: F32,
    image_to_vox: F64,
    bias: Callable[[F64], F64],
    *,
    noise_salt: int,
    on_sample: Callable[[F64, F64, F64], None] | None = None,
) -> tuple[F32, float]:
    """``image`` (template space) as the scanner sees it on the grid of ``spec``, and the
    noise sigma: each voxel the mean of its sub-slices (``offsets``), each sampled at the
    template position of its native position, times the bias field, scaled to
    ``WM_SIGNAL``, with Rician noise at the spec's SNR (drawn from its seed and
    ``noise_salt``). ``on_sample(native, template, image voxel)`` sees every sample."""
    affine = grid_affine(spec)
    shape = spec.grid_shape()
    data = np.zeros(shape, dtype=np.float32)
    chunk = max(1, chunk_voxels // (shape[1] * shape[2]))
    for k0 in range(0, shape[0], chunk):
        k1 = min(shape[0], k0 + chunk)
        idx = _grid_indices(shape, k0, k1)
        acc = np.zeros(idx.shape[1], dtype=np.float32)
        for off in offsets:
            sub = idx.copy()
            sub[0] += off
            pts = _world(affine, sub)
            y = to_template(pts)
            vox = _world(image_to_vox, y)
            acc += _sample(image, vox, 1)
            if on_sample is not None:
                on_sample(pts, y, vox)
        field_ = np.exp(bias(_world(affine, idx))[0]).astype(np.float32)
        data[k0:k1] = (acc / len(offsets) * field_).reshape(k1 - k0, shape[1], shape[2])
    data *= np.float32(WM_SIGNAL)
    sigma = WM_SIGNAL / spec.snr if spec.snr and math.isfinite(spec.snr) else 0.0
    if sigma > 0:
        salt = noise_salt
        key = [spec.seed, salt] if spec.scan_seed is None else [spec.seed, salt, spec.scan_seed]
        data = _rician(data, sigma, key)
    return data, sigma


def _rician(data: F32, sigma: float, key: list[int]) -> F32:
    """``data`` as the magnitude of a complex signal with Gaussian noise ``sigma`` in each
    channel (drawn from ``key``)."""
    rng = np.random.default_rng(key)
    real = data + rng.normal(0.0, sigma, size=data.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, size=data.shape).astype(np.float32)
    return np.asarray(np.sqrt(real * real + imag * imag), dtype=np.float32)


def _sample(volume: NDArray[Any], vox: F64, order: int) -> NDArray[Any]:
    out = ndi.map_coordinates(volume, vox, order=order, mode="constant", cval=0, prefilter=False)
    return np.asarray(out)


def _truth_sums(
    gm: F64, wm: F64, csf: F64, territory: NDArray[np.int16], voxel_ml: F64 | float, n: int
) -> F64:
    """Per region (0..n) sums of GM, WM, CSF (n+1, 3), weighted by voxel volume (mL)."""
    weights = np.asarray(voxel_ml)
    out = np.zeros((n + 1, 3))
    for j, frac in enumerate((gm, wm, csf)):
        out[:, j] = np.bincount(territory, weights=frac * weights, minlength=n + 1)[: n + 1]
    return out


def _truth_dict(sums: F64, names: tuple[str, ...]) -> dict[str, Any]:
    totals = sums.sum(axis=0)
    return {
        "gm_ml": float(totals[0]),
        "wm_ml": float(totals[1]),
        "csf_ml": float(totals[2]),
        "tiv_ml": float(totals.sum()),
        "regions": {
            name: {"gm_ml": float(s[0]), "wm_ml": float(s[1]), "csf_ml": float(s[2])}
            for name, s in zip(names, sums[1:], strict=True)
        },
    }


def make_phantom(spec: PhantomSpec, atlas: Atlas | None = None) -> Phantom:
    """A realistic T1 head with known regional volumes (see the module docstring).

    A :class:`ketanode.synthetic.realistic_phantom.RealisticSpec` gives the non-circular
    whole-head phantom of that module instead (its :meth:`PhantomSpec.make`)."""
    return spec.make(atlas)


def _make_template_phantom(spec: PhantomSpec, atlas: Atlas | None) -> Phantom:
    """The template-based head of :func:`make_phantom`."""
    if spec.orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {spec.orientation!r}")
    model = _template_model(atlas or load_atlas())
    subject = _subject(spec, model)
    gm, wm, csf = _scaled_tissues(model, subject.factors)
    it = subject.intensity
    t1 = (
        it["gm"] * gm
        + it["wm"] * wm
        + it["csf"] * csf
        + it["skull"] * model.skull
        + it["scalp"] * model.scalp
    ).astype(np.float32)
    to_vox = np.asarray(np.linalg.inv(model.affine), dtype=np.float64)
    affine = grid_affine(spec)
    n_regions = len(model.names)
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    offsets = _sub_slices(spec)
    isotropic = max(spec.voxel_mm) - min(spec.voxel_mm) < 1e-6
    truth_here = isotropic and not any(spec.fov_shift_mm) and len(offsets) == 1
    sums = np.zeros((n_regions + 1, 3))

    def add_truth(_pts: F64, _y: F64, vox: F64) -> None:
        terr = _sample(model.territory, vox, 0)
        g, w, c = (_sample(m, vox, 1).astype(np.float64) for m in (gm, wm, csf))
        sums[...] += _truth_sums(g, w, c, terr, voxel_ml, n_regions)

    data, sigma = _scan(
        spec,
        offsets,
        1_500_000,
        subject.to_template,
        t1,
        to_vox,
        subject.bias.value,
        noise_salt=1,
        on_sample=add_truth if truth_here else None,
    )
    data = np.clip(np.rint(data), 0, 65535).astype(np.float32)

    # truth in native space
    if truth_here:
        truth_grid = "output"
        # the whole intracranial volume must be inside the output grid
        native = _truth_dict(sums, model.names)
    else:
        truth_grid = "native"
        native = _native_truth(spec, subject, model, gm, wm, csf)
    # cross-check: template-space sums weighted by the Jacobian
    template = _template_truth(subject, model, gm, wm, csf)
    if truth_grid == "output" and abs(native["tiv_ml"] / template["tiv_ml"] - 1) > 0.01:
        native = _native_truth(spec, subject, model, gm, wm, csf)  # brain cut by the FOV
        truth_grid = "native"
    truth: dict[str, Any] = {
        "version": 1,
        "kind": "phantom",
        "seed": spec.seed,
        "spec": spec.as_dict(),
        "atlas": (atlas or load_atlas()).name,
        "truth_grid": truth_grid,
        **native,
        "gm_factors": dict(spec.gm_factors),
        "region_factors": subject.factors,
        "intensity": subject.intensity,
        "pose": _pose(subject),
        "warp": subject.warp.as_dict(),
        "bias": subject.bias.as_dict(),
        "noise_sigma": sigma,
        "wm_signal": WM_SIGNAL,
        "affine": np.round(affine, 6).tolist(),
        "template_check": template,
    }
    return Phantom(spec, data, affine, truth)


def _native_truth(
    spec: PhantomSpec, subject: _Subject, model: _Model, gm: F32, wm: F32, csf: F32
) -> dict[str, Any]:
    """Truth on an axis-aligned native grid covering the whole head."""
    step = min(min(spec.voxel_mm), 2.0)
    nz = np.argwhere(model.gm + model.wm + model.csf > 0)
    lo, hi = nz.min(axis=0) - 2, nz.max(axis=0) + 2
    corners = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1)
    y = _world(model.affine, corners.astype(np.float64))
    m = subject.matrix()
    x = _world(m, y)
    margin = spec.warp_mm * float(np.max(subject.scales)) + 2 * step
    x_lo, x_hi = x.min(axis=1) - margin, x.max(axis=1) + margin
    shape = tuple(int(math.ceil((h - lo_) / step)) + 1 for lo_, h in zip(x_lo, x_hi, strict=True))
    affine = np.diag([step, step, step, 1.0])
    affine[:3, 3] = x_lo
    to_vox = np.asarray(np.linalg.inv(model.affine), dtype=np.float64)
    n = len(model.names)
    sums = np.zeros((n + 1, 3))
    shape3 = (shape[0], shape[1], shape[2])
    chunk = max(1, 1_500_000 // (shape3[1] * shape3[2]))
    for k0 in range(0, shape3[0], chunk):
        k1 = min(shape3[0], k0 + chunk)
        vox = _world(to_vox, subject.to_template(_world(affine, _grid_indices(shape3, k0, k1))))
        terr = _sample(model.territory, vox, 0)
        g, w, c = (_sample(t, vox, 1).astype(np.float64) for t in (gm, wm, csf))
        sums += _truth_sums(g, w, c, terr, step**3 / 1000.0, n)
    return _truth_dict(sums, model.names)


def _template_truth(subject: _Subject, model: _Model, gm: F32, wm: F32, csf: F32) -> dict[str, Any]:
    """Template-space sums weighted by the native/template volume ratio (cross-check)."""
    inside = np.nonzero((gm + wm + csf) > 0)
    # the Jacobian is smooth: evaluate it on a 4-voxel lattice and interpolate linearly
    step = 4
    coarse_shape = tuple(int(math.ceil(n / step)) + 1 for n in gm.shape)
    lattice = np.indices(coarse_shape, dtype=np.float64).reshape(3, -1) * step
    coarse = subject.native_per_template_volume(_world(model.affine, lattice))
    coarse = coarse.reshape(coarse_shape)
    points = np.stack(inside).astype(np.float64) / step
    jac = _sample(coarse, points, 1)
    return _jacobian_truth(model, gm, wm, csf, inside, jac)


def _jacobian_truth(
    model: _Model, gm: F32, wm: F32, csf: F32, inside: tuple[NDArray[np.intp], ...], jac: F64
) -> dict[str, Any]:
    """The template-space truth: tissue at the voxels ``inside``, each weighted by its
    native/template volume ratio ``jac``."""
    voxel_ml = jac * abs(float(np.linalg.det(model.affine[:3, :3]))) / 1000.0
    sums = _truth_sums(
        gm[inside].astype(np.float64),
        wm[inside].astype(np.float64),
        csf[inside].astype(np.float64),
        model.territory[inside],
        voxel_ml,
        len(model.names),
    )
    return _truth_dict(sums, model.names)


def noise_volume(spec: PhantomSpec | None = None) -> Phantom:
    """Pure Rician (Rayleigh) noise on the scanner grid of ``spec``: a non-brain input."""
    spec = spec or PhantomSpec()
    shape = spec.grid_shape()
    rng = np.random.default_rng([spec.seed, 2])
    sigma = WM_SIGNAL / (spec.snr if spec.snr and math.isfinite(spec.snr) else 30.0)
    real = rng.normal(0.0, sigma, size=shape)
    imag = rng.normal(0.0, sigma, size=shape)
    data = np.rint(np.hypot(real, imag)).astype(np.float32)
    affine = grid_affine(spec)
    truth = {
        "version": 1,
        "kind": "noise",
        "seed": spec.seed,
        "spec": spec.as_dict(),
        "noise_sigma": sigma,
        "affine": np.round(affine, 6).tolist(),
    }
    return Phantom(spec, data, affine, truth)
