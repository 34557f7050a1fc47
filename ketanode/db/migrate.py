"""Alembic, driven from code: ``ketanode db upgrade`` and the node's start-up upgrade.

On PostgreSQL every upgrade (and every check before one) runs under one advisory lock,
:func:`schema_lock`: the processes of a cluster start at the same time, an admin may run
``ketanode db upgrade`` on two hosts at once, and two upgrades of one database at once
collide (duplicate tables, a revision applied twice). The second waits, then finds the
schema current.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def migrations_dir() -> Path:
    """The Alembic scripts: ``ketanode/migrations`` in an installed wheel (pyproject.toml
    maps the repository's ``migrations/`` there), else ``migrations/`` beside the package
    in a source tree (an editable install, or the checkout on ``sys.path``)."""
    installed = PACKAGE_DIR / "migrations"
    checkout = PACKAGE_DIR.parent
    candidates = [installed]
    if (checkout / "pyproject.toml").is_file():
        candidates.append(checkout / "migrations")
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise RuntimeError(
        f"Alembic migrations not found (looked in {looked}): this installation of ketanode "
        "lacks ketanode/migrations; a wheel built from the repository (`pip wheel .`) "
        "carries them"
    )


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["engine"] = engine
    return cfg


# PostgreSQL advisory lock key of schema upgrades (advisory lock keys are per database)
SCHEMA_LOCK_KEY = 0x6B6E_6D69_6772  # "knmigr"


@contextmanager
def schema_lock(engine: Engine) -> Iterator[None]:
    """Hold the schema-upgrade lock (PostgreSQL; nothing elsewhere) on a connection of its
    own, waiting for whoever holds it. Autocommit: the lock holder keeps no transaction
    open while Alembic works on its own connection."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql(f"SELECT pg_advisory_lock({SCHEMA_LOCK_KEY})")
        logger.debug("schema lock taken")
        try:
            yield
        finally:
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({SCHEMA_LOCK_KEY})")


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade to ``revision`` under :func:`schema_lock`."""
    with schema_lock(engine):
        command.upgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(engine: Engine) -> str | None:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


class SchemaOutOfDate(Exception):
    """The database's schema revision is not the one this code needs."""


def ensure_current(engine: Engine, auto_upgrade: bool) -> None:
    """Bring the schema to head when ``auto_upgrade``; otherwise refuse an old schema with
    the command that fixes it (the node at start, every cluster role, and every CLI command,
    go through here). The check and the upgrade run under :func:`schema_lock`."""
    with schema_lock(engine):
        if auto_upgrade:
            command.upgrade(alembic_config(engine), "head")
            return
        current, head = current_revision(engine), head_revision(engine)
    if current != head:
        raise SchemaOutOfDate(
            f"the database schema is at revision {current or 'none'}, this ketanode needs "
            f"{head}: run `ketanode db upgrade` (database.auto_upgrade is false)"
        )
