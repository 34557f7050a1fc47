"""Cluster mode on the command line: ``ketanode serve --role ROLE``, ``ketanode worker`` and
``ketanode cluster status`` (docs/scaling.md)."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import typer
from rich.table import Table

from ketanode import __version__
from ketanode.cli.common import (
    JsonOpt,
    console,
    err,
    run_until_stopped,
    sessions_for,
    settings_of,
    stop_on_signals,
)
from ketanode.config import Settings
from ketanode.logs import setup_logging
from ketanode.texts import RESEARCH_USE_ONLY

cluster_app = typer.Typer(
    help="Cluster mode: the role processes and the queue.", no_args_is_help=True
)
logger = logging.getLogger(__name__)


def _cluster_error(exc: Exception) -> typer.Exit:
    err.print(f"[red]{exc}[/red]", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def serve_role(settings: Settings, role: str | None) -> None:
    """Run one cluster role until SIGTERM or Ctrl-C (or until it fails: exit 3)."""
    from ketanode.node import ROLES, ClusterConfigError, check_cluster, make_role

    try:
        check_cluster(settings)
    except ClusterConfigError as exc:
        raise _cluster_error(exc) from exc
    if role is None:
        raise _cluster_error(
            ClusterConfigError(
                "cluster.enabled = true: start one role per process, "
                f"`ketanode serve --role {'|'.join(ROLES)}` or `ketanode worker`"
            )
        )

    setup_logging(settings.logging)
    stop = stop_on_signals()
    try:
        node = make_role(settings, role)
    except ClusterConfigError as exc:
        raise _cluster_error(exc) from exc
    what = node.start()
    logger.info("ketanode %s ready: %s (%s)", __version__, what, RESEARCH_USE_ONLY)
    run_until_stopped(node, stop, node.failed)
    if node.failed.is_set():
        raise typer.Exit(3)


def worker(
    ctx: typer.Context,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Jobs run at once (default: cluster.worker_concurrency)."),
    ] = None,
) -> None:
    """Run a Celery worker that runs jobs (cluster mode). SIGTERM: finish running jobs, stop."""
    from ketanode.node import ClusterConfigError, run_worker

    settings = settings_of(ctx)
    setup_logging(settings.logging)
    try:
        code = run_worker(settings, concurrency, loglevel=settings.logging.level)
    except ClusterConfigError as exc:
        raise _cluster_error(exc) from exc
    if code:
        raise typer.Exit(code)


def cluster_status_data(settings: Settings) -> dict[str, Any]:
    """What the dashboard's cluster page and /metrics show too (``cluster/status.py``)."""
    from ketanode.cluster.status import cluster_status

    return cluster_status(settings, sessions_for(settings))


@cluster_app.command("status")
def cluster_status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Roles alive (host, version, heartbeat), the active scheduler, the queue depth in
    RabbitMQ, jobs by state and lane, and the jobs running on each worker."""
    from ketanode.node import ClusterConfigError, check_cluster

    settings = settings_of(ctx)
    try:
        check_cluster(settings)
    except ClusterConfigError as exc:
        raise _cluster_error(exc) from exc
    data = cluster_status_data(settings)
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    table = Table(title=f"ketanode cluster ({RESEARCH_USE_ONLY})")
    for col in ("role", "host", "pid", "version", "alive", "heartbeat s", "detail"):
        table.add_column(col)
    for m in data["members"]:
        if not m["alive"] and m["stopped_at"]:
            continue
        detail = dict(m["detail"])
        detail.pop("token", None)
        if m["role"] == "worker":
            detail["running_jobs"] = m.get("running_jobs", [])
        table.add_row(
            m["role"],
            m["host"],
            str(m["pid"]),
            m["version"],
            "yes" if m["alive"] else "NO",
            str(m["heartbeat_age_s"]),
            json.dumps(detail),
        )
    console.print(table)
    q = data["queue"]
    queue_text = (
        f"{q['messages']} ready, {q['consumers']} consumers"
        if q["error"] is None
        else f"unreachable ({q['error']})"
    )
    console.print(f"active scheduler: {data['active_scheduler'] or 'NONE'}")
    console.print(f"queue {q['queue']}: {queue_text}", highlight=False)
    console.print(f"jobs: {json.dumps(data['jobs'])}")
    if data["running_not_by_a_live_worker"]:
        console.print(
            f"running, but not on a live worker (re-queued when the lease expires): "
            f"{data['running_not_by_a_live_worker']}"
        )
