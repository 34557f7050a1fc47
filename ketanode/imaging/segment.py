"""Three-class tissue segmentation (CSF, GM, WM) inside the brain mask, with tissue priors.

The template GM/WM maps and CSF = intracranial - GM - WM are pulled into native space with the
registration and used as prior probabilities; a plain Gaussian mixture underestimated
cerebellar GM by about 35 %, priors fix that.

Two methods (``pipeline.segmentation``):

- ``em`` (default): a Gaussian mixture fitted by expectation-maximisation in which each
  voxel's class probability is ``(1 - w) * pi_k + w * prior_k(x)`` (``w`` = ``prior_weight``,
  ``pi_k`` the global class fractions), then a partial-volume (mixel) model that counts a
  boundary voxel by its tissue fractions (:func:`em`); no spatial (MRF) term. An outlier
  class takes what fits no tissue; the pure classes' spreads are held to the cerebrum's and
  to caps relative to WM (:data:`GM_VARIANCE_CAP`, :data:`CSF_VARIANCE_CAP`). A few seconds
  on a 1 mm brain.
- ``atropos``: ANTs Atropos with the same priors and an MRF (about 35-50 s on a 1 mm brain on
  one ITK thread). Measured on the same inputs (docs/architecture.md, "Segmentation"), its
  MRF moves partial-volume CSF into GM (real UIH head: GM 911 mL with the MRF, 718 mL
  without; phantom with truth: +6 % total GM), and it is ten times slower; kept for comparison.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ants
import numpy as np
from numpy.typing import NDArray

from ketanode.imaging.preprocess import Registration, pull_to_native, read, template_priors

CLASSES = ("csf", "gm", "wm")

# The GM class's variance is held to at most this times the WM class's (cerebrum only): a
# pure tissue's spread is noise and its own heterogeneity; without the cap the GM Gaussian
# widened over the partial-volume voxels that the mixture classes are there for. Chosen on
# the three non-circular phantoms and the shared real head against SAMSEG (docs/
# architecture.md, "Measurement on real heads"): total GM vs SAMSEG +17 % -> +6 %.
GM_VARIANCE_CAP = 1.25
# The CSF class's variance likewise, at most this times WM's (in the cerebrum; the other
# compartments are held to its variances, see :func:`em`). Pure CSF is as uniform as WM;
# what widened the CSF Gaussian (to 3-4 x WM's SD on the spoiled gradient-echo phantoms,
# where the dura lies between CSF and GM) was sulcal CSF/GM partial volume and the shell of
# the intracranial mask, and a wide CSF class counts CSF/GM boundary voxels as all CSF:
# temporal GM -14 / -17 % on the IR-FSPGR axial phantom (-10 / -12 % with the cap).
# Measured (docs/architecture.md, "Measurement on real heads"): 2 moved the real UIH head's
# total GM by +1.1 %; 1.5 by +2.5 %.
CSF_VARIANCE_CAP = 2.0
# A voxel inside the intracranial mask that fits no tissue class (venous sinus blood, diploic
# marrow or fat at the mask's edge: brighter than WM on a spoiled gradient echo) goes to an
# outlier class of uniform density over the intensity range: kept out of the classes' means
# and variances, and counted by its intensity (below CSF's mean CSF, above WM's WM, between
# two means their linear unmixing; TIV stays the mask's volume). Without it a few hundred
# such voxels in the cerebellum's compartment, where pure WM is scarce, made its WM class's
# SD 0.11 of WM (0.06 with the outlier class; the cerebrum's: 0.045).
OUTLIER_START = 0.01


class SegmentationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Segmentation:
    """Paths of the native-space probability maps (0-1, float32), one per class."""

    csf_path: str
    gm_path: str
    wm_path: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def path(self, tissue: str) -> str:
        return str(getattr(self, f"{tissue}_path"))


def native_priors(
    native: ants.ANTsImage, reg: Registration, smooth_mm: float = 1.0
) -> list[ants.ANTsImage]:
    """CSF, GM, WM priors in native space (each smoothed a little, summing to <= 1)."""
    out = []
    for prior in template_priors()[1:]:
        p = pull_to_native(prior, native, reg.to_native, reg.invert_to_native)
        if smooth_mm > 0:
            p = ants.smooth_image(p, smooth_mm, sigma_in_physical_coordinates=True)
        out.append(p)
    return out


def atropos(
    native: ants.ANTsImage,
    mask: ants.ANTsImage,
    priors: list[ants.ANTsImage],
    prior_weight: float = 0.25,
    iterations: int = 5,
    mrf: float = 0.1,
) -> list[ants.ANTsImage]:
    """Run Atropos initialised from and regularised by ``priors``; returns CSF, GM, WM
    posterior probabilities (zero outside the mask)."""
    if float(mask.sum()) < 1000:
        raise SegmentationError("the brain mask is (nearly) empty")
    radius = "x".join("1" for _ in range(native.dimension))
    result = ants.atropos(
        a=native,
        x=mask,
        i=priors,
        m=f"[{mrf},{radius}]",
        c=f"[{iterations},0]",
        priorweight=prior_weight,
    )
    probs = list(result["probabilityimages"])
    if len(probs) != 3:
        raise SegmentationError(f"Atropos returned {len(probs)} classes, expected 3")
    m = mask.numpy() > 0
    return [p.new_image_like(np.where(m, p.numpy(), 0.0).astype(np.float32)) for p in probs]


def _normalised_priors(priors: list[ants.ANTsImage], m: NDArray[np.bool_]) -> NDArray[np.float32]:
    pr = np.stack([np.clip(p.numpy()[m], 0.0, None) for p in priors], axis=1).astype(np.float32)
    total = pr.sum(axis=1, keepdims=True)
    # voxels no prior covers (mask beyond the template's brain) start as "any class"
    return np.where(total > 1e-3, pr / np.maximum(total, 1e-3), np.float32(1.0 / 3.0))


class _Outlier:
    """The outlier class: a uniform density (``density``, in the units of the unnormalised
    Gaussians ``exp(-d^2 / 2 var) / sqrt(var)``) with a share refitted at every E-step;
    ``last`` holds the latest outlier posteriors."""

    def __init__(self, density: float, share: float) -> None:
        self.density = np.float32(density)
        self.share = share
        self.last: NDArray[np.float32] = np.zeros(0, dtype=np.float32)

    def posteriors(
        self, y: NDArray[np.float32], mu: NDArray[np.float32], var: NDArray[np.float32], mix: Any
    ) -> NDArray[np.float32]:
        """Normalised class posteriors ``mix * N(y; mu, var)`` (voxels x classes), the outlier
        class beside them (its posteriors in ``last``): they sum to 1 - ``last``."""
        d = y[:, None] - mu
        p = np.exp(-0.5 * d * d / var) * ((1.0 - self.share) * mix / np.sqrt(var))
        po = np.float32(self.share) * self.density
        total = np.maximum(p.sum(axis=1) + po, np.float32(1e-30))
        p /= total[:, None]
        self.last = (po / total).astype(np.float32)
        self.share = float(self.last.mean())
        out: NDArray[np.float32] = p.astype(np.float32)
        return out


def _moments(
    post: NDArray[np.float32], y: NDArray[np.float32]
) -> tuple[NDArray[np.float64], NDArray[np.float32], NDArray[np.float32]]:
    nk = np.maximum(post.sum(axis=0, dtype=np.float64), 1e-6)
    mu = ((post.T @ y) / nk).astype(np.float32)
    d = y[:, None] - mu
    var = np.einsum("ij,ij->j", post, d * d, dtype=np.float64) / nk
    floor = 1e-4 * float(np.var(mu)) + 1e-6
    return nk, mu, np.maximum(var, floor).astype(np.float32)


def em(
    native: ants.ANTsImage,
    mask: ants.ANTsImage,
    priors: list[ants.ANTsImage],
    prior_weight: float = 0.25,
    max_iterations: int = 15,
    tol: float = 1e-3,
    compartments: NDArray[np.integer[Any]] | None = None,
    gm_var_cap: float | None = GM_VARIANCE_CAP,
) -> list[ants.ANTsImage]:
    """Tissue fractions (CSF, GM, WM; zero outside the mask), fitted by :func:`em_fractions`
    in each compartment on its own: ``compartments`` (an integer map on ``native``'s grid;
    0 = cerebrum and the rest, 1 = cerebellum). The cerebellum's tissues have intensities of
    their own (on the shared UIH head, one GM class for both made the cerebrum's GM class so
    wide that it took in the cortex's partial volume with CSF). The GM variance cap applies
    to compartment 0 only (deep grey is there; the cerebellum's folia are thinner than a
    voxel, so its GM class is mostly partial volume). Compartment 0 is fitted first; every
    other compartment's pure-class variances are held to at most compartment 0's: the noise
    is the same over the brain, and the cerebellum holds too few pure WM and CSF voxels to
    measure their spread (on the IR-FSPGR axial phantom its WM class widened to 2.4 x the
    cerebrum's SD, took in the GM/WM boundary and moved its mean into it: cerebellar GM
    -12 / -16 %; tied, -4.2 / -8.1 %)."""
    m = mask.numpy() > 0
    if m.sum() < 1000:
        raise SegmentationError("the brain mask is (nearly) empty")
    y = native.numpy()[m].astype(np.float32)
    pr = _normalised_priors(priors, m)
    parts = np.zeros(int(m.sum()), dtype=np.int64) if compartments is None else compartments[m]
    fractions = np.zeros((3, y.size), dtype=np.float32)
    for part in np.unique(parts):
        sel = parts == part
        if sel.sum() < 1000:  # too few voxels to fit: join the main compartment
            parts[sel] = 0
    main: NDArray[np.float32] | None = None
    for part in np.unique(parts):  # sorted: compartment 0 first
        sel = parts == part
        fitted: dict[str, Any] = {}
        fractions[:, sel] = em_fractions(
            y[sel],
            pr[sel],
            prior_weight,
            max_iterations,
            tol,
            gm_var_cap if part == 0 else None,
            CSF_VARIANCE_CAP if part == 0 else None,
            var_max=main,
            fitted=fitted,
        )
        if part == 0:
            main = fitted["var"]
    out = []
    for frac in fractions:
        arr = np.zeros(m.shape, dtype=np.float32)
        arr[m] = frac
        out.append(native.new_image_like(arr))
    return out


def em_fractions(
    y: NDArray[np.float32],
    pr: NDArray[np.float32],
    prior_weight: float = 0.25,
    max_iterations: int = 15,
    tol: float = 1e-3,
    gm_var_cap: float | None = None,
    csf_var_cap: float | None = CSF_VARIANCE_CAP,
    var_max: NDArray[np.float32] | None = None,
    fitted: dict[str, Any] | None = None,
) -> NDArray[np.float32]:
    """Tissue fractions (3 x voxels: CSF, GM, WM) of intensities ``y`` with priors ``pr``
    (voxels x 3) by a Gaussian mixture, then a partial-volume (mixel) model.
    Deterministic: initialised from the priors, no random sampling. Beside the classes, an
    outlier class of uniform density over ``y``'s range (:data:`OUTLIER_START`); an outlier
    voxel counts by its intensity's unmixing between the two nearest class means. The pure
    classes' variances are held to ``var_max`` (per class, if given), GM's to
    ``gm_var_cap`` x WM's and CSF's to ``csf_var_cap`` x WM's (if given); ``fitted``, if
    given, receives the final means, the variances measured from the last pure posteriors
    (before the caps) and the outlier share.

    1. Three pure classes, each voxel's class probability ``(1 - w) * pi_k + w * prior_k``
       (``w`` = ``prior_weight``), fitted by EM: the class means and variances.
    2. Five classes: the three pure ones and the CSF/GM and GM/WM mixtures, whose intensity
       is a uniform mix of the two pure means (mean halfway, variance the pure ones' plus
       the spread of the mix); the pure means and variances are refitted from the pure
       posteriors only, so boundary voxels no longer widen the GM class. A mixture voxel
       counts by its linear unmixing ``alpha = (y - mu_b) / (mu_a - mu_b)``.
    Without step 2, boundary voxels between GM and WM intensity were counted mostly as GM
    (GM +9.5 % on a phantom with truth; an +8 % frontal change measured +4.9 % to +5.8 %);
    with it, +5.9 % and +6.1 % to +6.8 %, and a change in one region leaks less into
    the others (occipital -2.1 % -> -0.2 %)."""
    span = max(float(y.max() - y.min()), 1e-6)
    outlier = _Outlier(float(np.sqrt(2.0 * np.pi)) / span, OUTLIER_START)

    def capped(var: NDArray[np.float32]) -> NDArray[np.float32]:
        if var_max is not None:
            var = np.minimum(var, var_max).astype(np.float32)
        if gm_var_cap is not None:
            var[1] = min(var[1], gm_var_cap * var[2])
        if csf_var_cap is not None:
            var[0] = min(var[0], csf_var_cap * var[2])
        return var

    post = pr.copy()
    for _ in range(max_iterations):
        nk, mu, var = _moments(post, y)
        if var_max is not None:
            var = np.minimum(var, var_max).astype(np.float32)
        mix = (1.0 - prior_weight) * (nk / nk.sum()).astype(np.float32) + prior_weight * pr
        new = outlier.posteriors(y, mu, var, mix)
        change = float(np.abs(new - post).mean())
        post = new
        if change < tol:
            break
    if not (mu[0] < mu[1] < mu[2]):
        raise SegmentationError(
            "tissue intensities are not in T1 order (CSF < GM < WM): "
            + ", ".join(f"{c} {v:.4g}" for c, v in zip(CLASSES, mu, strict=True))
        )
    # step 2: the mixel model; mixtures take the geometric mean of their two priors
    pr5 = np.concatenate(
        [pr, np.sqrt(pr[:, 0:1] * pr[:, 1:2]), np.sqrt(pr[:, 1:2] * pr[:, 2:3])], axis=1
    )
    pi = np.full(5, 0.2, dtype=np.float32)
    for _ in range(max_iterations):
        var = capped(var)
        mu5 = np.array([*mu, (mu[0] + mu[1]) / 2, (mu[1] + mu[2]) / 2], dtype=np.float32)
        var5 = np.array(
            [
                *var,
                (var[0] + var[1]) / 2 + (mu[1] - mu[0]) ** 2 / 12,
                (var[1] + var[2]) / 2 + (mu[2] - mu[1]) ** 2 / 12,
            ],
            dtype=np.float32,
        )
        post5 = outlier.posteriors(y, mu5, var5, (1.0 - prior_weight) * pi + prior_weight * pr5)
        nk5 = post5.sum(axis=0, dtype=np.float64)
        pi = (nk5 / nk5.sum()).astype(np.float32)
        _, new_mu, var = _moments(post5[:, :3], y)
        change = float(np.abs(new_mu - mu).max() / max(float(mu[2] - mu[0]), 1e-6))
        mu = new_mu
        if change < tol or not (mu[0] < mu[1] < mu[2]):
            break
    if not (mu[0] < mu[1] < mu[2]):
        raise SegmentationError("tissue intensities left T1 order in the partial-volume fit")
    if fitted is not None:
        fitted.update(mu=mu, var=var, outlier=outlier.share)
    csf_in_cg = np.clip((y - mu[1]) / (mu[0] - mu[1]), 0.0, 1.0)
    gm_in_gw = np.clip((y - mu[2]) / (mu[1] - mu[2]), 0.0, 1.0)
    # an outlier voxel counts by its intensity alone: below the CSF mean CSF, above the WM
    # mean WM, between two means their linear unmixing (the outlier class keeps such voxels
    # out of the classes' means and variances; it does not decide what they are)
    out = outlier.last
    fractions: NDArray[np.float32] = np.stack(
        [
            post5[:, 0] + (post5[:, 3] + out) * csf_in_cg,
            post5[:, 1]
            + post5[:, 3] * (1.0 - csf_in_cg)
            + out * (1.0 - csf_in_cg) * gm_in_gw
            + post5[:, 4] * gm_in_gw,
            post5[:, 2] + (post5[:, 4] + out) * (1.0 - gm_in_gw),
        ]
    ).astype(np.float32)
    return fractions


def crop_to_mask(
    img: ants.ANTsImage, mask: ants.ANTsImage, margin: int = 2
) -> tuple[ants.ANTsImage, ants.ANTsImage, tuple[slice, ...]]:
    """``img`` and ``mask`` cropped to the mask's bounding box plus ``margin`` voxels, and the
    index slices of the box in the full grid. Atropos on the box gives the same posteriors
    as on the whole image in about two thirds of the time (1.2 mm head: 34 s -> 23 s)."""
    m = mask.numpy() > 0
    if not m.any():
        raise SegmentationError("the brain mask is empty")
    nz = np.argwhere(m)
    lo = np.maximum(nz.min(axis=0) - margin, 0)
    hi = np.minimum(nz.max(axis=0) + 1 + margin, m.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    cropped = ants.crop_indices(img, lo.tolist(), hi.tolist())
    # Atropos reads the priors back from NIfTI files (float32 origin): round the origin the
    # same way, or ITK finds the images "not in the same physical space"
    cropped.set_origin(tuple(float(np.float32(v)) for v in cropped.origin))
    cmask = cropped.new_image_like(np.ascontiguousarray(m[box]).astype(np.float32))
    return cropped, cmask, box


def segment(
    n4_path: str | Path,
    mask_path: str | Path,
    reg: Registration,
    out_dir: str | Path,
    prior_weight: float = 0.25,
    iterations: int = 5,
    method: str = "em",
    compartments: NDArray[np.integer[Any]] | None = None,
) -> Segmentation:
    """Segment the bias-corrected image inside the brain mask (``method``: ``em``, with
    ``compartments`` fitted apart, see :func:`em`, or ``atropos``, whose ``iterations`` it
    takes); writes
    ``{csf,gm,wm}_prob.nii.gz`` (on the input's grid) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    native = read(n4_path)
    mask = ants.image_read(str(mask_path), pixeltype="float")
    box_img, box_mask, box = crop_to_mask(native, mask)
    priors = native_priors(box_img, reg)
    if method == "atropos":
        probs = atropos(box_img, box_mask, priors, prior_weight=prior_weight, iterations=iterations)
    elif method == "em":
        parts = None if compartments is None else np.ascontiguousarray(compartments[box])
        probs = em(box_img, box_mask, priors, prior_weight=prior_weight, compartments=parts)
    else:
        raise ValueError(f"unknown segmentation method {method!r}")
    paths = []
    for name, img in zip(CLASSES, probs, strict=True):
        full = np.zeros(native.shape, dtype=np.float32)
        full[box] = img.numpy()
        path = out / f"{name}_prob.nii.gz"
        ants.image_write(native.new_image_like(full), str(path))
        paths.append(str(path))
    return Segmentation(*paths)
