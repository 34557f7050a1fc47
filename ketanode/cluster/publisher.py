"""The active scheduler's publisher: queued job ids go to the broker, live before batch.

A job is published when it is queued and was never published, and again when no worker
claimed it in time: after ``cluster.republish_idle_seconds`` when the work queue is empty
(its message is gone: the broker dropped it, or was restarted without it), else after
``cluster.republish_seconds``. A duplicate message changes nothing: the task's claim is a
conditional UPDATE by job id, and the second delivery finds the job running or done.
"""

from __future__ import annotations

import logging

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from ketanode.cluster.engine import TASK_NAME, priority_of, queue_depth, work_queue
from ketanode.config import Settings
from ketanode.db.jobqueue import mark_published, to_publish
from ketanode.db.models import utcnow

logger = logging.getLogger(__name__)


class Publisher:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings, app: Celery) -> None:
        self.sessions = sessions
        self.settings = settings
        self.app = app
        self.queue = work_queue(settings)
        self.last_depth: int | None = None

    def run(self) -> int:
        """Publish what is due; returns how many ids went to the broker."""
        cfg = self.settings.cluster
        depth = queue_depth(self.app, self.settings)
        self.last_depth = depth.messages
        idle = depth.messages == 0
        after = cfg.republish_idle_seconds if idle else cfg.republish_seconds
        with self.sessions() as session:
            due = to_publish(session, utcnow(), after)
        if not due:
            return 0
        sent: list[int] = []
        try:
            with self.app.producer_or_acquire() as producer:
                for job_id, lane in due:
                    self.app.send_task(
                        TASK_NAME,
                        args=[job_id],
                        queue=self.queue,
                        priority=priority_of(self.settings, lane),
                        producer=producer,
                    )
                    sent.append(job_id)
        except Exception as exc:
            logger.warning(
                "publisher: broker unreachable after %d of %d jobs (%s); trying again",
                len(sent),
                len(due),
                type(exc).__name__,
            )
        finally:
            mark_published(self.sessions, sent)
        if sent:
            logger.info("published %d job(s) to %s: %s", len(sent), self.queue.name, sent[:20])
        return len(sent)
