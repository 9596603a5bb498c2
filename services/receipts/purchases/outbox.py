"""The purchases table as the crediting outbox, written in group commits.

A verified purchase is first *recorded*: its row (state ``recorded``, bound to
the claiming account, the terms of its first record — coins, bonus, review flag
— fixed for good) commits before the wallet is called. The wallet is the source
of truth for "credited" (exactly once per store transaction); marking the row
``credited`` afterwards is bookkeeping that may come late or not at all: a row
left ``recorded`` is credited by the sweep (:meth:`OutboxRepository.uncredited`,
``receipts.purchases.credit_sweep`` on the worker's beat) with the same terms,
and the wallet answers ALREADY_CREDITED if it had. Receipts and the wallet may
live on separate databases: nothing here writes the wallet's rows or waits on
them inside a receipts transaction.

Concurrent verifications share their transactions (:class:`PurchaseBatches`):
one transaction records every purchase that arrived while the previous one ran,
one marks every credited purchase (and records each call's AIP-155 answer with
it). A new purchase costs one multi-row INSERT … RETURNING per batch; only rows
that existed (a repeat, a purchase a notification recorded first) take the
per-row path of :meth:`PurchaseRepository.claim_in`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.errors import DomainError
from services.common.group_commit import GroupCommit
from services.common.idempotency import insert_ignore
from services.receipts.errors import ReceiptBoundToOtherAccount
from services.receipts.purchases.model import CreditTerms, PurchaseRecord, StoredState, VerifiedPurchase
from services.receipts.purchases.repository import PurchaseRepository, initial_state, record_from_row

Finish = Callable[[Connection, PurchaseRecord], None]
Key = tuple[str, str]


def _key(purchase: VerifiedPurchase) -> Key:
    return (purchase.store.value, purchase.store_transaction_id)


@dataclass(frozen=True)
class Recording:
    """Record ``terms`` bound to ``account_id`` (None: record only)."""

    terms: CreditTerms
    account_id: str | None
    now: datetime


@dataclass(frozen=True)
class Settlement:
    """The wallet credited (or had credited) ``terms`` to ``account_id``: mark the row,
    and run ``finish`` (the AIP-155 answer, the Play consumption row) with it."""

    terms: CreditTerms
    account_id: str
    wallet_transaction_id: str
    now: datetime
    finish: Finish | None = None


RowOutcome = PurchaseRecord | DomainError


class OutboxRepository:
    """Batch SQL of the outbox (SQLAlchemy Core); each method is one transaction."""

    def __init__(self, purchases: PurchaseRepository) -> None:
        self.purchases = purchases
        self.database = purchases.database
        self._table = self.database.table("receipts_purchases")

    def record_batch(self, recordings: Sequence[Recording]) -> list[RowOutcome]:
        return self.database.transaction(lambda conn: self._record_batch(conn, recordings))

    def _record_batch(self, conn: Connection, recordings: Sequence[Recording]) -> list[RowOutcome]:
        table = self._table
        first: dict[Key, int] = {}
        for index, recording in enumerate(recordings):
            first.setdefault(_key(recording.terms.purchase), index)
        # Sorted: concurrent batches take the unique-index locks in one order.
        ordered = sorted(first.items())
        rows = [
            self.purchases.row(
                recordings[i].terms,
                recordings[i].account_id,
                initial_state(recordings[i].terms.purchase),
                recordings[i].now,
            )
            for _, i in ordered
        ]
        inserted = conn.execute(insert_ignore(conn, table).returning(*table.c), rows).all()
        fresh = {(row.store, row.store_transaction_id): record_from_row(row) for row in inserted}
        outcomes: list[RowOutcome] = []
        for index, recording in enumerate(recordings):
            key = _key(recording.terms.purchase)
            if key in fresh and first[key] == index:
                outcomes.append(fresh[key])
                continue
            try:
                outcomes.append(self.purchases.claim_in(conn, recording.terms, recording.account_id, recording.now))
            except DomainError as error:
                outcomes.append(error)
        return outcomes

    def settle_batch(self, settlements: Sequence[Settlement]) -> list[RowOutcome]:
        return self.database.transaction(lambda conn: self._settle_batch(conn, settlements))

    def _settle_batch(self, conn: Connection, settlements: Sequence[Settlement]) -> list[RowOutcome]:
        table = self._table
        params = sorted(
            (
                {
                    "b_store": s.terms.purchase.store.value,
                    "b_id": s.terms.purchase.store_transaction_id,
                    "b_txn": s.wallet_transaction_id,
                    "b_now": s.now,
                }
                for s in settlements
            ),
            key=lambda p: (p["b_store"], p["b_id"]),
        )
        conn.execute(
            table.update()
            .where(
                table.c.store == sa.bindparam("b_store"),
                table.c.store_transaction_id == sa.bindparam("b_id"),
                table.c.state == StoredState.RECORDED.value,
            )
            .values(
                state=StoredState.CREDITED.value,
                wallet_transaction_id=sa.bindparam("b_txn"),
                updated_at=sa.bindparam("b_now"),
            ),
            params,
        )
        keys = sorted({_key(s.terms.purchase) for s in settlements})
        found = conn.execute(
            sa.select(table).where(sa.tuple_(table.c.store, table.c.store_transaction_id).in_(keys))
        ).all()
        records = {(row.store, row.store_transaction_id): record_from_row(row) for row in found}
        outcomes: list[RowOutcome] = []
        for settlement in settlements:
            purchase = settlement.terms.purchase
            record = records[_key(purchase)]
            if record.account_id != settlement.account_id:
                outcomes.append(ReceiptBoundToOtherAccount(purchase.store_transaction_id))
                continue
            if settlement.finish is not None:
                try:
                    settlement.finish(conn, record)
                except DomainError as error:
                    outcomes.append(error)
                    continue
            outcomes.append(record)
        return outcomes

    def uncredited(self, recorded_before: datetime, limit: int) -> list[PurchaseRecord]:
        """Bound purchases recorded but not marked credited, oldest first (the partial index)."""
        table = self._table
        with self.database.connect() as conn:
            rows = conn.execute(
                sa.select(table)
                .where(
                    table.c.state == StoredState.RECORDED.value,
                    table.c.account_id.is_not(None),
                    table.c.updated_at <= recorded_before,
                )
                .order_by(table.c.updated_at)
                .limit(limit)
            ).all()
        return [record_from_row(row) for row in rows]


class PurchaseBatches:
    """The outbox's writes as group commits (``window_seconds`` 0: each alone)."""

    def __init__(self, outbox: OutboxRepository, *, window_seconds: float, max_batch: int) -> None:
        self.outbox = outbox
        self._recordings: GroupCommit[Recording, RowOutcome] | None = None
        self._settlements: GroupCommit[Settlement, RowOutcome] | None = None
        if window_seconds > 0:
            self._recordings = GroupCommit(self._run_recordings, window_seconds=window_seconds, max_batch=max_batch)
            self._settlements = GroupCommit(self._run_settlements, window_seconds=window_seconds, max_batch=max_batch)

    async def _run_recordings(self, recordings: list[Recording]) -> list[RowOutcome]:
        return await self.outbox.database.run(self.outbox.record_batch, recordings)

    async def _run_settlements(self, settlements: list[Settlement]) -> list[RowOutcome]:
        return await self.outbox.database.run(self.outbox.settle_batch, settlements)

    async def record(self, recording: Recording) -> PurchaseRecord:
        """The purchase's row after recording it: bound to the account, the first terms.
        Bound to another account → PERMISSION_DENIED ``RECEIPT_BOUND_TO_OTHER_ACCOUNT``."""
        if self._recordings is not None:
            return _raise(await self._recordings.submit(recording))
        return _raise((await self._run_recordings([recording]))[0])

    async def settle(self, settlement: Settlement) -> PurchaseRecord:
        """Mark the purchase CREDITED (unless refunded since) and run its ``finish``."""
        if self._settlements is not None:
            return _raise(await self._settlements.submit(settlement))
        return _raise((await self._run_settlements([settlement]))[0])


def _raise(outcome: RowOutcome) -> PurchaseRecord:
    if isinstance(outcome, DomainError):
        raise outcome
    return outcome
