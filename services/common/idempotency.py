"""AIP-155 request ids: a replay with the same body returns the stored original
response; the same id with a different body is refused (REQUEST_ID_REUSED).

The claim row is inserted in the same database transaction as the effect, so a
crash or a concurrent duplicate can never apply a request twice.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.engine import Connection

from services.common.db import dialect_insert
from services.common.errors import RequestIdReused


def request_log_table(metadata: sa.MetaData, service: str) -> sa.Table:
    return sa.Table(
        f"{service}_request_log",
        metadata,
        sa.Column("method", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("response", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def fingerprint(request: Message) -> str:
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


class RequestLog:
    """Claim-then-record for one service's request ids."""

    def __init__(self, table: sa.Table) -> None:
        self._table = table

    def claim(self, conn: Connection, method: str, request_id: str, request: Message) -> bytes | None:
        """Claim ``request_id`` for this transaction.

        Returns None when the claim is new (go ahead and do the work, then
        :meth:`record` the response), or the stored response of the original.
        A concurrent claimant blocks on the unique key until the first commits.
        """
        digest = fingerprint(request)
        table = self._table
        # RETURNING, not rowcount: psycopg reports rowcount -1 for INSERT … ON CONFLICT.
        inserted = conn.execute(
            insert_ignore(conn, table)
            .values(method=method, request_id=request_id, request_hash=digest, created_at=datetime.now(UTC))
            .returning(table.c.request_id)
        ).first()
        if inserted is not None:
            return None
        row = conn.execute(
            sa.select(table.c.request_hash, table.c.response).where(
                table.c.method == method, table.c.request_id == request_id
            )
        ).one()
        if row.request_hash != digest:
            raise RequestIdReused(request_id)
        if row.response is None:
            # Only possible if the original transaction committed without recording;
            # treat it like a reuse rather than repeating the effect.
            raise RequestIdReused(request_id)
        return bytes(row.response)

    def record(self, conn: Connection, method: str, request_id: str, response: Message) -> None:
        table = self._table
        conn.execute(
            table.update()
            .where(table.c.method == method, table.c.request_id == request_id)
            .values(response=response.SerializeToString(deterministic=True))
        )


def insert_ignore(conn: Connection, table: sa.Table) -> sa.Insert:
    """INSERT … ON CONFLICT DO NOTHING for the connection's dialect."""
    statement: sa.Insert = dialect_insert(conn, table).on_conflict_do_nothing()
    return statement
