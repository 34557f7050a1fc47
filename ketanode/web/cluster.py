"""The cluster on the dashboard (``[cluster] enabled``, the web role): ``/cluster`` (page),
``/api/cluster`` (JSON), and what ``/metrics`` and ``/health`` read of it.

Everything comes from ``ketanode.cluster.status``, the function ``ketanode cluster status``
prints: the role processes with their hosts, versions and heartbeats, the active scheduler,
the work queue's depth in RabbitMQ, jobs by state and lane and the jobs each worker runs. In
the embedded node there is no cluster: the page answers 404 and the dashboard's menu has
no entry for it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session, sessionmaker

from ketanode.config import Settings
from ketanode.web.auth import WebUser, api_user, page_user
from ketanode.web.context import context_of, render

if TYPE_CHECKING:
    from ketanode.cluster.status import ClusterReader

logger = logging.getLogger(__name__)

# a page or a scrape waits this long for RabbitMQ before it says the queue is unreachable
BROKER_TIMEOUT_SECONDS = 2.0


def make_reader(settings: Settings, sessions: sessionmaker[Session]) -> ClusterReader | None:
    """The dashboard's cluster reader in cluster mode; None in the embedded node (Celery is
    imported only in cluster mode)."""
    if not settings.cluster.enabled:
        return None
    from ketanode.cluster.status import ClusterReader

    return ClusterReader(settings, sessions, broker_timeout=BROKER_TIMEOUT_SECONDS)


def reader_of(request: Request) -> ClusterReader:
    """The dashboard's cluster reader; 404 in the embedded node (no cluster)."""
    reader = context_of(request).cluster
    if reader is None:
        raise HTTPException(status_code=404, detail="not a cluster (cluster.enabled is false)")
    return reader


router = APIRouter()

PageUser = Annotated[WebUser, Depends(page_user)]
ApiUser = Annotated[WebUser, Depends(api_user)]


@router.get("/cluster", include_in_schema=False)
def cluster_page(request: Request, user: PageUser) -> Response:
    data = reader_of(request).status()
    shown = []
    for m in data["members"]:
        if not m["alive"] and m["stopped_at"]:
            continue  # stopped cleanly: as `ketanode cluster status`
        detail = {k: v for k, v in m["detail"].items() if k != "token"}
        shown.append({**m, "detail": detail})
    return render(request, "cluster.html", user=user, data=data, members=shown)


@router.get("/api/cluster", include_in_schema=False)
def cluster_json(request: Request, user: ApiUser) -> dict[str, Any]:
    """``ketanode cluster status --json``."""
    return reader_of(request).status()
