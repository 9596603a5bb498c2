"""Alembic environment shared by every service's migration history."""

from __future__ import annotations

from alembic import context

from services.common.db import create_engine

config = context.config
version_table = config.attributes.get("version_table", "alembic_version")


def run_migrations_online() -> None:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "", pool_size=1)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            version_table=version_table,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
