"""What goes back to PACS for one job: the result row, the SR and the report image on disk,
and one outbox row per object per destination, committed in one transaction.

Two entry points, both run in the job's process:

- :func:`report_scored`: the pipeline's last step, after a prediction;
- :func:`report_not_scored`: when quality control stopped the job, or no model was there to
  score it (:class:`ketanode.process.predict.NoModel`: the radiologist then sees "NOT SCORED" and
  why in the study, instead of nothing).

A job reports at most once: when its result row exists (the job ran again after a crash
between the commit and the end of the job), the stored result is returned as it is, so the
PACS never receives two different SRs for one job. The files are written durably (write,
fsync, link, fsync the directory; :class:`ketanode.spool.Spool`) before the rows that
point at them are committed; a crash in between leaves an orphan file, never a row without
its file.

A job reports only while its worker still holds the job's lease: the commit begins with the
conditional UPDATE of the claim (this owner, this attempt, still running). A worker that was
paused (a stopped VM, a long stall) while the recovery sweep gave the job to another worker
finds its lease gone, writes no row and removes the files it wrote
(:class:`ketanode.db.jobqueue.LeaseLost`); the job's new owner reports it. The UPDATE holds
the job's row until the commit, so no claim can take the job between the check and the
result.

Every completed T1 series gets an answer in its study: the builders copy only what is valid
of the source header (:mod:`ketanode.report.source_header`; the keywords left empty are in
the step's output as ``source_header_dropped``), and when the SR or the report image still
cannot be built (or the source headers cannot be read), a minimal "NOT SCORED: report could
not be built" SR (:mod:`ketanode.report.minimal_sr`) is sent instead, with the source's UIDs;
its result row has the status ``report_failed`` (counted by ``/metrics`` as
``ketanode_results_total{status="report_failed"}``).
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from sqlalchemy import select, update
from sqlalchemy.orm import Session

import ketanode
from ketanode.db.jobqueue import LeaseLost
from ketanode.db.models import (
    DispatchState,
    EmittedObject,
    Instance,
    Job,
    JobStep,
    ModelRecord,
    ObjectKind,
    OutboxItem,
    Result,
    ResultStatus,
    Series,
    Study,
    utcnow,
)
from ketanode.imaging.atlas import region_names_of_default_atlas
from ketanode.imaging.features import default_spec
from ketanode.imaging.qc import QCFailed
from ketanode.process.context import JobContext, need
from ketanode.report.content import ResultForReport
from ketanode.roots import reports_root
from ketanode.spool import Spool, SpooledFile

logger = logging.getLogger(__name__)


def _source_headers(ctx: JobContext) -> list[Dataset]:
    return [dcmread(str(f), stop_before_pixels=True) for f in ctx.files]


def _source_uids(ctx: JobContext) -> list[Dataset]:
    """The series' instances as the database knows them (UIDs only): the source of the
    minimal SR when the headers themselves cannot be read."""
    assert ctx.sessions is not None
    with ctx.sessions() as session:
        rows = session.execute(
            select(
                Instance.sop_class_uid,
                Instance.sop_instance_uid,
                Series.series_uid,
                Study.study_uid,
            )
            .join(Series, Instance.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
            .where(Instance.series_id == ctx.series_id)
            .order_by(Instance.instance_number, Instance.id)
        ).all()
    out = []
    for sop_class, sop_instance, series_uid, study_uid in rows:
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, study_uid
        out.append(ds)
    return out


def _where(exc: BaseException) -> str:
    """Where an exception was raised (file:line function, innermost first), not its text,
    which may quote a value of the header."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in frames[::-1])


def _build(
    ctx: JobContext, report: ResultForReport
) -> tuple[list[tuple[str, Dataset]], list[str], str | None]:
    """The objects to send (SR and report image; or the minimal SR alone), the source
    keywords left empty, and why the report could not be built (None: it was)."""
    from ketanode.report.minimal_sr import build_minimal_sr
    from ketanode.report.secondary_capture import build_report_image
    from ketanode.report.source_header import clean_source_header
    from ketanode.report.sr import build_sr

    source: list[Dataset] = []
    try:
        source = _source_headers(ctx)
        dropped = list(clean_source_header(source[0]).blanked) if source else []
        sr = build_sr(source, report)
        sc = build_report_image(source, report)
        for ds in (sr, sc):  # the files must be writable too
            ds.save_as(BytesIO(), enforce_file_format=True)
        return [(ObjectKind.SR, sr), (ObjectKind.REPORT_IMAGE, sc)], dropped, None
    except Exception as exc:
        cause = type(exc).__name__
        logger.error(
            "job %s: the report could not be built (%s at %s); sending a minimal NOT SCORED SR",
            ctx.job_id,
            cause,
            _where(exc),
        )
    if not source:
        source = _source_uids(ctx)
    minimal = build_minimal_sr(
        source,
        cause=cause,
        reason=report.not_scored_reason,
        software_version=report.software_version,
    )
    return [(ObjectKind.SR, minimal)], ["*"], cause


def _model_version(session: Session, sha256: str) -> str:
    meta = session.scalar(select(ModelRecord.model_metadata).where(ModelRecord.sha256 == sha256))
    meta = meta or {}
    return str(meta.get("version") or str(meta.get("created_at") or "")[:10] or "1")


def _qc_checks(ctx: JobContext) -> list[dict[str, Any]]:
    """Every QC check the job's QC steps recorded (the final QC repeats the header checks:
    the latest value of a check wins)."""
    by_name: dict[str, dict[str, Any]] = {}
    for qc in ctx.results.qc_steps():
        for check in qc.table():
            by_name[str(check["name"])] = dict(check)
    return list(by_name.values())


def _volumes(ctx: JobContext) -> dict[str, float]:
    meas = ctx.results.measure
    return meas.features() if meas is not None else {}


def _images(ctx: JobContext) -> dict[str, Any]:
    """The T1 the page draws (the preprocess step's bias-corrected head on the working grid,
    else the converted image), its brain mask, the GM map and the atlas territories (as the
    measure step wrote them), all on the working grid when preprocessing ran."""
    pre, seg, meas = ctx.results.preprocess, ctx.results.segment, ctx.results.measure
    conv = ctx.results.convert
    t1 = pre.n4_path if pre else conv.path if conv else None
    out: dict[str, Any] = {"t1_path": Path(t1) if t1 else None}
    if pre and pre.mask_path:  # the slices are cropped to the brain and placed in it
        out["brain_mask_path"] = Path(pre.mask_path)
    if seg:
        out["gm_path"] = Path(seg.gm_path)
    if meas and meas.territories_path:  # the measure step's native territory map
        out["territories_path"] = Path(meas.territories_path)
        out["region_names"] = tuple(region_names_of_default_atlas())
    return out


def _existing(session: Session, job_id: int) -> Result | None:
    return session.scalar(select(Result).where(Result.job_id == job_id))


@dataclass(frozen=True)
class Reported:
    """The report step's result: the result row and its objects (kind, UIDs, path), the
    destinations they are queued for, and the source header's keywords whose values were
    left empty (``["*"]``: all, minimal SR)."""

    source_header_dropped: list[str]
    result_id: int
    status: str
    predicted_class: str | None
    probability: float | None
    objects: list[dict[str, str]]
    destinations: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "source_header_dropped": list(self.source_header_dropped),
            "result_id": self.result_id,
            "status": self.status,
            "predicted_class": self.predicted_class,
            "probability": self.probability,
            "objects": [dict(o) for o in self.objects],
            "destinations": list(self.destinations),
        }


def summary(result: Result, dropped: list[str] | None = None) -> Reported:
    """The report step's result for a stored result row."""
    return Reported(
        source_header_dropped=list(dropped or []),
        result_id=result.id,
        status=result.status,
        predicted_class=result.predicted_class,
        probability=result.probability,
        objects=[
            {
                "kind": o.kind,
                "sop_instance_uid": o.sop_instance_uid,
                "series_uid": o.series_uid,
                "path": o.path,
            }
            for o in result.objects
        ],
        destinations=sorted({row.destination for o in result.objects for row in o.outbox}),
    )


def _job_seconds(session: Session, job_id: int, attempt: int) -> float:
    steps = session.scalars(
        select(JobStep.seconds).where(JobStep.job_id == job_id, JobStep.attempt == attempt)
    ).all()
    return round(float(sum(steps)), 3)


def _emit(ctx: JobContext, report: ResultForReport, prediction_id: int | None) -> Reported:
    assert ctx.sessions is not None
    settings = ctx.settings
    with ctx.sessions.begin() as session:
        done = _existing(session, ctx.job_id)
        if done is not None:
            logger.info(
                "job %s: result %s already recorded; not reported again", ctx.job_id, done.id
            )
            return summary(done)
        ctx.hold_lease(session)  # before the files: a worker that lost its job writes none
    from ketanode.report.secondary_capture import write_png

    started = time.perf_counter()
    objects, dropped, failed = _build(ctx, report)
    store = Spool(settings.reports.path, int(settings.spool.min_free_mb * 2**20))
    written: list[tuple[str, Dataset, SpooledFile]] = []
    for kind, ds in objects:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        f = store.store(
            buf.getvalue(), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), ds.SOPInstanceUID
        )
        written.append((kind, ds, f))
    if settings.reports.png and len(written) > 1:
        write_png(written[1][1], written[1][2].path.with_suffix(".png"))
    build_seconds = time.perf_counter() - started
    try:
        return _commit(ctx, report, prediction_id, written, dropped, failed, build_seconds)
    except LeaseLost:
        for _, _, f in written:  # no row points at them
            f.path.with_suffix(".png").unlink(missing_ok=True)
            store.discard(f.path)
        raise


def _commit(
    ctx: JobContext,
    report: ResultForReport,
    prediction_id: int | None,
    written: list[tuple[str, Dataset, SpooledFile]],
    dropped: list[str],
    failed: str | None,
    build_seconds: float,
) -> Reported:
    """The result row, its objects and their outbox rows: one transaction, which begins
    with the lease check."""
    assert ctx.sessions is not None
    settings = ctx.settings
    with ctx.sessions.begin() as session:
        ctx.hold_lease(session)
        job = session.get(Job, ctx.job_id)
        assert job is not None
        if failed is None:
            status = ResultStatus.SCORED if report.scored else ResultStatus.NOT_SCORED
            reason = report.not_scored_reason
        else:  # what the PACS got: NOT SCORED, no class, no probability
            status = ResultStatus.REPORT_FAILED
            reason = f"report could not be built ({failed})" + (
                f"; {report.not_scored_reason}" if report.not_scored_reason else ""
            )
        sent = failed is None
        result = Result(
            job_id=ctx.job_id,
            series_id=ctx.series_id,
            status=status,
            predicted_class=report.predicted_class if sent else None,
            probability=report.probability if sent else None,
            decision_value=report.decision_value if sent else None,
            prediction_id=prediction_id,
            model_sha256=report.model_sha256,
            model_name=report.model_name,
            model_synthetic=report.model_synthetic,
            model_label=report.model_label,
            qc_outcome=report.qc_outcome,
            reason=reason,
            qc_checks=[dict(c) for c in report.qc_checks],
            volumes=dict(report.volumes),
            contributions=dict(report.contributions),
            software_version=report.software_version,
            current=True,
            job_started_at=job.started_at,
            processing_seconds=round(
                _job_seconds(session, ctx.job_id, ctx.attempt) + build_seconds, 3
            ),
        )
        session.add(result)
        session.flush()
        session.execute(
            update(Result)
            .where(Result.series_id == ctx.series_id, Result.id != result.id)
            .values(current=False)
        )
        now = utcnow()
        reports = reports_root(settings)
        for kind, ds, f in written:
            obj = EmittedObject(
                result_id=result.id,
                kind=kind,
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                study_uid=str(ds.StudyInstanceUID),
                path=reports.stored(f.path),
                size_bytes=f.size,
                sha256=f.sha256,
            )
            session.add(obj)
            session.flush()
            for dest in settings.destinations:
                session.add(
                    OutboxItem(
                        object_id=obj.id,
                        destination=dest.name,
                        state=DispatchState.PENDING,
                        next_at=now,
                    )
                )
        session.flush()
        session.refresh(result)
        out = summary(result, dropped)
    logger.info(
        "job %s: result %s (%s) reported: %s, %d destinations",
        ctx.job_id,
        out.result_id,
        out.status,
        ", ".join(f"{kind} {ds.SOPInstanceUID}" for kind, ds, _ in written),
        len(settings.destinations),
    )
    return out


def report_scored(ctx: JobContext) -> Reported:
    """The pipeline's ``report`` step: the prediction, volumes, QC and model, as SR + page."""
    assert ctx.sessions is not None
    pred = need(ctx.results.predict, "predict")
    meas = need(ctx.results.measure, "measure")
    qc = need(ctx.results.qc, "qc")
    model = pred.model
    rule = pred.decision_rule or {}
    with ctx.sessions() as session:
        version = _model_version(session, model.sha256)
    report = ResultForReport(
        decision_threshold=rule.get("threshold"),
        indeterminate_margin=rule.get("margin"),
        training_response_rate=rule.get("training_response_rate"),
        predicted_class=pred.predicted_class,
        probability=float(pred.probability),
        decision_value=float(pred.decision_value),
        contributions=dict(pred.contributions),
        volumes=_volumes(ctx),
        qc_outcome=qc.outcome,
        qc_checks=_qc_checks(ctx),
        model_name=model.name,
        model_version=version,
        model_sha256=model.sha256,
        model_synthetic=bool(model.synthetic),
        model_label=model.label,
        feature_spec_name=meas.spec.name,
        feature_spec_sha256=meas.spec.sha256,
        software_version=ketanode.__version__,
        **_images(ctx),
    )
    return _emit(ctx, report, pred.prediction_id)


def report_not_scored(ctx: JobContext, step: str, exc: Exception) -> Reported:
    """A job stopped at ``step`` by quality control (:class:`QCFailed`) or for want of a
    model (``NoModel``, after QC passed): an SR and page saying "NOT SCORED" and why."""
    checks = _qc_checks(ctx)
    names = {c["name"] for c in checks}
    for check in exc.all_checks if isinstance(exc, QCFailed) else []:
        row = check.as_dict()
        if row["name"] in names:
            checks = [c for c in checks if c["name"] != row["name"]]
        checks.append(row)
    final_qc = ctx.results.qc
    qc_outcome = "fail" if isinstance(exc, QCFailed) else final_qc.outcome if final_qc else None
    spec = default_spec()
    report = ResultForReport(
        predicted_class=None,
        probability=None,
        decision_value=None,
        contributions={},
        volumes=_volumes(ctx),
        qc_outcome=qc_outcome or "pass",
        qc_checks=checks,
        model_name=None,
        model_version=None,
        model_sha256=None,
        model_synthetic=False,
        model_label=None,
        feature_spec_name=spec.name,
        feature_spec_sha256=spec.sha256,
        software_version=ketanode.__version__,
        not_scored_reason=str(exc),
        **_images(ctx),
    )
    logger.info("job %s: not scored (%s failed); reporting that", ctx.job_id, step)
    return _emit(ctx, report, None)
