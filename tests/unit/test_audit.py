"""``ketanode audit list``: filters by kind, actor, day range and limit; JSON and table."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ketanode.admin.audit import AuditKind, record
from ketanode.cli.main import app
from ketanode.db.migrate import upgrade
from ketanode.db.session import make_engine, make_session_factory
from tests.support import write_config


def _day(day: int, hour: int = 12) -> dt.datetime:
    return dt.datetime(2024, 3, day, hour, tzinfo=dt.UTC)


EVENTS: list[tuple[dt.datetime, str, str, str]] = [
    (_day(1), AuditKind.LOGIN, "alice", "ok"),
    (_day(1, 23), AuditKind.LOGIN, "mallory", "refused"),
    (_day(2), AuditKind.ASSOCIATION, "STORESCU", "released"),
    (_day(3, 0), AuditKind.EXPORT, "alice", "ok"),
    (_day(3, 23), AuditKind.USER, "cli:root", "ok"),
    (_day(4), AuditKind.LOGIN, "alice", "ok"),
]


@pytest.fixture
def runner(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    engine = make_engine(db_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as s:
        for at, kind, actor, outcome in EVENTS:
            record(s, kind, actor, outcome=outcome, subject="x:1", detail={"n": 1}).at = at
    engine.dispose()
    config = write_config(tmp_path / "k.toml", {"database": {"url": db_url}})
    monkeypatch.setenv("KETANODE_CONFIG", str(config))  # the main app reads it
    return CliRunner()


def _list(runner: CliRunner, *args: str) -> list[dict[str, Any]]:
    res = runner.invoke(app, ["audit", "list", "--json", *args])
    assert res.exit_code == 0, res.output
    rows: list[dict[str, Any]] = json.loads(res.output)
    return rows


def _who(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["at"][:13], r["actor"]) for r in rows]


def test_audit_list_filters(runner: CliRunner) -> None:
    everything = _list(runner)
    # newest first
    assert [r["at"] for r in everything] == sorted((r["at"] for r in everything), reverse=True)
    assert len(everything) == len(EVENTS)
    assert everything[0]["detail"] == {"n": 1} and everything[0]["subject"] == "x:1"

    assert _who(_list(runner, "--kind", "login")) == [
        ("2024-03-04T12", "alice"),
        ("2024-03-01T23", "mallory"),
        ("2024-03-01T12", "alice"),
    ]
    assert [r["kind"] for r in _list(runner, "--actor", "alice")] == ["login", "export", "login"]
    assert _list(runner, "--kind", "login", "--actor", "mallory")[0]["outcome"] == "refused"
    # --since / --until are whole UTC days, both included
    assert _who(_list(runner, "--since", "2024-03-02", "--until", "2024-03-03")) == [
        ("2024-03-03T23", "cli:root"),
        ("2024-03-03T00", "alice"),
        ("2024-03-02T12", "STORESCU"),
    ]
    assert len(_list(runner, "--until", "2024-03-01")) == 2
    assert len(_list(runner, "--since", "2024-03-04")) == 1
    assert _who(_list(runner, "--limit", "2")) == [
        ("2024-03-04T12", "alice"),
        ("2024-03-03T23", "cli:root"),
    ]
    assert _list(runner, "--kind", "retention") == []


def test_audit_list_table_and_bad_date(runner: CliRunner) -> None:
    res = runner.invoke(app, ["audit", "list", "--kind", "association"])
    assert res.exit_code == 0, res.output
    assert "STORESCU" in res.output and "released" in res.output and "mallory" not in res.output
    res = runner.invoke(app, ["audit", "list", "--since", "03/01/2024"])
    assert res.exit_code == 2 and "YYYY-MM-DD" in res.output
