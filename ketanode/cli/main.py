"""The one entry point: ``ketanode <command>``. Thin: parse, call, print."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ketanode import __version__
from ketanode.cli.admin import audit_app, retention_app, users_app
from ketanode.cli.cluster import cluster_app, serve_role, worker
from ketanode.cli.common import (
    JsonOpt,
    console,
    err,
    load_settings_or_exit,
    print_rows,
    run_until_stopped,
    sessions_for,
    settings_of,
    stop_on_signals,
)
from ketanode.cli.model import model_app
from ketanode.cli.reprocess import reprocess
from ketanode.cli.results import dispatch_app, results_app
from ketanode.db import queries
from ketanode.db.session import make_engine
from ketanode.logs import setup_logging
from ketanode.roots import spool_root
from ketanode.texts import RESEARCH_USE_ONLY

app = typer.Typer(
    help=f"ketanode: scores structural 3D T1 MRI. {RESEARCH_USE_ONLY}.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema (Alembic).", no_args_is_help=True)
series_app = typer.Typer(help="Series received by the node.", no_args_is_help=True)
jobs_app = typer.Typer(help="Processing jobs.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(series_app, name="series")
app.add_typer(jobs_app, name="jobs")
app.add_typer(model_app, name="model")
app.add_typer(results_app, name="results")
app.add_typer(dispatch_app, name="dispatch")
app.add_typer(users_app, name="users")
app.add_typer(audit_app, name="audit")
app.add_typer(retention_app, name="retention")
app.add_typer(cluster_app, name="cluster")
app.command("worker")(worker)
app.command("reprocess")(reprocess)

logger = logging.getLogger(__name__)


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="TOML settings file (default: $KETANODE_CONFIG, else embedded defaults).",
        ),
    ] = None,
) -> None:
    ctx.obj = load_settings_or_exit(config)


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


@app.command()
def serve(
    ctx: typer.Context,
    role: Annotated[
        str | None,
        typer.Option(help="Cluster mode ([cluster] enabled): listener, scheduler or web."),
    ] = None,
) -> None:
    """Run the node: DICOM listener, series tracking, workers. Stops on SIGTERM or Ctrl-C."""
    from ketanode.node import Node
    from ketanode.receive.frontend import FrontEndError

    if role is not None or ctx.obj.cluster.enabled:
        serve_role(ctx.obj, role)
        return
    settings = settings_of(ctx)
    setup_logging(settings.logging)
    stop = stop_on_signals()
    try:
        node = Node(settings)
    except FrontEndError as exc:  # node.receiver_program is not there
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    host, port = node.start()
    logger.info("ketanode %s ready on %s:%s (%s)", __version__, host, port, RESEARCH_USE_ONLY)
    run_until_stopped(node, stop)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context, revision: str = "head") -> None:
    """Apply the Alembic migrations. On PostgreSQL under the schema lock that the roles take
    at start: two hosts upgrading at once take turns."""
    from ketanode.db.migrate import current_revision, upgrade

    engine = make_engine(settings_of(ctx).database.url)
    upgrade(engine, revision)
    print(f"database at revision {current_revision(engine)}")


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """Show the schema revision and the newest one this version knows."""
    from ketanode.db.migrate import current_revision, head_revision

    engine = make_engine(settings_of(ctx).database.url)
    print(f"current {current_revision(engine)}, head {head_revision(engine)}")


@app.command()
def status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Counts of series, jobs, associations and refusals."""
    import shutil

    settings = settings_of(ctx)
    with sessions_for(settings)() as session:
        data = queries.status(session)
    spool = settings.spool.path
    data["spool_free_mb"] = (shutil.disk_usage(spool).free // 2**20) if spool.exists() else None
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table(title=f"ketanode status ({RESEARCH_USE_ONLY})")
    table.add_column("what")
    table.add_column("value")
    for key, value in data.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    console.print(table)


@series_app.command("list")
def series_list(
    ctx: typer.Context, state: str | None = None, limit: int = 50, as_json: JsonOpt = False
) -> None:
    """Recent series with their state and reason."""
    with sessions_for(settings_of(ctx))() as session:
        rows = queries.list_series(session, state, limit)
    print_rows(
        rows,
        ["id", "modality", "description", "n_instances", "state", "completion_trigger", "reason"],
        as_json,
        "series",
    )


@series_app.command("show")
def series_show(
    ctx: typer.Context,
    key: str,
    as_json: JsonOpt = False,
    patient: Annotated[bool, typer.Option(help="Include patient identifiers.")] = False,
) -> None:
    """One series (row id or Series Instance UID): facts, selection checks, jobs and steps."""
    with sessions_for(settings_of(ctx))() as session:
        found = queries.find_series(session, key)
        if found is None:
            err.print(f"no series {key!r}")
            raise typer.Exit(1)
        data = queries.series_detail(session, found, with_patient=patient)
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    console.print_json(json.dumps(data, default=str))


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context, state: str | None = None, limit: int = 50, as_json: JsonOpt = False
) -> None:
    """Recent jobs, their state, attempts and failure reasons."""
    with sessions_for(settings_of(ctx))() as session:
        rows = queries.list_jobs(session, state, limit)
    for row in rows:
        row["steps_s"] = ", ".join(f"{s['name']} {s['seconds']:.2f}" for s in row["steps"])
    print_rows(
        rows,
        [
            "id",
            "series_id",
            "state",
            "attempt",
            "created_at",
            "finished_at",
            "steps_s",
            "failed_step",
            "error",
        ],
        as_json,
        "jobs",
    )


@app.command()
def failures(ctx: typer.Context, limit: int = 50, as_json: JsonOpt = False) -> None:
    """C-STOREs the node refused: status, reason, where the dataset was kept."""
    settings = settings_of(ctx)
    with sessions_for(settings)() as session:
        rows = queries.list_failures(session, limit, spool=spool_root(settings))
    print_rows(
        rows,
        ["id", "association_id", "status", "reason", "received_at", "quarantine_path"],
        as_json,
        "refused C-STOREs",
    )


@app.command()
def associations(ctx: typer.Context, limit: int = 50, as_json: JsonOpt = False) -> None:
    """Recent associations: caller, address, outcome, counts."""
    with sessions_for(settings_of(ctx))() as session:
        rows = queries.list_associations(session, limit)
    print_rows(
        rows,
        [
            "id",
            "calling_ae",
            "peer",
            "tls",
            "outcome",
            "stored",
            "duplicates",
            "failed",
            "started_at",
            "reason",
        ],
        as_json,
        "associations",
    )


@app.command()
def echo(
    host: str,
    port: int,
    aet: str,
    calling_ae: Annotated[str, typer.Option(help="Our calling AE title.")] = "KETANODE_SCU",
    as_json: JsonOpt = False,
) -> None:
    """C-ECHO a peer (HOST PORT AET)."""
    import time

    from ketanode.send.sender import AssociationFailed
    from ketanode.send.sender import echo as c_echo

    started = time.perf_counter()
    try:
        status_code = c_echo(host, port, aet, calling_ae)
        ok, message = status_code == 0, f"status 0x{status_code:04X}"
    except AssociationFailed as exc:
        ok, message = False, str(exc)
    ms = round((time.perf_counter() - started) * 1000, 1)
    if as_json:
        print(json.dumps({"ok": ok, "message": message, "ms": ms, "peer": f"{aet}@{host}:{port}"}))
    else:
        console.print(
            f"C-ECHO {aet}@{host}:{port}: {'ok' if ok else 'FAILED'} ({message}, {ms} ms)"
        )
    if not ok:
        raise typer.Exit(1)


@app.command()
def measure(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A T1 NIfTI file or a DICOM series folder.")],
    out_dir: Annotated[
        Path | None, typer.Option(help="Where to write the images (default: a temporary folder).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure regional volumes and run QC on one T1 image (exit 1 when QC fails)."""
    import tempfile

    from ketanode.imaging.analysis import analyse_path

    with tempfile.TemporaryDirectory(prefix="ketanode-measure-") as tmp:
        result = analyse_path(path, out_dir or Path(tmp), settings_of(ctx).pipeline)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        feats = result.get("features") or {"names": [], "vector": []}
        pairs = zip(feats["names"], feats["vector"], strict=True)
        title = f"features {feats.get('spec', {}).get('name', '')}"
        print_rows([{"feature": n, "mL": v} for n, v in pairs], ["feature", "mL"], False, title)
        print_rows(
            result["qc"]["checks"], ["name", "value", "warn", "fail", "outcome"], False, "QC"
        )
        console.print(f"QC: {result['qc']['outcome']}  seconds: {result['seconds']}")
        if result.get("error"):
            console.print(f"reason: {result['error']}")
    if result["qc"]["outcome"] == "fail":
        raise typer.Exit(1)


@app.command()
def demo(
    ctx: typer.Context,
    data_dir: Annotated[Path, typer.Option(help="Where the demo node keeps its data.")] = Path(
        "ketanode-demo"
    ),
    as_json: JsonOpt = False,
) -> None:
    """Start a node on embedded defaults, send it a generated study, show what it did: the
    result, the SR and the report image written (and sent to the configured destinations)."""
    from ketanode.cli.demo import run_demo

    setup_logging(_settings_for_demo())
    result = run_demo(data_dir.resolve(), destinations=settings_of(ctx).destinations)
    if as_json:
        print(
            json.dumps(
                {
                    "data_dir": str(result.data_dir),
                    "sent": result.sent,
                    "series": result.series,
                    "results": result.results,
                },
                indent=2,
                default=str,
            )
        )
    else:
        console.print(f"[bold]ketanode demo[/bold] ({RESEARCH_USE_ONLY})")
        console.print(f"sent over DICOM to port {result.port}: {result.sent}")
        print_rows(
            [s for s in result.series],
            ["id", "description", "n_instances", "state", "completion_trigger", "reason"],
            False,
            "series",
        )
        for s in result.series:
            for job in s["jobs"]:
                steps = ", ".join(f"{st['name']} {st['seconds']:.1f} s" for st in job["steps"])
                console.print(f"job {job['id']} ({job['state']}): {steps}")
                if job.get("error"):
                    console.print(f"  reason: {job['error']}")
                by_name = {st["name"]: st["detail"] or {} for st in job["steps"]}
                if "measure" in by_name:
                    _print_demo_measurement(by_name, result.truth)
        _print_demo_reports(result.results)
        console.print(
            f"database: {result.data_dir / 'ketanode.db'}; look with "
            f"`KETANODE__DATABASE__URL=sqlite:///{result.data_dir / 'ketanode.db'} "
            "ketanode results list` (or `series list`, `dispatch list`)"
        )
    states = {s["state"] for s in result.series}
    if not ({"done", "ignored"} <= states):
        raise typer.Exit(1)


def _print_demo_measurement(by_name: dict[str, Any], truth: dict[str, Any]) -> None:
    measured = dict(zip(by_name["measure"]["names"], by_name["measure"]["vector"], strict=True))
    rows = []
    for region in ("left_frontal", "right_frontal", "left_cerebellum", "right_cerebellum"):
        true = truth["regions"][region]["gm_ml"]
        got = measured[f"gm_{region}"]
        rows.append({"volume": f"GM {region}", "measured": got, "truth": true})
    for key, tkey in (("gm_total", "gm_ml"), ("tiv", "tiv_ml")):
        rows.append({"volume": key, "measured": measured[key], "truth": truth[tkey]})
    for row in rows:
        row["error_%"] = round(100 * (row["measured"] / row["truth"] - 1), 1)
        row["measured"], row["truth"] = round(row["measured"], 1), round(row["truth"], 1)
    print_rows(
        rows, ["volume", "measured", "truth", "error_%"], False, "volumes (mL) vs phantom truth"
    )
    qc = by_name.get("qc") or {}
    checks = ", ".join(f"{c['name']} {c['outcome']}" for c in qc.get("checks", []))
    console.print(f"QC {qc.get('outcome', '?')}: {checks}")
    pred = by_name.get("predict")
    if pred:
        model = pred["model"]
        rule = pred.get("decision_rule") or {}
        console.print(
            f"[bold]prediction: {pred['predicted_class']}[/bold], P(response) "
            f"{pred['probability']:.2f}, SVC decision value {pred['decision_value']:+.2f}; "
            f"model {model['name']} (sha256 {model['sha256'][:12]})"
        )
        if rule.get("threshold") is not None:
            rate = rule.get("training_response_rate")
            console.print(
                f"rule: responder when P >= {rule['threshold'] + rule['margin']:.3f}, "
                f"non-responder when P <= {rule['threshold'] - rule['margin']:.3f}, else "
                "indeterminate; P depends on the training cohort's response rate "
                f"({'not recorded' if rate is None else format(rate, '.0%')})",
                highlight=False,
            )
        if model["synthetic"]:
            console.print(f"[bold yellow]DEMO: {model['label']}[/bold yellow]")


def _print_demo_reports(results: list[dict[str, Any]]) -> None:
    """Where the SR and the report image of each result are, and whether they were sent.
    Paths are printed whole (no wrapping, no markup) so that they can be copied."""
    for r in results:
        console.print(f"[bold]result {r['id']}[/bold] ({r['status']}); what goes back to PACS:")
        for o in r["objects"]:
            kind = "Structured Report" if o["kind"] == "sr" else "report image"
            lines = [f"  {kind}: {o['path']}"]
            if o.get("png"):
                lines.append(f"    the page as PNG (what the radiologist sees): {o['png']}")
            lines += [f"    to {dest}: {state}" for dest, state in o["dispatch"].items()]
            if not o["dispatch"]:
                lines.append(
                    "    not sent: no destination configured (add [[destinations]] to a "
                    "settings file and run `ketanode -c FILE demo`)"
                )
            for line in lines:
                console.print(line, markup=False, highlight=False, soft_wrap=True)


def _settings_for_demo() -> Any:
    from ketanode.config import LoggingSettings

    return LoggingSettings(level="WARNING")


def run() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
