"""``/metrics``: Prometheus text format, read from the database at scrape time.

A custom collector counts rows, not events seen by this process, so the numbers include the
work of the job child processes and survive restarts. Counters derived from rows that
``ketanode dispatch retry`` resets (an outbox row's attempts go back to 0) can go down; for
Prometheus that is a counter reset, which ``rate()`` handles.

Metrics:

- ``ketanode_instances_received_total``, ``ketanode_store_failures_total``
- ``ketanode_series_completed_total{state}`` (final states: ignored, done, failed);
  ``ketanode_series{state}`` (every state, a gauge)
- ``ketanode_jobs{state}``
- ``ketanode_job_duration_seconds{state}``: histogram of the summed step times of finished
  jobs (done / failed); ``ketanode_job_step_seconds{step}``: summary per step
- ``ketanode_dispatch_attempts_total{destination}``, ``ketanode_dispatch_failures_total``
  (attempts that did not end in ``sent``), ``ketanode_dispatch_sent_total``;
  ``ketanode_outbox_items{destination,state}``
- ``ketanode_results_total{status}``; ``ketanode_results_by_class_total{class}`` (responder,
  non-responder, indeterminate); ``ketanode_demo_results_total``: scored results of a
  demonstration (synthetic) model, marked DEMO (0 unless ``model.demo_when_none_active``
  was switched on or a synthetic model activated)
- ``ketanode_database_up``: 0 when the database could not be read (then nothing else)

In cluster mode (the web role) also the cluster, from the same function as ``ketanode
cluster status`` (``ketanode/cluster/status.py``), read at scrape time:

- ``ketanode_cluster_members{role,host,version}``: role processes alive (heartbeat fresh);
  ``ketanode_cluster_alive{role}``: the same per role, every role (0 when none is alive)
- ``ketanode_cluster_scheduler_active``: 1 when an active scheduler is alive, else 0
- ``ketanode_worker_jobs_running{worker,host}``: jobs running on each live worker;
  ``ketanode_cluster_jobs_unowned``: running jobs whose worker is not alive (re-queued when
  their lease expires)
- ``ketanode_broker_up``: 0 when RabbitMQ did not answer (then no queue metrics);
  ``ketanode_queue_depth{queue}``: ready messages in the work queue;
  ``ketanode_queue_consumers{queue}``: worker processes consuming it
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ketanode.db.models import (
    FINAL_SERIES_STATES,
    FINISHED_JOB_STATES,
    DispatchState,
    Instance,
    Job,
    JobState,
    JobStep,
    OutboxItem,
    Result,
    ResultStatus,
    Series,
    SeriesState,
    StoreFailure,
)
from ketanode.web.auth import api_user
from ketanode.web.context import context_of

if TYPE_CHECKING:
    from ketanode.cluster.status import ClusterReader

logger = logging.getLogger(__name__)

# seconds: a job is 30-60 s on 2 cores; conversion-only jobs take about 2 s
DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0, 600.0, 1800.0)


def _count(session: Session, model: type) -> int:
    return int(session.scalar(select(func.count()).select_from(model)) or 0)


class DatabaseCollector(Collector):
    """Reads the node's tables on every scrape."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def describe(self) -> Iterable[Metric]:
        return []  # nothing at registration: the database is read only when scraped

    def collect(self) -> Iterable[Metric]:
        try:
            with self.sessions() as session:
                families = list(self._families(session))
        except SQLAlchemyError as exc:
            logger.warning("metrics: the database could not be read (%s)", type(exc).__name__)
            families = []
        up = GaugeMetricFamily(
            "ketanode_database_up", "1 when the database could be read for this scrape"
        )
        up.add_metric([], 1.0 if families else 0.0)
        return [*families, up]

    def _families(self, session: Session) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "ketanode_instances_received",
            "DICOM instances stored (rows in the instance table)",
            value=_count(session, Instance),
        )
        yield CounterMetricFamily(
            "ketanode_store_failures",
            "C-STORE requests the node refused",
            value=_count(session, StoreFailure),
        )

        by_state = {
            str(s): int(n)
            for s, n in session.execute(
                select(Series.state, func.count()).group_by(Series.state)
            ).all()
        }
        completed = CounterMetricFamily(
            "ketanode_series_completed",
            "Series that reached a final state",
            labels=["state"],
        )
        for state in FINAL_SERIES_STATES:
            completed.add_metric([str(state)], by_state.get(state, 0))
        yield completed
        series = GaugeMetricFamily("ketanode_series", "Series by state", labels=["state"])
        for state in SeriesState:
            series.add_metric([str(state)], by_state.get(state, 0))
        yield series

        jobs_by_state = {
            str(s): int(n)
            for s, n in session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        }
        jobs = GaugeMetricFamily("ketanode_jobs", "Jobs by state", labels=["state"])
        for job_state in JobState:
            jobs.add_metric([str(job_state)], jobs_by_state.get(job_state, 0))
        yield jobs

        yield self._job_durations(session)
        yield self._step_times(session)
        yield from self._dispatch(session)

        results = CounterMetricFamily(
            "ketanode_results", "Results recorded, by status", labels=["status"]
        )
        for status, n in session.execute(
            select(Result.status, func.count()).group_by(Result.status).order_by(Result.status)
        ).all():
            results.add_metric([str(status)], int(n))
        yield results

        # results of a synthetic (demonstration) model: none unless an admin switched it on
        demo = session.scalar(
            select(func.count())
            .select_from(Result)
            .where(Result.status == ResultStatus.SCORED, Result.model_synthetic.is_(True))
        )
        yield CounterMetricFamily(
            "ketanode_demo_results",
            "Scored results of a demonstration model trained on synthetic data (marked DEMO)",
            value=int(demo or 0),
        )
        by_class = CounterMetricFamily(
            "ketanode_results_by_class", "Scored results, by predicted class", labels=["class"]
        )
        for cls, n in session.execute(
            select(Result.predicted_class, func.count())
            .where(Result.status == ResultStatus.SCORED)
            .group_by(Result.predicted_class)
            .order_by(Result.predicted_class)
        ).all():
            by_class.add_metric([str(cls)], int(n))
        yield by_class

    def _job_durations(self, session: Session) -> Metric:
        per_job = (
            select(Job.state.label("state"), func.sum(JobStep.seconds).label("seconds"))
            .join(JobStep, JobStep.job_id == Job.id)
            .where(Job.state.in_(FINISHED_JOB_STATES))
            .group_by(Job.id, Job.state)
            .subquery()
        )
        columns = [func.sum(case((per_job.c.seconds <= le, 1), else_=0)) for le in DURATION_BUCKETS]
        rows = session.execute(
            select(
                per_job.c.state,
                func.count(),
                func.coalesce(func.sum(per_job.c.seconds), 0.0),
                *columns,
            ).group_by(per_job.c.state)
        ).all()
        found = {str(r[0]): r for r in rows}
        family = HistogramMetricFamily(
            "ketanode_job_duration_seconds",
            "Summed step times of finished jobs (all attempts)",
            labels=["state"],
        )
        for state in FINISHED_JOB_STATES:
            row = found.get(str(state))
            total = int(row[1]) if row else 0
            seconds = float(row[2]) if row else 0.0
            buckets = [
                (str(le), float(int(row[3 + i] or 0) if row else 0))
                for i, le in enumerate(DURATION_BUCKETS)
            ]
            buckets.append(("+Inf", float(total)))
            family.add_metric([str(state)], buckets, seconds)
        return family

    def _step_times(self, session: Session) -> Metric:
        family = SummaryMetricFamily(
            "ketanode_job_step_seconds", "Wall time of pipeline steps", labels=["step"]
        )
        for name, n, total in session.execute(
            select(JobStep.name, func.count(), func.sum(JobStep.seconds))
            .group_by(JobStep.name)
            .order_by(JobStep.name)
        ).all():
            family.add_metric([str(name)], int(n), float(total or 0.0))
        return family

    def _dispatch(self, session: Session) -> Iterator[Metric]:
        attempts = CounterMetricFamily(
            "ketanode_dispatch_attempts",
            "C-STORE attempts of outbox rows (SR, report image) per destination",
            labels=["destination"],
        )
        failures = CounterMetricFamily(
            "ketanode_dispatch_failures",
            "Dispatch attempts that did not deliver the object",
            labels=["destination"],
        )
        sent = CounterMetricFamily(
            "ketanode_dispatch_sent",
            "Objects delivered per destination",
            labels=["destination"],
        )
        is_sent = case((OutboxItem.state == DispatchState.SENT, 1), else_=0)
        for dest, n_attempts, n_sent in session.execute(
            select(
                OutboxItem.destination,
                func.coalesce(func.sum(OutboxItem.attempts), 0),
                func.coalesce(func.sum(is_sent), 0),
            )
            .group_by(OutboxItem.destination)
            .order_by(OutboxItem.destination)
        ).all():
            attempts.add_metric([str(dest)], int(n_attempts))
            failures.add_metric([str(dest)], max(0, int(n_attempts) - int(n_sent)))
            sent.add_metric([str(dest)], int(n_sent))
        yield attempts
        yield failures
        yield sent
        items = GaugeMetricFamily(
            "ketanode_outbox_items",
            "Outbox rows by destination and state",
            labels=["destination", "state"],
        )
        for dest, state, n in session.execute(
            select(OutboxItem.destination, OutboxItem.state, func.count())
            .group_by(OutboxItem.destination, OutboxItem.state)
            .order_by(OutboxItem.destination, OutboxItem.state)
        ).all():
            items.add_metric([str(dest), str(state)], int(n))
        yield items


class ClusterCollector(Collector):
    """The cluster's role processes, scheduler, workers and queue, on every scrape."""

    def __init__(self, reader: ClusterReader) -> None:
        self.reader = reader

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        try:
            data = self.reader.status()
        except SQLAlchemyError as exc:  # ketanode_database_up says so
            logger.warning("metrics: the cluster could not be read (%s)", type(exc).__name__)
            return []
        return list(self._families(data))

    def _families(self, data: dict[str, Any]) -> Iterator[Metric]:
        from ketanode.cluster.members import ROLES

        alive = [m for m in data["members"] if m["alive"]]
        members = GaugeMetricFamily(
            "ketanode_cluster_members",
            "Role processes alive (heartbeat fresh), by role, host and version",
            labels=["role", "host", "version"],
        )
        counted = Counter((str(m["role"]), str(m["host"]), str(m["version"])) for m in alive)
        for key, n in sorted(counted.items()):
            members.add_metric(list(key), n)
        yield members
        per_role = GaugeMetricFamily(
            "ketanode_cluster_alive", "Role processes alive, per role", labels=["role"]
        )
        for role in ROLES:
            per_role.add_metric([role], int(data["alive"].get(role, 0)))
        yield per_role
        yield GaugeMetricFamily(
            "ketanode_cluster_scheduler_active",
            "1 when an active scheduler (the holder of the scheduler lock) is alive",
            value=1 if data["active_scheduler"] else 0,
        )
        running = GaugeMetricFamily(
            "ketanode_worker_jobs_running",
            "Jobs running on each live worker process",
            labels=["worker", "host"],
        )
        for m in alive:
            if m["role"] == "worker":
                running.add_metric([str(m["name"]), str(m["host"])], len(m["running_jobs"]))
        yield running
        yield GaugeMetricFamily(
            "ketanode_cluster_jobs_unowned",
            "Running jobs whose worker is not alive (re-queued when their lease expires)",
            value=len(data["running_not_by_a_live_worker"]),
        )
        queue = data["queue"]
        up = queue["error"] is None
        yield GaugeMetricFamily(
            "ketanode_broker_up", "1 when RabbitMQ answered for this scrape", value=1 if up else 0
        )
        if up:
            depth = GaugeMetricFamily(
                "ketanode_queue_depth", "Ready messages in the work queue", labels=["queue"]
            )
            depth.add_metric([str(queue["queue"])], int(queue["messages"] or 0))
            yield depth
            consumers = GaugeMetricFamily(
                "ketanode_queue_consumers", "Consumers of the work queue", labels=["queue"]
            )
            consumers.add_metric([str(queue["queue"])], int(queue["consumers"] or 0))
            yield consumers


class FrontEndCollector(Collector):
    """The native front end's files (``node.receiver = "dcmtk"``): acknowledged and durable,
    not indexed yet (a backlog that grows says indexing cannot keep up or the database is
    away), and those whose indexing failed (kept as ``.failed``, a refusal recorded)."""

    def __init__(self, spool_root: Path) -> None:
        self.incoming = spool_root / "incoming"

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        waiting = failed = 0
        try:
            for path in self.incoming.glob("*/*"):
                if path.suffix == ".dcm":
                    waiting += 1
                elif path.suffix == ".failed":
                    failed += 1
        except OSError as exc:
            logger.warning("metrics: the front end's directory unreadable (%s)", exc.strerror)
        pending = GaugeMetricFamily(
            "ketanode_received_not_indexed",
            "Files the native front end acknowledged that the node has not indexed yet",
        )
        pending.add_metric([], waiting)
        kept = GaugeMetricFamily(
            "ketanode_received_index_failed",
            "Acknowledged files whose indexing failed, kept as .failed (see ketanode failures)",
        )
        kept.add_metric([], failed)
        return [pending, kept]


def make_registry(
    sessions: sessionmaker[Session],
    cluster: ClusterReader | None = None,
    spool_root: Path | None = None,
) -> CollectorRegistry:
    """A registry of its own (not the global one): one per app, several apps per process in
    tests. ``cluster``: the cluster's metrics too (cluster mode); ``spool_root``: the native
    front end's backlog."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(sessions))
    if spool_root is not None:
        registry.register(FrontEndCollector(spool_root))
    if cluster is not None:
        registry.register(ClusterCollector(cluster))
    return registry


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text format; login required unless ``web.metrics_public``."""
    ctx = context_of(request)
    if not ctx.settings.web.metrics_public:
        api_user(request)
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
