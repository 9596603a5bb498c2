"""Alembic migrations, one independent history per service.

Each service keeps its revisions in ``services/<name>/migrations/versions`` and
its own version table ``alembic_version_<name>``, so services evolve their
tables independently in one database.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from services.common.db import normalize_url

_ENV_DIR = Path(__file__).parent / "alembic"
_ROLE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class NotMigrated(Exception):
    """The database lacks this service's latest migration."""


def alembic_config(service: str, url: str) -> Config:
    package = importlib.import_module(f"services.{service}")
    versions = Path(package.__file__ or "").parent / "migrations"
    config = Config()
    config.set_main_option("script_location", str(_ENV_DIR))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(versions))
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    config.attributes["version_table"] = f"alembic_version_{service}"
    return config


def upgrade(service: str, url: str, revision: str = "heads") -> None:
    command.upgrade(alembic_config(service, url), revision)


def grant(service: str, url: str, role: str) -> list[str]:
    """Let ``role`` read and write this service's tables and nothing else (PostgreSQL).

    A service run as its own role (``COINSTORE_<SERVICE>_DATABASE_URL``) then cannot
    touch another service's rows: the receipts pod cannot write the ledger. Run after
    every migration (new tables need their grants); returns what was granted."""
    if not _ROLE.fullmatch(role):
        raise ValueError(f"{role!r} is not a plain role name")
    engine = sa.create_engine(normalize_url(url))
    try:
        if engine.dialect.name != "postgresql":
            raise ValueError("per-service roles need PostgreSQL")
        with engine.begin() as conn:
            tables = [name for name in sa.inspect(conn).get_table_names() if name.startswith(f"{service}_")]
            sequences = list(
                conn.execute(
                    sa.text(
                        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                        " WHERE c.relkind = 'S' AND n.nspname = current_schema() AND c.relname LIKE :prefix"
                    ),
                    {"prefix": f"{service}\\_%"},
                ).scalars()
            )
            statements = [
                f'GRANT USAGE ON SCHEMA "{conn.execute(sa.text("SELECT current_schema()")).scalar_one()}" TO "{role}"',
                f'GRANT SELECT ON "alembic_version_{service}" TO "{role}"',
                *(f'GRANT SELECT, INSERT, UPDATE, DELETE ON "{t}" TO "{role}"' for t in tables),
                *(f'GRANT USAGE, SELECT, UPDATE ON SEQUENCE "{s}" TO "{role}"' for s in sequences),
            ]
            for statement in statements:
                conn.exec_driver_sql(statement)
        return statements
    finally:
        engine.dispose()


def check_migrated(service: str, engine: sa.Engine) -> None:
    """Raise NotMigrated unless the database is at this service's head revision."""
    config = alembic_config(service, str(engine.url))
    heads = set(ScriptDirectory.from_config(config).get_heads())
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": f"alembic_version_{service}"})
        current = set(context.get_current_heads())
    if current != heads:
        raise NotMigrated(
            f"the database is not migrated for the {service} service (at {sorted(current) or 'nothing'},"
            f" expected {sorted(heads)}): run `coinstore migrate`"
        )
