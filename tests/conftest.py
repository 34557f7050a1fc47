from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import NodeProcess, postgres_database


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A skipped test is a failed one here: every tool and service a test needs is installed
    by scripts/setup.sh and running in CI, so a skip can only hide a broken set-up."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped ({reason}): this suite allows no skip (see tests/conftest.py)"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same test on SQLite and on PostgreSQL (a fresh database each time)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ketanode.db'}"
    else:
        with postgres_database() as url:
            yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ketanode.db'}"


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    """Collects NodeProcess objects a test starts and stops them all at teardown."""
    started: list[NodeProcess] = []
    yield started
    for node in started:
        with contextlib.suppress(Exception):
            node.kill()
