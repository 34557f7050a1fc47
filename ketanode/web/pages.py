"""The dashboard's pages (server-rendered, read-only): results, one result with its report
image, ignored series, jobs, the dispatch outbox, plots, and the audit trail (admins).

Lists never show patient identifiers. The result page shows the patient ID (not the name,
birth date or accession number) to the logged-in user, and records a RESULT_VIEW audit
event, as does fetching the report image.
"""

from __future__ import annotations

import datetime as dt
import logging
from io import BytesIO
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ketanode.admin.audit import AuditKind, event_kinds, list_events, record_now
from ketanode.db import queries as db_queries
from ketanode.db import results as db_results
from ketanode.db.models import (
    DispatchState,
    EmittedObject,
    Job,
    JobState,
    ObjectKind,
    OutboxItem,
    Result,
    Series,
    SeriesState,
)
from ketanode.db.results import ResultFilter
from ketanode.roots import reports_root
from ketanode.web import plots, queries
from ketanode.web.auth import WebUser, admin_user, api_user, client_address, page_user
from ketanode.web.context import context_of, render

logger = logging.getLogger(__name__)

router = APIRouter()

PageUser = Annotated[WebUser, Depends(page_user)]
ApiUser = Annotated[WebUser, Depends(api_user)]
AdminUser = Annotated[WebUser, Depends(admin_user)]
Limit = Annotated[int, Query(ge=1, le=1000)]

PLOT_DAYS = 30
INGEST_HOURS = 48
PLOTS = {
    "results-per-day": "Results per day",
    "probability": "Probability distribution",
    "step-times": "Processing time per step",
    "ingest": "Ingest rate",
}
NO_STORE = {"Cache-Control": "no-store"}


def _session(request: Request) -> Session:
    return context_of(request).sessions()


def _blank(value: str | None) -> str | None:
    return value or None


@router.get("/", include_in_schema=False)
def home(user: PageUser) -> Response:
    return RedirectResponse("/results", status_code=303)


@router.get("/results", include_in_schema=False)
def results_page(
    request: Request,
    user: PageUser,
    status: str | None = None,
    current: bool = False,
    limit: Limit = 100,
) -> Response:
    with _session(request) as session:
        rows = db_results.list_results(
            session, ResultFilter(status=_blank(status), current_only=current), limit=limit
        )
        counts = db_queries.counts_by(session, Result.status)
    return render(
        request,
        "results.html",
        user=user,
        rows=rows,
        counts=counts,
        status=status or "",
        current=current,
        limit=limit,
    )


@router.get("/api/results", include_in_schema=False)
def results_json(
    request: Request,
    user: ApiUser,
    status: str | None = None,
    current: bool = False,
    limit: Limit = 100,
) -> list[dict[str, Any]]:
    """The results list as JSON (no patient identifiers)."""
    with _session(request) as session:
        return db_results.list_results(
            session, ResultFilter(status=_blank(status), current_only=current), limit=limit
        )


def _result_or_404(session: Session, result_id: int) -> Result:
    found = session.get(Result, result_id)
    if found is None:
        raise HTTPException(status_code=404, detail=f"no result {result_id}")
    return found


@router.get("/results/{result_id}", include_in_schema=False)
def result_page(request: Request, result_id: int, user: PageUser) -> Response:
    ctx = context_of(request)
    with _session(request) as session:
        result = _result_or_404(session, result_id)
        detail = db_results.result_detail(
            session, result, with_patient=False, reports=reports_root(ctx.settings)
        )
        patient_id = queries.patient_id_of_result(session, result_id)
        has_image = any(
            o["kind"] == ObjectKind.REPORT_IMAGE and not o["purged_at"] for o in detail["objects"]
        )
    record_now(
        ctx.sessions,
        AuditKind.RESULT_VIEW,
        user.username,
        subject=f"result:{result_id}",
        address=client_address(request),
        detail={"view": "page"},
    )
    contributions = sorted(
        ((str(k), float(v)) for k, v in (detail.get("contributions") or {}).items()),
        key=lambda kv: -abs(kv[1]),
    )
    return render(
        request,
        "result.html",
        user=user,
        r=detail,
        patient_id=patient_id,
        has_image=has_image,
        contributions=contributions,
        volumes=sorted((detail.get("volumes") or {}).items()),
    )


def _png_of_dicom(path: Path) -> bytes:
    """The Secondary Capture's pixels as PNG (when the PNG copy is missing)."""
    import numpy as np
    from PIL import Image
    from pydicom import dcmread

    ds = dcmread(str(path))
    pixels = np.asarray(ds.pixel_array)
    if pixels.dtype != np.uint8:
        pixels = pixels.astype(np.float64)
        span = float(pixels.max() - pixels.min()) or 1.0
        pixels = ((pixels - pixels.min()) / span * 255).astype(np.uint8)
    mode = "RGB" if pixels.ndim == 3 and pixels.shape[-1] == 3 else "L"
    buf = BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@router.get("/results/{result_id}/report.png", include_in_schema=False)
def report_image(request: Request, result_id: int, user: ApiUser) -> Response:
    """The report page as PNG: the copy written next to the SC's .dcm, else its pixels."""
    with _session(request) as session:
        _result_or_404(session, result_id)
        path = session.scalar(
            select(EmittedObject.path)
            .where(
                EmittedObject.result_id == result_id,
                EmittedObject.kind == ObjectKind.REPORT_IMAGE,
            )
            .order_by(EmittedObject.id.desc())
            .limit(1)
        )
    if path is None:
        raise HTTPException(status_code=404, detail="this result has no report image")
    dcm = reports_root(context_of(request).settings).resolve(path)
    png = dcm.with_suffix(".png")
    response: Response
    if png.is_file():
        response = FileResponse(png, media_type="image/png", headers=NO_STORE)
    elif dcm.is_file():
        try:
            response = Response(_png_of_dicom(dcm), media_type="image/png", headers=NO_STORE)
        except Exception as exc:
            logger.warning(
                "report image of result %s could not be rendered (%s)",
                result_id,
                type(exc).__name__,
            )
            raise HTTPException(status_code=500, detail="report image unreadable") from exc
    else:
        raise HTTPException(status_code=404, detail="the report image file was removed")
    record_now(
        context_of(request).sessions,
        AuditKind.RESULT_VIEW,
        user.username,
        subject=f"result:{result_id}",
        address=client_address(request),
        detail={"view": "report_image"},
    )
    return response


@router.get("/series", include_in_schema=False)
def series_page(
    request: Request,
    user: PageUser,
    state: str = SeriesState.IGNORED,
    limit: Limit = 100,
) -> Response:
    with _session(request) as session:
        rows = db_queries.list_series(session, state=_blank(state), limit=limit)
        counts = db_queries.counts_by(session, Series.state)
    return render(
        request,
        "series.html",
        user=user,
        rows=rows,
        counts=counts,
        state=state,
        states=[str(s) for s in SeriesState],
    )


@router.get("/jobs", include_in_schema=False)
def jobs_page(
    request: Request,
    user: PageUser,
    state: str | None = None,
    limit: Limit = 100,
) -> Response:
    with _session(request) as session:
        rows = db_queries.list_jobs(session, state=_blank(state), limit=limit)
        descriptions = queries.job_series(session, [int(r["id"]) for r in rows])
        counts = db_queries.counts_by(session, Job.state)
    for row in rows:
        row["series_description"] = descriptions.get(int(row["id"]))
        current = [s for s in row["steps"] if s["attempt"] == row["attempt"]]
        row["current_steps"] = current or row["steps"]
        row["total_seconds"] = sum(float(s["seconds"]) for s in row["current_steps"])
    return render(
        request,
        "jobs.html",
        user=user,
        rows=rows,
        counts=counts,
        state=state or "",
        states=[str(s) for s in JobState],
    )


@router.get("/outbox", include_in_schema=False)
def outbox_page(
    request: Request,
    user: PageUser,
    state: str | None = None,
    destination: str | None = None,
    limit: Limit = 100,
) -> Response:
    with _session(request) as session:
        rows = db_results.list_outbox(
            session, state=_blank(state), destination=_blank(destination), limit=limit
        )
        summary: dict[str, dict[str, int]] = {}
        for dest, row_state, n in session.execute(
            select(OutboxItem.destination, OutboxItem.state, func.count())
            .group_by(OutboxItem.destination, OutboxItem.state)
            .order_by(OutboxItem.destination)
        ).all():
            summary.setdefault(str(dest), {})[str(row_state)] = int(n)
    return render(
        request,
        "outbox.html",
        user=user,
        rows=rows,
        summary=summary,
        state=state or "",
        destination=destination or "",
        states=[str(s) for s in DispatchState],
    )


@router.get("/audit", include_in_schema=False)
def audit_page(
    request: Request,
    user: AdminUser,
    kind: str | None = None,
    limit: Limit = 200,
) -> Response:
    with _session(request) as session:
        events = list_events(session, kind=_blank(kind), limit=limit)
        kinds = event_kinds(session)
    return render(request, "audit.html", user=user, events=events, kinds=kinds, kind=kind or "")


@router.get("/plots", include_in_schema=False)
def plots_page(request: Request, user: PageUser) -> Response:
    return render(request, "plots.html", user=user, plots=PLOTS)


@router.get("/plots/{name}.svg", include_in_schema=False)
def plot_svg(request: Request, name: str, user: ApiUser) -> Response:
    if name not in PLOTS:
        raise HTTPException(status_code=404, detail=f"no plot {name}")
    with _session(request) as session:
        if name == "results-per-day":
            svg = plots.results_per_day(queries.results_per_day(session, PLOT_DAYS), PLOT_DAYS)
        elif name == "probability":
            svg = plots.probability_distribution(queries.probabilities(session))
        elif name == "step-times":
            svg = plots.step_times(queries.step_times(session, PLOT_DAYS), PLOT_DAYS)
        else:
            svg = plots.ingest_rate(
                queries.ingest(session, "hour", INGEST_HOURS / 24),
                queries.ingest(session, "day", PLOT_DAYS),
                INGEST_HOURS,
                PLOT_DAYS,
                now=dt.datetime.now(dt.UTC),
            )
    return Response(svg, media_type="image/svg+xml", headers=NO_STORE)
