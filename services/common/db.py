"""Database plumbing: one SQLAlchemy Core engine per process, the same code on
SQLite and PostgreSQL (psycopg 3).

Blocking database work runs on a thread pool sized to the connection pool, so
async servicers ``await db.run(fn, ...)``. :meth:`Database.transaction` retries
the whole unit of work on serialization failures and deadlocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# PostgreSQL SQLSTATEs where retrying the whole transaction is the documented fix.
_RETRYABLE_SQLSTATES = {"40001", "40P01"}
_MAX_ATTEMPTS = 8


def normalize_url(url: str) -> str:
    """Accept plain postgresql:// URLs and use psycopg 3 for them."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def create_engine(url: str, pool_size: int = 16, statement_timeout_ms: int = 0) -> Engine:
    """An engine that never logs bound parameters (they hold account ids and receipts).

    ``statement_timeout_ms`` bounds every statement of a PostgreSQL session (0 = none:
    the audit, migrations and reports run as long as they need)."""
    url = normalize_url(url)
    if is_sqlite(url):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url,
            connect_args={"timeout": 60, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=0,
            pool_pre_ping=False,
            hide_parameters=True,
        )
        _make_sqlite_transactional(engine)
        return engine
    return sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size // 2,
        # No ping before each checkout (a round trip per unit of work, a fifth of a group-
        # committed purchase's): a connection the server dropped fails its first statement,
        # which invalidates the whole pool; a transaction then retries on a new connection
        # (is_retryable), a read answers UNAVAILABLE once.
        pool_pre_ping=False,
        pool_recycle=1800,
        hide_parameters=True,
        connect_args={
            "connect_timeout": 10,
            **({"options": f"-c statement_timeout={statement_timeout_ms}"} if statement_timeout_ms else {}),
        },
    )


def _make_sqlite_transactional(engine: Engine) -> None:
    """WAL, a busy timeout, and BEGIN IMMEDIATE so writers queue instead of deadlocking."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def is_retryable(error: BaseException) -> bool:
    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            # A dropped connection (a server restart, a killed session). Had its COMMIT
            # gone through after all, the retry finds the unit's keys taken, as a caller's
            # retry would: every unit of work is keyed (request ids, unique rows, guarded
            # state moves).
            return True
        sqlstate = getattr(error.orig, "sqlstate", None)
        if sqlstate in _RETRYABLE_SQLSTATES:
            return True
        if isinstance(error, OperationalError) and "database is locked" in str(error.orig):
            return True
    return False


def dialect_insert(conn: Connection, table: sa.Table) -> Any:
    """The connection's dialect's INSERT, which offers ON CONFLICT (PostgreSQL, SQLite)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


class Database:
    """An engine plus the thread pool its blocking work runs on."""

    def __init__(self, engine: Engine, workers: int | None = None) -> None:
        self.engine = engine
        size = workers or engine.pool.size()  # type: ignore[attr-defined]
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="db")
        self._tables = sa.MetaData()
        self._tables_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, pool_size: int = 16, statement_timeout_ms: int = 0) -> Database:
        return cls(create_engine(url, pool_size, statement_timeout_ms), pool_size)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def table(self, name: str) -> sa.Table:
        """Table ``name`` as the migrations made it, read from the database once.

        For code that keeps no copy of the schema: the columns, their types and
        keys come from the database itself."""
        with self._tables_lock:
            table = self._tables.tables.get(name)
            if table is None:
                with self.engine.connect() as conn:
                    table = sa.Table(name, self._tables, autoload_with=conn)
            return table

    @contextlib.contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection for reads. On PostgreSQL its statements run in autocommit: no
        BEGIN and ROLLBACK round trips around them, and nothing else changes, since at
        READ COMMITTED each statement takes its own snapshot anyway. Writes belong in
        :meth:`transaction`."""
        with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    def transaction(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in one transaction, retrying it whole on serialization failures."""
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                with self.engine.begin() as conn:
                    return work(conn)
            except DBAPIError as error:
                if attempt == _MAX_ATTEMPTS or not is_retryable(error):
                    raise
                delay = min(0.2, 0.005 * 2**attempt) * random.random()
                log.debug("retrying transaction after %s (attempt %d)", type(error.orig).__name__, attempt)
                time.sleep(delay)
        raise AssertionError("unreachable")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run blocking database code off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.engine.dispose()
