"""The process side of a cluster: the Celery task that runs one job by id.

The task claims the job with the same conditional UPDATE as the embedded worker pool, so a
message delivered twice, or a job id published twice, runs once: the second claim finds the
job running (or done) and the task returns. While the pipeline runs, a thread renews the
lease; a worker that dies stops renewing, and the active scheduler's recovery sweep re-queues
the job when the lease expires (at once when the dead worker was on the scheduler's host).
The message is acknowledged only after the job ended (``acks_late``), and given back to the
broker when the worker process is lost (``reject_on_worker_lost``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_process_init
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from ketanode.cluster.engine import TASK_NAME
from ketanode.config import Settings
from ketanode.db.jobqueue import claim_job, renew
from ketanode.db.session import make_engine, make_session_factory

# imported here, in the worker's main process, so that the pool's children are forked with
# the imaging libraries loaded (a child then claims its job at once, not after the imports)
from ketanode.process.pipeline import run_job

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class _State:
    """What a worker's processes share (set before the pool forks its children)."""

    settings: Settings | None = None
    token: str = "worker"
    engine: Engine | None = None
    engine_pid: int | None = None


_state = _State()


def owner_for(token: str) -> str:
    """The lease owner of a job run by this process: host, pid (the recovery sweep on the
    same host tells a dead pid at once) and the worker's token (``cluster status`` groups
    running jobs by it)."""
    return f"{socket.gethostname()}:{os.getpid()}:{token}"


def _sessions(settings: Settings) -> sessionmaker[Session]:
    # one engine per process: a pool inherited through fork must not be used by the child
    if _state.engine is None or _state.engine_pid != os.getpid():
        _state.engine = make_engine(settings.database.url)
        _state.engine_pid = os.getpid()
    return make_session_factory(_state.engine)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the lease expiry still re-queues
        pass


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _child_started(**_kwargs: Any) -> None:
    """A pool process dies with its worker (SIGKILL of the worker: its jobs are re-queued,
    never left running unwatched)."""
    _die_with_parent()
    _state.engine = None
    _state.engine_pid = None


def run_one(settings: Settings, job_id: int, owner: str) -> str:
    """Claim job ``job_id`` and run it; 'done', 'failed' or 'skipped' (not queued: another
    delivery ran it, it is running elsewhere, or it was superseded)."""
    sessions = _sessions(settings)
    lease = settings.pipeline.lease_seconds
    if not claim_job(sessions, job_id, owner, lease):
        logger.info("job %s: not queued (a duplicate message, or run elsewhere); skipped", job_id)
        return "skipped"
    stop = threading.Event()

    def renew_lease() -> None:
        while not stop.wait(lease / 3):
            try:
                renew(sessions, owner, lease)
            except Exception:
                logger.exception("job %s: could not renew the lease", job_id)

    renewer = threading.Thread(target=renew_lease, name=f"ketanode-lease-{job_id}", daemon=True)
    renewer.start()
    try:
        ok = run_job(sessions, settings, job_id, owner)
    finally:
        stop.set()
        renewer.join(5)
    return "done" if ok else "failed"


def register(app: Celery, settings: Settings, token: str) -> None:
    """Register the job task on ``app`` for a worker whose processes run with ``settings``."""
    _state.settings = settings
    _state.token = token

    @app.task(  # type: ignore[untyped-decorator]
        name=TASK_NAME,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
    )
    def run_job_task(job_id: int) -> str:
        cfg = _state.settings
        assert cfg is not None
        return run_one(cfg, int(job_id), owner_for(_state.token))
