"""The tables of ``ketanode failures`` and ``ketanode jobs list`` print a reason as it is:
a ``[...]`` in it (a refused dataset's text, an exception message) is not Rich markup."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ketanode.cli.main import app
from ketanode.db.migrate import upgrade
from ketanode.db.models import Job, Series, StoreFailure, Study
from ketanode.db.session import make_engine, make_session_factory
from tests.support import write_config

REFUSED = "bad value [bold]x[/bold] in [red] (0010,0010)"
FAILED = "RuntimeError: [red]boom[/red] at [bold]x[/bold]"


@pytest.fixture
def config(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("KETANODE_CONFIG", raising=False)
    engine = make_engine(sqlite_url)
    upgrade(engine)
    with make_session_factory(engine).begin() as s:
        study = Study(study_uid="1.2.3")
        series = Series(study=study, series_uid="1.2.3.4", modality="MR", state="failed")
        s.add_all([study, series])
        s.flush()
        s.add(Job(series_id=series.id, state="failed", failed_step="measure", error=FAILED))
        s.add(StoreFailure(status=0xA900, reason=REFUSED))
    engine.dispose()
    return write_config(tmp_path / "k.toml", {"database": {"url": sqlite_url}})


@pytest.mark.parametrize(
    ("args", "text"),
    [(["failures"], REFUSED), (["jobs", "list"], FAILED)],
    ids=["failures", "jobs list"],
)
def test_reason_with_brackets_is_printed_literally(
    config: Path, args: list[str], text: str
) -> None:
    res = CliRunner().invoke(app, ["-c", str(config), *args])
    assert res.exit_code == 0, res.output
    assert text in res.stdout, res.stdout
