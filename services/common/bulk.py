"""Set-based SQL for the batch (group-commit) paths: many rows per statement,
at a Python cost per row close to nothing.

On PostgreSQL a batch travels as ONE JSON text parameter which the server
unpacks with ``json_populate_recordset`` against the target table's own row
type, and key lookups bind ONE array. The driver then adapts one value per
statement instead of one per cell (psycopg's text array dumper runs a regular
expression on every element), the statement text is the same whatever the
batch size, so psycopg prepares it once and SQLAlchemy compiles it once, and
the server parses the rows in C. On SQLite the same calls use executemany and
IN lists.

On PostgreSQL the statements also run past SQLAlchemy's execution layer (see
:meth:`Bulk._run`): compiled once to text, executed on the connection's own psycopg
cursor, errors raised exactly as SQLAlchemy raises them.

Why it matters: psycopg parses a statement's text in Python (a regular expression
over the whole text) unless it has at most 50 parameters and 4 KiB of text, and
SQLAlchemy builds and compiles a statement whose VALUES or IN list grows with the
batch anew each time; for a group commit of dozens of rows that costs more CPU than
everything else the batch does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

import sqlalchemy as sa
from psycopg.rows import namedtuple_row
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import BindParameter

_ROWS = "rows"

log = logging.getLogger(__name__)

# A key column, or the columns of a composite key (whose keys are then tuples).
KeyColumns: TypeAlias = "sa.Column[Any] | tuple[sa.Column[Any], ...]"


def _cell(value: object) -> object:
    # json_populate_recordset reads each cell in its column type's text form.
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    raise TypeError(f"cannot send {type(value).__name__} in a bulk statement")


def _document(rows: Sequence[dict[str, Any]]) -> str:
    return json.dumps(rows, default=_cell, separators=(",", ":"))


@dataclass(frozen=True)
class Rows:
    """Rows for one table, for :meth:`Bulk.insert_all`."""

    table: sa.Table
    rows: Sequence[dict[str, Any]]
    add_on_conflict: tuple[sa.Column[Any], ...] = ()


@dataclass(frozen=True)
class Changes:
    """New values for existing rows of one table found by ``key`` (as :meth:`Bulk.update`),
    for :meth:`Bulk.insert_all`. Only for rows this transaction has locked already."""

    table: sa.Table
    key: str
    rows: Sequence[dict[str, Any]]


@dataclass(frozen=True)
class _Text:
    """A batch statement compiled for the connection's driver."""

    sql: str
    defaults: dict[str, Any]  # the values bound when the statement was built (OFFSET 0, constants)
    required: frozenset[str]  # what each execution must give


_UNSEEN = object()


def _converts(type_: Any, dialect: Any, *, result: bool) -> bool:
    """Whether SQLAlchemy converts values of ``type_`` on the way in (or, ``result``, out) of
    this dialect's driver; when it cannot tell without a live cursor, assume so."""
    try:
        impl = type_.dialect_impl(dialect)
        if isinstance(impl, sa.ARRAY):
            # Its processor only applies the item type's to each element (the keys' lists go as they are).
            return _converts(impl.item_type, dialect, result=result)
        return (impl.result_processor(dialect, None) if result else impl.bind_processor(dialect)) is not None
    except Exception:
        return True


def _with_fixed_lists(stmt: Any) -> Any:
    """``stmt`` with each IN list over values fixed when it was built (``column.in_([...])``)
    spelled as one plain parameter per value: SQLAlchemy renders an IN list anew on every
    execution, which would keep the whole statement on its execution layer. An IN list
    given at execution, an empty one or one of tuples stays as it is."""

    def fixed(element: Any, **_: Any) -> Any:
        if (
            isinstance(element, BindParameter)
            and element.expanding
            and not element.required
            and element.callable is None
            and isinstance(element.value, (list, tuple))
            and element.value
            and not any(isinstance(v, (list, tuple)) for v in element.value)
        ):
            return sa.tuple_(*(sa.bindparam(None, v, type_=element.type) for v in element.value))
        return None

    return visitors.replacement_traverse(stmt, {}, fixed)


class Bulk:
    """Batch statements for one dialect, each built and compiled once."""

    def __init__(self, dialect: str) -> None:
        self._postgres = dialect == "postgresql"
        self._statements: dict[tuple[Any, ...], Any] = {}
        # Per cached statement (they live as long as this object): its text and default
        # parameters, or None for one that needs SQLAlchemy's type processing.
        self._texts: dict[int, _Text | None] = {}

    def _run(self, conn: Connection, stmt: Any, params: dict[str, Any], *, rows: bool = True) -> list[Any]:
        """Execute a cached PostgreSQL batch statement; its rows (attribute access by column
        name, as SQLAlchemy's rows) if ``rows``.

        SQLAlchemy's per-execution layer (the compiled-cache look-up, an execution context,
        result metadata rebuilt from ``cursor.description`` every time) costs as much CPU as
        psycopg's own work for these statements: half of each, at a few per group commit. So
        each is compiled once and run on the connection's psycopg cursor, in the same
        transaction. A statement whose parameters or columns need SQLAlchemy's conversions
        takes the ordinary path. A failure goes through SQLAlchemy's own handler, so callers
        and Database.transaction see the same exceptions, and a dropped connection
        invalidates the pool as before."""
        text = self._text(conn, stmt)
        driver: Any = conn.connection.driver_connection
        # Outside a transaction SQLAlchemy would autobegin one; only its own path does that.
        if text is None or not (conn.in_transaction() or driver.autocommit):
            result = conn.execute(stmt, params)
            return list(result.all()) if rows else []
        missing = text.required - params.keys()
        if missing:
            # What SQLAlchemy raises too: a parameter left out must not go as NULL.
            raise sa.exc.InvalidRequestError(f"A value is required for bind parameter {min(missing)!r}")
        cursor = None
        try:
            cursor = driver.cursor(row_factory=namedtuple_row)
            cursor.execute(text.sql, {**text.defaults, **params})
            return cursor.fetchall() if rows else []
        except Exception as error:
            # SQLAlchemy's own handler for driver errors (private, pinned by requirements.lock;
            # tests/common/test_bulk.py fails if it stops wrapping or invalidating).
            conn._handle_dbapi_exception(error, text.sql, None, cursor, None)
        finally:
            if cursor is not None:
                cursor.close()

    def _text(self, conn: Connection, stmt: Any) -> _Text | None:
        found = self._texts.get(id(stmt), _UNSEEN)
        if found is _UNSEEN:
            dialect = conn.dialect
            compiled = _with_fixed_lists(stmt).compile(dialect=dialect)
            binds = compiled.binds
            returned: Any = getattr(stmt, "selected_columns", None) or getattr(stmt, "exported_columns", ())
            names = [getattr(column, "name", None) for column in returned]
            plain = (
                # IN lists given at execution and literal parameters are rendered per
                # execution, by SQLAlchemy.
                not any(b.expanding for b in binds.values())
                and not compiled.literal_execute_params
                and not compiled.post_compile_params
                and not any(_converts(b.type, dialect, result=False) for b in binds.values())
                and not any(_converts(c.type, dialect, result=True) for c in returned)
                # Rows are named tuples: their field names must be unique identifiers.
                and len(set(names)) == len(names)
                and all(isinstance(n, str) and n.isidentifier() and not n.startswith("_") for n in names)
            )
            found = self._texts[id(stmt)] = (
                _Text(
                    compiled.string,
                    {name: value for name, value in compiled.params.items() if not binds[name].required},
                    frozenset(name for name in compiled.params if binds[name].required),
                )
                if plain
                else None
            )
            if found is None:
                # A batch statement on a hot path should not land here (tests watch for this).
                log.debug("bulk statement takes SQLAlchemy's path: %s", compiled.string)
        return found  # type: ignore[return-value]

    def cell(self, value: datetime | bytes) -> object:
        """``value`` as a row for these statements should carry it: on PostgreSQL already in
        its text form (for a value used in many rows, convert it once: the JSON encoder calls
        back into Python for every datetime or bytes cell it meets); on SQLite the value."""
        return _cell(value) if self._postgres else value

    def _source(self, table: sa.Table, parameter: str = _ROWS) -> Any:
        """``json_populate_recordset(NULL::<table>, :rows)``: the batch as rows of ``table``."""
        rows = sa.cast(sa.bindparam(parameter, type_=sa.Text), sa.JSON)
        function = sa.func.json_populate_recordset(sa.literal_column(f"NULL::{table.name}"), rows)
        return function.table_valued(*(column.name for column in table.columns), name="batch")

    def insert(
        self,
        conn: Connection,
        table: sa.Table,
        rows: Sequence[dict[str, Any]],
        *,
        ignore: bool = False,
        returning: Sequence[sa.Column[Any]] = (),
        add_on_conflict: Sequence[sa.Column[Any]] = (),
        replace_on_conflict: Sequence[str] = (),
    ) -> list[Any]:
        """INSERT ``rows`` in one statement, returning ``returning`` of the rows actually
        inserted or updated. On a conflict: nothing (``ignore``), add ``balance``
        (``add_on_conflict``: the conflict columns), or overwrite the
        ``replace_on_conflict`` columns of the row with that primary key; the last is a
        keyed UPDATE that always finds its rows through the index, where an
        UPDATE … FROM a batch lets the planner hash-join it against a scan of the whole
        table. Rows are written in the order given, which is the order their row locks
        are taken in."""
        if not rows:
            return []
        columns = tuple(rows[0])
        key = (
            "insert",
            table.name,
            columns,
            ignore,
            tuple(returning),
            tuple(add_on_conflict),
            tuple(replace_on_conflict),
        )
        stmt = self._statements.get(key)
        if stmt is None:
            stmt = self._statements[key] = self._build_insert(
                table, columns, ignore, returning, add_on_conflict, replace_on_conflict=replace_on_conflict
            )
        if self._postgres:
            return self._run(conn, stmt, {_ROWS: _document(rows)}, rows=bool(returning))
        # executemany with RETURNING: SQLAlchemy batches it into multi-row INSERTs.
        result = conn.execute(stmt, list(rows))
        return list(result.all()) if returning else []

    def insert_all(self, conn: Connection, parts: Sequence[Rows], changes: Sequence[Changes] = ()) -> None:
        """INSERT into several tables (and apply ``changes``) in one round trip: on PostgreSQL
        one statement whose last part is the main INSERT and the others data-modifying WITH
        clauses. Only the last part should take row locks on existing rows (the WITH
        clauses run in no guaranteed order): ``changes`` touch rows already locked."""
        parts = [part for part in parts if part.rows]
        changes = [change for change in changes if change.rows]
        if not self._postgres or len(parts) + len(changes) < 2 or not parts:
            for change in changes:
                self.update(conn, change.table, change.key, change.rows)
            for part in parts:
                self.insert(conn, part.table, part.rows, add_on_conflict=part.add_on_conflict)
            return
        key = (
            "insert_all",
            *((p.table.name, tuple(p.rows[0]), p.add_on_conflict) for p in parts),
            *((c.table.name, c.key, tuple(c.rows[0])) for c in changes),
        )
        stmt = self._statements.get(key)
        if stmt is None:
            statements = [
                self._build_insert(p.table, tuple(p.rows[0]), False, (), p.add_on_conflict, f"rows_{p.table.name}")
                for p in parts
            ]
            clauses = [s.cte(f"write_{p.table.name}") for s, p in zip(statements[:-1], parts, strict=False)]
            clauses += [
                self._build_update(
                    c.table, (c.key,), tuple(k for k in c.rows[0] if k != c.key), f"set_{c.table.name}"
                ).cte(f"change_{c.table.name}")
                for c in changes
            ]
            stmt = self._statements[key] = statements[-1].add_cte(*clauses)
        self._run(
            conn,
            stmt,
            {
                **{f"rows_{p.table.name}": _document(p.rows) for p in parts},
                **{f"set_{c.table.name}": _document(c.rows) for c in changes},
            },
            rows=False,
        )

    def _build_insert(
        self,
        table: sa.Table,
        columns: tuple[str, ...],
        ignore: bool,
        returning: Sequence[sa.Column[Any]],
        add_on_conflict: Sequence[sa.Column[Any]],
        parameter: str = _ROWS,
        *,
        replace_on_conflict: Sequence[str] = (),
    ) -> Any:
        stmt: Any
        if self._postgres:
            source = self._source(table, parameter)
            stmt = pg_insert(table).from_select(list(columns), sa.select(*(source.c[c] for c in columns)))
        else:
            stmt = sqlite_insert(table)
        if ignore:
            stmt = stmt.on_conflict_do_nothing()
        if add_on_conflict:
            stmt = stmt.on_conflict_do_update(
                index_elements=list(add_on_conflict), set_={"balance": table.c.balance + stmt.excluded.balance}
            )
        if replace_on_conflict:
            stmt = stmt.on_conflict_do_update(
                index_elements=list(table.primary_key.columns), set_={c: stmt.excluded[c] for c in replace_on_conflict}
            )
        if returning or not self._postgres:
            stmt = stmt.returning(*(returning or table.primary_key.columns))
        return stmt

    def update(
        self,
        conn: Connection,
        table: sa.Table,
        key: str | tuple[str, ...],
        rows: Sequence[dict[str, Any]],
        *,
        only: sa.ColumnElement[bool] | None = None,
        returning: Sequence[sa.Column[Any]] = (),
    ) -> list[Any]:
        """Set the other columns of ``rows`` on the rows of ``table`` whose ``key`` (a
        column, or the columns of a composite key) matches and that meet ``only`` (a
        condition on ``table``, fixed for this statement), in one statement on PostgreSQL
        (``UPDATE … FROM`` the batch; rows are locked in the order given, so give them
        in the row-lock order). Each row is found by one index probe on ``key`` and
        updated through its ``ctid``: a plain join on ``key`` lets the planner hash the
        batch against a scan of the whole table on every call. SQLite: executemany.

        ``returning``: those columns of the rows updated, on PostgreSQL (SQLite returns
        nothing: read them back)."""
        if not rows:
            return []
        keys = (key,) if isinstance(key, str) else key
        columns = tuple(c for c in rows[0] if c not in keys)
        # ``only`` is the caller's one condition object, kept alive by the cached statement.
        cache_key = ("update", table.name, keys, columns, id(only), tuple(returning))
        stmt = self._statements.get(cache_key)
        if stmt is None:
            stmt = self._statements[cache_key] = self._build_update(
                table, keys, columns, only=only, returning=returning
            )
        if self._postgres:
            return self._run(conn, stmt, {_ROWS: _document(rows)}, rows=bool(returning))
        conn.execute(stmt, [{f"b_{c}": v for c, v in row.items()} for row in rows])
        return []

    def _build_update(
        self,
        table: sa.Table,
        keys: tuple[str, ...],
        columns: tuple[str, ...],
        parameter: str = _ROWS,
        *,
        only: sa.ColumnElement[bool] | None = None,
        returning: Sequence[sa.Column[Any]] = (),
    ) -> Any:
        stmt: Any
        if self._postgres:
            source = self._source(table, parameter)
            probe = table.alias("probe")
            matches = [probe.c[k] == source.c[k] for k in keys]
            where = (
                sa.select(sa.column("ctid", _selectable=probe).label("row"))
                .select_from(probe)
                .where(*matches)
                .offset(0)
                .lateral("found")
            )
            found = (
                sa.select(where.c.row, *(source.c[c] for c in columns))
                .select_from(source.join(where, sa.true()))
                .subquery("changes")
            )
            stmt = (
                table.update()
                .where(sa.column("ctid", _selectable=table) == found.c.row)
                .values({c: found.c[c] for c in columns})
            )
        else:
            stmt = (
                table.update()
                .where(*(table.c[k] == sa.bindparam(f"b_{k}") for k in keys))
                .values({c: sa.bindparam(f"b_{c}") for c in columns})
            )
        if only is not None:
            stmt = stmt.where(only)
        if returning and self._postgres:
            stmt = stmt.returning(*returning)
        return stmt

    def select_for_keys(
        self,
        conn: Connection,
        key: KeyColumns,
        keys: Sequence[Any],
        query: sa.Select[Any],
        params: dict[str, Any] | None = None,
        *,
        for_update: bool = False,
    ) -> list[Any]:
        """The rows of ``query`` (built once by the caller, with ``params`` for its bind
        parameters) whose ``key`` is one of ``keys``, locked with ``for_update``. ``key``
        may be the columns of a composite key, ``keys`` then being tuples.

        On PostgreSQL this is one index probe per key, in the order of ``keys`` (so
        also the order the row locks are taken in): a LATERAL subquery over the
        unnested keys (one array per key column), kept from being flattened into a
        join by OFFSET 0. A plain ``= ANY(:keys)`` lets the planner choose a
        sequential scan for a young table without statistics, and its generic plan
        compares every row with the whole array.
        """
        if not keys:
            return []
        columns = key if isinstance(key, tuple) else (key,)
        if not self._postgres:
            matches = sa.tuple_(*columns).in_(list(keys)) if isinstance(key, tuple) else key.in_(list(keys))
            return list(conn.execute(query.where(matches), params or {}).all())
        cache_key = ("keys", query, columns, for_update)
        stmt = self._statements.get(cache_key)
        if stmt is None:
            wanted, found = _probe(query, columns, for_update, "")
            stmt = self._statements[cache_key] = sa.select(found).select_from(wanted.join(found, sa.true()))
        if isinstance(key, tuple):
            arrays = {f"key_{i}": [k[i] for k in keys] for i in range(len(columns))}
        else:
            arrays = {"key_0": list(keys)}
        return self._run(conn, stmt, {**arrays, **(params or {})})

    def select_parts_for_keys(
        self,
        conn: Connection,
        keys: Sequence[Any],
        parts: Sequence[tuple[sa.Column[Any], sa.Select[Any]]],
        *,
        for_update: bool = False,
    ) -> list[list[Any]]:
        """For each ``(key, query)`` of ``parts``, what :meth:`select_for_keys` returns for
        ``keys``, in ONE statement on PostgreSQL: the parts' probes joined by UNION ALL,
        which runs them one after the other, so the row locks are taken part by part and
        within a part in the order of ``keys``. The queries' columns must line up (same
        names and compatible types, as UNION wants them)."""
        if not keys:
            return [[] for _ in parts]
        if not self._postgres:
            return [self.select_for_keys(conn, key, keys, query, for_update=for_update) for key, query in parts]
        cache_key = ("parts", tuple(parts), for_update)
        stmt = self._statements.get(cache_key)
        if stmt is None:
            branches = []
            for number, (key, query) in enumerate(parts):
                wanted, probed = _probe(query, (key,), for_update, f"_{number}")
                part = sa.literal_column(str(number), sa.Integer).label("part")
                branches.append(sa.select(part, probed).select_from(wanted.join(probed, sa.true())))
            stmt = self._statements[cache_key] = sa.union_all(*branches)
        found: list[list[Any]] = [[] for _ in parts]
        for row in self._run(conn, stmt, {"key_0": list(keys)}):
            found[row.part].append(row)
        return found


def _probe(
    query: sa.Select[Any], columns: tuple[sa.Column[Any], ...], for_update: bool, suffix: str
) -> tuple[Any, Any]:
    """The unnested keys (one array parameter ``key_<i>`` per key column) and, LATERAL to
    them, ``query`` probed once per key (OFFSET 0 keeps the planner from flattening the
    probe into a join), locked with ``for_update``."""
    names = [f"key_{i}" for i in range(len(columns))]
    unnested = sa.func.unnest(
        *(sa.bindparam(name, type_=ARRAY(column.type)) for name, column in zip(names, columns, strict=True))
    )
    wanted = unnested.table_valued(*names).render_derived(f"wanted{suffix}")
    probe = query.where(*(column == wanted.c[name] for name, column in zip(names, columns, strict=True)))
    return wanted, (probe.with_for_update() if for_update else probe).offset(0).lateral(f"found{suffix}")
