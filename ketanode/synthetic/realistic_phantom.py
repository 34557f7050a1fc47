"""Non-circular phantoms: a whole head whose brain is not the template's.

The phantoms of :mod:`ketanode.synthetic.phantom` are the ICBM152 maps that the node registers
to and takes its tissue priors from, moved by a pose and a small warp: measuring them tests
little. ``make_realistic_phantom(RealisticSpec(...))`` (or ``make_phantom`` with a
:class:`RealisticSpec`) builds a head whose anatomy the node has not seen:

1. **Brain** (template space, 1 mm): the ICBM152 GM/WM/CSF fractions are made an
   individual's: sharpened (an individual's tissue boundaries are crisper than a population
   average), given a seeded sulcal pattern (GM opened into CSF clefts, or CSF filled with GM,
   where band-pass noise of ~4 mm wavelength is high or low), seeded sulcal widening or
   narrowing (a smooth field that exchanges GM and CSF at their interface), and a per-region
   GM change (``region_sd`` = 8 % SD by default, plus ``gm_factors``; grown or shrunk at the
   grey/white interface as in :func:`~ketanode.synthetic.phantom._scaled_tissues`).
2. **Shape**: a seeded head size (1 +- 8 %) and anisotropic scaling (1 +- 6 % per axis), a
   pose, and a large, smooth, *purely non-affine* warp: a sum of 8 random plane waves
   (wavelengths 70-160 mm; mostly transverse, i.e. shear that moves boundaries, with 35 % of
   the amplitude along the wave: local volume change) minus its least-squares affine fit over
   the brain, scaled to ``warp_rms_mm`` (5 mm) RMS displacement over the brain (maxima
   11-16 mm at the brain's edge, template mm), plus a radial bump that enlarges or shrinks
   the ventricles (-8..+20 % linear at their centre). The warp's Jacobian determinant is
   checked >= 0.35 over the whole head (0.7-1.35 for the shipped seeds) and the largest
   singular value of its gradient <= 0.75: the pull-back is then a contraction perturbation
   of the identity, hence a diffeomorphism, inverted by Newton's method. Since the warp has
   no affine part over the brain, even the best affine registration leaves the subject's
   cortex, ventricles and region boundaries ~5 mm (RMS) away from the template's.
3. **Head** (built once, cached on disk like the template model): skin, subcutaneous fat,
   galea/temporalis muscle, skull with inner and outer tables and diploic marrow, dura,
   venous sinuses, frontal and maxillary sinuses, orbits with fat, eyeballs, lenses and optic
   nerves, nose, nasal cavity, teeth, hard palate, mandible, tongue, parotid glands, a neck
   (vertebrae with marrow and discs, spinal canal and cord, airway, carotids and jugulars,
   muscle with fat planes) and the top of the shoulders with the clavicles.
4. **Scanner**: a realistic field of view (default sagittal 176 x 256 x 256 at 1 mm) placed
   on the head, not on the brain: the top of the head 6-20 mm below the top edge, the neck
   filling the lower part; a contrast profile (:data:`PROFILES`, ``mprage`` or ``spgr``), a
   multiplicative bias field, Rician noise, integer values.

**Truth** (``phantom.truth``): GM, WM and CSF (mL) per atlas region, their totals and TIV
(GM + WM + CSF inside the intracranial mask: the ICBM152 intracranial volume, brain stem down
to the template's lower edge, no spinal cord) of *this* phantom: its own individualised tissue
fractions and the atlas territory map (:func:`~ketanode.imaging.atlas.region_territories`:
nearest atlas region within cerebrum / cerebellum, the definition the node measures with),
both carried through the phantom's own transform (pose, scaling and nonlinear warp) and
summed in native space (linear interpolation for the fractions, nearest neighbour for the
territories): on the image's own grid when it holds the whole brain in isotropic voxels of
at most ``truth_step_mm`` (1 mm; ``truth_grid`` = "output"), else on an axis-aligned native
grid of ``truth_step_mm`` or the voxel size if smaller ("native"). ``truth["template_check"]``
holds the same sums computed in template space weighted by the transform's Jacobian (totals
agree within 0.1 %, regions within ~1 %).

**Why it is independent of the node's priors**: the node pulls its tissue priors and its
territory map into the subject through its *own* registration of the image to the template.
The phantom's tissue maps differ from those priors (sharpened, a sulcal pattern, sulcal
widening, regional GM changes of ~8 % SD) and its geometry differs from the template's by a
5 mm RMS non-affine warp and a ventricular change that no affine registration can undo, so
the node's priors and region boundaries land on anatomy that is not theirs, exactly as in a
real subject; the head around the brain (fat, neck, face) is not in the template at all.
The truth never uses the node's registration or segmentation, so the node's errors are real.
What is *not* independent: the territory definition is the atlas the node measures with
(carried by the true warp, which is what "the frontal lobe of this subject" means here), and
the tissue maps start from the template's (their folding is the template's, individualised
only at the scale of a few mm).

Contrast profiles (signal relative to white matter, 3 T; :data:`PROFILES`; chosen by hand to
match commonly reported appearances, not simulated from the signal equations): MPRAGE
(TR/TI/flip ~2300 ms/900 ms/9 deg): GM/WM 0.62, CSF/WM 0.16, subcutaneous fat ~ WM (1.05),
muscle 0.45, diploic marrow 0.95, cortical bone and air ~0, flowing blood dark-grey (0.30).
Spoiled gradient echo / IR-FSPGR (GE BRAVO-like, TI ~450 ms, flip ~12 deg): less GM/WM
contrast (GM/WM 0.76, CSF/WM 0.27), fat and marrow well above WM (1.45, 1.30: fat's short T1
recovers fully at a short TR), inflowing blood bright in the sinuses and neck vessels (1.15),
dura 0.70. The T1 values behind these orders at 3 T: WM ~1080 ms, GM ~1820 ms, muscle
~1410 ms, blood ~1930 ms (Stanisz et al., MRM 2005), fat ~300-400 ms, CSF ~4000 ms.

API: :class:`RealisticSpec`; :func:`make_realistic_phantom` (also reached through
``make_phantom``); :func:`realistic_specs` / :func:`realistic_phantoms` (the three accuracy
phantoms: MPRAGE sagittal, IR-FSPGR axial, IR-FSPGR sagittal); :func:`tissue_map` (the tissue
of every voxel); :func:`truth_maps` (true fractions and territories on any grid). The result
is a :class:`~ketanode.synthetic.phantom.Phantom`: ``write_nifti``, ``write_dicom`` (a Siemens
MPRAGE or a GE BRAVO header by default), ``write_truth``. Seeded: the same spec gives the same
phantom; the head model is built once (~15 s) and cached on disk with the template model.

Coordinates: world = scanner RAS mm (NIfTI); template = MNI mm.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from ketanode.imaging.atlas import TEMPLATE_GM, TEMPLATE_T1, TEMPLATE_WM, Atlas, load_atlas
from ketanode.synthetic.phantom import (
    F32,
    F64,
    WM_SIGNAL,
    Phantom,
    PhantomSpec,
    _cache_dir,
    _gm_factors,
    _grid_indices,
    _jacobian_truth,
    _linear,
    _matrix,
    _Model,
    _pose,
    _sample,
    _save_npz,
    _scaled_tissues,
    _scan,
    _sub_slices,
    _template_model,
    _truth_dict,
    _truth_sums,
    _volume_ratio,
    _Waves,
    _waves,
    _world,
    grid_affine,
)
from ketanode.synthetic.series_writer import ORIENTATIONS, SeriesSpec

#: Head tissues outside the intracranial volume; the label value is the index.
HEAD_TISSUES: tuple[str, ...] = (
    "air",
    "skin",
    "fat",
    "muscle",
    "bone",
    "marrow",
    "dura",
    "vessel",
    "vitreous",
    "lens",
    "cord",
    "spinal_csf",
    "gland",
    "disc",
    "nerve",
)
_L = {name: i for i, name in enumerate(HEAD_TISSUES)}

#: Signal relative to white matter per tissue and contrast (see the module docstring).
PROFILES: dict[str, dict[str, float]] = {
    "mprage": {
        "wm": 1.00,
        "gm": 0.62,
        "csf": 0.16,
        "air": 0.0,
        "skin": 0.55,
        "fat": 1.05,
        "muscle": 0.45,
        "bone": 0.05,
        "marrow": 0.95,
        "dura": 0.30,
        "vessel": 0.30,
        "vitreous": 0.13,
        "lens": 0.50,
        "cord": 0.85,
        "spinal_csf": 0.16,
        "gland": 0.70,
        "disc": 0.40,
        "nerve": 0.90,
    },
    "spgr": {
        "wm": 1.00,
        "gm": 0.76,
        "csf": 0.27,
        "air": 0.0,
        "skin": 0.65,
        "fat": 1.45,
        "muscle": 0.55,
        "bone": 0.06,
        "marrow": 1.30,
        "dura": 0.70,
        "vessel": 1.15,
        "vitreous": 0.24,
        "lens": 0.65,
        "cord": 0.90,
        "spinal_csf": 0.27,
        "gland": 0.90,
        "disc": 0.50,
        "nerve": 0.92,
    },
}

#: Vendor and series description of the two profiles ({plane} filled in; both match the
#: node's T1 selection).
SERIES = {
    "mprage": ("siemens", "t1_mprage_{plane}_p2_iso"),
    "spgr": ("ge", "{plane} 3D T1 BRAVO"),
}
_PLANES = {
    "mprage": {"sagittal": "sag", "axial": "tra", "coronal": "cor"},
    "spgr": {"sagittal": "Sag", "axial": "Ax", "coronal": "Cor"},
}

HEAD_VERSION = 1
#: Head grid (template MNI mm, 1 mm): origin and shape.
_HEAD_ORIGIN = (-104, -132, -236)
_HEAD_SHAPE = (209, 269, 349)
#: Ventricular bump centre (MNI mm) and width.
_VENTRICLES = (0.0, -12.0, 16.0)
_VENTRICLE_SIGMA = 18.0


@dataclass(frozen=True)
class RealisticSpec(PhantomSpec):
    """A non-circular whole-head phantom (see the module docstring).

    Inherits every :class:`~ketanode.synthetic.phantom.PhantomSpec` field; the defaults differ
    (a 176 x 256 x 256 sagittal field of view, larger between-subject variation). The field
    of view is placed on the head (``fov_shift_mm`` moves it further).
    """

    fov_mm: tuple[float, float, float] = (176.0, 256.0, 256.0)
    region_sd: float = 0.08
    head_scale_range: float = 0.08
    aniso: float = 0.06
    rotation_deg: float = 8.0
    bias: float = 0.25
    contrast: str = "mprage"  # mprage | spgr
    warp_rms_mm: float = 5.0  # RMS of the non-affine displacement over the brain
    warp_waves: int = 8
    warp_longitudinal: float = 0.35  # share of the waves' amplitude along their direction
    warp_wavelengths_mm: tuple[float, float] = (70.0, 160.0)
    ventricle_change: tuple[float, float] = (-0.08, 0.20)  # linear change at their centre
    sharpen: tuple[float, float] = (1.4, 1.6)  # exponent range of the tissue sharpening
    sulcal_pattern: float = 0.5  # strength of the individual sulcal pattern
    sulcal_widening: tuple[float, float] = (-0.10, 0.30)  # mean GM->CSF exchange at sulci
    top_margin_mm: tuple[float, float] = (6.0, 20.0)  # head top below the FOV's top edge
    truth_step_mm: float | None = None  # None: min(voxel size, 1 mm)

    def make(self, atlas: Atlas | None = None) -> Phantom:
        return make_realistic_phantom(self, atlas)

    def default_series(self) -> SeriesSpec:
        vendor, pattern = SERIES[self.contrast]
        name = pattern.format(plane=_PLANES[self.contrast][self.orientation])
        return SeriesSpec(vendor=vendor, series_description=name, protocol_name=name)


def realistic_specs(voxel_mm: float = 1.0, **overrides: Any) -> list[RealisticSpec]:
    """The three accuracy phantoms: MPRAGE sagittal, IR-FSPGR axial, IR-FSPGR sagittal."""
    v = (voxel_mm, voxel_mm, voxel_mm)
    return [
        RealisticSpec(seed=9101, voxel_mm=v, contrast="mprage", **overrides),
        RealisticSpec(
            seed=9102,
            voxel_mm=v,
            contrast="spgr",
            orientation="axial",
            fov_mm=(184.0, 256.0, 256.0),
            **overrides,
        ),
        RealisticSpec(seed=9103, voxel_mm=v, contrast="spgr", **overrides),
    ]


def realistic_phantoms(voxel_mm: float = 1.0, **overrides: Any) -> list[Phantom]:
    """The three accuracy phantoms of :func:`realistic_specs`, generated."""
    return [make_realistic_phantom(s) for s in realistic_specs(voxel_mm, **overrides)]


# --------------------------------------------------------------------------------------
# The head (template space, seed-independent, cached)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Head:
    labels: NDArray[np.uint8]  # HEAD_TISSUES index; 0 inside the intracranial volume
    affine: F64
    offset: tuple[int, int, int]  # the model grid's first voxel in the head grid


_HEADS: dict[str, _Head] = {}


def _head_model(model: _Model) -> _Head:
    origin = np.array(_HEAD_ORIGIN, dtype=np.float64)
    offset = np.rint(model.affine[:3, 3] - origin).astype(int)
    if not np.allclose(model.affine[:3, :3], np.eye(3)) or not np.allclose(
        model.affine[:3, 3] - origin, offset
    ):
        raise ValueError("the head model needs the 1 mm MNI template grid")
    files = (TEMPLATE_GM, TEMPLATE_WM, TEMPLATE_T1)
    digest = hashlib.sha256(
        repr(
            (
                HEAD_VERSION,
                _HEAD_ORIGIN,
                _HEAD_SHAPE,
                model.gm.shape,
                [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
            )
        ).encode()
    ).hexdigest()[:16]
    if digest in _HEADS:
        return _HEADS[digest]
    cache = _cache_dir()
    path = cache / f"head-{digest}.npz" if cache else None
    labels: NDArray[np.uint8] | None = None
    if path is not None and path.is_file():
        try:
            with np.load(path) as npz:
                labels = npz["labels"].astype(np.uint8)
        except (OSError, ValueError, KeyError):
            labels = None
    if labels is None or labels.shape != _HEAD_SHAPE:
        labels = _build_head(model, (int(offset[0]), int(offset[1]), int(offset[2])))
        if path is not None:
            _save_npz(path, labels=labels)
    affine = np.eye(4)
    affine[:3, 3] = origin
    head = _Head(labels, affine, (int(offset[0]), int(offset[1]), int(offset[2])))
    _HEADS[digest] = head
    return head


def _smoothstep(t: NDArray[Any] | float) -> NDArray[np.float32]:
    t = np.clip(np.asarray(t, dtype=np.float32), 0.0, 1.0)
    return np.asarray(t * t * (3.0 - 2.0 * t), dtype=np.float32)


class _Canvas:
    """A label volume on the head grid, painted primitive by primitive on sub-boxes."""

    def __init__(self, shape: tuple[int, int, int], origin: tuple[int, int, int]) -> None:
        self.labels = np.zeros(shape, dtype=np.uint8)
        self.origin = np.array(origin, dtype=np.float64)
        self.shape = shape

    def box(
        self, lo: tuple[float, float, float], hi: tuple[float, float, float]
    ) -> tuple[tuple[slice, slice, slice], F32, F32, F32]:
        """Slices of the MNI box [lo, hi] and broadcast MNI coordinates X, Y, Z on it."""
        sl = []
        coords = []
        for axis in range(3):
            a = max(0, int(math.floor(lo[axis] - self.origin[axis])))
            b = min(self.shape[axis], int(math.ceil(hi[axis] - self.origin[axis])) + 1)
            b = max(a, b)
            sl.append(slice(a, b))
            c = np.arange(a, b, dtype=np.float32) + np.float32(self.origin[axis])
            coords.append(c.reshape([-1 if i == axis else 1 for i in range(3)]).astype(np.float32))
        return (sl[0], sl[1], sl[2]), coords[0], coords[1], coords[2]

    def paint(
        self,
        lo: tuple[float, float, float],
        hi: tuple[float, float, float],
        mask_fn: Any,
        label: str,
        where: NDArray[np.bool_] | None = None,
    ) -> None:
        sl, x, y, z = self.box(lo, hi)
        mask = np.broadcast_to(mask_fn(x, y, z), self.labels[sl].shape)
        if where is not None:
            mask = mask & where[sl]
        self.labels[sl][mask] = _L[label]


def _ellipsoid(
    c: tuple[float, float, float], r: tuple[float, float, float]
) -> tuple[tuple[float, float, float], tuple[float, float, float], Any]:
    """(lo, hi, mask_fn) of an ellipsoid centred at c with semi-axes r (MNI mm)."""

    def fn(x: Any, y: Any, z: Any) -> Any:
        return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1

    lo = (c[0] - r[0] - 1, c[1] - r[1] - 1, c[2] - r[2] - 1)
    hi = (c[0] + r[0] + 1, c[1] + r[1] + 1, c[2] + r[2] + 1)
    return lo, hi, fn


def _tube(
    p0: tuple[float, float, float], p1: tuple[float, float, float], radius: float
) -> tuple[tuple[float, float, float], tuple[float, float, float], Any]:
    """(lo, hi, mask_fn) of a capsule from p0 to p1."""
    a = np.array(p0, dtype=np.float32)
    d = np.array(p1, dtype=np.float32) - a
    length2 = float(d @ d)

    def fn(x: Any, y: Any, z: Any) -> Any:
        t = ((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / length2
        t = np.clip(t, 0.0, 1.0)
        return (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (
            z - a[2] - t * d[2]
        ) ** 2 <= radius**2

    lo = tuple(float(min(p, q) - radius - 1) for p, q in zip(p0, p1, strict=True))
    hi = tuple(float(max(p, q) + radius + 1) for p, q in zip(p0, p1, strict=True))
    return (lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2]), fn


def _spine_y(z: Any) -> Any:
    """AP position (MNI y) of the spinal canal's centre at height z (cervical lordosis)."""
    t = np.clip((-70.0 - np.asarray(z, dtype=np.float32)) / 150.0, 0.0, 1.0)
    return np.float32(-45.5) + np.float32(9.0) * np.sin(np.float32(np.pi) * t)


def _build_head(model: _Model, offset: tuple[int, int, int]) -> NDArray[np.uint8]:
    """The head's labels on the head grid (MNI mm, 1 mm; sizes are for the MNI brain, which
    is ~9 % larger than an average adult's: REFERENCE_SCALE scales the whole head)."""
    shape = _HEAD_SHAPE
    canvas = _Canvas(shape, _HEAD_ORIGIN)
    icv = np.zeros(shape, dtype=bool)
    m_icv = (model.gm + model.wm + model.csf) > 0
    icv[
        offset[0] : offset[0] + m_icv.shape[0],
        offset[1] : offset[1] + m_icv.shape[1],
        offset[2] : offset[2] + m_icv.shape[2],
    ] = m_icv
    del m_icv
    d_icv = ndi.distance_transform_edt(~icv).astype(np.float32)
    _, X, Y, Z = canvas.box(
        (-1e9, -1e9, -1e9),
        (1e9, 1e9, 1e9),
    )

    # skull thickness: thicker at the occiput, thin at the temporal squama and orbital roofs
    wobble = (np.sin(X * 0.05 + 0.3) * np.cos(Y * 0.04 + 1.1) + np.sin(Z * 0.06 + 2.0)) * 0.5
    occipital = _smoothstep((-55.0 - Y) / 25.0)
    temporal = _smoothstep((np.abs(X) - 48.0) / 10.0) * _smoothstep((25.0 - np.abs(Z + 8)) / 10)
    orbital = _smoothstep((Y - 10.0) / 15.0) * _smoothstep((-8.0 - Z) / 8.0)
    skull_out = np.maximum(
        6.5 + wobble + 1.8 * occipital - 2.8 * temporal - 3.0 * orbital, np.float32(3.2)
    ).astype(np.float32)
    temporalis = (
        10.0
        * _smoothstep((np.abs(X) - 42.0) / 12.0)
        * _smoothstep((28.0 - np.abs(Z + 10.0)) / 14.0)
        * _smoothstep((40.0 - np.abs(Y + 5.0)) / 20.0)
    ).astype(np.float32)
    scalp = (6.5 + 0.8 * wobble + 1.5 * occipital).astype(np.float32)
    del wobble, occipital, temporal, orbital

    # the body envelope: cranium, face, nose, eyelids, neck and shoulders
    shell = d_icv <= skull_out + temporalis + scalp
    env = shell.astype(np.float32)
    del shell, temporalis, scalp
    ys = _spine_y(Z)
    shoulders = _smoothstep((-188.0 - Z) / 38.0)
    neck_c = ys + 14.0 + 10.0 * shoulders
    neck_ax = 58.0 + 115.0 * shoulders
    neck_ay = 62.0 + 18.0 * shoulders
    neck = (((X / neck_ax) ** 2 + ((Y - neck_c) / neck_ay) ** 2) <= 1) & (Z <= -30)
    env[neck] = 1.0
    del neck, neck_c, neck_ax, neck_ay
    for lo, hi, fn in (
        _ellipsoid((0.0, 25.0, -70.0), (60.0, 64.0, 58.0)),  # face
        _ellipsoid((0.0, 58.0, -110.0), (30.0, 26.0, 20.0)),  # chin
        _ellipsoid((32.0, 60.0, -40.0), (15.0, 15.0, 14.5)),  # eyelids
        _ellipsoid((-32.0, 60.0, -40.0), (15.0, 15.0, 14.5)),
    ):
        sl, x, y, z = canvas.box(lo, hi)
        env[sl][np.broadcast_to(fn(x, y, z), env[sl].shape)] = 1.0

    # nose: a triangular prism from the root (y 84, z -26) to the tip (y 116, z -68)
    def nose(x: Any, y: Any, z: Any) -> Any:
        t = np.clip((-26.0 - z) / 42.0, 0.0, 1.0)
        front = np.where(z >= -68.0, 84.0 + 32.0 * t, 116.0 - 2.2 * (-68.0 - z))
        half = 7.0 + 11.0 * t
        back = 70.0
        return (y >= back) & (y <= front) & (np.abs(x) <= half * (front - y) / (front - back))

    sl, x, y, z = canvas.box((-20.0, 68.0, -76.0), (20.0, 120.0, -24.0))
    env[sl][np.broadcast_to(nose(x, y, z), env[sl].shape)] = 1.0
    ndi.gaussian_filter(env, 2.0, output=env)
    inside = env > 0.5
    del env
    inside |= icv
    e_in = ndi.distance_transform_edt(inside).astype(np.float32)
    del inside

    # subcutaneous fat: thicker on the cheeks, the back of the neck and the shoulders
    cheeks = (
        _smoothstep((np.abs(X) - 22.0) / 12.0)
        * _smoothstep((Y - 20.0) / 20.0)
        * _smoothstep((40.0 - np.abs(Z + 78.0)) / 15.0)
    )
    nape = _smoothstep((-75.0 - Z) / 30.0) * _smoothstep((ys - Y) / 30.0)
    fat_depth = (2.0 + 4.0 + 5.0 * cheeks + 6.0 * nape + 8.0 * shoulders).astype(np.float32)
    del cheeks, nape
    body = e_in > 0
    canvas.labels[body] = _L["muscle"]
    canvas.labels[body & (e_in <= fat_depth)] = _L["fat"]
    canvas.labels[body & (e_in <= 2.0)] = _L["skin"]
    del fat_depth
    deep = body & (e_in > 4.0) & ~icv  # inside the skin and most of the fat
    del body

    # fat planes between the neck muscles (seed-independent texture)
    rng = np.random.default_rng(20260511)
    sl, x, y, z = canvas.box((-104.0, -132.0, -236.0), (104.0, 136.0, -100.0))
    planes = rng.standard_normal(canvas.labels[sl].shape).astype(np.float32)
    ndi.gaussian_filter(planes, 4.0, output=planes)
    planes /= np.float32(planes.std() + 1e-6)
    sub = canvas.labels[sl]
    sub[(np.abs(planes) < 0.07) & (sub == _L["muscle"]) & deep[sl]] = _L["fat"]
    del planes, sub

    away = d_icv > 3.0  # face and neck structures keep off the skull's inner table
    outer = deep & away

    def paint(shape_: Any, label: str, where: NDArray[np.bool_] = outer) -> None:
        lo_, hi_, fn_ = shape_
        canvas.paint(lo_, hi_, fn_, label, where)

    # neck: vertebrae (cortex, marrow), discs, posterior arches and spinous processes
    def vertebra(part: str) -> Any:
        def fn(x: Any, y: Any, z: Any) -> Any:
            yc = _spine_y(z)
            phase = np.mod(-84.0 - z, 18.0)
            body_z = (z <= -84.0) & (phase < 14.0)
            disc_z = (z <= -84.0) & (phase >= 14.0)
            r_body = (x / 15.0) ** 2 + ((y - yc - 21.0) / 10.5) ** 2
            r_canal = np.sqrt((x / 10.0) ** 2 + ((y - yc) / 8.5) ** 2)
            arch = (r_canal >= 1.0) & (r_canal <= 1.55) & (y <= yc + 6.0) & body_z
            spinous = (np.abs(x) <= 3.5) & (y >= yc - 34.0) & (y <= yc - 8.0)
            spinous &= body_z & (phase > 3.0) & (phase < 11.0)
            if part == "cortex":
                return ((r_body <= 1.0) & body_z) | arch | spinous | ((r_body <= 1.0) & disc_z)
            if part == "marrow":
                return (r_body <= 0.72) & body_z
            return (r_body <= 0.9) & disc_z  # disc

        return fn

    neck_box = ((-60.0, -100.0, -236.0), (60.0, 40.0, -70.0))
    canvas.paint(*neck_box, vertebra("cortex"), "bone", outer)
    canvas.paint(*neck_box, vertebra("marrow"), "marrow", outer)
    canvas.paint(*neck_box, vertebra("disc"), "disc", outer)

    # airway: nasopharynx, pharynx, larynx and trachea
    def airway(x: Any, y: Any, z: Any) -> Any:
        yc = _spine_y(z) + 40.0
        narrow = _smoothstep((-140.0 - z) / 20.0)
        ax = 13.0 - 5.0 * narrow
        ay = 7.0 + 1.0 * narrow
        return ((x / ax) ** 2 + ((y - yc) / ay) ** 2 <= 1) & (z <= -58.0)

    canvas.paint((-20.0, -30.0, -236.0), (20.0, 40.0, -56.0), airway, "air", outer)
    paint(_ellipsoid((0.0, 22.0, -60.0), (12.0, 26.0, 7.0)), "air")  # nasopharynx
    # carotid arteries and jugular veins
    for side in (-1.0, 1.0):
        for dx, dy, radius in ((20.0, 42.0, 3.2), (30.0, 35.0, 5.0)):

            def vessel(
                x: Any,
                y: Any,
                z: Any,
                s: float = side,
                dx: float = dx,
                dy: float = dy,
                r: float = radius,
            ) -> Any:
                yc = _spine_y(z) + dy
                return ((x - s * dx) ** 2 + (y - yc) ** 2 <= r * r) & (z <= -55.0)

            canvas.paint((-45.0, -30.0, -236.0), (45.0, 40.0, -50.0), vessel, "vessel", outer)

    # face: nasal cavity and septum, turbinates, sinuses, palate, teeth, mandible, tongue
    for side in (-1.0, 1.0):
        paint(_ellipsoid((side * 27.0, 58.0, -62.0), (13.5, 16.5, 16.5)), "gland")  # mucosa
        paint(_ellipsoid((side * 27.0, 58.0, -62.0), (12.0, 15.0, 15.0)), "air")  # maxillary
        paint(_ellipsoid((side * 52.0, -2.0, -80.0), (11.0, 16.0, 22.0)), "gland")  # parotid
        # zygomatic bone and arch
        paint(_ellipsoid((side * 47.0, 48.0, -52.0), (8.0, 15.0, 8.0)), "bone")
        paint(_ellipsoid((side * 47.0, 48.0, -52.0), (5.0, 11.0, 5.0)), "marrow")
        paint(_tube((side * 52.0, 38.0, -52.0), (side * 60.0, -2.0, -50.0), 3.5), "bone")
    paint(_ellipsoid((0.0, 72.0, -54.0), (15.0, 24.0, 21.0)), "air")  # nasal cavity
    canvas.paint(
        (-2.0, 48.0, -76.0),
        (2.0, 98.0, -32.0),
        lambda x, y, z: np.abs(x) <= 1.2,
        "gland",
        outer & (canvas.labels == _L["air"]),
    )  # septum
    for side in (-1.0, 1.0):
        for z0 in (-62.0, -50.0):
            paint(_ellipsoid((side * 9.0, 70.0, z0), (4.0, 18.0, 3.5)), "gland")  # turbinates

    def hard_palate(x: Any, y: Any, z: Any) -> Any:
        return (np.abs(x) <= 28.0) & (y >= 38.0) & (y <= 86.0) & (z >= -80.0) & (z <= -74.0)

    canvas.paint((-30.0, 36.0, -82.0), (30.0, 88.0, -72.0), hard_palate, "bone", outer)

    def arch(r_out: tuple[float, float], width: float, y0: float) -> Any:
        def fn(x: Any, y: Any, z: Any) -> Any:
            r = np.sqrt((x / r_out[0]) ** 2 + ((y - y0) / r_out[1]) ** 2)
            return (r <= 1.0) & (r >= 1.0 - width / r_out[1]) & (y >= y0 - 5.0)

        return fn

    for z0, z1 in ((-89.0, -80.0), (-99.0, -91.0)):  # upper and lower teeth
        canvas.paint((-45.0, 20.0, z0), (45.0, 95.0, z1), arch((34.0, 44.0), 9.0, 44.0), "bone")
    canvas.paint(
        (-60.0, 0.0, -130.0),
        (60.0, 100.0, -99.0),
        arch((50.0, 52.0), 10.0, 36.0),
        "bone",
        outer,
    )  # mandible body
    canvas.paint(
        (-60.0, 0.0, -127.0),
        (60.0, 100.0, -102.0),
        arch((47.0, 49.0), 4.5, 36.0),
        "marrow",
        outer,
    )
    for side in (-1.0, 1.0):
        paint(_tube((side * 49.0, 14.0, -112.0), (side * 50.0, 4.0, -58.0), 5.0), "bone")  # rami
        paint(_tube((side * 49.0, 14.0, -110.0), (side * 50.0, 4.0, -62.0), 2.5), "marrow")
    paint(_ellipsoid((0.0, 55.0, -89.5), (22.0, 28.0, 1.8)), "air")  # oral cavity

    # orbits: bony walls, fat, eyeballs (sclera, vitreous, lens), optic nerves
    for side in (-1.0, 1.0):
        walls = outer & (np.broadcast_to(Y, shape) <= 66.0)
        paint(_ellipsoid((side * 30.0, 49.0, -40.0), (18.5, 27.0, 16.5)), "bone", walls)
        paint(_ellipsoid((side * 30.0, 50.0, -40.0), (16.0, 26.0, 14.5)), "fat", deep & away)
        paint(_tube((side * 31.0, 46.0, -40.0), (side * 14.0, 22.0, -33.0), 2.4), "nerve")
        paint(_ellipsoid((side * 32.0, 60.0, -40.0), (13.2, 13.2, 13.2)), "muscle", deep | away)
        paint(_ellipsoid((side * 32.0, 60.0, -40.0), (12.3, 12.3, 12.3)), "vitreous", away)
        paint(_ellipsoid((side * 32.0, 70.0, -40.0), (4.5, 2.0, 4.5)), "lens", away)

    # skull: dura, inner table, diploic marrow, outer table (over everything near the brain)
    cranial = ~icv & (d_icv <= skull_out)
    canvas.labels[cranial] = _L["bone"]
    canvas.labels[cranial & (d_icv > 2.2) & (d_icv <= skull_out - 1.3)] = _L["marrow"]
    canvas.labels[cranial & (d_icv <= 1.0)] = _L["dura"]
    del cranial
    # frontal sinus in the diploe above the nasion
    frontal = (d_icv > 2.2) & (d_icv <= skull_out - 1.0)
    for side in (-1.0, 1.0):
        paint(_ellipsoid((side * 9.0, 76.0, -8.0), (9.0, 8.0, 11.0)), "air", frontal)
    del frontal, skull_out
    # venous sinuses in the dura: superior sagittal and transverse
    dural = ~icv & (d_icv > 0.3) & (d_icv <= 4.5)

    def sagittal_sinus(x: Any, y: Any, z: Any) -> Any:
        return (np.abs(x) <= 4.0) & ((z >= -5.0) | (y <= -88.0)) & (z >= -25.0)

    def transverse_sinus(x: Any, y: Any, z: Any) -> Any:
        return (np.abs(z + 17.0) <= 4.5) & (y <= -60.0)

    canvas.paint((-5.0, -132.0, -26.0), (5.0, 136.0, 112.0), sagittal_sinus, "vessel", dural)
    canvas.paint((-80.0, -132.0, -24.0), (80.0, -58.0, -10.0), transverse_sinus, "vessel", dural)
    del dural

    # spinal canal and cord below the brain stem (the template's intracranial volume ends at
    # z = -70 mm)
    def canal(scale_x: float, scale_y: float) -> Any:
        def fn(x: Any, y: Any, z: Any) -> Any:
            taper = 1.0 + 0.25 * np.exp((z + 70.0) / 8.0)
            return (
                (x / (scale_x * taper)) ** 2 + ((y - _spine_y(z)) / (scale_y * taper)) ** 2 <= 1
            ) & (z <= -60.0)

        return fn

    box = ((-20.0, -70.0, -236.0), (20.0, -20.0, -58.0))
    canvas.paint(*box, canal(9.5, 8.0), "spinal_csf", ~icv)
    canvas.paint(*box, canal(6.2, 5.0), "cord", ~icv)
    canvas.labels[icv] = 0
    # clavicles at the bottom
    for side in (-1.0, 1.0):
        paint(_tube((side * 18.0, 10.0, -228.0), (side * 95.0, -25.0, -212.0), 7.0), "bone")
        paint(_tube((side * 18.0, 10.0, -228.0), (side * 95.0, -25.0, -212.0), 4.0), "marrow")
    return canvas.labels


# --------------------------------------------------------------------------------------
# The subject: transform, nonlinear warp, placement
# --------------------------------------------------------------------------------------


def _wave_value(w: _Waves, x: F64) -> F64:
    """``w.value(x)`` computed in float32 (the phases stay within ~30 rad: errors ~1e-5 mm)."""
    arg = w.freq.astype(np.float32) @ (x - w.centre[:, None]).astype(np.float32)
    arg += w.phase.astype(np.float32)[:, None]
    np.sin(arg, out=arg)
    return np.asarray(w.amp.T.astype(np.float32) @ arg, dtype=np.float64)


@dataclass(frozen=True)
class _Bump:
    """A radial displacement -k (y - c) exp(-|y - c|^2 / 2 sigma^2): k > 0 enlarges the
    middle (the pull-back samples the template closer to c), k < 0 shrinks it."""

    centre: F64
    k: float
    sigma: float

    def _parts(self, y: F64) -> tuple[F64, F64]:
        r = y - self.centre[:, None]
        g = np.exp(-(r * r).sum(axis=0) / (2.0 * self.sigma**2))
        return r, g

    def value(self, y: F64) -> F64:
        r = (y - self.centre[:, None]).astype(np.float32)
        g = np.exp((r * r).sum(axis=0) * np.float32(-0.5 / self.sigma**2))
        r *= np.float32(-self.k) * g
        return np.asarray(r, dtype=np.float64)

    def jacobian(self, y: F64) -> F64:
        r, g = self._parts(y)
        outer = np.einsum("in,jn->nij", r, r) / self.sigma**2
        return np.asarray(-self.k * g[:, None, None] * (np.eye(3)[None] - outer), dtype=np.float64)


@dataclass(frozen=True)
class _Warp:
    """Pull-back displacement u(y) = waves(y) + bump(y) - (B (y - c) + b), template mm."""

    waves: _Waves
    bump: _Bump
    linear: F64  # B: the affine part of waves + bump over the brain, removed
    offset: F64  # b
    centre: F64

    def value(self, y: F64) -> F64:
        affine = self.linear @ (y - self.centre[:, None]) + self.offset[:, None]
        return np.asarray(
            _wave_value(self.waves, y) + self.bump.value(y) - affine, dtype=np.float64
        )

    def jacobian(self, y: F64) -> F64:
        """d u / d y, (N, 3, 3)."""
        return np.asarray(
            self.waves.jacobian(y) + self.bump.jacobian(y) - self.linear[None], dtype=np.float64
        )

    def invert(self, y: F64, tolerance_mm: float = 1e-4) -> F64:
        """y0 with y0 + u(y0) = y: Newton's method from the fixed-point guess y - u(y)
        (u is a contraction, |du/dy| <= 0.75, so the inverse exists and is unique)."""
        y0 = y - self.value(y)
        for _ in range(12):
            residual = y0 + self.value(y0) - y
            if float(np.abs(residual).max(initial=0.0)) < tolerance_mm:
                break
            jac = np.eye(3)[None] + self.jacobian(y0)
            y0 = y0 - np.linalg.solve(jac, residual.T[:, :, None])[:, :, 0].T
        return y0

    def as_dict(self) -> dict[str, Any]:
        return {
            "waves": self.waves.as_dict(),
            "ventricle_bump": {
                "centre": self.bump.centre.tolist(),
                "k": round(self.bump.k, 6),
                "sigma_mm": self.bump.sigma,
            },
            "removed_affine": {
                "linear": np.round(self.linear, 6).tolist(),
                "offset": np.round(self.offset, 6).tolist(),
            },
        }


@dataclass(frozen=True)
class _Individual:
    linear: F64  # 3x3: template offset (mm from centre, after the warp's pull-back) -> native
    translation: F64  # native position of the template centre
    centre: F64
    warp: _Warp
    bias: _Waves
    factors: dict[str, float]
    intensity: dict[str, float]
    rotation_deg: F64
    scales: F64
    sharpen: float
    sulcal_mean: float
    sulcal_field: _Waves
    pattern_seed: int
    ventricle_change: float
    warp_stats: dict[str, float]

    def to_template(self, x: F64) -> F64:
        """Pull-back: native RAS mm (3, N) -> template MNI mm (3, N)."""
        y0 = self.centre[:, None] + np.linalg.solve(self.linear, x - self.translation[:, None])
        return np.asarray(y0 + self.warp.value(y0), dtype=np.float64)

    def to_native(self, y: F64) -> F64:
        """Template MNI mm (3, N) -> native RAS mm (3, N)."""
        y0 = self.warp.invert(y)
        return np.asarray(
            self.translation[:, None] + self.linear @ (y0 - self.centre[:, None]), dtype=np.float64
        )

    def native_per_template_volume(self, y: F64) -> F64:
        """Native volume per template volume at template points y (3, N)."""
        y0 = self.warp.invert(y)
        return _volume_ratio(self.linear, self.warp.jacobian(y0))

    def matrix(self) -> F64:
        return _matrix(self)


def _lattice(mask: NDArray[np.bool_], affine: F64, step: int) -> F64:
    """World coordinates (3, N) of the voxels of ``mask`` on a ``step``-voxel lattice."""
    sub = mask[::step, ::step, ::step]
    idx = np.argwhere(sub).T.astype(np.float64) * step
    return _world(affine, idx)


def _scaled_waves(w: _Waves, factor: float) -> _Waves:
    return _Waves(w.amp * factor, w.freq, w.phase, w.centre)


def _make_warp(
    spec: RealisticSpec,
    waves: _Waves,
    bump: _Bump,
    brain: F64,
    head: F64,
    centre: F64,
) -> tuple[_Warp, dict[str, float]]:
    """Scale ``waves`` to ``warp_rms_mm`` of non-affine displacement over the brain, remove
    the affine part, and shrink it until the Jacobian is safe over the whole head."""
    ones = np.ones((1, brain.shape[1]))
    design = np.vstack([brain - centre[:, None], ones]).T  # (N, 4)

    def affine_fit(u: F64) -> tuple[F64, F64]:
        coef, *_ = np.linalg.lstsq(design, u.T, rcond=None)  # (4, 3)
        return np.asarray(coef[:3].T, dtype=np.float64), np.asarray(coef[3], dtype=np.float64)

    u0 = waves.value(brain)
    lin0, off0 = affine_fit(u0)
    resid = u0 - (lin0 @ (brain - centre[:, None]) + off0[:, None])
    factor = spec.warp_rms_mm / max(float(np.sqrt((resid**2).sum(axis=0).mean())), 1e-9)
    stats: dict[str, float] = {}
    for _ in range(20):
        scaled = _scaled_waves(waves, factor)
        lin, off = affine_fit(scaled.value(brain) + bump.value(brain))
        warp = _Warp(scaled, bump, lin, off, centre)
        jac = np.eye(3)[None] + warp.jacobian(head)
        det = np.linalg.det(jac)
        norm = np.linalg.norm(jac - np.eye(3)[None], ord=2, axis=(1, 2))
        if float(det.min()) >= 0.35 and float(norm.max()) <= 0.75:
            u = warp.value(brain)
            length = np.sqrt((u**2).sum(axis=0))
            lin_r, off_r = affine_fit(u)
            rest = u - (lin_r @ (brain - centre[:, None]) + off_r[:, None])
            det_brain = np.linalg.det(np.eye(3)[None] + warp.jacobian(brain))
            stats = {
                "rms_mm": float(np.sqrt((length**2).mean())),
                "max_mm": float(length.max()),
                "rms_after_affine_mm": float(np.sqrt((rest**2).sum(axis=0).mean())),
                "jacobian_min_brain": float(det_brain.min()),
                "jacobian_max_brain": float(det_brain.max()),
                "jacobian_min_head": float(det.min()),
                "jacobian_max_head": float(det.max()),
                "max_gradient_norm_head": float(norm.max()),
                "scale_factor": float(factor),
            }
            return warp, stats
        factor *= 0.9
    raise RuntimeError("no diffeomorphic warp found")  # pragma: no cover


def _individual(spec: RealisticSpec, model: _Model, head: _Head) -> _Individual:
    if spec.contrast not in PROFILES:
        raise ValueError(f"unknown contrast {spec.contrast!r}; one of {sorted(PROFILES)}")
    rng = np.random.default_rng([spec.seed, 71])
    # draw everything in a fixed order so that changing one option leaves the rest alone
    head_scale = 1.0 + rng.uniform(-spec.head_scale_range, spec.head_scale_range)
    aniso = 1.0 + rng.uniform(-spec.aniso, spec.aniso, size=3)
    rot = rng.uniform(-spec.rotation_deg, spec.rotation_deg, size=3)
    jitter = rng.uniform(-1.0, 1.0, size=3)
    region_noise = np.clip(rng.normal(0.0, 1.0, size=len(model.names)), -2.5, 2.5)
    profile = PROFILES[spec.contrast]
    tissue_noise = rng.normal(0.0, 1.0, size=len(profile))
    waves = _waves(rng, spec.warp_waves, 3, spec.warp_wavelengths_mm, 1.0, np.asarray(model.centre))
    # mostly transverse waves (displacement across the wave vector: shear, which moves
    # boundaries without changing volume), with a part along it (local volume change)
    unit = waves.freq / np.linalg.norm(waves.freq, axis=1, keepdims=True)
    along = (waves.amp * unit).sum(axis=1, keepdims=True) * unit
    waves = _Waves(
        waves.amp - (1.0 - spec.warp_longitudinal) * along, waves.freq, waves.phase, waves.centre
    )
    ventricle = float(rng.uniform(*spec.ventricle_change))
    sharpen = float(rng.uniform(*spec.sharpen))
    sulcal_mean = float(rng.uniform(*spec.sulcal_widening))
    sulcal_field = _waves(rng, 4, 1, (50.0, 120.0), 0.25, np.asarray(model.centre))
    pattern_seed = int(rng.integers(0, 2**31 - 1))
    bias = _waves(rng, 4, 1, (250.0, 500.0), math.log1p(spec.bias), np.zeros(3))
    if spec.scan_seed is not None:
        scan = np.random.default_rng([spec.seed, spec.scan_seed, 73])
        rot = scan.uniform(-spec.rotation_deg, spec.rotation_deg, size=3)
        jitter = scan.uniform(-1.0, 1.0, size=3)
        bias = _waves(scan, 4, 1, (250.0, 500.0), math.log1p(spec.bias), np.zeros(3))
    linear, scales = _linear(spec, head_scale, aniso, rot)
    factors = _gm_factors(spec, model.names, region_noise)
    intensity = {
        k: float(v * (1.0 + spec.intensity_sd * z)) if v > 0 else 0.0
        for (k, v), z in zip(profile.items(), tissue_noise, strict=True)
    }
    centre = np.asarray(model.centre, dtype=np.float64)
    icv = (model.gm + model.wm + model.csf) > 0
    brain_pts = _lattice(icv, model.affine, 3)
    head_mask = head.labels > 0
    o = head.offset
    head_mask[
        o[0] : o[0] + icv.shape[0], o[1] : o[1] + icv.shape[1], o[2] : o[2] + icv.shape[2]
    ] |= icv
    head_pts = _lattice(head_mask, head.affine, 4)
    del head_mask
    k = 1.0 - 1.0 / (1.0 + ventricle)
    bump = _Bump(np.array(_VENTRICLES), k, _VENTRICLE_SIGMA)
    warp, stats = _make_warp(spec, waves, bump, brain_pts, head_pts, centre)

    # placement: the field of view on the head, its top edge above the top of the head
    warp_inv = warp.invert(head_pts)
    x = linear @ (warp_inv - centre[:, None])  # native, before the translation
    brain_x = linear @ (warp.invert(brain_pts) - centre[:, None])
    affine = grid_affine(spec)
    shape = spec.grid_shape()
    corners = np.array(
        np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij"), dtype=np.float64
    ).reshape(3, -1)
    fov = _world(affine, corners)
    f_lo, f_hi = fov.min(axis=1), fov.max(axis=1)
    lo_m, hi_m = spec.top_margin_mm
    margin = lo_m + (hi_m - lo_m) * (jitter[2] + 1.0) / 2.0
    upper = x[:, x[2] > float(np.percentile(brain_x[2], 5))]  # cranium and face
    t = np.zeros(3)
    t[0] = (f_lo[0] + f_hi[0]) / 2 - (upper[0].min() + upper[0].max()) / 2 + 4.0 * jitter[0]
    t[1] = (f_lo[1] + f_hi[1]) / 2 - (upper[1].min() + upper[1].max()) / 2 + 8.0 * jitter[1]
    t[2] = f_hi[2] - margin - x[2].max()
    return _Individual(
        linear=linear,
        translation=t,
        centre=centre,
        warp=warp,
        bias=bias,
        factors=factors,
        intensity=intensity,
        rotation_deg=rot,
        scales=scales,
        sharpen=sharpen,
        sulcal_mean=sulcal_mean,
        sulcal_field=sulcal_field,
        pattern_seed=pattern_seed,
        ventricle_change=ventricle,
        warp_stats=stats,
    )


# --------------------------------------------------------------------------------------
# The individual brain (template space)
# --------------------------------------------------------------------------------------


def _individual_brain(spec: RealisticSpec, ind: _Individual, model: _Model) -> tuple[F32, F32, F32]:
    """GM, WM, CSF fractions of this subject on the model grid (sum = intracranial mask)."""
    full = (model.gm + model.wm + model.csf) > 0
    nz = np.argwhere(full)
    box = tuple(
        slice(int(a), int(b) + 2) for a, b in zip(nz.min(axis=0) - 1, nz.max(axis=0), strict=True)
    )
    del full, nz
    box_affine = model.affine.copy()
    box_affine[:3, 3] = _world(model.affine, np.array([[s.start] for s in box], dtype=np.float64))[
        :, 0
    ]
    gm, wm, csf = (a[box].astype(np.float32) for a in (model.gm, model.wm, model.csf))
    icv = (gm + wm + csf) > 0
    # 1. crisper tissue boundaries than the population average
    g = np.float32(ind.sharpen)
    pg, pw, pc = (np.power(a, g, dtype=np.float32) for a in (gm, wm, csf))
    total = pg + pw + pc
    ok = total > 0
    gm = np.divide(pg, total, out=np.zeros_like(pg), where=ok)
    wm = np.divide(pw, total, out=np.zeros_like(pw), where=ok)
    csf = np.where(icv, np.float32(1.0) - gm - wm, np.float32(0.0)).astype(np.float32)
    np.clip(csf, 0.0, 1.0, out=csf)
    del pg, pw, pc, total, ok
    # 2. an individual sulcal pattern: GM opened into CSF clefts, or CSF filled with GM
    noise = np.random.default_rng(ind.pattern_seed).standard_normal(gm.shape, dtype=np.float32)
    ndi.gaussian_filter(noise, 1.5, output=noise)
    noise /= np.float32(noise.std() + 1e-9)
    a = np.float32(spec.sulcal_pattern)
    opening = a * np.clip(noise - 0.5, 0.0, 1.0) * gm * (csf > 0.02)
    closing = a * np.clip(-noise - 0.5, 0.0, 1.0) * csf * (gm > 0.2)
    del noise
    gm += closing - opening
    csf += opening - closing
    del opening, closing
    # 3. sulci widened or narrowed (a smooth field): GM <-> CSF at their interface
    inside = np.nonzero(icv)
    pts = _world(box_affine, np.stack(inside).astype(np.float64))
    w = np.clip(ind.sulcal_mean + _wave_value(ind.sulcal_field, pts)[0], -0.6, 0.6)
    w = w.astype(np.float32)
    g_in, c_in = gm[inside], csf[inside]
    delta = np.clip(w * 4.0 * g_in * c_in, -c_in, g_in)
    gm[inside] = g_in - delta
    csf[inside] = c_in + delta
    del pts, w, g_in, c_in, delta, inside
    np.clip(gm, 0.0, 1.0, out=gm)
    np.clip(csf, 0.0, 1.0, out=csf)
    csf = np.where(icv, np.clip(np.float32(1.0) - gm - wm, 0.0, 1.0), np.float32(0.0))
    csf = csf.astype(np.float32)
    gm = np.where(icv, np.float32(1.0) - wm - csf, np.float32(0.0)).astype(np.float32)
    # 4. regional GM sizes (grown or shrunk at the grey/white interface)
    cropped = replace(model, gm=gm, wm=wm, csf=csf, territory=model.territory[box])
    out = []
    for part in _scaled_tissues(cropped, ind.factors):
        whole = np.zeros(model.gm.shape, dtype=np.float32)
        whole[box] = part
        out.append(whole)
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------------------
# Phantom
# --------------------------------------------------------------------------------------


@dataclass
class _Context:
    spec: RealisticSpec
    model: _Model
    head: _Head
    ind: _Individual
    gm: F32
    wm: F32
    csf: F32
    atlas_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _prepare(spec: RealisticSpec, atlas: Atlas | None) -> _Context:
    if spec.orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {spec.orientation!r}")
    atlas = atlas or load_atlas()
    model = _template_model(atlas)
    head = _head_model(model)
    ind = _individual(spec, model, head)
    gm, wm, csf = _individual_brain(spec, ind, model)
    return _Context(spec, model, head, ind, gm, wm, csf, atlas.name)


def _intensity_map(ctx: _Context) -> F32:
    """Signal / WM of every tissue on the head grid (template space)."""
    it = ctx.ind.intensity
    lut = np.array([it[t] for t in HEAD_TISSUES], dtype=np.float32)
    img = lut[ctx.head.labels]
    o = ctx.head.offset
    s = ctx.gm.shape
    sl = (slice(o[0], o[0] + s[0]), slice(o[1], o[1] + s[1]), slice(o[2], o[2] + s[2]))
    img[sl] += (
        np.float32(it["gm"]) * ctx.gm
        + np.float32(it["wm"]) * ctx.wm
        + np.float32(it["csf"]) * ctx.csf
    )
    return img


class _TruthSums:
    """Accumulates the truth over native points: GM, WM, CSF per territory (mL), and where
    the intracranial volume lies (RAS bounding box, centroid)."""

    def __init__(self, ctx: _Context, voxel_ml: float) -> None:
        self.ctx = ctx
        self.voxel_ml = voxel_ml
        model = ctx.model
        self.n = len(model.names)
        self.to_model = np.asarray(np.linalg.inv(model.affine), dtype=np.float64)
        nz = np.argwhere((model.gm + model.wm + model.csf) > 0)
        self.lo_vox, self.hi_vox = nz.min(axis=0) - 1.0, nz.max(axis=0) + 1.0
        self.sums = np.zeros((self.n + 1, 3))
        self.lo = np.full(3, np.inf)
        self.hi = np.full(3, -np.inf)
        self.weighted = np.zeros(3)
        self.weight = 0.0

    def add(self, pts: F64, y: F64) -> None:
        """Native points (3, N) and their template positions (3, N)."""
        vox = _world(self.to_model, y)
        near = np.all((vox >= self.lo_vox[:, None]) & (vox <= self.hi_vox[:, None]), axis=0)
        if not near.any():
            return
        vox, pts = vox[:, near], pts[:, near]
        terr = _sample(self.ctx.model.territory, vox, 0)
        c = self.ctx
        g, w, f = (_sample(t, vox, 1).astype(np.float64) for t in (c.gm, c.wm, c.csf))
        self.sums += _truth_sums(g, w, f, terr, self.voxel_ml, self.n)
        frac = g + w + f
        brain = frac > 0.5
        if brain.any():
            self.lo = np.minimum(self.lo, pts[:, brain].min(axis=1))
            self.hi = np.maximum(self.hi, pts[:, brain].max(axis=1))
        self.weighted += (pts * frac).sum(axis=1)
        self.weight += float(frac.sum())

    def result(self, grid: str, step: float) -> tuple[dict[str, Any], dict[str, Any]]:
        where = {
            "bbox_ras": [np.round(self.lo, 2).tolist(), np.round(self.hi, 2).tolist()],
            "centroid_ras": np.round(self.weighted / max(self.weight, 1e-9), 2).tolist(),
            "truth_grid": grid,
            "truth_step_mm": step,
        }
        return _truth_dict(self.sums, self.ctx.model.names), where


def _truth_here(ctx: _Context) -> bool:
    """Whether the truth can be summed on the output grid itself: isotropic voxels of at most
    ``truth_step_mm`` (1 mm by default), no slice profile, the whole brain inside the FOV."""
    spec = ctx.spec
    v = spec.voxel_mm
    if max(v) - min(v) > 1e-6 or len(_sub_slices(spec)) > 1:
        return False
    if max(v) > (spec.truth_step_mm or 1.0) + 1e-6:
        return False
    icv = (ctx.model.gm + ctx.model.wm + ctx.model.csf) > 0
    x = ctx.ind.to_native(_lattice(icv, ctx.model.affine, 2))
    affine = grid_affine(spec)
    idx = _world(np.asarray(np.linalg.inv(affine), dtype=np.float64), x)
    shape = np.array(spec.grid_shape(), dtype=np.float64)[:, None]
    return bool(np.all((idx >= 3) & (idx <= shape - 4)))


def _render(ctx: _Context, img: F32, truth: _TruthSums | None) -> F32:
    spec, ind = ctx.spec, ctx.ind

    def add_truth(pts: F64, y: F64, _vox: F64) -> None:
        assert truth is not None
        truth.add(pts, y)

    data, sigma = _scan(
        spec,
        _sub_slices(spec),
        1_000_000,
        ind.to_template,
        img,
        np.asarray(np.linalg.inv(ctx.head.affine), dtype=np.float64),
        lambda x: _wave_value(ind.bias, x),
        noise_salt=72,
        on_sample=add_truth if truth is not None else None,
    )
    ctx.extra["noise_sigma"] = sigma
    return np.clip(np.rint(data), 0, 65535).astype(np.float32)


def _native_truth(ctx: _Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """Truth on an axis-aligned native grid of ``truth_step_mm`` covering the intracranial
    volume (when the output grid cannot hold it: thick slices, coarse voxels, brain cut)."""
    spec, ind, model = ctx.spec, ctx.ind, ctx.model
    step = spec.truth_step_mm or min(min(spec.voxel_mm), 1.0)
    icv = (model.gm + model.wm + model.csf) > 0
    x = ind.to_native(_lattice(icv, model.affine, 2))
    margin = 4.0 + 2 * step
    x_lo, x_hi = x.min(axis=1) - margin, x.max(axis=1) + margin
    shape = tuple(int(math.ceil((h - lo) / step)) + 1 for lo, h in zip(x_lo, x_hi, strict=True))
    shape3 = (shape[0], shape[1], shape[2])
    affine = np.diag([step, step, step, 1.0])
    affine[:3, 3] = x_lo
    acc = _TruthSums(ctx, step**3 / 1000.0)
    chunk = max(1, 1_000_000 // (shape3[1] * shape3[2]))
    for k0 in range(0, shape3[0], chunk):
        k1 = min(shape3[0], k0 + chunk)
        pts = _world(affine, _grid_indices(shape3, k0, k1))
        acc.add(pts, ind.to_template(pts))
    return acc.result("native", step)


def _template_truth(ctx: _Context) -> dict[str, Any]:
    """Template-space sums weighted by the native/template volume ratio (cross-check)."""
    ind, model, gm, wm, csf = ctx.ind, ctx.model, ctx.gm, ctx.wm, ctx.csf
    inside = np.nonzero((gm + wm + csf) > 0)
    points = np.stack(inside).astype(np.float64)
    lo = points.min(axis=1) - 1.0
    step = 3  # the Jacobian is smooth: a 3-voxel lattice over the brain, interpolated linearly
    coarse_shape = tuple(
        int(math.ceil((h - a) / step)) + 2 for a, h in zip(lo, points.max(axis=1), strict=True)
    )
    lattice = np.indices(coarse_shape, dtype=np.float64).reshape(3, -1) * step + lo[:, None]
    coarse = ind.native_per_template_volume(_world(model.affine, lattice)).reshape(coarse_shape)
    jac = _sample(coarse, (points - lo[:, None]) / step, 1)
    return _jacobian_truth(model, gm, wm, csf, inside, jac)


def make_realistic_phantom(spec: RealisticSpec, atlas: Atlas | None = None) -> Phantom:
    """A whole-head T1 with an individual brain and known regional volumes (see the module
    docstring for what the truth is and why it is independent of the node's priors)."""
    ctx = _prepare(spec, atlas)
    affine = grid_affine(spec)
    here = _truth_here(ctx)
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    sums = _TruthSums(ctx, voxel_ml) if here else None
    data = _render(ctx, _intensity_map(ctx), sums)
    if sums is not None:
        native, where = sums.result("output", float(spec.voxel_mm[0]))
    else:
        native, where = _native_truth(ctx)
    template = _template_truth(ctx)
    ind = ctx.ind
    shape = spec.grid_shape()
    centre_idx = (np.array(shape, dtype=np.float64) - 1) / 2
    fov_centre = _world(affine, centre_idx[:, None])[:, 0]
    truth: dict[str, Any] = {
        "version": 1,
        "kind": "realistic_phantom",
        "seed": spec.seed,
        "spec": spec.as_dict(),
        "atlas": ctx.atlas_name,
        "truth_grid": where.pop("truth_grid"),
        **native,
        "contrast": spec.contrast,
        "gm_factors": dict(spec.gm_factors),
        "region_factors": ind.factors,
        "intensity": ind.intensity,
        "individual": {
            "sharpen": ind.sharpen,
            "sulcal_widening": ind.sulcal_mean,
            "ventricle_change": ind.ventricle_change,
        },
        "pose": _pose(ind),
        "warp": ind.warp.as_dict(),
        "warp_stats": {k: round(v, 4) for k, v in ind.warp_stats.items()},
        "brain": where,
        "fov_centre_ras": np.round(fov_centre, 2).tolist(),
        "bias": ind.bias.as_dict(),
        "noise_sigma": ctx.extra["noise_sigma"],
        "wm_signal": WM_SIGNAL,
        "affine": np.round(affine, 6).tolist(),
        "template_check": template,
    }
    return Phantom(spec, data, affine, truth)


#: Codes of :func:`tissue_map` inside the intracranial volume (the majority tissue).
BRAIN_CODES = {"gm": 20, "wm": 21, "csf": 22}


def tissue_map(spec: RealisticSpec, atlas: Atlas | None = None) -> NDArray[np.uint8]:
    """The tissue of every voxel of the phantom's grid (nearest): :data:`HEAD_TISSUES` index
    outside the intracranial volume, :data:`BRAIN_CODES` (majority tissue) inside."""
    ctx = _prepare(spec, atlas)
    affine = grid_affine(spec)
    shape = spec.grid_shape()
    to_head = np.asarray(np.linalg.inv(ctx.head.affine), dtype=np.float64)
    to_model = np.asarray(np.linalg.inv(ctx.model.affine), dtype=np.float64)
    out = np.zeros(shape, dtype=np.uint8)
    chunk = max(1, 1_000_000 // (shape[1] * shape[2]))
    for k0 in range(0, shape[0], chunk):
        k1 = min(shape[0], k0 + chunk)
        y = ctx.ind.to_template(_world(affine, _grid_indices(shape, k0, k1)))
        labels = _sample(ctx.head.labels, _world(to_head, y), 0).astype(np.uint8)
        vox = _world(to_model, y)
        fr = np.stack([_sample(t, vox, 1) for t in (ctx.gm, ctx.wm, ctx.csf)])
        brain = fr.sum(axis=0) > 0.5
        labels[brain] = np.array(list(BRAIN_CODES.values()), dtype=np.uint8)[
            fr[:, brain].argmax(axis=0)
        ]
        out[k0:k1] = labels.reshape(k1 - k0, shape[1], shape[2])
    return out


def truth_maps(
    spec: RealisticSpec,
    affine: F64,
    shape: tuple[int, int, int],
    atlas: Atlas | None = None,
) -> dict[str, NDArray[Any]]:
    """The phantom's true GM, WM, CSF fractions and territories (k = 1-based atlas region,
    0 none) on any grid (RAS ``affine``, ``shape``), e.g. a pipeline's working grid: summing
    the node's GM posterior by the true territories, or the true GM by the node's territories,
    splits a regional error into its segmentation and its registration parts."""
    ctx = _prepare(spec, atlas)
    to_model = np.asarray(np.linalg.inv(ctx.model.affine), dtype=np.float64)
    out: dict[str, NDArray[Any]] = {
        "gm": np.zeros(shape, dtype=np.float32),
        "wm": np.zeros(shape, dtype=np.float32),
        "csf": np.zeros(shape, dtype=np.float32),
        "territory": np.zeros(shape, dtype=np.int16),
    }
    chunk = max(1, 1_000_000 // (shape[1] * shape[2]))
    for k0 in range(0, shape[0], chunk):
        k1 = min(shape[0], k0 + chunk)
        pts = _world(np.asarray(affine, dtype=np.float64), _grid_indices(shape, k0, k1))
        vox = _world(to_model, ctx.ind.to_template(pts))
        part = (k1 - k0, shape[1], shape[2])
        for key, volume in (("gm", ctx.gm), ("wm", ctx.wm), ("csf", ctx.csf)):
            out[key][k0:k1] = _sample(volume, vox, 1).reshape(part)
        out["territory"][k0:k1] = _sample(ctx.model.territory, vox, 0).reshape(part)
    return out
