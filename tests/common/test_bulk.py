"""Bulk's statements on PostgreSQL run past SQLAlchemy's execution layer, on the
connection's psycopg cursor: they must still fail as SQLAlchemy fails (the same
exception classes, a dropped connection invalidated), and
statements that need SQLAlchemy's conversions must still get them."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.bulk import Bulk
from services.common.bulk import log as bulk_log
from services.common.db import Database
from tests.support.databases import sqlalchemy_path_statements, terminate_backend

pytestmark = pytest.mark.postgres

metadata = sa.MetaData()
units = sa.Table(
    "bulk_units",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(40), nullable=False),
    sa.Column("active", sa.Boolean, nullable=False),
)
NAMES = sa.select(units.c.id, units.c.name)


@pytest.fixture
def database(postgres_url: str) -> Iterator[Database]:
    database = Database.from_url(postgres_url, pool_size=1)
    metadata.create_all(database.engine)
    yield database
    database.close()


def _paths(bulk: Bulk) -> set[str]:
    """Which path the statements ``bulk`` ran took: "direct" (the psycopg cursor) or "sqlalchemy"."""
    return {"sqlalchemy" if text is None else "direct" for text in bulk._texts.values()}


def _insert(bulk: Bulk, conn: Connection, *ids: int) -> None:
    bulk.insert(conn, units, [{"id": i, "name": f"unit-{i}", "active": True} for i in ids])


def test_rows_come_back_by_column_name(database: Database) -> None:
    bulk = Bulk("postgresql")
    database.transaction(lambda conn: _insert(bulk, conn, 1, 2, 3))
    with database.connect() as conn:
        rows = bulk.select_for_keys(conn, units.c.id, [3, 1], NAMES)
    assert [(row.id, row.name) for row in rows] == [(3, "unit-3"), (1, "unit-1")]
    assert rows[0]._asdict() == {"id": 3, "name": "unit-3"}
    assert _paths(bulk) == {"direct"}


def test_a_parameter_left_out_is_refused_not_sent_as_null(database: Database) -> None:
    bulk = Bulk("postgresql")
    database.transaction(lambda conn: _insert(bulk, conn, 1))
    named = NAMES.where(units.c.name == sa.bindparam("name", type_=sa.String))
    with database.connect() as conn:
        assert [r.id for r in bulk.select_for_keys(conn, units.c.id, [1], named, {"name": "unit-1"})] == [1]
        with pytest.raises(sa.exc.InvalidRequestError, match="'name'"):
            bulk.select_for_keys(conn, units.c.id, [1], named)
    assert _paths(bulk) == {"direct"}


def test_a_constraint_violation_is_sqlalchemys_integrity_error(database: Database) -> None:
    bulk = Bulk("postgresql")
    database.transaction(lambda conn: _insert(bulk, conn, 1))
    with pytest.raises(sa.exc.IntegrityError):
        database.transaction(lambda conn: _insert(bulk, conn, 2, 1))
    with database.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(units)).scalar_one() == 1
    assert _paths(bulk) == {"direct"}


def _drop_the_pooled_connection(database: Database, postgres_url: str) -> None:
    # Found in a transaction: an autocommit read would have the pool reset the connection
    # at the next checkout, failing there, before any Bulk statement.
    pid = database.transaction(lambda conn: int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()))
    terminate_backend(postgres_url, pid)


def test_a_read_on_a_dropped_connection_fails_as_sqlalchemy_fails(database: Database, postgres_url: str) -> None:
    bulk = Bulk("postgresql")
    database.transaction(lambda conn: _insert(bulk, conn, 7))
    _drop_the_pooled_connection(database, postgres_url)
    # What the gRPC interceptor answers UNAVAILABLE (DATABASE_UNAVAILABLE), and the pool drops.
    with pytest.raises(sa.exc.OperationalError) as caught, database.connect() as conn:
        bulk.select_for_keys(conn, units.c.id, [7], NAMES)
    assert caught.value.connection_invalidated
    with database.connect() as conn:
        assert [row.id for row in bulk.select_for_keys(conn, units.c.id, [7], NAMES)] == [7]
    assert _paths(bulk) == {"direct"}


def test_statements_that_need_sqlalchemys_conversions_still_get_them(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    setup = Bulk("postgresql")
    database.transaction(lambda conn: _insert(setup, conn, 1, 2))
    bulk = Bulk("postgresql")
    caplog.set_level(logging.DEBUG, logger=bulk_log.name)
    # A Boolean parameter (SQLAlchemy checks it) and an IN list given per call (SQLAlchemy expands it).
    flagged = sa.select(units.c.id).where(units.c.active == sa.bindparam("active", type_=sa.Boolean))
    listed = sa.select(units.c.id).where(units.c.name.in_(sa.bindparam("names", expanding=True)))
    # An IN list of tuples, even fixed when built, is SQLAlchemy's to render.
    pairs = sa.select(units.c.id).where(sa.tuple_(units.c.id, units.c.name).in_([(2, "unit-2"), (1, "other")]))
    with database.connect() as conn:
        assert [r.id for r in bulk.select_for_keys(conn, units.c.id, [1, 2], flagged, {"active": True})] == [1, 2]
        assert [r.id for r in bulk.select_for_keys(conn, units.c.id, [1, 2], listed, {"names": ["unit-2"]})] == [2]
        assert [r.id for r in bulk.select_for_keys(conn, units.c.id, [1, 2], pairs)] == [2]
    assert _paths(bulk) == {"sqlalchemy"}
    # Each is named in the log the hot-path tests watch (tests/support/databases.py).
    assert len(sqlalchemy_path_statements(caplog)) == 3


def test_in_lists_fixed_when_built_run_on_the_cursor(database: Database) -> None:
    bulk = Bulk("postgresql")
    database.transaction(lambda conn: _insert(bulk, conn, 1, 2, 3))
    kept = NAMES.where(units.c.name.in_(["unit-1", "unit-3"]), units.c.id.not_in([3]))
    with database.connect() as conn:
        assert [r.id for r in bulk.select_for_keys(conn, units.c.id, [1, 2, 3], kept)] == [1]
        moved = bulk.update(
            conn, units, "id", [{"id": 2, "name": "renamed"}], only=units.c.name.in_(["unit-2"]), returning=[units.c.id]
        )
        unmoved = bulk.update(
            conn, units, "id", [{"id": 1, "name": "renamed"}], only=units.c.name.in_(["unit-2"]), returning=[units.c.id]
        )
    assert ([r.id for r in moved], unmoved) == ([2], [])
    assert _paths(bulk) == {"direct"}
