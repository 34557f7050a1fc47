"""``ketanode results ...`` and ``ketanode dispatch ...``: what the node concluded and what it
sent back to PACS. Thin: parse, call :mod:`ketanode.db.results`, print.

Added to the main app in ``cli/main.py`` with ``app.add_typer(results_app, name="results")``
and ``app.add_typer(dispatch_app, name="dispatch")``. Patient identifiers are printed only with
``--patient``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ketanode.cli.common import (
    JsonOpt,
    cli_actor,
    console,
    err,
    print_rows,
    sessions_for,
    settings_of,
)
from ketanode.db import results as q
from ketanode.db.models import UNSENT_STATES, DispatchState, ResultStatus
from ketanode.roots import reports_root
from ketanode.texts import DEMO, RESEARCH_USE_ONLY

results_app = typer.Typer(
    help=f"Results the node sent back to PACS (SR, report image). {RESEARCH_USE_ONLY}.",
    no_args_is_help=True,
)
dispatch_app = typer.Typer(
    help="The outbox: objects x destinations, their state; re-queue failed rows.",
    no_args_is_help=True,
)

DATE_FORMATS = ["%Y-%m-%d"]
SinceOpt = Annotated[
    dt.datetime | None,
    typer.Option(
        "--since", formats=DATE_FORMATS, help="Results made on or after this day (YYYY-MM-DD, UTC)."
    ),
]
UntilOpt = Annotated[
    dt.datetime | None,
    typer.Option(
        "--until",
        formats=DATE_FORMATS,
        help="Results made on or before this day (YYYY-MM-DD, UTC).",
    ),
]
StatusOpt = Annotated[str | None, typer.Option("--status", help="scored | not_scored")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Model SHA-256 (or a prefix).")]
PatientIdOpt = Annotated[
    str | None, typer.Option("--patient-id", help="Only this Patient ID (not printed).")
]
AccessionOpt = Annotated[
    str | None, typer.Option("--accession", help="Only this Accession Number (not printed).")
]
ClassOpt = Annotated[
    str | None,
    typer.Option("--class", help="Predicted class: responder, non-responder or indeterminate."),
]
AllOpt = Annotated[
    bool, typer.Option("--all", help="Include superseded results (series received again).")
]
PatientOpt = Annotated[
    bool,
    typer.Option(
        "--patient", help="Include patient identifiers (name, ID, birth date, accession)."
    ),
]

RESULT_COLUMNS = [
    "id",
    "created",
    "series_id",
    "status",
    "class",
    "P(response)",
    "decision",
    "model",
    "synthetic",
    "qc",
    "current",
    "dispatch",
    "reason",
]
PATIENT_COLUMNS = ["patient_id", "patient_name", "accession_number"]
OUTBOX_COLUMNS = [
    "id",
    "result_id",
    "kind",
    "destination",
    "state",
    "attempts",
    "next_at",
    "last_status",
    "last_error",
    "sent_at",
    "synthetic",
]


def _title(what: str) -> str:
    return f"{what} ({RESEARCH_USE_ONLY})"


def _result_filter(
    since: dt.datetime | None,
    until: dt.datetime | None,
    status: str | None,
    model: str | None,
    patient_id: str | None,
    accession: str | None,
    predicted_class: str | None,
    include_all: bool,
) -> q.ResultFilter:
    """The filter options of ``results list`` and ``results export``, checked."""
    if since is not None and until is not None and until < since:
        raise typer.BadParameter(
            f"{until.date()} is before --since {since.date()}", param_hint="'--until'"
        )
    if status is not None and status not in {s.value for s in ResultStatus}:
        raise typer.BadParameter(
            " or ".join(s.value for s in ResultStatus), param_hint="'--status'"
        )
    return q.ResultFilter(
        since=since.date() if since else None,
        until=until.date() if until else None,
        status=status,
        model=model,
        patient_id=patient_id,
        accession=accession,
        predicted_class=predicted_class,
        current_only=not include_all,
    )


def _short_time(value: str | None) -> str | None:
    return value[:16].replace("T", " ") if value else None


def _table_row(row: dict[str, Any]) -> dict[str, Any]:
    def num(v: float | None, fmt: str) -> str | None:
        return None if v is None else format(v, fmt)

    sha = row["model_sha256"]
    return row | {
        "created": _short_time(row["created_at"]),
        "class": row["predicted_class"],
        "P(response)": num(row["probability"], ".2f"),
        "decision": num(row["decision_value"], "+.2f"),
        "model": f"{row['model_name']} ({sha[:12]})" if sha else None,
        "synthetic": DEMO if row["synthetic"] else "",
        "qc": row["qc_outcome"],
        "current": "yes" if row["current"] else "superseded",
    }


def _demo_caption(rows: list[dict[str, Any]]) -> str | None:
    labels = sorted({str(r["model_label"] or "synthetic model") for r in rows if r["synthetic"]})
    parts = [f"{DEMO}: " + "; ".join(labels)] if labels else []
    if any(r["predicted_class"] == "indeterminate" for r in rows):
        parts.append(INDETERMINATE_NOTE)
    return "\n".join(parts) or None


INDETERMINATE_NOTE = (
    "indeterminate: P(response) within the margin of the model's threshold "
    "(ketanode results show ID gives the rule)"
)


def rule_line(data: dict[str, Any]) -> str | None:
    """``indeterminate: P(response) 52.0 %; responder when >= 55.0 % ...`` for a scored
    result whose model's rule is known."""
    rule, p = data.get("decision_rule"), data.get("probability")
    if not rule or p is None or rule.get("threshold") is None:
        return None
    t, m = float(rule["threshold"]), float(rule.get("margin") or 0)
    rate = rule.get("training_response_rate")
    shown = f"{float(rate) * 100:.1f} %" if rate is not None else "not recorded"
    return (
        f"{data['predicted_class']}: P(response) {p * 100:.1f} %; responder when >= "
        f"{(t + m) * 100:.1f} %, non-responder when <= {(t - m) * 100:.1f} %, indeterminate "
        f"in between (threshold {t * 100:.1f} %). P depends on the training cohort's response "
        f"rate ({shown})."
    )


@results_app.command("list")
def results_list(
    ctx: typer.Context,
    since: SinceOpt = None,
    until: UntilOpt = None,
    status: StatusOpt = None,
    model: ModelOpt = None,
    patient_id: PatientIdOpt = None,
    accession: AccessionOpt = None,
    predicted_class: ClassOpt = None,
    include_all: AllOpt = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 50,
    as_json: JsonOpt = False,
    patient: PatientOpt = False,
) -> None:
    """Results, newest first (current ones only unless --all)."""
    filters = _result_filter(
        since, until, status, model, patient_id, accession, predicted_class, include_all
    )
    with sessions_for(settings_of(ctx))() as session:
        rows = q.list_results(session, filters, limit=limit, with_patient=patient)
    if as_json:
        print_rows(rows, [], True, "")
        return
    print_rows(
        [_table_row(r) for r in rows],
        RESULT_COLUMNS + (PATIENT_COLUMNS if patient else []),
        False,
        _title("results"),
        caption=_demo_caption(rows),
    )


@results_app.command("show")
def results_show(
    ctx: typer.Context,
    key: Annotated[
        str, typer.Argument(help="Result id, SR SOP Instance UID or Series Instance UID.")
    ],
    as_json: JsonOpt = False,
    patient: PatientOpt = False,
) -> None:
    """One result (by id, SR UID or Series UID): model, QC, volumes, objects, outbox, history."""
    settings = settings_of(ctx)
    with sessions_for(settings)() as session:
        found = q.find_result(session, key)
        if found is None:
            err.print(
                f"no result {escape(repr(key))} (a result id, SR UID or Series UID)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1)
        data = q.result_detail(session, found, with_patient=patient, reports=reports_root(settings))
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    console.print(
        f"[bold]result {data['id']}[/bold] ({RESEARCH_USE_ONLY})", highlight=False, soft_wrap=True
    )
    if data["synthetic"]:
        console.print(
            f"[bold red]{DEMO}: {escape(data['model_label'] or 'synthetic model')}[/bold red]"
        )
    line = rule_line(data)
    if line:
        console.print(escape(line), highlight=False, soft_wrap=True)
    console.print_json(json.dumps(data, default=str))


@results_app.command("export")
def results_export(
    ctx: typer.Context,
    since: SinceOpt = None,
    until: UntilOpt = None,
    status: StatusOpt = None,
    model: ModelOpt = None,
    patient_id: PatientIdOpt = None,
    accession: AccessionOpt = None,
    predicted_class: ClassOpt = None,
    include_all: AllOpt = False,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many rows.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="csv | json")] = "csv",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write (default: stdout).")
    ] = None,
    patient: Annotated[
        bool,
        typer.Option(
            "--patient",
            help="Include patient identifiers (name, ID, birth date, accession). "
            "Without it the export has none.",
        ),
    ] = False,
) -> None:
    """Export results: CSV (one vol_<feature> column per volume) or JSON (as `list --json`).

    No patient identifiers unless --patient.
    """
    from ketanode.admin.audit import AuditKind, record_now

    if fmt not in ("csv", "json"):
        raise typer.BadParameter("csv or json", param_hint="'--format'")
    filters = _result_filter(
        since, until, status, model, patient_id, accession, predicted_class, include_all
    )
    sessions = sessions_for(settings_of(ctx))
    with sessions() as session:
        if fmt == "csv":
            rows = q.export_rows(session, filters, limit=limit, with_patient=patient)
        else:
            rows = q.list_results(session, filters, limit=limit, with_patient=patient)
    if fmt == "json":
        text = json.dumps(rows, indent=2, default=str) + "\n"
    else:
        buf = io.StringIO()
        columns = list(rows[0]) if rows else list(q.EXPORT_COLUMNS)
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        try:
            with open(output, "w", newline="", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            err.print(
                f"[red]cannot write {escape(str(output))}: {escape(str(exc))}[/red]",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from exc
    record_now(
        sessions,
        AuditKind.EXPORT,
        cli_actor(),
        subject="results",
        detail={
            "format": fmt,
            "rows": len(rows),
            "with_patient": patient,
            # the filters, but never a patient identifier itself
            "filters": {
                k: (v is not None) if k in ("patient_id", "accession") else str(v) if v else v
                for k, v in dataclasses.asdict(filters).items()
            },
        },
    )
    where = str(output) if output else "stdout"
    who = "with patient identifiers" if patient else "no patient identifiers"
    err.print(
        f"{len(rows)} results to {where} ({who}). {RESEARCH_USE_ONLY}.",
        highlight=False,
        soft_wrap=True,
    )


@dispatch_app.command("list")
def dispatch_list(
    ctx: typer.Context,
    state: Annotated[
        str | None, typer.Option("--state", help="pending | retrying | sent | dead")
    ] = None,
    destination: Annotated[str | None, typer.Option("--destination")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Outbox rows (object x destination), newest first."""
    if state is not None and state not in {s.value for s in DispatchState}:
        raise typer.BadParameter(" | ".join(s.value for s in DispatchState), param_hint="'--state'")
    with sessions_for(settings_of(ctx))() as session:
        rows = q.list_outbox(session, state=state, destination=destination, limit=limit)
    if as_json:
        print_rows(rows, [], True, "")
        return
    shown = [
        r
        | {
            "next_at": _short_time(r["next_at"]) if r["state"] in UNSENT_STATES else None,
            "sent_at": _short_time(r["sent_at"]),
            "last_status": None if r["last_status"] is None else f"0x{r['last_status']:04X}",
            "synthetic": DEMO if r["synthetic"] else "",
        }
        for r in rows
    ]
    caption = (
        f"{DEMO}: objects of a demonstration model" if any(r["synthetic"] for r in rows) else None
    )
    print_rows(shown, OUTBOX_COLUMNS, False, _title("outbox"), caption=caption)


@dispatch_app.command("retry")
def dispatch_retry(
    ctx: typer.Context,
    ids: Annotated[list[int] | None, typer.Argument(help="Outbox row ids.")] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Every dead row.")] = False,
    destination: Annotated[
        str | None, typer.Option("--destination", help="Only rows to this destination.")
    ] = None,
    resend: Annotated[
        bool,
        typer.Option("--resend", help="Also send again rows already sent (only rows named by id)."),
    ] = False,
) -> None:
    """Re-queue dead or retrying outbox rows (pending, attempts 0, due now). Rows whose
    object's file retention removed are skipped (the send could only fail)."""
    from ketanode.admin.audit import AuditKind, record

    sessions = sessions_for(settings_of(ctx))
    try:
        with sessions.begin() as session:
            outcome = q.requeue(
                session, ids=ids or None, dead=dead, destination=destination, resend=resend
            )
            n, skipped = outcome.requeued, outcome.skipped_purged
            if n:
                record(
                    session,
                    AuditKind.REQUEUE,
                    cli_actor(),
                    subject="outbox:" + (",".join(map(str, ids)) if ids else "dead"),
                    detail={
                        "ids": ids or None,
                        "dead": dead,
                        "destination": destination,
                        "resend": resend,
                        "requeued": n,
                        "skipped_purged": skipped,
                    },
                )
    except ValueError as exc:
        err.print(
            f"[red]{escape(str(exc))}[/red]: ketanode dispatch retry ID... \\[--resend] | --dead",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from exc
    purged = (
        f"skipped {skipped} outbox row(s) whose object's file was purged by retention "
        "(a send could only fail)"
        if skipped
        else ""
    )
    if n == 0:
        which = "dead" if dead else "dead or retrying" + (" (or sent, --resend)" if resend else "")
        why = purged or f"no {which} outbox row matched"
        err.print(f"[red]nothing re-queued: {why}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(
        f"re-queued {n} outbox row(s)" + (f"; {purged}" if purged else ""),
        highlight=False,
        soft_wrap=True,
    )
