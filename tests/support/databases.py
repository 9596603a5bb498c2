"""A fresh database per test: a SQLite file, or a new PostgreSQL database."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from services.common.bulk import log as bulk_log
from services.common.db import normalize_url
from tests.support import env


@contextmanager
def sqlite_database(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / f'coinstore-{uuid.uuid4().hex[:8]}.db'}"


@contextmanager
def postgres_database(icu_locale: str = "") -> Iterator[str]:
    """A new database; with ``icu_locale`` (e.g. ``en-US``), one that sorts text by that ICU
    collation, as many production databases do, rather than the server's default."""
    admin_url = env.postgres_admin_url()
    if admin_url is None:
        env.unavailable("COINSTORE_TEST_DATABASE_URL is not set")
        raise AssertionError("unreachable")
    admin = sa.create_engine(normalize_url(admin_url), isolation_level="AUTOCOMMIT")
    name = f"cs_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            icu = f" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE '{icu_locale}'" if icu_locale else ""
            conn.execute(sa.text(f'CREATE DATABASE "{name}"{icu}'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        env.unavailable(f"PostgreSQL at COINSTORE_TEST_DATABASE_URL is unreachable: {exc.orig}")
    url = sa.engine.make_url(normalize_url(admin_url)).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def terminate_backend(postgres_url: str, pid: int) -> None:
    """Drop one server connection, as a server restart or an admin would."""
    admin = sa.create_engine(normalize_url(postgres_url))
    try:
        with admin.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
    finally:
        admin.dispose()


def sqlalchemy_path_statements(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The batch statements ``services.common.bulk`` left to SQLAlchemy's execution layer while
    ``caplog`` captured its DEBUG log (each costs about twice the CPU of one on the cursor)."""
    return [record.getMessage() for record in caplog.records if record.name == bulk_log.name]


@contextmanager
def on_the_cursor(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail unless every batch statement run inside stays on the psycopg cursor."""
    caplog.set_level(logging.DEBUG, logger=bulk_log.name)
    yield
    assert sqlalchemy_path_statements(caplog) == []
