"""Alembic migrations, one independent history per service.

Each service keeps its revisions in ``services/<name>/migrations/versions`` and
its own version table ``alembic_version_<name>``, so services evolve their
tables independently in one database.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from services.common.db import normalize_url

_ENV_DIR = Path(__file__).parent / "alembic"


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
