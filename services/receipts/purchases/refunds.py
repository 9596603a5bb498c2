"""SQL of refunds as the stores report them, against the purchase key.

A refund can reach us before its purchase does (a lost or late purchase
notification, an app that verifies days later). ``receipts_refunds`` keeps every
reported refund by (store, store_transaction_id) whether or not the purchase is
known, merged cumulatively (a full refund wins; otherwise the largest quantity and
share reported), so the crediting path can refuse to credit a refunded purchase
and reverse one it credited meanwhile.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.bulk import Bulk
from services.common.catalog import StoreId
from services.common.db import Database, dialect_insert
from services.receipts.purchases.model import Environment, Refund


def _larger(column: sa.Column[Any], value: int) -> sa.ColumnElement[Any]:
    return sa.case((column < value, sa.literal(value)), else_=column)


class RefundRepository:
    def __init__(self, database: Database) -> None:
        self.database = database
        self._refunds = database.table("receipts_refunds")
        self._bulk = Bulk(database.dialect)
        self._all = sa.select(self._refunds)

    def _key(self, store: StoreId, store_transaction_id: str) -> sa.ColumnElement[bool]:
        refunds = self._refunds
        return sa.and_(refunds.c.store == store.value, refunds.c.store_transaction_id == store_transaction_id)

    def _get(self, conn: Connection, store: StoreId, store_transaction_id: str) -> Refund | None:
        row = conn.execute(sa.select(self._refunds).where(self._key(store, store_transaction_id))).one_or_none()
        return None if row is None else _refund_of(row)

    def get_in(self, conn: Connection, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], Refund]:
        """The recorded refunds of many (store, store_transaction_id) keys, in one statement of
        the caller's transaction (the outbox's group commits)."""
        if not keys:
            return {}
        refunds = self._refunds
        key = (refunds.c.store, refunds.c.store_transaction_id)
        rows = self._bulk.select_for_keys(conn, key, sorted(keys), self._all)
        return {(row.store, row.store_transaction_id): _refund_of(row) for row in rows}

    def of(self, table: sa.Table) -> sa.Label[Any]:
        """For the RETURNING (or columns) of a statement on ``table``, keyed by (store,
        store_transaction_id) like the refunds: the row's recorded refund as JSON text, NULL
        when none (PostgreSQL; read it with :meth:`from_json`). Saves the settlement a
        statement per batch."""
        refund = self._refunds.alias("refund")
        return (
            sa.select(sa.cast(sa.func.row_to_json(sa.literal_column(refund.name)), sa.Text))
            .where(refund.c.store == table.c.store, refund.c.store_transaction_id == table.c.store_transaction_id)
            .scalar_subquery()
            .label("refund")
        )

    @staticmethod
    def from_json(text: str) -> Refund:
        return _refund_of(SimpleNamespace(**json.loads(text)))

    async def record(self, refund: Refund, now: datetime) -> Refund:
        """Remember ``refund`` (merged with what was reported before); the merged refund."""
        refunds = self._refunds

        def work(conn: Connection) -> Refund:
            upsert = dialect_insert(conn, refunds).values(
                store=refund.store.value,
                store_transaction_id=refund.store_transaction_id,
                environment=_env(refund),
                full_refund=refund.full,
                refunded_quantity=refund.refunded_quantity,
                refunded_percentage_milli=refund.refunded_percentage_milli,
                reason=refund.reason[:512],
                reported_at=now,
                updated_at=now,
            )
            # Merged with the row reported before, in the same statement: fullness and the
            # cumulative figures only grow.
            merged = upsert.on_conflict_do_update(
                index_elements=[refunds.c.store, refunds.c.store_transaction_id],
                set_={
                    "full_refund": sa.or_(refunds.c.full_refund, sa.literal(refund.full)),
                    "refunded_quantity": _larger(refunds.c.refunded_quantity, refund.refunded_quantity),
                    "refunded_percentage_milli": _larger(
                        refunds.c.refunded_percentage_milli, refund.refunded_percentage_milli
                    ),
                    "environment": sa.func.coalesce(refunds.c.environment, sa.literal(_env(refund))),
                    "updated_at": now,
                },
            )
            return _refund_of(conn.execute(merged.returning(*refunds.c)).one())

        return await self.database.run(self.database.transaction, work)

    async def withdraw(self, store: StoreId, store_transaction_id: str) -> None:
        """The store reversed its refund (the purchase was restored)."""
        key = self._key(store, store_transaction_id)
        await self.database.run(self.database.transaction, lambda conn: conn.execute(self._refunds.delete().where(key)))

    async def get(self, store: StoreId, store_transaction_id: str) -> Refund | None:
        def work() -> Refund | None:
            with self.database.connect() as conn:
                return self._get(conn, store, store_transaction_id)

        return await self.database.run(work)


def _refund_of(row: Any) -> Refund:
    return Refund(
        StoreId(row.store),
        row.store_transaction_id,
        Environment(row.environment) if row.environment else None,
        full=bool(row.full_refund),
        refunded_quantity=int(row.refunded_quantity),
        refunded_percentage_milli=int(row.refunded_percentage_milli),
        reason=row.reason,
    )


def _env(refund: Refund) -> str | None:
    return refund.environment.value if refund.environment else None
