"""The Database plumbing on PostgreSQL: reads open no transaction, and a unit of work
whose pooled connection the server dropped runs again on a new one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from psycopg.pq import TransactionStatus
from sqlalchemy.engine import Connection

from services.common.db import Database
from tests.support.databases import terminate_backend

pytestmark = pytest.mark.postgres


@pytest.fixture
def database(postgres_url: str) -> Iterator[Database]:
    database = Database.from_url(postgres_url, pool_size=1)
    with database.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE units (id integer PRIMARY KEY)"))
    yield database
    database.close()


def _server_pid(database: Database) -> int:
    with database.connect() as conn:
        return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def test_reads_open_no_transaction_on_the_server(database: Database) -> None:
    with database.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM units")).scalar_one() == 0
        driver = conn.connection.dbapi_connection
        assert driver is not None
        # No BEGIN went out before the SELECT, so no ROLLBACK has to follow it.
        assert driver.info.transaction_status == TransactionStatus.IDLE


def test_a_transaction_survives_its_connection_being_dropped(database: Database, postgres_url: str) -> None:
    pid = _server_pid(database)  # the pool's one connection
    terminate_backend(postgres_url, pid)
    attempts: list[int] = []

    def work(conn: Connection) -> int:
        attempts.append(int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()))
        conn.execute(sa.text("INSERT INTO units (id) VALUES (1)"))
        return len(attempts)

    assert database.transaction(work) == 1  # the first statement failed on the dropped connection
    assert attempts[0] != pid
    with database.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM units")).scalar_one() == 1
