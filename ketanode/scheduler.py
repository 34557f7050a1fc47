"""APScheduler timers: series completion, lease renewal, recovery sweep, dispatch retries."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

logger = logging.getLogger(__name__)


def _guarded(name: str, fn: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except Exception:
            logger.exception("scheduled task %s failed", name)

    run.__name__ = name
    return run


class Timers:
    def __init__(self) -> None:
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(4)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
            timezone=dt.UTC,
        )

    def every(self, name: str, seconds: float, fn: Callable[[], Any]) -> None:
        self.scheduler.add_job(
            _guarded(name, fn),
            "interval",
            seconds=seconds,
            id=name,
            name=name,
            replace_existing=True,
        )

    def soon(self, name: str, delay_seconds: float, fn: Callable[[], Any]) -> None:
        """Run ``fn`` once after a delay (a prompt check on top of the periodic one)."""
        run_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay_seconds)
        self.scheduler.add_job(
            _guarded(name, fn), "date", run_date=run_at, name=name, misfire_grace_time=60
        )

    def start(self) -> None:
        self.scheduler.start()

    @property
    def running(self) -> bool:
        return bool(self.scheduler.running)

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
