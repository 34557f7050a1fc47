"""The measurement steps end to end, on one NIfTI file (used by the pipeline and the CLI).

Each ``step_*`` takes explicit inputs and returns a typed result (paths, numbers) whose
``as_dict()`` is what the node stores with the step: the converted volume
(:class:`~ketanode.imaging.convert.Volume`), :class:`QCResult` (the three QC steps),
:class:`~ketanode.imaging.preprocess.Preprocessed`,
:class:`~ketanode.imaging.segment.Segmentation` and :class:`Measured`. :func:`analyse` chains
them for ``ketanode measure`` and for researchers and returns a JSON-able dict::

    from ketanode.imaging.analysis import analyse
    result = analyse("t1.nii.gz", "out/")   # {"features": ..., "qc": ..., "seconds": ...}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ants
import numpy as np

from ketanode.config import PipelineSettings, QCSettings
from ketanode.imaging import qc as qcmod
from ketanode.imaging.features import FeatureSpec, default_spec
from ketanode.imaging.measure import (
    Measurement,
    cerebellar_labels,
    measure,
    native_territories,
)
from ketanode.imaging.preprocess import ImplausibleBrain, Preprocessed, preprocess, read
from ketanode.imaging.scratch import scratch_dir
from ketanode.imaging.segment import Segmentation, segment

T = TypeVar("T")


@dataclass(frozen=True)
class QCResult:
    """A QC step's checks and their overall outcome (fail, else warn, else pass)."""

    checks: tuple[qcmod.Check, ...]

    @property
    def outcome(self) -> qcmod.Outcome:
        return qcmod.outcome(self.checks)

    def table(self) -> list[dict[str, Any]]:
        """The checks as stored and reported (values rounded, NaN as None)."""
        return qcmod.table(self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "checks": self.table()}


@dataclass(frozen=True)
class Measured:
    """The measure step's result: the feature vector in the spec's order, the regional
    volumes it came from, and the native territory map (for the report page)."""

    spec: FeatureSpec
    vector: list[float]
    measurement: Measurement
    territories_path: str

    @property
    def names(self) -> list[str]:
        return list(self.spec.features)

    def features(self) -> dict[str, float]:
        return {str(k): float(v) for k, v in zip(self.names, self.vector, strict=True)}

    def as_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.as_dict(),
            "names": self.names,
            "vector": list(self.vector),
            "measurement": self.measurement.as_dict(),
            "territories_path": self.territories_path,
        }


def step_qc_input(t1_path: str | Path, qc: QCSettings) -> QCResult:
    """Header checks (voxel size, coverage); raises QCFailed before any heavy work."""
    checks = qcmod.geometry_checks(t1_path, qc)
    qcmod.raise_on_fail(checks)
    return QCResult(tuple(checks))


def step_preprocess(t1_path: str | Path, out_dir: Path, p: PipelineSettings) -> Preprocessed:
    """Working grid, brain extraction, N4, registration; raises QCFailed when the extracted
    brain's volume is outside the TIV limits (no head: nothing to register)."""
    try:
        pre = preprocess(
            t1_path,
            out_dir,
            p.registration,
            p.registration_resolution_mm,
            tuple(p.syn_iterations),
            p.grid_mm,
            p.qc.tiv_ml_fail,
            p.syn_resolution_mm,
        )
    except ImplausibleBrain as exc:
        raise qcmod.QCFailed([qcmod.brain_volume_check(exc.brain_ml, p.qc)]) from exc
    return pre


def _registration_checks(pre: Preprocessed, qc: QCSettings) -> list[qcmod.Check]:
    return qcmod.registration_checks(pre.mask_path, pre.registration, float(pre.brain_ml), qc)


def step_qc_registration(pre: Preprocessed, qc: QCSettings) -> QCResult:
    """Brain found, in the field of view, registered; raises QCFailed before segmentation."""
    checks = _registration_checks(pre, qc)
    qcmod.raise_on_fail(checks)
    return QCResult(tuple(checks))


def step_segment(pre: Preprocessed, out_dir: Path, p: PipelineSettings) -> Segmentation:
    """Tissue fractions; the native territory map is written first (``territories.nii.gz``
    next to the fractions), because the segmentation fits the cerebellum apart."""
    reg = pre.registration
    out_dir.mkdir(parents=True, exist_ok=True)
    terr = native_territories(reg, read(pre.n4_path))
    ants.image_write(terr, str(out_dir / "territories.nii.gz"))
    cerebellum = np.isin(np.rint(terr.numpy()).astype(np.int64), cerebellar_labels())
    return segment(
        pre.n4_path,
        pre.mask_path,
        reg,
        out_dir,
        p.prior_weight,
        p.atropos_iterations,
        p.segmentation,
        compartments=cerebellum.astype(np.int8),
    )


def step_measure(pre: Preprocessed, seg: Segmentation) -> Measured:
    """Regional volumes and the feature vector; the native territory map is kept next to
    the GM map (``territories_path``) for the report page."""
    terr = Path(seg.gm_path).parent / "territories.nii.gz"
    m = measure(seg, pre.registration, territories_path=terr)
    spec = default_spec()
    return Measured(spec, spec.vector(m), m, str(terr))


def step_qc(
    t1_path: str | Path,
    pre: Preprocessed,
    seg: Segmentation,
    meas: Measured,
    qc: QCSettings,
    raise_on_fail: bool = True,
) -> QCResult:
    """All checks (header, image, measurement); raises QCFailed when one fails."""
    checks = (
        qcmod.geometry_checks(t1_path, qc)
        + _registration_checks(pre, qc)
        + qcmod.tissue_checks(pre.n4_path, seg, qc)
        + qcmod.measurement_checks(meas.measurement, qc)
    )
    if raise_on_fail:
        qcmod.raise_on_fail(checks)
    return QCResult(tuple(checks))


def analyse(
    t1_path: str | Path, out_dir: str | Path, settings: PipelineSettings | None = None
) -> dict[str, Any]:
    """Run every step on a NIfTI file; never raises on QC failure (the result says so).
    The libraries' temporary files live in ``out_dir/tmp``, removed at the end."""
    with scratch_dir(Path(out_dir) / "tmp"):
        return _analyse(t1_path, Path(out_dir), settings or PipelineSettings())


def _analyse(t1_path: str | Path, out: Path, p: PipelineSettings) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    result: dict[str, Any] = {"input": str(t1_path), "seconds": seconds}

    def timed(name: str, fn: Callable[..., T], *args: Any) -> T:
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            seconds[name] = round(time.perf_counter() - t, 3)

    def failed(checks: list[qcmod.Check], exc: qcmod.QCFailed) -> dict[str, Any]:
        return result | {
            "qc": {"outcome": "fail", "checks": qcmod.table(checks)},
            "error": str(exc),
        }

    geometry = qcmod.geometry_checks(t1_path, p.qc)
    try:
        timed("qc_input", step_qc_input, t1_path, p.qc)
    except qcmod.QCFailed as exc:
        return failed(geometry, exc)
    try:
        pre = timed("preprocess", step_preprocess, t1_path, out, p)
    except qcmod.QCFailed as exc:
        return failed(geometry + exc.all_checks, exc)
    result["preprocess_seconds"] = pre.seconds
    try:
        timed("qc_registration", step_qc_registration, pre, p.qc)
    except qcmod.QCFailed as exc:
        return failed(geometry + exc.all_checks, exc)
    seg = timed("segment", step_segment, pre, out, p)
    meas = timed("measure", step_measure, pre, seg)
    qc = timed("qc", step_qc, t1_path, pre, seg, meas, p.qc, False)
    result |= {"features": meas.as_dict(), "qc": qc.as_dict()}
    if qc.outcome == "fail":  # the reason quotes the values as the table holds them
        result["error"] = str(qcmod.QCFailed([qcmod.Check(**_check(c)) for c in qc.table()]))
    return result


def _check(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    d["value"] = float("nan") if d["value"] is None else d["value"]
    return d


def analyse_path(
    path: str | Path, out_dir: str | Path, settings: PipelineSettings | None = None
) -> dict[str, Any]:
    """:func:`analyse` on a NIfTI file or a folder holding one DICOM series."""
    src, out = Path(path), Path(out_dir)
    if src.is_dir():
        from ketanode.imaging.convert import convert_series

        files = sorted(f for f in src.rglob("*") if f.is_file() and not f.name.startswith("."))
        src = Path(convert_series(files, out / "t1.nii.gz").path)
    return analyse(src, out, settings)
