"""``ketanode reprocess``: series already received, processed again (a new model) as batch
work, through the same queue as live scans but after them (docs/scaling.md).

A new job per series in the ``batch`` lane; the series keeps its current result until the
new job writes one. Running the same command again resumes: series whose current result
already comes from the model, and series with a job queued or running, are left out.
``--stop`` takes the batch's queued jobs out of the queue (running ones finish).
``--limit N`` queues at most N new jobs (the first series by row id); the same command
again queues the next ones.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased, sessionmaker

from ketanode.cli.common import console, err, sessions_for, settings_of
from ketanode.db.jobqueue import enqueue_batch, stop_batch
from ketanode.db.models import (
    Job,
    JobLane,
    JobState,
    ModelRecord,
    Result,
    Series,
    SeriesState,
)


def _day(text: str | None, option: str) -> dt.datetime | None:
    if text is None:
        return None
    try:
        return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)
    except ValueError as exc:
        err.print(f"[red]{option}: expected a date YYYY-MM-DD (got {text!r})[/red]")
        raise typer.Exit(2) from exc


def _model(session: Session, ref: str | None) -> ModelRecord:
    active = session.scalar(select(ModelRecord).where(ModelRecord.active.is_(True)))
    if active is None:
        err.print("[red]no active model: `ketanode model activate SHA` first[/red]")
        raise typer.Exit(2)
    if ref is not None and not active.sha256.startswith(ref.lower()):
        err.print(
            f"[red]model {ref} is not the active one ({active.sha256[:12]}): jobs run with the "
            f"active model; `ketanode model activate {ref}` first[/red]"
        )
        raise typer.Exit(2)
    return active


def selected_series(
    session: Session,
    since: dt.datetime | None,
    until: dt.datetime | None,
    uids: list[str],
) -> list[int]:
    query = select(Series.id).where(Series.state.in_((SeriesState.DONE, SeriesState.FAILED)))
    if uids:
        query = query.where(Series.series_uid.in_(uids))
    if since is not None:
        query = query.where(Series.completed_at >= since)
    if until is not None:
        query = query.where(Series.completed_at < until + dt.timedelta(days=1))
    return list(session.scalars(query.order_by(Series.id)))


def already_done(session: Session, series_ids: list[int], model_sha256: str) -> set[int]:
    """Series whose current result comes from the model."""
    if not series_ids:
        return set()
    return set(
        session.scalars(
            select(Result.series_id).where(
                Result.series_id.in_(series_ids),
                Result.current.is_(True),
                Result.model_sha256 == model_sha256,
            )
        )
    )


def progress_counts(session: Session, series_ids: list[int]) -> tuple[int, int, int]:
    """(finished, queued or running, failed) of the newest batch job of each series."""
    newest = aliased(Job)
    latest = (
        select(func.max(Job.id))
        .where(Job.series_id == newest.series_id, Job.lane == JobLane.BATCH)
        .correlate(newest)
        .scalar_subquery()
    )
    rows = session.execute(
        select(newest.state, func.count())
        .where(newest.series_id.in_(series_ids), newest.id == latest)
        .group_by(newest.state)
    ).all()
    by = {str(s): int(n) for s, n in rows}
    active = by.get(JobState.QUEUED, 0) + by.get(JobState.RUNNING, 0)
    return by.get(JobState.DONE, 0) + by.get(JobState.FAILED, 0), active, by.get(JobState.FAILED, 0)


def reprocess(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(help="SHA-256 (or prefix) of the model; it must be the active one."),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Series completed on or after this day.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="... and on or before this day.")] = None,
    series: Annotated[
        list[str] | None, typer.Option("--series", help="A Series Instance UID (repeatable).")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Show progress until the batch is done.")] = True,
    stop: Annotated[bool, typer.Option("--stop", help="Take the queued batch jobs out.")] = False,
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="Queue at most this many new jobs; run again for the next."),
    ] = None,
) -> None:
    """Process received series again with the active model, as batch work (after the live
    scans). Run it again to resume; --stop to stop."""
    settings = settings_of(ctx)
    sessions: sessionmaker[Session] = sessions_for(settings)
    if stop:
        n = stop_batch(sessions)
        console.print(f"batch stopped: {n} queued jobs taken out (running ones finish)")
        return
    first, last = _day(since, "--since"), _day(until, "--until")
    with sessions() as session:
        target = _model(session, model)
        ids = selected_series(session, first, last, series or [])
        done = already_done(session, ids, target.sha256)
    todo = [i for i in ids if i not in done]
    created = enqueue_batch(sessions, todo, settings.pipeline.max_attempts, limit)
    watched, later = todo, 0
    if limit is not None and created and len(created) == limit:
        with sessions() as session:  # the series after the last one queued wait for a rerun
            last_series = session.scalar(select(Job.series_id).where(Job.id == created[-1]))
        cut = todo.index(last_series) + 1 if last_series in todo else len(todo)
        watched, later = todo[:cut], len(todo) - cut
    console.print(
        f"{len(ids)} series selected: {len(done)} already by model {target.sha256[:12]}, "
        f"{len(created)} queued as batch work, {len(watched) - len(created)} busy or purged"
        + (f", {later} left for the next run (--limit {limit})" if later else "")
    )
    todo = watched
    if not wait or not todo:
        return
    columns = (
        TextColumn("reprocessing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("batch", total=len(todo), note="")
            while True:
                with sessions() as session:
                    finished, active, failed = progress_counts(session, todo)
                bar.update(
                    task, completed=finished, note=f"{active} waiting/running, {failed} failed"
                )
                if active == 0:
                    break
                time.sleep(1.0)
    except KeyboardInterrupt:
        console.print(
            "stopped watching; the batch goes on (`ketanode reprocess --stop` stops it, "
            "the same command again resumes)"
        )
        raise typer.Exit(130) from None
