"""The in-process worker pool: threads that claim jobs from the database and run them."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from ketanode.config import Settings
from ketanode.jobqueue import claim
from ketanode.pipeline import run_job

logger = logging.getLogger(__name__)


class WorkerPool:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings, owner: str) -> None:
        self.sessions = sessions
        self.settings = settings
        self.owner = owner
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.busy = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        for n in range(self.settings.pipeline.workers):
            thread = threading.Thread(target=self._loop, name=f"ketanode-worker-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job_id = claim(self.sessions, self.owner, self.settings.pipeline.lease_seconds)
            except Exception:
                logger.exception("could not claim a job")
                job_id = None
            if job_id is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            with self._lock:
                self.busy += 1
            try:
                run_job(self.sessions, self.settings, job_id, self.owner)
            finally:
                with self._lock:
                    self.busy -= 1
