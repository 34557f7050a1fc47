"""Retention: removes files the node no longer needs (and the instance rows of removed spool
files); the other rows (series, jobs, results, objects, audit) are kept.

Two kinds of files go:

- Spool files (the received instances) of a series that was ``ignored``, or ``done`` /
  ``failed`` with its latest job done / failed, ``retention.spool_hours`` after it finished
  (the job's ``finished_at``; ``completed_at`` for an ignored series). Never while the series
  is receiving / complete / queued / processing or any of its jobs is queued / running, and
  never while an object of one of its results still has a pending / retrying outbox row (the
  SR must stay re-creatable from the spool). ``Series.purged_at`` records it. In the same
  transaction the series' ``instance`` rows are deleted and its ``n_instances`` /
  ``n_frames`` set to 0: the series row, its jobs (and steps), results, objects and the
  audit rows stay. A series sent again after that is not taken for duplicates (those are
  found by the instance rows): its instances are stored anew, reopen it (``generation`` + 1)
  and count from 0, so it completes as a new series would (expected count, or release and
  grace) and is processed again. The instance rows that exist after a purge are the ones
  received since, which makes the series due again once it finished again.
- Report files (the SR / report image, and the PNG copy next to the image) of an emitted
  object whose every outbox row is sent or dead, ``retention.reports_hours`` after the last
  of them changed (``created_at`` for an object without rows). ``EmittedObject.purged_at``.

- Refused datasets kept in ``<spool>/rejected`` (``spool.keep_rejected``), by their own age:
  ``retention.rejected_hours`` after they were written (the file's modification time). Their
  ``store_failure`` rows stay, with ``quarantine_path`` cleared.

Each series / object is claimed with a conditional UPDATE that re-checks the rules, its files
are removed, and the claim commits; a crash in between leaves ``purged_at`` unset and the
next sweep finishes the job (missing files are fine). Only files under the configured spool
and reports roots are touched. One RETENTION audit row per sweep that removed something.

The series and study directories left empty are removed too (``prune_dirs``, on unless
asked otherwise): ``dicom.spool.Spool`` creates a directory it remembered again when it finds
it gone, so a series received again after its directory was removed is stored as before.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from ketanode import roots
from ketanode.admin.audit import AuditKind, record_now
from ketanode.config import Settings
from ketanode.db.models import (
    ACTIVE_JOB_STATES,
    FINISHED_JOB_STATES,
    UNSENT_STATES,
    EmittedObject,
    Instance,
    Job,
    OutboxItem,
    Result,
    Series,
    SeriesState,
    StoreFailure,
    utcnow,
)
from ketanode.db.session import rowcount

logger = logging.getLogger(__name__)


@dataclass
class Purged:
    """One series (spool) or emitted object (report) whose files went (or would go)."""

    id: int
    files: int = 0
    bytes: int = 0


@dataclass
class RetentionReport:
    dry_run: bool
    at: dt.datetime
    series: list[Purged] = field(default_factory=list)
    objects: list[Purged] = field(default_factory=list)
    rejected_files: int = 0
    rejected_bytes: int = 0

    @property
    def spool_files(self) -> int:
        return sum(p.files for p in self.series)

    @property
    def report_files(self) -> int:
        return sum(p.files for p in self.objects)

    @property
    def bytes(self) -> int:
        return (
            sum(p.bytes for p in self.series)
            + sum(p.bytes for p in self.objects)
            + self.rejected_bytes
        )

    @property
    def removed_anything(self) -> bool:
        return bool(self.series or self.objects or self.rejected_files)

    def summary(self) -> dict[str, Any]:
        return {
            "series": len(self.series),
            "spool_files": self.spool_files,
            "objects": len(self.objects),
            "report_files": self.report_files,
            "rejected_files": self.rejected_files,
            "bytes": self.bytes,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "at": self.at.isoformat(timespec="seconds"),
            **self.summary(),
            "purged_series": [asdict(p) for p in self.series],
            "purged_objects": [asdict(p) for p in self.objects],
        }


# --- which rows are due -------------------------------------------------------------------


def _series_due(cutoff: dt.datetime) -> ColumnElement[bool]:
    """The spool rule for ``Series`` (correlated; usable in a SELECT and an UPDATE)."""
    any_job = aliased(Job)
    latest = aliased(Job)
    active_job = exists().where(
        any_job.series_id == Series.id, any_job.state.in_(ACTIVE_JOB_STATES)
    )
    # correlate explicitly: two levels down, SQLAlchemy would add ``series`` to the FROM list
    latest_id = select(func.max(any_job.id)).where(any_job.series_id == Series.id).correlate(Series)
    latest_finished_long_ago = exists().where(
        latest.id == latest_id.scalar_subquery(),
        latest.state.in_(FINISHED_JOB_STATES),
        latest.finished_at <= cutoff,
    )
    unsent = exists().where(
        Result.series_id == Series.id,
        EmittedObject.result_id == Result.id,
        OutboxItem.object_id == EmittedObject.id,
        OutboxItem.state.in_(UNSENT_STATES),
    )
    # not purged yet, or received again: a purge deletes the instance rows, so any that
    # exist arrived after it
    unpurged = or_(Series.purged_at.is_(None), exists().where(Instance.series_id == Series.id))
    finished = or_(
        and_(
            Series.state == SeriesState.IGNORED,
            func.coalesce(Series.completed_at, Series.last_received_at) <= cutoff,
        ),
        and_(
            Series.state.in_((SeriesState.DONE, SeriesState.FAILED)),
            latest_finished_long_ago,
        ),
    )
    return and_(finished, ~active_job, ~unsent, unpurged)


def _object_due(cutoff: dt.datetime) -> ColumnElement[bool]:
    """The report rule for ``EmittedObject`` (correlated)."""
    unsent = exists().where(
        OutboxItem.object_id == EmittedObject.id, OutboxItem.state.in_(UNSENT_STATES)
    )
    last_change = (
        select(func.max(OutboxItem.updated_at))
        .where(OutboxItem.object_id == EmittedObject.id)
        .scalar_subquery()
    )
    return and_(
        EmittedObject.purged_at.is_(None),
        ~unsent,
        func.coalesce(last_change, EmittedObject.created_at) <= cutoff,
    )


# --- files -------------------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def _existing(paths: list[Path], root: Path) -> tuple[int, int]:
    """(files, bytes) of ``paths`` that exist under ``root``."""
    files = size = 0
    for path in paths:
        if not _inside(path, root):
            continue
        try:
            size += path.stat().st_size
            files += 1
        except FileNotFoundError:
            pass
    return files, size


def _remove(paths: list[Path], root: Path) -> tuple[int, int]:
    """Remove ``paths`` under ``root``; (files, bytes) actually removed. Gone is fine."""
    files = size = 0
    for path in paths:
        if not _inside(path, root):
            logger.warning("retention: not removing a file outside %s", root)
            continue
        try:
            n = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        files += 1
        size += n
    return files, size


def _prune(directories: set[Path], root: Path) -> None:
    """Remove empty directories (and then their empty parents) below ``root``."""
    for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
        current = directory.resolve()
        while current != root and current.is_relative_to(root):
            try:
                os.rmdir(current)
            except OSError:  # not empty, gone, or busy: leave it
                break
            current = current.parent


def _object_paths(main: Path) -> list[Path]:
    return [main, main.with_suffix(".png")]


# --- the sweep ---------------------------------------------------------------------------


def sweep(
    sessions: sessionmaker[Session],
    settings: Settings,
    now: dt.datetime | None = None,
    dry_run: bool = False,
    *,
    actor: str = "node",
    prune_dirs: bool = True,
) -> RetentionReport:
    """Remove (or with ``dry_run`` only list) the files that retention allows to go now;
    with ``prune_dirs`` also the spool directories that are left empty."""
    now = now or utcnow()
    cfg = settings.retention
    report = RetentionReport(dry_run=dry_run, at=now)
    spool = roots.spool_root(settings)
    reports = roots.reports_root(settings)
    spool_root, reports_root = spool.path, reports.path
    spool_cutoff = now - dt.timedelta(hours=cfg.spool_hours)
    reports_cutoff = now - dt.timedelta(hours=cfg.reports_hours)

    with sessions() as session:
        series_ids = list(
            session.scalars(select(Series.id).where(_series_due(spool_cutoff)).order_by(Series.id))
        )
        object_rows = session.execute(
            select(EmittedObject.id, EmittedObject.path)
            .where(_object_due(reports_cutoff))
            .order_by(EmittedObject.id)
        ).all()

    emptied: set[Path] = set()
    for series_id in series_ids:
        purged = _sweep_series(sessions, series_id, spool_cutoff, spool, now, dry_run)
        if purged is not None:
            report.series.append(purged[0])
            emptied |= purged[1]
    for object_id, path in object_rows:
        paths = _object_paths(reports.resolve(str(path)))
        if dry_run:
            files, size = _existing(paths, reports_root)
            report.objects.append(Purged(int(object_id), files, size))
            continue
        with sessions.begin() as session:
            claimed = session.execute(
                update(EmittedObject)
                .where(EmittedObject.id == object_id, _object_due(reports_cutoff))
                .values(purged_at=now)
                .execution_options(synchronize_session=False)
            )
            if rowcount(claimed) != 1:
                continue  # re-queued (or purged by another sweep) in the meantime
            files, size = _remove(paths, reports_root)
        report.objects.append(Purged(int(object_id), files, size))
    if prune_dirs and not dry_run:
        _prune(emptied, spool_root)
    rejected_cutoff = now - dt.timedelta(hours=cfg.rejected_hours)
    report.rejected_files, report.rejected_bytes = _sweep_rejected(
        sessions, spool, rejected_cutoff, dry_run
    )

    if report.removed_anything and not dry_run:
        logger.info(
            "retention: spool files of %d series (%d files), report files of %d objects "
            "(%d files), %d refused datasets, %d MiB freed",
            len(report.series),
            report.spool_files,
            len(report.objects),
            report.report_files,
            report.rejected_files,
            report.bytes // 2**20,
        )
        record_now(sessions, AuditKind.RETENTION, actor, detail=report.summary())
    return report


def _sweep_series(
    sessions: sessionmaker[Session],
    series_id: int,
    cutoff: dt.datetime,
    spool: roots.Root,
    now: dt.datetime,
    dry_run: bool,
) -> tuple[Purged, set[Path]] | None:
    """One series: claim it (the rules checked again; its counters reset), remove its files
    and delete its instance rows, commit."""
    if dry_run:
        with sessions() as session:
            paths = [spool.resolve(p) for p in session.scalars(_spool_paths(series_id))]
        files, size = _existing(paths, spool.path)
        return Purged(series_id, files, size), set()
    with sessions.begin() as session:
        claimed = session.execute(
            update(Series)
            .where(Series.id == series_id, _series_due(cutoff))
            .values(purged_at=now, n_instances=0, n_frames=0)
            .execution_options(synchronize_session=False)
        )
        if rowcount(claimed) != 1:
            return None  # received again or re-queued in the meantime
        paths = [spool.resolve(p) for p in session.scalars(_spool_paths(series_id))]
        session.execute(
            delete(Instance)
            .where(Instance.series_id == series_id)
            .execution_options(synchronize_session=False)
        )
        files, size = _remove(paths, spool.path)
    return Purged(series_id, files, size), {p.parent for p in paths}


def _spool_paths(series_id: int) -> Any:
    return select(Instance.spool_path).where(Instance.series_id == series_id).order_by(Instance.id)


def _sweep_rejected(
    sessions: sessionmaker[Session], spool: roots.Root, cutoff: dt.datetime, dry_run: bool
) -> tuple[int, int]:
    """Refused datasets older than ``cutoff`` (by modification time): removed, and their
    store_failure rows no longer point at them (by their stored path, relative to the spool,
    or absolute as rows written before migration 0007 may hold it). Returns (files, bytes)."""
    directory = spool.path / "rejected"
    if not directory.is_dir():
        return 0, 0
    limit = cutoff.timestamp()
    due: list[tuple[Path, int]] = []
    for path in directory.glob("*.dcm"):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if stat.st_mtime <= limit:
            due.append((path, stat.st_size))
    if dry_run or not due:
        return len(due), sum(size for _, size in due)
    files = size = 0
    removed: list[str] = []
    for path, n in due:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        files += 1
        size += n
        removed += [spool.stored(path), str(path)]
    for start in range(0, len(removed), 500):
        chunk = removed[start : start + 500]
        with sessions.begin() as session:
            session.execute(
                update(StoreFailure)
                .where(StoreFailure.quarantine_path.in_(chunk))
                .values(quarantine_path=None)
                .execution_options(synchronize_session=False)
            )
    return files, size
