"""Admin commands on a database whose schema is older than the code: upgraded first when
``database.auto_upgrade`` (as the node does at start), else refused with the command that
fixes it, never a traceback about a missing column."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from typer.testing import CliRunner

from ketanode.cli.main import app
from ketanode.db.migrate import alembic_config, current_revision, head_revision
from ketanode.db.session import make_engine
from tests.support import write_config

COMMANDS = [
    ["results", "list"],
    ["dispatch", "list"],
    ["series", "list"],
    ["status"],
    ["audit", "list"],
    ["model", "list"],
]


def _old_schema(db_url: str) -> None:
    engine = make_engine(db_url)
    command.upgrade(alembic_config(engine), "0002")
    assert current_revision(engine) == "0002"
    engine.dispose()


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a))
def test_old_schema_is_refused_with_the_fix(db_url: str, tmp_path: Path, args: list[str]) -> None:
    _old_schema(db_url)
    config = write_config(tmp_path / "k.toml", {"database": {"url": db_url, "auto_upgrade": False}})
    res = CliRunner().invoke(app, ["-c", str(config), *args])
    assert res.exit_code == 2, res.output
    assert "ketanode db upgrade" in res.output and "0002" in res.output
    assert "Traceback" not in res.output


def test_old_schema_is_upgraded_when_auto_upgrade(db_url: str, tmp_path: Path) -> None:
    _old_schema(db_url)
    config = write_config(tmp_path / "k.toml", {"database": {"url": db_url}})
    res = CliRunner().invoke(app, ["-c", str(config), "results", "list", "--json"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == "[]"
    engine = make_engine(db_url)
    assert current_revision(engine) == head_revision(engine)
    engine.dispose()
