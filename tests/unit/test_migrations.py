"""Alembic migrations run on SQLite and PostgreSQL and match the models exactly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from ketanode.db.migrate import current_revision, head_revision, upgrade
from ketanode.db.models import Base
from ketanode.db.session import make_engine


def test_upgrade_downgrade_and_models_in_sync(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    assert current_revision(engine) == head_revision(engine) is not None
    tables = set(inspect(engine).get_table_names())
    assert {
        "association",
        "study",
        "series",
        "instance",
        "store_failure",
        "job",
        "job_step",
        "model",
        "prediction",
        "result",
        "emitted_object",
        "outbox",
        "user_account",
        "audit_event",
    } <= tables
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    assert diff == [], f"models and migrations differ: {diff}"
    # upgrade is idempotent, and the schema can be taken down and up again
    upgrade(engine)
    from alembic import command

    from ketanode.db.migrate import alembic_config

    command.downgrade(alembic_config(engine), "base")
    assert current_revision(engine) is None
    upgrade(engine)
    assert current_revision(engine) == head_revision(engine)
    engine.dispose()


def test_sqlite_is_wal_with_busy_timeout(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 5000
        assert int(conn.exec_driver_sql("PRAGMA synchronous").scalar() or 0) == 2  # FULL
    engine.dispose()
