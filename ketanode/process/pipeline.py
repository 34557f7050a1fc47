"""One job, step by step: each step is a small function, timed and recorded as a JobStep row.

A step takes the :class:`~ketanode.process.context.JobContext`, reads the typed results of
the steps before it (``ctx.results``), keeps its own there and returns it; its ``as_dict()``
is stored with the step (``job_steps.detail``). The steps come in named sets
(:data:`CONVERSION`, :data:`MEASUREMENT`, :data:`SCORING`) that :func:`steps_for` chooses
from the settings; :data:`STEPS` is all of them, in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ketanode.config import Settings
from ketanode.db.jobqueue import finish
from ketanode.db.models import Instance, Job, JobStep, Series, utcnow
from ketanode.dicom.sop import PROCESSED_SOP_CLASSES
from ketanode.imaging import analysis
from ketanode.imaging.analysis import Measured, QCResult
from ketanode.imaging.convert import Volume, convert_series
from ketanode.imaging.preprocess import Preprocessed
from ketanode.imaging.qc import QCFailed
from ketanode.imaging.scratch import scratch_dir
from ketanode.imaging.segment import Segmentation
from ketanode.process import emit, predict
from ketanode.process.context import JobContext, need
from ketanode.process.emit import Reported
from ketanode.process.predict import Predicted
from ketanode.roots import spool_root

logger = logging.getLogger(__name__)


class StepResult(Protocol):
    """What a step returns: its ``as_dict()`` is stored with the step."""

    def as_dict(self) -> dict[str, Any]: ...


Step = Callable[[JobContext], StepResult]


def step_convert(ctx: JobContext) -> Volume:
    ctx.results.convert = convert_series(ctx.files, ctx.work_dir / "t1.nii.gz")
    return ctx.results.convert


def _measure_dir(ctx: JobContext) -> Path:
    return ctx.work_dir / "measure"


def _t1_path(ctx: JobContext) -> str:
    return need(ctx.results.convert, "convert").path


def step_qc_input(ctx: JobContext) -> QCResult:
    ctx.results.qc_input = analysis.step_qc_input(_t1_path(ctx), ctx.settings.pipeline.qc)
    return ctx.results.qc_input


def step_preprocess(ctx: JobContext) -> Preprocessed:
    ctx.results.preprocess = analysis.step_preprocess(
        _t1_path(ctx), _measure_dir(ctx), ctx.settings.pipeline
    )
    return ctx.results.preprocess


def step_qc_registration(ctx: JobContext) -> QCResult:
    pre = need(ctx.results.preprocess, "preprocess")
    ctx.results.qc_registration = analysis.step_qc_registration(pre, ctx.settings.pipeline.qc)
    return ctx.results.qc_registration


def step_segment(ctx: JobContext) -> Segmentation:
    pre = need(ctx.results.preprocess, "preprocess")
    ctx.results.segment = analysis.step_segment(pre, _measure_dir(ctx), ctx.settings.pipeline)
    return ctx.results.segment


def step_measure(ctx: JobContext) -> Measured:
    ctx.results.measure = analysis.step_measure(
        need(ctx.results.preprocess, "preprocess"), need(ctx.results.segment, "segment")
    )
    return ctx.results.measure


def step_qc(ctx: JobContext) -> QCResult:
    """All QC checks; a failed check fails the job with the checks as its reason."""
    ctx.results.qc = analysis.step_qc(
        _t1_path(ctx),
        need(ctx.results.preprocess, "preprocess"),
        need(ctx.results.segment, "segment"),
        need(ctx.results.measure, "measure"),
        ctx.settings.pipeline.qc,
    )
    return ctx.results.qc


def step_predict(ctx: JobContext) -> Predicted:
    """The model's prediction from the measured features, stored as a prediction row."""
    assert ctx.sessions is not None
    measured = need(ctx.results.measure, "measure")
    ctx.results.predict = predict.predict_job(
        ctx.sessions,
        ctx.settings.model,
        job_id=ctx.job_id,
        series_id=ctx.series_id,
        feature_spec_sha256=measured.spec.sha256,
        names=measured.names,
        vector=measured.vector,
        hold=ctx.hold_lease,
    )
    return ctx.results.predict


def step_report(ctx: JobContext) -> Reported:
    """The result row, the SR and the report image on disk, their outbox rows: one commit."""
    return emit.report_scored(ctx)


#: The series as a NIfTI volume: the node always does this.
CONVERSION: list[tuple[str, Step]] = [("convert", step_convert)]
#: Quality control and regional volumes (``pipeline.measure``).
MEASUREMENT: list[tuple[str, Step]] = [
    ("qc_input", step_qc_input),
    ("preprocess", step_preprocess),
    ("qc_registration", step_qc_registration),
    ("segment", step_segment),
    ("measure", step_measure),
    ("qc", step_qc),
]
#: The prediction and the report to the PACS (SR, report image, outbox; ``model.predict``).
SCORING: list[tuple[str, Step]] = [("predict", step_predict), ("report", step_report)]
#: Every step, in order.
STEPS: list[tuple[str, Step]] = CONVERSION + MEASUREMENT + SCORING


def _context(
    sessions: sessionmaker[Session],
    settings: Settings,
    job_id: int,
    owner: str | None = None,
    attempt: int | None = None,
) -> JobContext:
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        series = session.get(Series, job.series_id)
        assert series is not None
        paths = session.scalars(
            select(Instance.spool_path)
            .where(
                Instance.series_id == series.id, Instance.sop_class_uid.in_(PROCESSED_SOP_CLASSES)
            )
            .order_by(Instance.instance_number, Instance.id)
        ).all()
        spool = spool_root(settings)
        work_dir = settings.pipeline.work_dir.resolve() / f"series-{series.id}" / f"job-{job.id}"
        return JobContext(
            job_id=job.id,
            attempt=job.attempt if attempt is None else attempt,
            series_id=series.id,
            work_dir=work_dir,
            files=[spool.resolve(p) for p in paths],
            settings=settings,
            sessions=sessions,
            owner=owner,
        )


def _record_step(
    sessions: sessionmaker[Session],
    ctx: JobContext,
    name: str,
    ok: bool,
    seconds: float,
    detail: dict[str, Any] | None,
    error: str | None,
) -> None:
    with sessions.begin() as session:
        session.add(
            JobStep(
                job_id=ctx.job_id,
                attempt=ctx.attempt,
                name=name,
                ok=ok,
                seconds=round(seconds, 4),
                started_at=utcnow(),
                detail=detail,
                error=error,
            )
        )


def steps_for(settings: Settings) -> list[tuple[str, Step]]:
    """The node's steps: conversion, then measurement when ``pipeline.measure`` is on, then
    prediction and the report (SR, report image, outbox) when ``model.predict`` is on too."""
    if not settings.pipeline.measure:
        return list(CONVERSION)
    return CONVERSION + MEASUREMENT + (SCORING if settings.model.predict else [])


def _report_not_scored(
    sessions: sessionmaker[Session], ctx: JobContext, step: str, exc: Exception
) -> None:
    """Quality control stopped the job, or no model is active: report "NOT SCORED" and why
    (recorded as the ``report`` step). A failure here is logged and recorded; the job keeps
    its reason."""
    started = time.perf_counter()
    try:
        detail = emit.report_not_scored(ctx, step, exc).as_dict()
    except Exception as report_exc:
        seconds = time.perf_counter() - started
        logger.exception("job %s: could not report the QC failure", ctx.job_id)
        error = f"{type(report_exc).__name__}: {report_exc}"
        _record_step(sessions, ctx, "report", False, seconds, None, error[:4000])
        return
    _record_step(sessions, ctx, "report", True, time.perf_counter() - started, detail, None)


def run_job(
    sessions: sessionmaker[Session],
    settings: Settings,
    job_id: int,
    owner: str,
    steps: list[tuple[str, Step]] | None = None,
    attempt: int | None = None,
) -> bool:
    """Run every step of a claimed job; returns True when all succeeded. Never raises.
    ``attempt``: the one the claim started (else the job row's, read when the job starts)."""
    try:
        ctx = _context(sessions, settings, job_id, owner, attempt)
    except Exception as exc:
        logger.exception("job %s: cannot prepare", job_id)
        finish(
            sessions,
            job_id,
            owner,
            ok=False,
            failed_step="prepare",
            error=str(exc),
            attempt=attempt,
        )
        return False
    logger.info(
        "job %s (series row %s, attempt %s): %d files",
        job_id,
        ctx.series_id,
        ctx.attempt,
        len(ctx.files),
    )
    chosen = steps or steps_for(settings)
    # every temporary file a library writes stays in the job's folder, removed at the end
    with scratch_dir(ctx.work_dir / "tmp"):
        return _run_steps(sessions, settings, ctx, owner, chosen)


def _run_steps(
    sessions: sessionmaker[Session],
    settings: Settings,
    ctx: JobContext,
    owner: str,
    chosen: list[tuple[str, Step]],
) -> bool:
    job_id = ctx.job_id
    reports = settings.reports.not_scored and any(n == "report" for n, _ in chosen)
    for name, fn in chosen:
        started = time.perf_counter()
        try:
            detail = fn(ctx).as_dict()
        except Exception as exc:
            seconds = time.perf_counter() - started
            # a QC failure reads as itself ("QC failed: ..."); anything else names its type
            error = str(exc) if isinstance(exc, QCFailed) else f"{type(exc).__name__}: {exc}"
            logger.warning(
                "job %s: step %s failed after %.2f s: %s", job_id, name, seconds, type(exc).__name__
            )
            _record_step(sessions, ctx, name, False, seconds, None, error[:4000])
            if reports and isinstance(exc, QCFailed | predict.NoModel):
                _report_not_scored(sessions, ctx, name, exc)
            finish(
                sessions,
                job_id,
                owner,
                ok=False,
                failed_step=name,
                error=error[:4000],
                attempt=ctx.attempt,
            )
            return False
        seconds = time.perf_counter() - started
        _record_step(sessions, ctx, name, True, seconds, detail, None)
        logger.info("job %s: step %s done in %.2f s", job_id, name, seconds)
    return finish(sessions, job_id, owner, ok=True, attempt=ctx.attempt)
