"""What the CLI modules share: consoles, the ``--json`` option, settings, sessions, the
audit actor, tables (markup-escaped).

``ketanode/cli/main.py`` builds the main app and imports the sub-apps (``model``,
``results``, ``admin``), so the sub-apps cannot import ``main``; they import this module.
"""

from __future__ import annotations

import getpass
import json
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Protocol

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from ketanode.config import ConfigError, Settings, load_settings

console = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def load_settings_or_exit(path: Path | None) -> Settings:
    """The settings of ``path`` (``None``: ``$KETANODE_CONFIG``, else the environment and the
    embedded defaults); a bad file exits 2 with the reason."""
    try:
        return load_settings(path)
    except ConfigError as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from exc


def settings_of(ctx: typer.Context) -> Settings:
    """The settings the main app loaded (``-c FILE``); a sub-app run on its own (tests) loads
    them from ``$KETANODE_CONFIG`` / the environment (:func:`load_settings_or_exit`)."""
    if isinstance(ctx.obj, Settings):
        return ctx.obj
    return load_settings_or_exit(None)


def cli_actor() -> str:
    """Who runs this command, for the audit trail: ``cli:<OS user>``."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return "cli:unknown"


def engine_for(settings: Settings) -> Engine:
    """The configured database with a current schema: upgraded first when
    ``database.auto_upgrade`` (as the node does at start), else an old schema exits 2 with
    the command that fixes it (never a traceback from a missing column)."""
    from ketanode.db.migrate import SchemaOutOfDate, ensure_current
    from ketanode.db.session import make_engine

    engine = make_engine(settings.database.url)
    try:
        ensure_current(engine, settings.database.auto_upgrade)
    except SchemaOutOfDate as exc:
        engine.dispose()
        err.print(f"[red]{exc}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    return engine


def sessions_for(settings: Settings) -> sessionmaker[Session]:
    """A session factory on the configured database, its schema current (:func:`engine_for`)."""
    from ketanode.db.session import make_session_factory

    return make_session_factory(engine_for(settings))


class _Stoppable(Protocol):
    def stop(self) -> None: ...


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM and SIGINT (Ctrl-C) set, for a serving command to wait on (never
    shut pynetdicom down from a signal handler: it deadlocks)."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return stop


def run_until_stopped(
    node: _Stoppable, stop: threading.Event, failed: threading.Event | None = None
) -> None:
    """Wait until ``stop`` is set (:func:`stop_on_signals`), or ``failed`` (the node ends on
    its own), then stop ``node``."""
    try:
        while not stop.wait(0.5):
            if failed is not None and failed.is_set():
                break
    finally:
        node.stop()


def print_rows(
    rows: list[dict[str, Any]],
    columns: list[str],
    as_json: bool,
    title: str,
    caption: str | None = None,
) -> None:
    """``rows`` as JSON (every key) or as a table of ``columns`` (``None`` shown empty)."""
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title=title, caption=caption)
    for col in columns:
        table.add_column(col)
    for row in rows:
        # Text, not markup: a reason or a path may contain "[...]"
        table.add_row(*[Text("" if row.get(c) is None else str(row.get(c))) for c in columns])
    if console.is_terminal:
        console.print(table)
        return
    # piped or redirected: full rows at their natural width (not squeezed into 80 columns)
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    Console(file=console.file, width=max(console.width, natural)).print(table)
