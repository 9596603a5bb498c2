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
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.bulk import Bulk
from services.common.errors import DomainError, RequestIdReused
from services.common.group_commit import Batching, GroupCommit
from services.common.idempotency import fingerprint
from services.receipts.errors import ReceiptBoundToOtherAccount
from services.receipts.purchases.model import (
    CreditTerms,
    PurchaseRecord,
    PurchaseResult,
    Refund,
    StoredState,
    VerifiedPurchase,
)
from services.receipts.purchases.refunds import RefundRepository
from services.receipts.purchases.repository import (
    Call,
    CreditHook,
    PurchaseRepository,
    RequestRecorder,
    RowHook,
    initial_state,
    record_from_row,
)

Key = tuple[str, str]
T = TypeVar("T")
# The states a credit the wallet confirmed marks CREDITED.
_CREDITABLE = (StoredState.RECORDED.value, StoredState.REFUSED.value)


def _key(purchase: VerifiedPurchase) -> Key:
    return (purchase.store.value, purchase.store_transaction_id)


@dataclass(frozen=True)
class Recording:
    """Record ``terms`` bound to ``account_id`` (None: record only), unless ``call`` (the
    AIP-155 call recording it) was answered before."""

    terms: CreditTerms
    account_id: str | None
    now: datetime
    call: Call | None = None


@dataclass(frozen=True)
class Settlement:
    """The wallet credited (or had credited) ``terms`` to ``account_id``: mark the row,
    and record ``hook`` (the AIP-155 answer, the Play consumption row) with it, giving
    it ``result_for`` the row."""

    terms: CreditTerms
    account_id: str
    wallet_transaction_id: str
    now: datetime
    result_for: Callable[[PurchaseRecord], PurchaseResult]
    hook: CreditHook | None = None


@dataclass(frozen=True)
class Recorded:
    """A purchase's row and its refund recorded by then (``receipts_refunds``), read in the
    transaction that wrote the row: the crediting path's refund checks ride the group commit."""

    record: PurchaseRecord
    refund: Refund | None


@dataclass(frozen=True)
class Answered:
    """The recording's call had been answered: ``response`` is the stored answer."""

    response: bytes


class AlreadyAnswered(Exception):
    """Raised by :meth:`PurchaseBatches.record` when the call recording the purchase was
    answered before (AIP-155): nothing was recorded; ``response`` is the stored answer."""

    def __init__(self, response: bytes) -> None:
        super().__init__("this request id was answered before")
        self.response = response


RowOutcome = Recorded | DomainError
RecordOutcome = Recorded | Answered | DomainError


class OutboxRepository:
    """Batch SQL of the outbox (SQLAlchemy Core); each method is one transaction."""

    def __init__(self, purchases: PurchaseRepository) -> None:
        self.purchases = purchases
        self.database = purchases.database
        self._table = self.database.table("receipts_purchases")
        self._request_log = self.database.table("receipts_request_log")
        self.refunds = RefundRepository(self.database)
        # Batch statements built once: their text does not grow with the batch (see Bulk).
        self._bulk = Bulk(self.database.dialect)
        self._purchase_key = (self._table.c.store, self._table.c.store_transaction_id)
        self._all_purchases = sa.select(self._table)
        self._creditable = self._table.c.state.in_(_CREDITABLE)
        self._marked = (*self._table.c, self.refunds.of(self._table))
        log = self._request_log
        self._log_key = (log.c.method, log.c.request_id)
        self._log_entries = sa.select(log.c.method, log.c.request_id, log.c.request_hash, log.c.response)

    def record_batch(self, recordings: Sequence[Recording]) -> list[RecordOutcome]:
        return self.database.transaction(lambda conn: self._record_batch(conn, recordings))

    def _record_batch(self, conn: Connection, recordings: Sequence[Recording]) -> list[RecordOutcome]:
        table = self._table
        # AIP-155 first, in the same transaction: a call answered before records nothing.
        answered = self._answered(conn, [r.call for r in recordings if r.call is not None])
        outcomes: list[RecordOutcome | None] = [None] * len(recordings)
        first: dict[Key, int] = {}
        for index, recording in enumerate(recordings):
            if recording.call is not None:
                outcomes[index] = answered.get((recording.call.method, recording.call.request_id))
            if outcomes[index] is None:
                first.setdefault(_key(recording.terms.purchase), index)
        # Read before the rows are written: a purchase refunded in full is recorded REVOKED.
        refunds = self.refunds.get_in(conn, first)
        recordings = [_revoked_if_refunded(r, refunds.get(_key(r.terms.purchase))) for r in recordings]
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
        inserted = self._bulk.insert(conn, table, rows, ignore=True, returning=tuple(table.c))
        fresh = {(row.store, row.store_transaction_id): record_from_row(row) for row in inserted}
        for index, recording in enumerate(recordings):
            if outcomes[index] is not None:
                continue
            key = _key(recording.terms.purchase)
            if key in fresh and first[key] == index:
                outcomes[index] = Recorded(fresh[key], refunds.get(key))
                continue
            try:
                record = self.purchases.claim_in(conn, recording.terms, recording.account_id, recording.now)
                outcomes[index] = Recorded(record, refunds.get(key))
            except DomainError as error:
                outcomes[index] = error
        return _present(outcomes)

    def _answered(self, conn: Connection, calls: Sequence[Call]) -> dict[tuple[str, str], Answered | DomainError]:
        """The calls among ``calls`` answered before: their stored answer, or
        REQUEST_ID_REUSED for a call whose body differs from the answered one's."""
        if not calls:
            return {}
        keys = sorted({(c.method, c.request_id) for c in calls})
        stored = {
            (row.method, row.request_id): row
            for row in self._bulk.select_for_keys(conn, self._log_key, keys, self._log_entries)
            if row.response is not None
        }
        found: dict[tuple[str, str], Answered | DomainError] = {}
        for call in calls:
            row = stored.get((call.method, call.request_id))
            if row is None:
                continue
            if row.request_hash != fingerprint(call.request):
                found[(call.method, call.request_id)] = RequestIdReused(call.request_id)
            else:
                found[(call.method, call.request_id)] = Answered(bytes(row.response))
        return found

    def settle_batch(self, settlements: Sequence[Settlement]) -> list[RowOutcome]:
        return self.database.transaction(lambda conn: self._settle_batch(conn, settlements))

    def _settle_batch(self, conn: Connection, settlements: Sequence[Settlement]) -> list[RowOutcome]:
        table = self._table
        marks = {
            _key(s.terms.purchase): {
                "store": s.terms.purchase.store.value,
                "store_transaction_id": s.terms.purchase.store_transaction_id,
                "wallet_transaction_id": s.wallet_transaction_id,
                "updated_at": s.now,
                "state": StoredState.CREDITED.value,
                "credit_refused_reason": None,
            }
            for s in settlements
        }
        # RECORDED (or REFUSED, the wallet having changed its mind) → CREDITED, in key order
        # (the row-lock order).
        marked = self._bulk.update(
            conn,
            table,
            ("store", "store_transaction_id"),
            [marks[k] for k in sorted(marks)],
            only=self._creditable,
            # With each row its recorded refund, read after the wallet credited: a refund
            # recorded after this read finds the credit in the wallet (Crediting.apply_refund).
            returning=self._marked,
        )
        records: dict[Key, PurchaseRecord] = {}
        refunds: dict[Key, Refund] = {}
        for row in marked:
            key = (row.store, row.store_transaction_id)
            records[key] = record_from_row(row)
            if row.refund is not None:
                refunds[key] = self.refunds.from_json(row.refund)
        # The rows not moved (credited before, refunded since; on SQLite all of them).
        unmoved = [key for key in sorted(marks) if key not in records]
        for row in self._bulk.select_for_keys(conn, self._purchase_key, unmoved, self._all_purchases):
            records[(row.store, row.store_transaction_id)] = record_from_row(row)
        refunds.update(self.refunds.get_in(conn, unmoved))
        outcomes: list[RowOutcome | None] = [None] * len(settlements)
        answers: list[tuple[int, RequestRecorder]] = []
        rows: list[RowHook] = []
        for index, settlement in enumerate(settlements):
            purchase = settlement.terms.purchase
            record = records[_key(purchase)]
            hook = settlement.hook
            if record.account_id != settlement.account_id:
                outcomes[index] = ReceiptBoundToOtherAccount(purchase.store_transaction_id)
                continue
            if type(hook) is RowHook:
                rows.append(hook)
                hook = hook.inner
            if type(hook) is RequestRecorder:
                answers.append((index, hook))
            elif hook is not None:
                try:
                    hook.record_in(conn, [settlement.result_for(record)])
                except DomainError as error:
                    outcomes[index] = error
            if outcomes[index] is None:
                outcomes[index] = Recorded(record, refunds.get(_key(purchase)))
        _insert_rows(conn, self._bulk, rows)
        self._record_answers(conn, settlements, records, answers)
        return _present(outcomes)

    def _record_answers(
        self,
        conn: Connection,
        settlements: Sequence[Settlement],
        records: dict[Key, PurchaseRecord],
        answers: list[tuple[int, RequestRecorder]],
    ) -> None:
        """The AIP-155 answers of the batch's calls in one INSERT; an id already taken (a
        concurrent call with the same id) takes the per-call path, which replays or refuses."""
        if not answers:
            return
        log = self._request_log
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        first: list[tuple[int, RequestRecorder, tuple[str, str]]] = []
        repeats: list[tuple[int, RequestRecorder]] = []
        for index, recorder in answers:
            settlement = settlements[index]
            row = recorder.log_row([settlement.result_for(records[_key(settlement.terms.purchase)])], settlement.now)
            key = (row["method"], row["request_id"])
            if key in rows:
                repeats.append((index, recorder))
            else:
                rows[key] = row
                first.append((index, recorder, key))
        inserted = self._bulk.insert(
            conn, log, [rows[key] for key in sorted(rows)], ignore=True, returning=self._log_key
        )
        ours = {(row.method, row.request_id) for row in inserted}
        for index, recorder, key in first:
            if key in ours:
                recorder.recorded()
            else:
                repeats.append((index, recorder))
        for index, recorder in repeats:
            settlement = settlements[index]
            recorder.record_in(conn, [settlement.result_for(records[_key(settlement.terms.purchase)])])

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

    def refuse(self, record: PurchaseRecord, reason: str, now: datetime) -> bool:
        """The wallet refused to credit ``record`` for good: RECORDED → REFUSED with the
        wallet's reason (out of the sweep's index). False when the row had moved on."""
        table = self._table

        def work(conn: Connection) -> bool:
            moved = conn.execute(
                table.update()
                .where(
                    table.c.store == record.store.value,
                    table.c.store_transaction_id == record.store_transaction_id,
                    table.c.state == StoredState.RECORDED.value,
                )
                .values(state=StoredState.REFUSED.value, credit_refused_reason=reason[:128], updated_at=now)
            )
            return moved.rowcount == 1

        return self.database.transaction(work)


class PurchaseBatches:
    """The outbox's writes as group commits (no window: each alone)."""

    def __init__(self, outbox: OutboxRepository, batching: Batching = Batching()) -> None:
        self.outbox = outbox
        self._recordings: GroupCommit[Recording, RecordOutcome] | None = batching.group(self._run_recordings)
        self._settlements: GroupCommit[Settlement, RowOutcome] | None = batching.group(self._run_settlements)

    async def _run_recordings(self, recordings: list[Recording]) -> list[RecordOutcome]:
        return await self.outbox.database.run(self.outbox.record_batch, recordings)

    async def _run_settlements(self, settlements: list[Settlement]) -> list[RowOutcome]:
        return await self.outbox.database.run(self.outbox.settle_batch, settlements)

    async def record(self, recording: Recording) -> Recorded:
        """The purchase's row after recording it: bound to the account, the first terms
        (REVOKED if a full refund was recorded before), and that refund.
        Bound to another account → PERMISSION_DENIED ``RECEIPT_BOUND_TO_OTHER_ACCOUNT``.
        The recording's call answered before → :class:`AlreadyAnswered` (REQUEST_ID_REUSED
        if its body differs), and nothing is recorded."""
        if self._recordings is not None:
            outcome = await self._recordings.submit(recording)
        else:
            outcome = (await self._run_recordings([recording]))[0]
        if isinstance(outcome, Answered):
            raise AlreadyAnswered(outcome.response)
        return _raise(outcome)

    async def settle(self, settlement: Settlement) -> Recorded:
        """Mark the purchase CREDITED (unless refunded since) and run its ``finish``; the row
        and the refund recorded by then, read after marking."""
        if self._settlements is not None:
            return _raise(await self._settlements.submit(settlement))
        return _raise((await self._run_settlements([settlement]))[0])


def _present(outcomes: Sequence[T | None]) -> list[T]:
    present = [outcome for outcome in outcomes if outcome is not None]
    assert len(present) == len(outcomes)
    return present


def _raise(outcome: RowOutcome) -> Recorded:
    if isinstance(outcome, DomainError):
        raise outcome
    return outcome


def _revoked_if_refunded(recording: Recording, refund: Refund | None) -> Recording:
    if refund is None or not refund.full:
        return recording
    return replace(recording, terms=replace(recording.terms, purchase=recording.terms.purchase.as_revoked()))


def _insert_rows(conn: Connection, bulk: Bulk, hooks: Sequence[RowHook]) -> None:
    """The :class:`RowHook` rows of a batch: one INSERT … ON CONFLICT DO NOTHING RETURNING
    per table, in key order; a key twice in the batch is added by its first hook only."""
    tables: dict[sa.Table, list[RowHook]] = {}
    for hook in hooks:
        tables.setdefault(hook.table, []).append(hook)
    for table, group in tables.items():
        key = group[0].key
        rows = {str(hook.row[key]): hook.row for hook in reversed(group)}
        returned = bulk.insert(conn, table, [rows[k] for k in sorted(rows)], ignore=True, returning=(table.c[key],))
        inserted = {str(row[0]) for row in returned}
        for hook in group:
            value = str(hook.row[key])
            hook.added = value in inserted
            inserted.discard(value)
