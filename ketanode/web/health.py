"""``/health``: is the node able to do its work? JSON, 200 when healthy, else 503.

Healthy means: the database answers ``SELECT 1``, the spool has more free space than
``spool.min_free_mb`` (below it the node refuses C-STOREs with 0xA700), and the scheduler
(completion sweep, recovery, dispatch) is running. No login: a load balancer or systemd
watchdog asks it. Nothing here names a patient, a path or the database URL.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from ketanode import __version__
from ketanode.config import Settings
from ketanode.scheduler import Timers
from ketanode.web.context import context_of

logger = logging.getLogger(__name__)


def database_ok(sessions: sessionmaker[Session]) -> bool:
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception as exc:  # any driver error means "not usable"
        logger.warning("health: database check failed (%s)", type(exc).__name__)
        return False


def spool_free_bytes(settings: Settings) -> int | None:
    try:
        return int(shutil.disk_usage(settings.spool.path).free)
    except OSError as exc:
        logger.warning("health: spool free space unknown (%s)", type(exc).__name__)
        return None


def check(
    settings: Settings, sessions: sessionmaker[Session], timers: Timers | None
) -> tuple[bool, dict[str, Any]]:
    """(healthy, the JSON body)."""
    db = database_ok(sessions)
    free = spool_free_bytes(settings)
    floor = int(settings.spool.min_free_mb * 2**20)
    spool_ok = free is not None and free >= floor
    running = bool(timers is not None and timers.running)
    healthy = db and spool_ok and running
    body = {
        "status": "ok" if healthy else "unhealthy",
        "version": __version__,
        "database": {"ok": db},
        "spool": {"ok": spool_ok, "free_bytes": free, "min_free_bytes": floor},
        "scheduler": {"running": running},
    }
    return healthy, body


router = APIRouter()


@router.get("/health", include_in_schema=False)
def health(request: Request) -> JSONResponse:
    ctx = context_of(request)
    healthy, body = check(ctx.settings, ctx.sessions, ctx.timers)
    return JSONResponse(
        body, status_code=200 if healthy else 503, headers={"Cache-Control": "no-store"}
    )
