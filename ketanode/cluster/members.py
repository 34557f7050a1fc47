"""The role processes of a cluster: each writes a heartbeat row; ``ketanode cluster status``
reads them with the queue depth and the jobs running per worker."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, create_engine, func, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from ketanode import __version__
from ketanode.db.models import ClusterMember, Job, JobState, utcnow
from ketanode.db.session import normalise_url

logger = logging.getLogger(__name__)

ROLES = ("listener", "scheduler", "worker", "web")
ALIVE_HEARTBEATS = 3  # a member is alive while its last heartbeat is younger than this many


def new_token() -> str:
    return uuid.uuid4().hex[:10]


class Membership:
    """This process's row in ``cluster_member``, its heartbeat written by a thread.

    Its own engine without a pool (a heartbeat opens one short connection): nothing a
    forked child could inherit and misuse.
    """

    def __init__(
        self,
        url: str,
        role: str,
        heartbeat_seconds: float,
        detail: Callable[[], dict[str, Any]] | None = None,
        token: str | None = None,
    ) -> None:
        self.role = role
        self.token = token or new_token()
        self.host = socket.gethostname()
        self.name = f"{role}@{self.host}:{os.getpid()}:{self.token}"
        self.heartbeat_seconds = heartbeat_seconds
        self.detail = detail or (lambda: {})
        self.engine: Engine = create_engine(normalise_url(url), poolclass=NullPool)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _detail(self) -> dict[str, Any]:
        try:
            return {"token": self.token, **self.detail()}
        except Exception:
            logger.exception("membership: the detail callback failed")
            return {"token": self.token}

    def start(self) -> None:
        now = utcnow()
        with self.sessions.begin() as session:
            session.add(
                ClusterMember(
                    name=self.name,
                    role=self.role,
                    host=self.host,
                    pid=os.getpid(),
                    version=__version__,
                    started_at=now,
                    heartbeat_at=now,
                    detail=self._detail(),
                )
            )
        self._thread = threading.Thread(
            target=self._loop, name=f"ketanode-heartbeat-{self.role}", daemon=True
        )
        self._thread.start()

    def beat(self) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(ClusterMember)
                .where(ClusterMember.name == self.name)
                .values(heartbeat_at=utcnow(), detail=self._detail())
            )

    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self.beat()
            except Exception as exc:
                logger.warning("membership: heartbeat failed (%s)", type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        try:
            with self.sessions.begin() as session:
                session.execute(
                    update(ClusterMember)
                    .where(ClusterMember.name == self.name)
                    .values(stopped_at=utcnow(), detail=self._detail())
                )
        except Exception as exc:
            logger.warning("membership: could not record the stop (%s)", type(exc).__name__)
        self.engine.dispose()


def is_alive(member: ClusterMember, heartbeat_seconds: float, now: dt.datetime) -> bool:
    if member.stopped_at is not None:
        return False
    return (now - member.heartbeat_at).total_seconds() < ALIVE_HEARTBEATS * heartbeat_seconds


def token_of(owner: str | None) -> str | None:
    """The worker token at the end of a lease owner (``host:pid:token``)."""
    if not owner or owner.count(":") < 2:
        return None
    return owner.rsplit(":", 1)[1]


def cluster_state(
    session: Session, heartbeat_seconds: float, recent_hours: float = 24.0
) -> dict[str, Any]:
    """Members seen in the last ``recent_hours`` (alive or not), the active scheduler, job
    counts by state and lane, and the jobs running per worker."""
    now = utcnow()
    members = session.scalars(
        select(ClusterMember)
        .where(ClusterMember.heartbeat_at > now - dt.timedelta(hours=recent_hours))
        .order_by(ClusterMember.role, ClusterMember.host, ClusterMember.started_at)
    ).all()
    running = session.execute(
        select(Job.id, Job.lease_owner, Job.lane).where(Job.state == JobState.RUNNING)
    ).all()
    per_token: dict[str | None, list[int]] = {}
    for job_id, owner, _lane in running:
        per_token.setdefault(token_of(owner), []).append(int(job_id))
    rows = []
    active = None
    for m in members:
        alive = is_alive(m, heartbeat_seconds, now)
        detail = dict(m.detail or {})
        token = detail.get("token")
        row = {
            "name": m.name,
            "role": m.role,
            "host": m.host,
            "pid": m.pid,
            "version": m.version,
            "alive": alive,
            "started_at": m.started_at.isoformat(timespec="seconds"),
            "heartbeat_age_s": round((now - m.heartbeat_at).total_seconds(), 1),
            "stopped_at": m.stopped_at.isoformat(timespec="seconds") if m.stopped_at else None,
            "detail": detail,
        }
        if m.role == "worker":
            row["running_jobs"] = sorted(per_token.pop(token, []))
        if m.role == "scheduler" and alive and detail.get("active"):
            active = m.name
        rows.append(row)
    jobs: dict[str, dict[str, int]] = {}
    for state, lane, n in session.execute(
        select(Job.state, Job.lane, func.count()).group_by(Job.state, Job.lane)
    ).all():
        jobs.setdefault(str(state), {})[str(lane)] = int(n)
    orphans = sorted(j for ids in per_token.values() for j in ids)
    return {
        "members": rows,
        "alive": {r: sum(1 for m in rows if m["role"] == r and m["alive"]) for r in ROLES},
        "active_scheduler": active,
        "jobs": jobs,
        "running_not_by_a_live_worker": orphans,
    }
