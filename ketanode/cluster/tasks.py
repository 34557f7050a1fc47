"""The process side of a cluster: the Celery task that runs one job by id.

The task claims the job with the same conditional UPDATE as the embedded worker pool, so a
message delivered twice, or a job id published twice, runs once: the second claim finds the
job running (or done) and the task returns. The pipeline runs in a child process while the
task's process renews the lease; a worker that dies stops renewing, and the active
scheduler's recovery sweep re-queues the job when the lease expires (at once when the dead
worker was on the scheduler's host).
The message is acknowledged only after the job ended (``acks_late``), and given back to the
broker when the worker process is lost (``reject_on_worker_lost``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from ketanode.cluster.engine import TASK_NAME
from ketanode.config import Settings
from ketanode.db.jobqueue import claim_job_attempt, finish, renew
from ketanode.db.session import make_engine, make_session_factory

# imported here, in the worker's main process, so that the pool's children are forked with
# the imaging libraries loaded (a child then claims its job at once, not after the imports)
from ketanode.process.pipeline import run_job
from ketanode.process.worker import describe_exit, die_with_parent

logger = logging.getLogger(__name__)


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


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _child_started(**_kwargs: Any) -> None:
    """A pool process dies with its worker (SIGKILL of the worker: its jobs are re-queued,
    never left running unwatched)."""
    die_with_parent()
    _state.engine = None
    _state.engine_pid = None


def _job_process(settings: Settings, job_id: int, owner: str, attempt: int) -> None:
    """The job's own process (forked from the pool process, the libraries already loaded):
    its own engine; it dies with the pool process."""
    die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine = make_engine(settings.database.url)
    try:
        ok = run_job(make_session_factory(engine), settings, job_id, owner, attempt=attempt)
    finally:
        engine.dispose()
    os._exit(0 if ok else 3)  # no finaliser of what the fork inherited runs


def _fork_job(settings: Settings, job_id: int, owner: str, attempt: int) -> int:
    """Fork the job's process; returns its pid. (Not multiprocessing: Celery's pool
    processes are daemonic to it, and those may not have children.)"""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child: covered by the cluster tests)
        try:
            _job_process(settings, job_id, owner, attempt)
        finally:
            os._exit(70)
    return pid


def _wait(pid: int, seconds: float) -> int | None:
    """The child's exit code (negative: killed by that signal) once it ended, else None
    after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def run_one(settings: Settings, job_id: int, owner: str) -> str:
    """Claim job ``job_id`` and run it; 'done', 'failed' or 'skipped' (not queued: another
    delivery ran it, it is running elsewhere, or it was superseded).

    The pipeline runs in a child process, and this process renews the lease while it waits:
    an imaging library that holds the interpreter lock for minutes cannot starve the
    renewal (the lease would expire and the job run twice), and a crash of the pipeline
    (a segmentation fault, the kernel's OOM killer) fails the job with the reason instead
    of taking the worker down."""
    sessions = _sessions(settings)
    lease = settings.pipeline.lease_seconds
    attempt = claim_job_attempt(sessions, job_id, owner, lease)
    if attempt is None:
        logger.info("job %s: not queued (a duplicate message, or run elsewhere); skipped", job_id)
        return "skipped"
    pid: int | None = None
    try:
        pid = _fork_job(settings, job_id, owner, attempt)
        while (code := _wait(pid, lease / 3)) is None:
            try:
                renew(sessions, owner, lease)
            except Exception:
                logger.exception("job %s: could not renew the lease", job_id)
    except BaseException as exc:  # the soft time limit, a cold shutdown: stop the job too
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        reason = (
            f"timed out after {settings.pipeline.job_timeout_seconds:.0f} s"
            if isinstance(exc, SoftTimeLimitExceeded)
            else f"interrupted ({type(exc).__name__})"
        )
        finish(
            sessions, job_id, owner, ok=False, failed_step="worker", error=reason, attempt=attempt
        )
        raise
    if code in (0, 3):  # the job's process recorded the outcome itself
        return "done" if code == 0 else "failed"
    reason = f"pipeline process ended abnormally ({describe_exit(code)})"
    logger.error("job %s: %s", job_id, reason)
    finish(sessions, job_id, owner, ok=False, failed_step="worker", error=reason, attempt=attempt)
    return "failed"


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
