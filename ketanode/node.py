"""The node: settings, database, spool, listener, timers and workers, wired together."""

from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from ketanode.admin.retention import sweep as retention_sweep
from ketanode.config import Settings
from ketanode.db.jobqueue import new_owner, recover, renew
from ketanode.db.migrate import ensure_current
from ketanode.db.session import make_engine, make_session_factory
from ketanode.process.worker import WorkerPool
from ketanode.receive.associations import AssociationLog
from ketanode.receive.completion import CompletionTracker
from ketanode.receive.listener import Listener
from ketanode.receive.store import StoreService
from ketanode.scheduler import Timers
from ketanode.send.dispatcher import Dispatcher
from ketanode.spool import Spool

if TYPE_CHECKING:
    from ketanode.web.server import WebServer

logger = logging.getLogger(__name__)


def prepare_database(settings: Settings) -> Engine:
    engine = make_engine(settings.database.url)
    ensure_current(engine, settings.database.auto_upgrade)
    return engine


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = prepare_database(settings)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        self.owner = new_owner()
        self.node_name = f"{socket.gethostname()}/{settings.node.ae_title}"
        self.spool = Spool(
            settings.spool.path,
            int(settings.spool.min_free_mb * 2**20),
            keep_rejected=settings.spool.keep_rejected,
            rejected_max_bytes=int(settings.spool.rejected_max_mb * 2**20),
        )
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
        self.listener = Listener(settings.node, self.store, self.associations)
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
