"""SQL of the purchases core (SQLAlchemy Core). Transactions live here.

``receipts_purchases`` has one row per store transaction, keyed by
(store, store_transaction_id). The row binds the purchase to the first account
that claims it (a conditional ``UPDATE … WHERE account_id IS NULL``), and keeps
the credit terms fixed at that moment so every later wallet call is identical.

The schema is the migrations' alone: each repository reads the tables it
queries from the database (:meth:`Database.table`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.engine import Connection

from services.common.catalog import Price, StoreId
from services.common.clock import as_utc
from services.common.db import Database
from services.common.errors import RequestIdReused
from services.common.idempotency import RequestLog, fingerprint, insert_ignore
from services.receipts.errors import ReceiptBoundToOtherAccount
from services.receipts.purchases.model import (
    CreditTerms,
    Environment,
    PurchaseRecord,
    PurchaseResult,
    StoredState,
    VerifiedPurchase,
)

T = TypeVar("T")


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


def record_from_row(row: Any) -> PurchaseRecord:
    """A ``receipts_purchases`` row as a :class:`PurchaseRecord`."""
    price = Price(int(row.price_minor), row.currency) if row.price_minor is not None and row.currency else None
    created = as_utc(row.created_at)
    updated = as_utc(row.updated_at)
    return PurchaseRecord(
        store=StoreId(row.store),
        store_transaction_id=row.store_transaction_id,
        account_id=row.account_id,
        product_id=row.product_id,
        quantity=int(row.quantity),
        coins=int(row.coins),
        bonus_coins=int(row.bonus_coins),
        environment=Environment(row.environment),
        storefront=row.storefront,
        price=price,
        purchase_time=_utc(row.purchase_time),
        order_id=row.order_id or "",
        original_transaction_id=row.original_transaction_id or "",
        state=StoredState(row.state),
        flagged_for_review=bool(row.flagged_for_review),
        wallet_transaction_id=row.wallet_transaction_id or "",
        refunded_quantity=int(row.refunded_quantity),
        refunded_percentage_milli=int(row.refunded_percentage_milli),
        created_at=created,
        updated_at=updated,
        evidence_sha256=row.evidence_sha256 or "",
        credit_refused_reason=row.credit_refused_reason or "",
    )


def initial_state(purchase: VerifiedPurchase) -> StoredState:
    """The state a purchase is first recorded in."""
    if purchase.revoked:
        return StoredState.REVOKED
    if purchase.pending:
        return StoredState.PENDING
    return StoredState.RECORDED


class PurchaseRepository:
    """Purchases and the request log, on one :class:`Database`."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._request_log = database.table("receipts_request_log")
        self.requests = RequestLog(self._request_log)
        self._purchases = database.table("receipts_purchases")

    async def _tx(self, work: Callable[[Connection], T]) -> T:
        return await self.database.run(self.database.transaction, work)

    def _key(self, store: StoreId, store_transaction_id: str) -> sa.ColumnElement[bool]:
        purchases = self._purchases
        return sa.and_(purchases.c.store == store.value, purchases.c.store_transaction_id == store_transaction_id)

    def _insert(
        self, conn: Connection, terms: CreditTerms, account: str | None, state: StoredState, now: datetime, **more: Any
    ) -> None:
        """The purchase's row with the terms of its first claim, unless it exists (first writer wins)."""
        conn.execute(insert_ignore(conn, self._purchases).values(**self.row(terms, account, state, now, **more)))

    def row(
        self, terms: CreditTerms, account: str | None, state: StoredState, now: datetime, **more: Any
    ) -> dict[str, Any]:
        """The values of a new purchase row."""
        purchase, price = terms.purchase, terms.purchase.price
        return dict(
            store=purchase.store.value,
            store_transaction_id=purchase.store_transaction_id,
            account_id=account,
            product_id=purchase.product_id,
            quantity=purchase.quantity,
            coins=terms.coins,
            bonus_coins=terms.bonus_coins,
            environment=purchase.environment.value,
            storefront=purchase.storefront,
            price_minor=price.amount_minor if price else None,
            currency=price.currency if price else None,
            purchase_time=purchase.purchase_time,
            order_id=purchase.order_id or None,
            original_transaction_id=purchase.original_transaction_id or None,
            state=state.value,
            flagged_for_review=terms.flagged_for_review,
            evidence_sha256=purchase.evidence_sha256,
            created_at=now,
            updated_at=now,
            **more,
        )

    def _bind(self, conn: Connection, terms: CreditTerms, account_id: str, now: datetime) -> None:
        """Bind an unbound row to ``account_id`` (a conditional update: the first claimer wins)."""
        purchase, purchases = terms.purchase, self._purchases
        values: dict[str, Any] = {"account_id": account_id, "flagged_for_review": terms.flagged_for_review}
        if purchase.evidence_sha256:
            # A row a notification recorded without evidence takes the claimer's.
            values["evidence_sha256"] = sa.func.coalesce(
                sa.func.nullif(purchases.c.evidence_sha256, ""), purchase.evidence_sha256
            )
        conn.execute(
            purchases.update()
            .where(self._key(purchase.store, purchase.store_transaction_id), purchases.c.account_id.is_(None))
            .values(updated_at=now, **values)
        )

    def _bound_record(self, conn: Connection, purchase: VerifiedPurchase, account_id: str | None) -> PurchaseRecord:
        """The row after the claim; bound to another account than ``account_id`` → PERMISSION_DENIED."""
        key = self._key(purchase.store, purchase.store_transaction_id)
        record = record_from_row(conn.execute(sa.select(self._purchases).where(key)).one())
        if account_id is not None and record.account_id != account_id:
            raise ReceiptBoundToOtherAccount(purchase.store_transaction_id)
        return record

    def _current(self, conn: Connection, store: StoreId, store_transaction_id: str) -> PurchaseRecord | None:
        row = conn.execute(sa.select(self._purchases).where(self._key(store, store_transaction_id))).one_or_none()
        return record_from_row(row) if row is not None else None

    # --- purchases -------------------------------------------------------

    def claim_in(self, conn: Connection, terms: CreditTerms, account_id: str | None, now: datetime) -> PurchaseRecord:
        """Record the purchase (first writer's terms win) and bind it to ``account_id``, in the
        caller's transaction (a group commit claims many in one).

        The row is inserted with ``ON CONFLICT DO NOTHING``; an unbound row is bound with a
        conditional update. A row bound to another account raises PERMISSION_DENIED
        ``RECEIPT_BOUND_TO_OTHER_ACCOUNT`` before its state moves. ``account_id=None`` only
        records (a store notification nobody has claimed yet). A revoked purchase that was
        never credited becomes REVOKED."""
        purchase = terms.purchase
        initial = initial_state(purchase)
        self._insert(conn, terms, account_id, initial, now)
        if account_id is not None:
            self._bind(conn, terms, account_id, now)
        record = self._bound_record(conn, purchase, account_id)
        # Revocation wins over recorded, pending or refused; a completed payment ends pending.
        movable = [StoredState.RECORDED, StoredState.PENDING]
        values: dict[str, Any] = {"state": initial.value, "updated_at": now}
        if initial is StoredState.REVOKED:
            movable.append(StoredState.REFUSED)
        if initial is StoredState.RECORDED:
            movable = [StoredState.PENDING]
            # A paid Play purchase gets the order id and completion time pending ones lack.
            values.update(order_id=purchase.order_id or None, purchase_time=purchase.purchase_time)
        if record.state is initial or record.state not in movable:
            return record
        purchases = self._purchases
        conn.execute(
            purchases.update()
            .where(
                self._key(purchase.store, purchase.store_transaction_id),
                purchases.c.state.in_([state.value for state in movable]),
            )
            .values(**values)
        )
        return self._bound_record(conn, purchase, account_id)

    async def mark_refund(
        self,
        store: StoreId,
        store_transaction_id: str,
        refunded_quantity: int,
        refunded_percentage_milli: int,
        now: datetime,
    ) -> PurchaseRecord | None:
        """Record the cumulative refund of a credited purchase (state REFUNDED)."""
        refunded = StoredState.REFUNDED
        return await self._move(
            store,
            store_transaction_id,
            (StoredState.CREDITED, refunded),
            refunded,
            {"refunded_quantity": refunded_quantity, "refunded_percentage_milli": refunded_percentage_milli},
            now,
        )

    async def revoke_uncredited(self, store: StoreId, store_transaction_id: str, now: datetime) -> None:
        """A purchase refunded in full before it was credited: RECORDED, PENDING or REFUSED → REVOKED."""
        sources = (StoredState.RECORDED, StoredState.PENDING, StoredState.REFUSED)
        await self._move(store, store_transaction_id, sources, StoredState.REVOKED, {}, now)

    async def mark_restored(self, store: StoreId, store_transaction_id: str, now: datetime) -> PurchaseRecord | None:
        """REFUNDED → CREDITED after the store reversed the refund."""
        nothing_refunded = {"refunded_quantity": 0, "refunded_percentage_milli": 0}
        return await self._move(
            store, store_transaction_id, (StoredState.REFUNDED,), StoredState.CREDITED, nothing_refunded, now
        )

    async def _move(
        self,
        store: StoreId,
        store_transaction_id: str,
        sources: tuple[StoredState, ...],
        target: StoredState,
        values: dict[str, int],
        now: datetime,
    ) -> PurchaseRecord | None:
        """A row in one of ``sources`` moves to ``target`` with ``values``; the row after it."""

        def work(conn: Connection) -> PurchaseRecord | None:
            purchases = self._purchases
            conn.execute(
                purchases.update()
                .where(self._key(store, store_transaction_id), purchases.c.state.in_([s.value for s in sources]))
                .values(state=target.value, updated_at=now, **values)
            )
            return self._current(conn, store, store_transaction_id)

        return await self._tx(work)

    async def get(self, store: StoreId, store_transaction_id: str) -> PurchaseRecord | None:
        return await self.database.run(self._read, lambda conn: self._current(conn, store, store_transaction_id))

    def _read(self, work: Callable[[Connection], T]) -> T:
        """A read outside a write transaction (on SQLite, no write lock is taken)."""
        with self.database.connect() as conn:
            return work(conn)

    async def for_account(self, account_id: str, limit: int = 100) -> Sequence[PurchaseRecord]:
        purchases = self._purchases

        def work(conn: Connection) -> list[PurchaseRecord]:
            rows = conn.execute(
                sa.select(purchases)
                .where(purchases.c.account_id == account_id)
                .order_by(purchases.c.created_at.desc())
                .limit(limit)
            ).all()
            return [record_from_row(r) for r in rows]

        return await self.database.run(self._read, work)

    # --- request ids (AIP-155) -------------------------------------------

    async def replay(self, method: str, request_id: str, request: Message) -> bytes | None:
        """The stored response of an earlier call with this request id, if any.

        A fast path only: :meth:`remember` is what makes the id unique.
        Raises REQUEST_ID_REUSED when the id came with a different body.
        """
        digest = fingerprint(request)
        request_log = self._request_log

        def work(conn: Connection) -> bytes | None:
            row = conn.execute(
                sa.select(request_log.c.request_hash, request_log.c.response).where(
                    request_log.c.method == method, request_log.c.request_id == request_id
                )
            ).one_or_none()
            if row is None:
                return None
            if row.request_hash != digest:
                raise RequestIdReused(request_id)
            return bytes(row.response) if row.response is not None else None

        return await self.database.run(self._read, work)

    async def remember(self, method: str, request_id: str, request: Message, response: Message) -> bytes | None:
        """Claim the request id and store the response in one transaction.

        Returns None when this call's response is now the recorded one, or the
        response recorded by a concurrent call with the same id and body.
        """

        def work(conn: Connection) -> bytes | None:
            stored = self.requests.claim(conn, method, request_id, request)
            if stored is None:
                self.requests.record(conn, method, request_id, response)
            return stored

        return await self._tx(work)


@dataclass(frozen=True)
class Call:
    """An AIP-155 call: its answer is looked up by (method, request_id)."""

    method: str
    request_id: str
    request: Message


class CreditHook(Protocol):
    """Work that commits in the transaction marking a purchase CREDITED (see
    :meth:`OutboxRepository.settle_batch`): one commit per batch of verifications."""

    def record_in(self, conn: Connection, results: Sequence[PurchaseResult]) -> None: ...


class RowHook:
    """A :class:`CreditHook` that inserts one row into ``table`` unless its ``key`` column's
    value is taken (``added`` says whether it did), then runs ``inner`` (the call's
    AIP-155 answer), if any. A group commit inserts the rows of all its calls in one
    statement per table (:meth:`OutboxRepository.settle_batch`)."""

    def __init__(self, table: sa.Table, key: str, row: dict[str, Any], inner: CreditHook | None) -> None:
        self.table = table
        self.key = key
        self.row = row
        self.inner = inner
        self.added = False

    def record_in(self, conn: Connection, results: Sequence[Any]) -> None:
        # RETURNING tells a skipped insert apart on every dialect (rowcount does not on psycopg).
        inserted = conn.execute(
            insert_ignore(conn, self.table).values(**self.row).returning(self.table.c[self.key])
        ).first()
        self.added = inserted is not None
        if self.inner is not None:
            self.inner.record_in(conn, results)


class RequestRecorder:
    """Records a call's AIP-155 response inside the transaction that records its
    effect (see :meth:`OutboxRepository.settle_batch`), saving a commit.

    ``build`` turns the results into the response message. After the work,
    ``done`` tells whether it was recorded, and ``stored`` holds the response a
    concurrent call with the same id recorded first (None when ours was).
    """

    def __init__(self, log: RequestLog, method: str, request_id: str, request: Message, build: Callable[..., Message]):
        self._log = log
        self._method = method
        self._request_id = request_id
        self._request = request
        self._build = build
        self.done = False
        self.stored: bytes | None = None
        self.response: Message | None = None

    @property
    def call(self) -> Call:
        return Call(self._method, self._request_id, self._request)

    def log_row(self, results: Sequence[Any], now: datetime) -> dict[str, Any]:
        """The request-log row of this call, its response built (a group commit inserts many
        at once; :meth:`recorded` then, or :meth:`record_in` when the id was taken)."""
        self.response = response = self._build(results)
        return {
            "method": self._method,
            "request_id": self._request_id,
            "request_hash": fingerprint(self._request),
            "response": response.SerializeToString(deterministic=True),
            "created_at": now,
        }

    def recorded(self) -> None:
        """This call's row went in with its response: ours is the recorded answer."""
        self.stored = None
        self.done = True

    def record_in(self, conn: Connection, results: Sequence[Any]) -> None:
        response = self._build(results)
        stored = self._log.claim(conn, self._method, self._request_id, self._request)
        if stored is None:
            self._log.record(conn, self._method, self._request_id, response)
        self.response = response
        self.stored = stored
        self.done = True


class BindingRepository:
    """Which account an appAccountToken / obfuscatedAccountId was issued to.

    The binding values are an HMAC of the account id and cannot be reversed, so
    the receipts core records each binding when it hands one out
    (GetPurchaseBinding); notifications that carry a value never recorded here
    are not ours and are only recorded.
    """

    def __init__(self, database: Database) -> None:
        self.db = database
        self._bindings = database.table("receipts_account_bindings")

    def record(
        self, conn: Connection, account_id: str, app_account_token: str, obfuscated_id: str, now: datetime
    ) -> None:
        conn.execute(
            insert_ignore(conn, self._bindings).values(
                account_id=account_id,
                app_account_token=app_account_token.lower(),
                obfuscated_account_id=obfuscated_id,
                created_at=now,
            )
        )

    def record_now(self, account_id: str, app_account_token: str, obfuscated_id: str, now: datetime) -> None:
        """Record once per binding secret: an account asks for its binding before every
        purchase, and a read is all a known one costs (no write transaction, no SQLite
        write lock). A rotated secret gives the account a further row."""
        with self.db.connect() as conn:
            known = conn.execute(
                sa.select(self._bindings.c.account_id).where(
                    self._bindings.c.app_account_token == app_account_token.lower()
                )
            ).first()
        if known is None:
            self.db.transaction(lambda conn: self.record(conn, account_id, app_account_token, obfuscated_id, now))

    def account_for_app_account_token(self, token: str) -> str | None:
        with self.db.connect() as conn:
            value = conn.execute(
                sa.select(self._bindings.c.account_id).where(self._bindings.c.app_account_token == token.lower())
            ).scalar_one_or_none()
        return None if value is None else str(value)

    def account_for_obfuscated_id(self, obfuscated_id: str) -> str | None:
        with self.db.connect() as conn:
            value = conn.execute(
                sa.select(self._bindings.c.account_id).where(self._bindings.c.obfuscated_account_id == obfuscated_id)
            ).scalar_one_or_none()
        return None if value is None else str(value)
