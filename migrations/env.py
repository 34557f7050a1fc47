"""Alembic environment: the engine comes from ketanode (``ketanode db upgrade``)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from ketanode.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if not isinstance(engine, Engine):
        from ketanode.config import load_settings
        from ketanode.db.session import make_engine

        engine = make_engine(load_settings().database.url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `ketanode db upgrade`")
run_migrations_online()
