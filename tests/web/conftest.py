"""Fixtures of the dashboard tests: a database with the node's schema and seeded rows, on
SQLite and PostgreSQL (module scope: built once per module and database), served by a real
:class:`ketanode.web.server.WebServer` on a free port."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from ketanode.config import Settings, merge
from ketanode.db.migrate import upgrade
from ketanode.db.session import make_engine, make_session_factory
from ketanode.scheduler import Timers
from ketanode.web.server import WebServer
from tests.support import postgres_database
from tests.web.webtools import Seeded, add_users, seed


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def web_db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'ketanode.db'}"
    else:
        with postgres_database() as url:
            yield url


def web_settings(root: Path, db_url: str, overrides: dict[str, Any] | None = None) -> Settings:
    (root / "spool").mkdir(parents=True, exist_ok=True)
    base = {
        "database": {"url": db_url},
        "spool": {"path": str(root / "spool"), "min_free_mb": 1},
        "web": {"enabled": True, "port": 0, "session_secret": "test-secret-not-for-production"},
    }
    return Settings.model_validate(merge(base, overrides or {}))


@dataclass
class Served:
    """A dashboard on a free port over a seeded database."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    timers: Timers
    server: WebServer
    seeded: Seeded

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def served(web_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("web")
    settings = web_settings(root, web_db_url)
    engine = make_engine(web_db_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    add_users(sessions)
    seeded = seed(sessions, root)
    timers = Timers()
    timers.start()
    server = WebServer(settings, sessions, timers)
    server.start()
    yield Served(settings, engine, sessions, timers, server, seeded)
    server.stop()
    timers.stop()
    engine.dispose()
