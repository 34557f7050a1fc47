"""The Celery application: broker, the work queue (a RabbitMQ priority queue), and what a
message is (a job id, nothing else: the job row is the source of truth).

Why one priority queue and not a queue per lane: on RabbitMQ Celery sets the prefetch limit
per channel, so a worker that consumes a live and a batch queue takes from either in turn,
and a live scan may wait behind the batch. With one queue and message priorities the broker
hands the next free worker the highest-priority message: a live scan waits only for the
jobs already running.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from amqp.exceptions import NotFound
from celery import Celery
from kombu.entity import Exchange, Queue

from ketanode.config import Settings
from ketanode.db.models import JobLane

TASK_NAME = "ketanode.run_job"
MAX_PRIORITY = 9


def work_queue(settings: Settings) -> Queue:
    name = settings.cluster.queue
    return Queue(  # type: ignore[no-untyped-call]
        name,
        Exchange(name, type="direct", durable=True),  # type: ignore[no-untyped-call]
        routing_key=name,
        durable=True,
        queue_arguments={"x-max-priority": MAX_PRIORITY},
    )


def make_celery(settings: Settings) -> Celery:
    """The Celery app of this cluster: one job per worker process at a time, the message
    acknowledged only after the job ended (a worker that dies gives its message back)."""
    cfg = settings.cluster
    app = Celery("ketanode", broker=cfg.broker_url, set_as_current=False)
    queue = work_queue(settings)
    app.conf.update(
        task_queues=[queue],
        task_default_queue=queue.name,
        task_default_exchange=queue.name,
        task_default_routing_key=queue.name,
        task_create_missing_queues=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_default_delivery_mode="persistent",
        # a published id is recorded only once the broker confirmed it
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
        # the pipeline has its own time limit; SoftTimeLimitExceeded fails the step
        task_soft_time_limit=settings.pipeline.job_timeout_seconds,
        task_time_limit=settings.pipeline.job_timeout_seconds + 60,
        # a job keeps running when the broker connection drops: its message comes back and
        # the second delivery finds the job claimed (no duplicate work)
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # no remote control, events or gossip: workers of several clusters may share a
        # broker, and nothing here needs them
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_max_tasks_per_child=50,
    )
    return app


def priority_of(settings: Settings, lane: str) -> int:
    cfg = settings.cluster
    return cfg.batch_priority if lane == JobLane.BATCH else cfg.live_priority


@dataclass
class QueueDepth:
    name: str
    messages: int | None  # ready (not yet delivered) messages
    consumers: int | None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.name,
            "messages": self.messages,
            "consumers": self.consumers,
            "error": self.error,
        }


def queue_depth(app: Celery, settings: Settings, timeout: float = 5.0) -> QueueDepth:
    """Ready messages and consumers of the work queue (a passive declare: creates nothing)."""
    name = settings.cluster.queue
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
            channel = conn.channel()
            try:
                ok = channel.queue_declare(queue=name, passive=True)
            finally:
                with contextlib.suppress(Exception):  # a channel the broker closed
                    channel.close()
            return QueueDepth(name, int(ok.message_count), int(ok.consumer_count))
    except NotFound:
        # no worker and no publisher declared it yet: nothing is waiting in it
        return QueueDepth(name, 0, 0, None)
    except Exception as exc:
        return QueueDepth(name, None, None, f"{type(exc).__name__}: {exc}")
