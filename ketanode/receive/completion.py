"""Where a series becomes complete, and what happens then (docs/architecture.md, Data flow).

A series is complete when the expected number of instances has arrived, or when the
association that carried it was released and a short grace passed with nothing new,
or, for senders that keep one association open, after a quiet period. Completion runs
selection in the same transaction: the series is ignored (reason kept) or queued.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ketanode.config import Settings
from ketanode.db.jobqueue import enqueue
from ketanode.db.models import Association, AssociationOutcome, Series, SeriesState, utcnow
from ketanode.receive.selection import SeriesView, decide

logger = logging.getLogger(__name__)

EXPECTED_COUNT = "expected_count"
ASSOCIATION_RELEASED = "association_released"
QUIET_PERIOD = "quiet_period"


def completion_trigger(
    series: Series, assoc: Association | None, now: dt.datetime, grace: float, quiet: float
) -> str | None:
    if series.expected_instances and series.n_instances >= series.expected_instances:
        return EXPECTED_COUNT
    idle = (now - series.last_received_at).total_seconds()
    # Only a release says the sender finished. An aborted association (peer abort, dropped
    # connection, or this node dying mid-series) usually means a retry is coming: waiting
    # for the quiet period then avoids processing (and splitting) a half series.
    if (
        assoc is not None
        and assoc.ended_at is not None
        and assoc.outcome == AssociationOutcome.RELEASED
    ):
        since_end = (now - max(assoc.ended_at, series.last_received_at)).total_seconds()
        if since_end >= grace:
            return ASSOCIATION_RELEASED
    if idle >= quiet:
        return QUIET_PERIOD
    return None


def view_of(series: Series) -> SeriesView:
    return SeriesView(
        modality=series.modality,
        sop_class_uid=series.sop_class_uid,
        description=series.description,
        protocol_name=series.protocol_name,
        image_type=series.image_type,
        mr_acquisition_type=series.mr_acquisition_type,
        pixel_spacing_row=series.pixel_spacing_row,
        pixel_spacing_col=series.pixel_spacing_col,
        slice_thickness=series.slice_thickness,
        spacing_between_slices=series.spacing_between_slices,
        n_instances=series.n_instances,
        n_frames=series.n_frames,
    )


class CompletionTracker:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.on_queued = on_queued
        self._lock = threading.Lock()

    def sweep(self) -> int:
        """Complete every receiving series that is due. Returns how many were completed."""
        with self._lock:
            with self.sessions() as session:
                ids = session.scalars(
                    select(Series.id).where(Series.state == SeriesState.RECEIVING)
                ).all()
            done = 0
            queued = False
            for series_id in ids:
                try:
                    state = self._complete_if_due(series_id)
                except Exception:
                    logger.exception("completion check failed for series row %s", series_id)
                    continue
                if state is not None:
                    done += 1
                    queued = queued or state == SeriesState.QUEUED
        if queued and self.on_queued is not None:
            self.on_queued()
        return done

    def _complete_if_due(self, series_id: int) -> str | None:
        cfg = self.settings.series
        with self.sessions.begin() as session:
            series = session.scalar(
                select(Series).where(Series.id == series_id).with_for_update(skip_locked=True)
            )
            if series is None or series.state != SeriesState.RECEIVING:
                return None
            assoc = (
                session.get(Association, series.last_association_id)
                if series.last_association_id
                else None
            )
            now = utcnow()
            trigger = completion_trigger(series, assoc, now, cfg.grace_seconds, cfg.quiet_seconds)
            if trigger is None:
                return None
            decision = decide(view_of(series), cfg.selection)
            series.completed_at = now
            series.completion_trigger = trigger
            series.selection = decision.as_dict()
            series.reason = decision.reason
            if decision.selected:
                series.state = SeriesState.QUEUED
                job = enqueue(session, series, self.settings.pipeline.max_attempts)
                logger.info(
                    "series row %s complete (%s, %d instances): queued as job %s",
                    series.id,
                    trigger,
                    series.n_instances,
                    job.id,
                )
            else:
                series.state = SeriesState.IGNORED
                logger.info(
                    "series row %s complete (%s, %d instances): ignored: %s",
                    series.id,
                    trigger,
                    series.n_instances,
                    decision.reason,
                )
            return series.state
