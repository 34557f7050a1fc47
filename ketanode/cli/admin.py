"""``ketanode users|audit|retention ...``: dashboard users, the audit trail, retention.

Thin: parse, call :mod:`ketanode.admin.users`, :mod:`ketanode.admin.retention`, print.
Added to the main app in ``ketanode/cli/main.py``.
Changes are audited with the actor ``cli:<OS user>``.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Annotated, Any

import typer

from ketanode.admin.audit import AuditKind, event_row, list_events
from ketanode.cli.common import (
    JsonOpt,
    cli_actor,
    console,
    err,
    print_rows,
    sessions_for,
    settings_of,
)
from ketanode.db.models import UserRole

users_app = typer.Typer(help="Dashboard users (argon2 password hashes).", no_args_is_help=True)
audit_app = typer.Typer(help="The audit trail.", no_args_is_help=True)
retention_app = typer.Typer(
    help="Removing spool and report files past retention.", no_args_is_help=True
)


def _refused(exc: Exception) -> typer.Exit:
    err.print(f"[red]{exc}[/red]", highlight=False)
    return typer.Exit(1)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


# --- users -------------------------------------------------------------------------------

RoleOpt = Annotated[UserRole, typer.Option("--role", help="viewer (reads the dashboard) or admin.")]
StdinOpt = Annotated[
    bool,
    typer.Option("--password-stdin", help="Read the password from the first line of stdin."),
]


@users_app.command("add")
def users_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Username.")],
    role: RoleOpt = UserRole.VIEWER,
    password_stdin: StdinOpt = False,
) -> None:
    """Add a user (the password is prompted twice, hidden, unless --password-stdin)."""
    from ketanode.admin.users import add_user

    password = _read_password(password_stdin)
    try:
        with sessions_for(settings_of(ctx)).begin() as session:
            user = add_user(session, name, password, role, actor=cli_actor())
            user_id = user.id
    except ValueError as exc:
        raise _refused(exc) from exc
    console.print(f"user {name} added (id {user_id}, role {role.value})", highlight=False)


@users_app.command("list")
def users_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Users, their role, whether they are disabled, their last login."""
    from ketanode.admin.users import list_users, user_row

    with sessions_for(settings_of(ctx))() as session:
        rows = [user_row(u) for u in list_users(session)]
    print_rows(
        rows,
        ["id", "username", "role", "disabled", "created_at", "last_login_at"],
        as_json,
        "users",
    )


@users_app.command("disable")
def users_disable(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Username.")]
) -> None:
    """Disable a user: logins are refused from now on (the row and its history are kept)."""
    from ketanode.admin.users import disable_user

    try:
        with sessions_for(settings_of(ctx)).begin() as session:
            disable_user(session, name, actor=cli_actor())
    except ValueError as exc:
        raise _refused(exc) from exc
    console.print(f"user {name} disabled", highlight=False)


@users_app.command("passwd")
def users_passwd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Username.")],
    password_stdin: StdinOpt = False,
) -> None:
    """Set a user's password (prompted twice, hidden, unless --password-stdin)."""
    from ketanode.admin.users import set_password

    password = _read_password(password_stdin)
    try:
        with sessions_for(settings_of(ctx)).begin() as session:
            set_password(session, name, password, actor=cli_actor())
    except ValueError as exc:
        raise _refused(exc) from exc
    console.print(f"password of {name} changed", highlight=False)


# --- audit -------------------------------------------------------------------------------


def _moment(value: str | None, option: str, end: bool) -> dt.datetime | None:
    """YYYY-MM-DD (UTC; as an end: the whole day) or an ISO date-time."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
            return start + dt.timedelta(days=1) if end else start
        moment = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter("YYYY-MM-DD or an ISO date-time", param_hint=option) from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


@audit_app.command("list")
def audit_list(
    ctx: typer.Context,
    kind: Annotated[
        str | None,
        typer.Option(help=", ".join(AuditKind) + "."),
    ] = None,
    actor: Annotated[str | None, typer.Option(help="Exactly this actor.")] = None,
    since: Annotated[str | None, typer.Option(help="From this day (YYYY-MM-DD, UTC).")] = None,
    until: Annotated[
        str | None, typer.Option(help="Up to and including this day (YYYY-MM-DD, UTC).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1)] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Audit events, newest first."""
    start = _moment(since, "'--since'", end=False)
    stop = _moment(until, "'--until'", end=True)
    with sessions_for(settings_of(ctx))() as session:
        events = list_events(session, kind=kind, actor=actor, since=start, until=stop, limit=limit)
        rows = [event_row(e) for e in events]
    if not as_json:
        for row in rows:
            row["detail"] = "" if row["detail"] is None else _compact(row["detail"])
    print_rows(
        rows,
        ["id", "at", "kind", "actor", "address", "subject", "outcome", "detail"],
        as_json,
        "audit events",
    )


def _compact(detail: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in detail.items())


# --- retention ---------------------------------------------------------------------------


@retention_app.command("run")
def retention_run(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only list what would be removed.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run one retention sweep now (also when retention is disabled in the settings) and
    print what was (or with --dry-run would be) removed."""
    from ketanode.admin.retention import sweep

    settings = settings_of(ctx)
    report = sweep(
        sessions_for(settings), settings, dry_run=dry_run, actor=cli_actor(), prune_dirs=True
    )
    if as_json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
        return
    verb = "would remove" if dry_run else "removed"
    rows = [
        {"what": "series (spool)", "id": p.id, "files": p.files, "bytes": p.bytes}
        for p in report.series
    ]
    rows += [
        {"what": "object (report)", "id": p.id, "files": p.files, "bytes": p.bytes}
        for p in report.objects
    ]
    print_rows(rows, ["what", "id", "files", "bytes"], False, f"retention: {verb}")
    console.print(
        f"{verb}: {report.spool_files} spool files of {len(report.series)} series, "
        f"{report.report_files} report files of {len(report.objects)} objects "
        f"({report.bytes / 2**20:.1f} MiB)",
        highlight=False,
    )
