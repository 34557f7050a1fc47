"""The node: settings, database, spool, listener, timers and workers, wired together.

:class:`Node` is the embedded all-in-one node (``ketanode serve``). With ``[cluster]
enabled`` the same stages run apart, one role per process (docs/scaling.md):
:class:`ListenerRole` (C-STORE into the spool and the database; several at once),
:class:`SchedulerRole` (completion, recovery, publishing job ids to the broker, dispatch,
retention; one active, the others standbys), :class:`WebRole` (the dashboard) and
:func:`run_worker` (a Celery worker that runs jobs).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from ketanode.admin.retention import sweep as retention_sweep
from ketanode.config import NodeSettings, Settings
from ketanode.db.jobqueue import new_owner, recover, renew
from ketanode.db.migrate import ensure_current
from ketanode.db.session import make_engine, make_session_factory
from ketanode.process.worker import WorkerPool
from ketanode.receive.associations import AssociationLog
from ketanode.receive.completion import CompletionTracker
from ketanode.receive.frontend import FrontEnd
from ketanode.receive.listener import Listener
from ketanode.receive.store import StoreService
from ketanode.scheduler import Timers
from ketanode.send.dispatcher import Dispatcher
from ketanode.spool import Spool

if TYPE_CHECKING:
    from ketanode.cluster.members import Membership
    from ketanode.web.server import WebServer

logger = logging.getLogger(__name__)


def prepare_database(settings: Settings) -> Engine:
    """The engine, its schema current. On PostgreSQL the check and upgrade run under the
    schema lock (``db/migrate.py``): the processes of a cluster start at the same time, and
    two upgrades of an empty database at once collide (duplicate tables)."""
    engine = make_engine(settings.database.url)
    ensure_current(engine, settings.database.auto_upgrade)
    return engine


def received_spool(settings: Settings) -> Spool:
    """The spool of received instances (and of refused ones, kept within their quota)."""
    return Spool(
        settings.spool.path,
        int(settings.spool.min_free_mb * 2**20),
        keep_rejected=settings.spool.keep_rejected,
        rejected_max_bytes=int(settings.spool.rejected_max_mb * 2**20),
    )


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = prepare_database(settings)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        self.owner = new_owner()
        self.node_name = f"{socket.gethostname()}/{settings.node.ae_title}"
        self.spool = received_spool(settings)
        self.timers = Timers()
        self.dispatcher = Dispatcher(self.sessions, settings)
        self.workers = WorkerPool(self.sessions, settings, self.owner, on_job_ended=self._job_ended)
        self.tracker = CompletionTracker(self.sessions, settings, on_queued=self.workers.wake)
        self.associations = AssociationLog(
            self.sessions,
            settings.node,
            self.node_name,
            tls=settings.node.tls.enabled,
            on_ended=self._association_ended,
        )
        self.store = StoreService(
            self.sessions,
            self.spool,
            self.associations.row_id,
            on_series_stored=self._series_stored,
        )
        self.listener = receiver(settings.node, self.store, self.associations, self.node_name)
        self.address: tuple[str, int] | None = None
        # the dashboard, /metrics and /health ([web] enabled); its bound (host, port)
        self.web: WebServer | None = None
        self.web_address: tuple[str, int] | None = None
        self.stopped = threading.Event()

    def _association_ended(self, _row_id: int) -> None:
        self.timers.soon(
            "completion-after-release",
            self.settings.series.grace_seconds + 0.05,
            self.tracker.sweep,
        )

    def _job_ended(self, _job_id: int) -> None:
        if self.settings.destinations:
            self.timers.soon("dispatch-after-job", 0.0, self.dispatcher.run)

    def _series_stored(self, _series_id: int, expected_reached: bool) -> None:
        if expected_reached:
            self.timers.soon("completion-expected-count", 0.0, self.tracker.sweep)

    def recover(self) -> None:
        """Work a dead process left half done: partial files, open associations, jobs."""
        parts = self.spool.clean_tmp()
        stale = self.associations.close_stale()
        jobs = recover(self.sessions)
        if parts or stale or jobs:
            logger.warning(
                "recovery: %d partial files removed, %d associations closed, "
                "%d jobs re-queued or failed",
                parts,
                stale,
                jobs,
            )

    def start(self) -> tuple[str, int]:
        self.recover()
        cfg = self.settings
        self.timers.every("completion-sweep", cfg.series.check_interval_seconds, self.tracker.sweep)
        self.timers.every(
            "lease-renewal",
            cfg.pipeline.lease_seconds / 3,
            lambda: renew(self.sessions, self.owner, cfg.pipeline.lease_seconds),
        )
        self.timers.every("recovery-sweep", 30.0, lambda: recover(self.sessions))
        if cfg.destinations:
            self.timers.every("dispatch", cfg.dispatch.interval_seconds, self.dispatcher.run)
            self.timers.soon("dispatch-at-start", 0.0, self.dispatcher.run)
        if cfg.retention.enabled:
            self.timers.every(
                "retention",
                cfg.retention.interval_minutes * 60,
                lambda: retention_sweep(self.sessions, cfg, prune_dirs=True),
            )
        self.timers.start()
        self.workers.start()
        self.workers.wake()
        if cfg.web.enabled:
            from ketanode.web.server import WebServer  # FastAPI only when the web is on

            self.web = WebServer(cfg, self.sessions, self.timers)
            self.web_address = self.web.start()  # logs the URL
        self.address = self.listener.start()
        return self.address

    def stop(self) -> None:
        logger.info("stopping: listener, timers, workers")
        if self.web is not None:
            self.web.stop()
        self.listener.stop()
        self.timers.stop()
        self.workers.stop()
        self.engine.dispose()
        self.stopped.set()
        logger.info("stopped")


# --- cluster mode: one role per process ------------------------------------------------

ROLES = ("listener", "scheduler", "web")


class ClusterConfigError(Exception):
    """Cluster mode asked for on a configuration that cannot run it (the message names the
    key)."""


def check_cluster(settings: Settings) -> None:
    """A cluster role needs ``cluster.enabled`` and PostgreSQL."""
    if not settings.cluster.enabled:
        raise ClusterConfigError(
            "cluster roles need cluster.enabled = true (without it, `ketanode serve` is the "
            "embedded all-in-one node)"
        )
    if not settings.database.url.startswith("postgresql"):
        raise ClusterConfigError(
            "cluster.enabled = true needs PostgreSQL: key 'database.url' is "
            f"{settings.database.url.split(':', 1)[0]}:..., expected a postgresql:// URL "
            "(SQLite is for the embedded node only: its file cannot be shared between hosts)"
        )


class Role:
    """A cluster role process: its database, its membership row, start and stop."""

    name = "role"

    def __init__(self, settings: Settings) -> None:
        check_cluster(settings)
        self.settings = settings
        self.engine = prepare_database(settings)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        from ketanode.cluster.members import Membership  # Celery and kombu in cluster mode only

        self.membership: Membership = Membership(
            settings.database.url,
            self.name,
            settings.cluster.heartbeat_seconds,
            detail=self.detail,
        )
        # set when the role must end on its own (a scheduler that lost its lock)
        self.failed = threading.Event()

    def detail(self) -> dict[str, Any]:
        return {}

    def start(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        self.membership.stop()
        self.engine.dispose()


class ListenerRole(Role):
    """C-STORE into the shared spool and the database; completion is the scheduler's."""

    name = "listener"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.address: tuple[str, int] | None = None
        # unique per listener (several may run on one host), stable across its restarts
        self.node_name = f"{socket.gethostname()}/{settings.node.ae_title}:{settings.node.port}"
        self.spool = received_spool(settings)
        self.associations = AssociationLog(
            self.sessions, settings.node, self.node_name, tls=settings.node.tls.enabled
        )
        self.store = StoreService(self.sessions, self.spool, self.associations.row_id)
        self.listener = receiver(settings.node, self.store, self.associations, self.node_name)

    def detail(self) -> dict[str, Any]:
        host, port = self.address or (self.settings.node.bind_address, self.settings.node.port)
        return {"ae_title": self.settings.node.ae_title, "address": f"{host}:{port}"}

    def start(self) -> str:
        # the spool is shared: only partial files old enough to be no other listener's
        parts = remove_stale_parts(self.spool.tmp, STALE_PART_SECONDS)
        stale = self.associations.close_stale()
        if parts or stale:
            logger.warning(
                "listener recovery: %d stale partial files removed, %d associations closed",
                parts,
                stale,
            )
        self.address = self.listener.start()
        self.membership.start()
        host, port = self.address
        return f"listener {self.settings.node.ae_title} on {host}:{port}"

    def stop(self) -> None:
        self.listener.stop()
        super().stop()


def receiver(
    settings: NodeSettings, store: StoreService, log: AssociationLog, name: str
) -> Listener | FrontEnd:
    """What answers C-STOREs (``node.receiver``): pynetdicom here, or the native front end."""
    if settings.receiver == "dcmtk":
        return FrontEnd(settings, store, log, name)
    return Listener(settings, store, log)


STALE_PART_SECONDS = 3600.0


def remove_stale_parts(tmp: Path, older_than_seconds: float) -> int:
    """Partial files (``*.part``) older than ``older_than_seconds``: a listener that died
    left them; a younger one may be another listener's C-STORE in progress."""
    cutoff = time.time() - older_than_seconds
    removed = 0
    for part in tmp.glob("*.part"):
        try:
            if part.stat().st_mtime < cutoff:
                part.unlink(missing_ok=True)
                removed += 1
        except FileNotFoundError:
            continue
    return removed


class SchedulerRole(Role):
    """Completion, recovery, publishing, dispatch and retention, while it holds the lock.

    A standby waits for the lock (:class:`LeaderLock`); the active one checks it every
    ``standby_poll_seconds`` and, if its connection is gone, stops its timers and sets
    :attr:`failed` (the process exits; its supervisor starts it again as a standby).
    """

    name = "scheduler"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        from ketanode.cluster.engine import make_celery
        from ketanode.cluster.leader import LeaderLock
        from ketanode.cluster.publisher import Publisher

        self.lock = LeaderLock(settings.database.url)
        self.tracker = CompletionTracker(self.sessions, settings)
        self.dispatcher = Dispatcher(self.sessions, settings)
        self.celery = make_celery(settings)
        self.publisher = Publisher(self.sessions, settings, self.celery)
        self.timers: Timers | None = None
        self.active = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def detail(self) -> dict[str, Any]:
        return {
            "active": self.active.is_set(),
            "queue": self.settings.cluster.queue,
            "queue_depth": self.publisher.last_depth,
        }

    def start(self) -> str:
        self.membership.start()
        self._thread = threading.Thread(
            target=self._loop, name="ketanode-scheduler-lock", daemon=True
        )
        self._thread.start()
        return "scheduler (active while it holds the lock, else a standby)"

    def _loop(self) -> None:
        poll = self.settings.cluster.standby_poll_seconds
        announced = False
        while not self._stop.is_set():
            if not self.active.is_set():
                if self.lock.try_acquire():
                    self._become_active()
                elif not announced:
                    logger.info("scheduler: standby (another scheduler is active)")
                    announced = True
            elif not self.lock.check():
                logger.error("scheduler: lost the lock; stopping (a standby takes over)")
                self._stop_timers()
                self.active.clear()
                self.failed.set()
                return
            self._stop.wait(poll)

    def _become_active(self) -> None:
        cfg = self.settings
        logger.info("scheduler: active (holds the scheduler lock)")
        jobs = recover(self.sessions)
        if jobs:
            logger.warning("scheduler recovery: %d jobs re-queued or failed", jobs)
        timers = Timers()
        timers.every("completion-sweep", cfg.series.check_interval_seconds, self.tracker.sweep)
        timers.every(
            "recovery-sweep",
            cfg.cluster.recovery_interval_seconds,
            lambda: recover(self.sessions),
        )
        timers.every("publish", cfg.cluster.publish_interval_seconds, self.publisher.run)
        timers.soon("publish-at-start", 0.0, self.publisher.run)
        if cfg.destinations:
            timers.every("dispatch", cfg.dispatch.interval_seconds, self.dispatcher.run)
            timers.soon("dispatch-at-start", 0.0, self.dispatcher.run)
        if cfg.retention.enabled:
            timers.every(
                "retention",
                cfg.retention.interval_minutes * 60,
                lambda: retention_sweep(self.sessions, cfg, prune_dirs=True),
            )
        timers.start()
        self.timers = timers
        self.active.set()
        try:
            self.membership.beat()  # say so at once (cluster status, tests)
        except Exception:
            logger.warning("scheduler: could not write the heartbeat")

    def _stop_timers(self) -> None:
        if self.timers is not None:
            self.timers.stop()
            self.timers = None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self._stop_timers()
        self.active.clear()
        self.lock.release()
        super().stop()


class WebRole(Role):
    """The dashboard, /metrics and /health on the cluster's database."""

    name = "web"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.web: WebServer | None = None

    def start(self) -> str:
        from ketanode.web.server import WebServer

        self.web = WebServer(self.settings, self.sessions, None)
        host, port = self.web.start()
        self.membership.start()
        return f"web on {host}:{port}"

    def stop(self) -> None:
        if self.web is not None:
            self.web.stop()
        super().stop()


def make_role(settings: Settings, role: str) -> Role:
    if role == "listener":
        return ListenerRole(settings)
    if role == "scheduler":
        return SchedulerRole(settings)
    if role == "web":
        return WebRole(settings)
    raise ClusterConfigError(f"unknown role {role!r} (one of {', '.join(ROLES)})")


def run_worker(settings: Settings, concurrency: int | None = None, loglevel: str = "INFO") -> int:
    """``ketanode worker``: a Celery worker on the work queue; returns its exit code.

    Celery owns the signals: SIGTERM is a warm shutdown (running jobs finish first), a
    second one or SIGQUIT a cold one (their messages go back to the broker, and the
    recovery sweep re-queues their jobs)."""
    check_cluster(settings)
    engine = prepare_database(settings)  # the schema is current before any job runs
    engine.dispose()
    from ketanode.cluster import tasks
    from ketanode.cluster.engine import make_celery
    from ketanode.cluster.members import Membership

    membership = Membership(
        settings.database.url,
        "worker",
        settings.cluster.heartbeat_seconds,
        detail=lambda: {
            "queue": settings.cluster.queue,
            "concurrency": concurrency or settings.cluster.worker_concurrency,
        },
    )
    app = make_celery(settings)
    tasks.register(app, settings, membership.token)
    membership.start()
    try:
        worker = app.Worker(
            hostname=f"ketanode-{membership.token}@{socket.gethostname()}",
            queues=[settings.cluster.queue],
            concurrency=concurrency or settings.cluster.worker_concurrency,
            pool="prefork",
            without_gossip=True,
            without_mingle=True,
            without_heartbeat=True,
            loglevel=loglevel,
            optimization="fair",
        )
        worker.start()
        return int(getattr(worker, "exitcode", 0) or 0)
    finally:
        membership.stop()
