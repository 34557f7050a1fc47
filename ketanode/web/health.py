"""``/health``: is the node able to do its work? JSON, 200 when healthy, else 503.

Healthy means: the database answers ``SELECT 1``, the spool has more free space than
``spool.min_free_mb`` (below it the node refuses C-STOREs with 0xA700), and the scheduler
(completion sweep, recovery, dispatch) is running. No login: a load balancer or systemd
watchdog asks it. Nothing here names a patient, a path or the database URL.

In cluster mode (the web role) the scheduler is another process, on this host or another:
it is running when an active scheduler (the holder of the scheduler lock) is alive in the
``cluster_member`` table (its heartbeat fresh). The body then says which one and on which
host, how many standbys wait, and in ``reasons`` why the cluster is unhealthy.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ketanode import __version__
from ketanode.config import Settings
from ketanode.scheduler import Timers
from ketanode.web.context import WebContext, context_of

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
    """(healthy, the JSON body) of the embedded node: its own timers are the scheduler."""
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


def check_cluster(ctx: WebContext) -> tuple[bool, dict[str, Any]]:
    """(healthy, the JSON body) of a cluster's web role: the database, an active scheduler
    alive in the members table, and the shared spool's free space once it exists (the
    listeners create it)."""
    assert ctx.cluster is not None
    _, body = check(ctx.settings, ctx.sessions, None)
    db = bool(body["database"]["ok"])
    reasons = []
    if not db:
        reasons.append("the database does not answer")
        scheduler: dict[str, Any] = {
            "running": False,
            "reason": "unknown (the cluster's members are in the database)",
        }
    else:
        try:
            scheduler = ctx.cluster.scheduler()
        except SQLAlchemyError as exc:
            logger.warning(
                "health: the cluster's members could not be read (%s)", type(exc).__name__
            )
            scheduler = {"running": False, "reason": "the cluster's members could not be read"}
    if not ctx.settings.spool.path.is_dir():
        # a listener makes it; the web role (perhaps on a host of its own) only reads
        body["spool"] = {"ok": None, "exists": False}
    elif not body["spool"]["ok"]:
        reasons.append("the spool is below its free-space floor (or cannot be read)")
    if db and not scheduler["running"]:
        reasons.append(str(scheduler["reason"]))
    healthy = not reasons
    body.update(
        status="ok" if healthy else "unhealthy",
        mode="cluster",
        scheduler=scheduler,
        reasons=reasons,
    )
    return healthy, body


router = APIRouter()


@router.get("/health", include_in_schema=False)
def health(request: Request) -> JSONResponse:
    ctx = context_of(request)
    if ctx.cluster is not None:
        healthy, body = check_cluster(ctx)
    else:
        healthy, body = check(ctx.settings, ctx.sessions, ctx.timers)
    return JSONResponse(
        body, status_code=200 if healthy else 503, headers={"Cache-Control": "no-store"}
    )
