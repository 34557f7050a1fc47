"""What the cluster looks like now, read in one place: :func:`cluster_status` is what
``ketanode cluster status`` prints, the dashboard's cluster page shows and ``/metrics``
exports; :func:`scheduler_health` is how ``/health`` of a web role judges the scheduler,
which runs in another process.

The status: the role processes seen in the last 24 h (host, pid, version, heartbeat, alive
or not; a worker with the jobs it runs), the active scheduler, jobs by state and lane, jobs
running but not on a live worker (``members.cluster_state``), and the work queue's ready
messages and consumers in RabbitMQ (a passive declare, ``engine.queue_depth``).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from ketanode.cluster.engine import make_celery, queue_depth
from ketanode.cluster.members import cluster_state
from ketanode.config import Settings

# how long a reader waits for RabbitMQ before the queue is reported unreachable
BROKER_TIMEOUT_SECONDS = 5.0


def cluster_status(
    settings: Settings,
    sessions: sessionmaker[Session],
    app: Celery | None = None,
    broker_timeout: float = BROKER_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """The members, the active scheduler, the jobs, and ``queue``: the work queue's depth
    (``messages`` and ``consumers`` None, ``error`` set, when the broker does not answer).
    ``app``: a Celery app of ``settings`` to reuse (one is made otherwise). The database
    session is closed before the broker is asked."""
    with sessions() as session:
        data = cluster_state(session, settings.cluster.heartbeat_seconds)
    celery = app if app is not None else make_celery(settings)
    data["queue"] = queue_depth(celery, settings, timeout=broker_timeout).as_dict()
    return data


def scheduler_health(state: dict[str, Any]) -> dict[str, Any]:
    """Is an active scheduler alive, from :func:`members.cluster_state` (or
    :func:`cluster_status`)? ``running`` is the verdict; ``reason`` says why not."""
    schedulers = [m for m in state["members"] if m["role"] == "scheduler"]
    alive = [m for m in schedulers if m["alive"]]
    active = next((m for m in alive if m["name"] == state["active_scheduler"]), None)
    out: dict[str, Any] = {
        "running": active is not None,
        "active": None,
        "standbys": len(alive) - (1 if active is not None else 0),
        "reason": None,
    }
    if active is not None:
        out["active"] = {
            "name": active["name"],
            "host": active["host"],
            "version": active["version"],
            "heartbeat_age_s": active["heartbeat_age_s"],
        }
    elif alive:
        out["reason"] = (
            f"no active scheduler: {len(alive)} scheduler(s) alive, all standbys "
            "(none holds the scheduler lock yet)"
        )
    elif schedulers:
        last = min(schedulers, key=lambda m: m["heartbeat_age_s"])
        how = "stopped" if last["stopped_at"] else "has sent no heartbeat for"
        ago = "s ago" if last["stopped_at"] else "s"
        out["reason"] = (
            f"no scheduler alive: the last one (on {last['host']}) {how} "
            f"{last['heartbeat_age_s']} {ago}"
        )
    else:
        out["reason"] = "no scheduler has run in the last 24 h"
    return out


class ClusterReader:
    """The cluster status for a long-lived reader (the dashboard, /metrics, /health of a web
    role): one Celery app reused by every read."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        broker_timeout: float = BROKER_TIMEOUT_SECONDS,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.broker_timeout = broker_timeout
        self.celery = make_celery(settings)

    def status(self) -> dict[str, Any]:
        """:func:`cluster_status`."""
        return cluster_status(self.settings, self.sessions, self.celery, self.broker_timeout)

    def scheduler(self) -> dict[str, Any]:
        """:func:`scheduler_health`, from the database only (no broker)."""
        with self.sessions() as session:
            state = cluster_state(session, self.settings.cluster.heartbeat_seconds)
        return scheduler_health(state)
