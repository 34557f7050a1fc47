"""The worker pool: threads that claim jobs from the database, each job run in a child process.

The child process (forked from a forkserver that has the pipeline imported) isolates the
node from the imaging libraries: a segmentation fault, a leak or a hang in one job cannot
take the listener down. The child dies with its parent (PR_SET_PDEATHSIG), and a job whose
child ended abnormally or ran past ``pipeline.job_timeout_seconds`` is failed with that reason.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from sqlalchemy.orm import Session, sessionmaker

from ketanode.config import Settings
from ketanode.db.jobqueue import claim_next, finish, release

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["ketanode.process.pipeline"])


def die_with_parent() -> None:
    """This process gets SIGKILL when its parent dies (Linux; used by the job processes here
    and by the cluster worker's pool)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the lease expiry still re-queues the job
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _watch_node(node_pid: int) -> None:
    """The child's parent is the forkserver, not the node: watch the node itself."""

    def watch() -> None:
        while _alive(node_pid):
            time.sleep(0.1)
        os._exit(70)

    threading.Thread(target=watch, name="ketanode-watch-node", daemon=True).start()


def _child(settings: Settings, job_id: int, owner: str, attempt: int, node_pid: int) -> None:
    """Entry point of a job's process: its own engine, logging, and the steps."""
    die_with_parent()
    _watch_node(node_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the node, which stops us
    from ketanode.db.session import make_engine, make_session_factory
    from ketanode.logs import setup_logging
    from ketanode.process.pipeline import run_job

    setup_logging(settings.logging)
    engine = make_engine(settings.database.url)
    try:
        ok = run_job(make_session_factory(engine), settings, job_id, owner, attempt=attempt)
    finally:
        engine.dispose()
    raise SystemExit(0 if ok else 3)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class WorkerPool:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        owner: str,
        on_job_ended: Callable[[int], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.on_job_ended = on_job_ended  # e.g. wake the dispatcher
        self.settings = settings
        self.owner = owner
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._children: dict[int, BaseProcess] = {}
        self._lock = threading.Lock()

    @property
    def busy(self) -> int:
        with self._lock:
            return len(self._children)

    def start(self) -> None:
        for n in range(self.settings.pipeline.workers):
            thread = threading.Thread(target=self._loop, name=f"ketanode-worker-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming; interrupt running jobs and put them back in the queue."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            children = dict(self._children)
        for child in children.values():
            if child.is_alive():
                child.terminate()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                taken = claim_next(self.sessions, self.owner, self.settings.pipeline.lease_seconds)
            except Exception:
                logger.exception("could not claim a job")
                taken = None
            if taken is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            job_id, attempt = taken
            try:
                self._run(job_id, attempt)
            except Exception:
                logger.exception("job %s: the worker failed to run it", job_id)
            if self.on_job_ended is not None:
                try:
                    self.on_job_ended(job_id)
                except Exception:
                    logger.exception("job %s: the end-of-job callback failed", job_id)

    def _run(self, job_id: int, attempt: int) -> None:
        # the pool's threads share one owner: the attempt tells this claim from a later one
        child = _CONTEXT.Process(
            target=_child,
            args=(self.settings, job_id, self.owner, attempt, os.getpid()),
            name=f"ketanode-job-{job_id}",
            daemon=True,
        )
        with self._lock:
            self._children[job_id] = child
        try:
            child.start()
            child.join(self.settings.pipeline.job_timeout_seconds)
            timed_out = child.is_alive()
            if timed_out:
                child.kill()
                child.join(10)
        finally:
            with self._lock:
                self._children.pop(job_id, None)
        if child.exitcode in (0, 3):  # the child recorded the outcome itself
            return
        if self._stop.is_set():
            release(
                self.sessions,
                job_id,
                self.owner,
                "interrupted: the node was stopping",
                attempt=attempt,
            )
            logger.info("job %s interrupted by the node stopping; re-queued", job_id)
            return
        reason = (
            f"timed out after {self.settings.pipeline.job_timeout_seconds:.0f} s"
            if timed_out
            else f"pipeline process ended abnormally ({describe_exit(child.exitcode)})"
        )
        logger.error("job %s: %s", job_id, reason)
        finish(
            self.sessions,
            job_id,
            self.owner,
            ok=False,
            failed_step="worker",
            error=reason,
            attempt=attempt,
        )
