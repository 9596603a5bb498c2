"""SQL of the wallet service (SQLAlchemy Core). Transactions live here.

Every method that moves value runs as ONE database transaction holding the
AIP-155 request-id claim, the exactly-once key (purchase, reservation), the
immutable ledger entries and the balance rows, so a crash or a concurrent
duplicate can never apply anything twice or half.

Locking order (no deadlocks between our own transactions): request-log claims
sorted by (method, request_id), then COIN balance rows by account id, then
DIAMOND balance rows by account id. System accounts have no balance rows (their
balances are the sums of their entries), so they are never a hot row.
"""

from __future__ import annotations

import base64
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.engine import Connection

from services.common.catalog import Catalog
from services.common.clock import Clock
from services.common.db import Database, dialect_insert
from services.common.errors import RequestIdReused
from services.common.idempotency import RequestLog, fingerprint, insert_ignore, request_log_table
from services.wallet.bulk import Bulk, Rows
from services.wallet.domain.ledger import (
    CLAWBACK,
    GIFT_REVENUE,
    PAYOUT_CLEARING,
    SPEND_REVENUE,
    BalanceView,
    Currency,
    Environment,
    Kind,
    Posting,
    Store,
    balanced,
    hold_account,
    is_system,
    promotions_expense,
    purchase_clearing,
)
from services.wallet.domain.rules import (
    LimitState,
    Period,
    ReservationState,
    change_limit,
    clawback_target,
    period_start,
    refuse_reservation,
    resolved_error,
)
from services.wallet.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

M = TypeVar("M", bound=Message)

metadata = sa.MetaData()
request_log = request_log_table(metadata, "wallet")
TZ = sa.DateTime(timezone=True)
_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")

transactions = sa.Table(
    "wallet_transactions",
    metadata,
    sa.Column("txn_id", sa.String(40), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("reference", sa.String(512), nullable=False),
    sa.Column("sandbox", sa.Boolean, nullable=False),
)
entries = sa.Table(
    "wallet_entries",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("txn_id", sa.String(40), nullable=False),
    sa.Column("account_id", sa.String(160), nullable=False),
    sa.Column("currency", sa.String(8), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
)
balances = sa.Table(
    "wallet_balances",
    metadata,
    sa.Column("account_id", sa.String(160), primary_key=True),
    sa.Column("currency", sa.String(8), primary_key=True),
    sa.Column("balance", sa.BigInteger, nullable=False),
)
history = sa.Table(
    "wallet_history",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("account_id", sa.String(160), nullable=False),
    sa.Column("txn_id", sa.String(40), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("coins_delta", sa.BigInteger, nullable=False),
    sa.Column("diamonds_delta", sa.BigInteger, nullable=False),
    sa.Column("reference", sa.String(512), nullable=False),
    sa.Column("counterparty", sa.String(160), nullable=False),
)
purchases = sa.Table(
    "wallet_purchases",
    metadata,
    sa.Column("store", sa.String(16), primary_key=True),
    sa.Column("store_transaction_id", sa.String(512), primary_key=True),
    sa.Column("account_id", sa.String(160), nullable=False),
    sa.Column("product_id", sa.String(128), nullable=False),
    sa.Column("coins", sa.BigInteger, nullable=False),
    sa.Column("bonus_coins", sa.BigInteger, nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("environment", sa.String(16), nullable=False),
    sa.Column("storefront", sa.String(16), nullable=False),
    sa.Column("price_minor", sa.BigInteger, nullable=False),
    sa.Column("price_currency", sa.String(3), nullable=False),
    sa.Column("purchase_time", TZ, nullable=True),
    sa.Column("flagged_for_review", sa.Boolean, nullable=False),
    sa.Column("credit_txn_id", sa.String(40), nullable=False),
    sa.Column("clawed_back", sa.BigInteger, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
)
reservations = sa.Table(
    "wallet_reservations",
    metadata,
    sa.Column("reservation_id", sa.String(128), primary_key=True),
    sa.Column("account_id", sa.String(160), nullable=False),
    sa.Column("diamonds", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("requested_expire_at", TZ, nullable=True),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("expire_at", TZ, nullable=False),
    sa.Column("resolved_at", TZ, nullable=True),
)
spending_limits = sa.Table(
    "wallet_spending_limits",
    metadata,
    sa.Column("account_id", sa.String(160), primary_key=True),
    sa.Column("period", sa.String(16), primary_key=True),
    sa.Column("limit_coins", sa.BigInteger, nullable=False),
    sa.Column("pending_limit_coins", sa.BigInteger, nullable=True),
    sa.Column("pending_effective_at", TZ, nullable=True),
    sa.Column("updated_at", TZ, nullable=False),
)


def utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back without an offset; they are all UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def new_txn_id() -> str:
    return uuid.uuid4().hex


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class CreditResult:
    already_credited: bool
    txn_id: str
    coins: int
    bonus_coins: int
    balance: BalanceView


@dataclass(frozen=True)
class ReversalResult:
    applied: bool
    coins: int
    account_id: str
    balance: BalanceView


@dataclass(frozen=True)
class ReservationView:
    reservation_id: str
    account_id: str
    diamonds: int
    state: ReservationState
    created_at: datetime
    expire_at: datetime


@dataclass(frozen=True)
class LimitView:
    period: Period
    limit_coins: int
    spent_coins: int
    pending_limit_coins: int | None
    pending_effective_at: datetime | None


@dataclass(frozen=True)
class HistoryItem:
    txn_id: str
    kind: Kind
    created_at: datetime
    coins_delta: int
    diamonds_delta: int
    reference: str
    counterparty: str


@dataclass(frozen=True)
class DebitItem:
    """One gift (creator set) or one coin spend (creator None), for the batch debit path."""

    method: str
    request_id: str
    request: Message
    sender: str
    coins: int
    reference: str
    creator: str | None = None
    diamonds: int = 0
    live_stream_id: str = ""


@dataclass(frozen=True)
class DebitDone:
    txn_id: str
    coins: int
    diamonds: int
    balance: BalanceView


@dataclass(frozen=True)
class CreditItem:
    """One CreditPurchase, for the batch credit path."""

    request_id: str
    request: Message
    account_id: str
    store: Store
    store_transaction_id: str
    product_id: str
    coins: int
    bonus_coins: int
    quantity: int
    environment: Environment
    storefront: str
    price_minor: int
    price_currency: str
    purchase_time: datetime | None
    flagged_for_review: bool

    @property
    def key(self) -> tuple[str, str]:
        return (self.store.value, self.store_transaction_id)


@dataclass
class _Batch:
    """Per-item state of one group-committed batch."""

    results: list[Message | bytes | DomainError | None]
    digests: list[str]
    first: dict[tuple[str, str], int] = field(default_factory=dict)
    followers: list[int] = field(default_factory=list)
    live: list[int] = field(default_factory=list)


@dataclass
class _Deferred:
    """An error to raise after the transaction commits (its writes must stay)."""

    error: DomainError


@dataclass
class _HistoryRow:
    account_id: str
    kind: Kind
    coins_delta: int = 0
    diamonds_delta: int = 0


PAGE_TOKEN_PREFIX = "h1:"  # noqa: S105 (a page cursor, not a secret)


def encode_page_token(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"{PAGE_TOKEN_PREFIX}{last_id}".encode()).decode()


def decode_page_token(token: str) -> int | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token.encode()).decode()
        if not raw.startswith(PAGE_TOKEN_PREFIX):
            raise ValueError(raw)
        value = int(raw[len(PAGE_TOKEN_PREFIX) :])
    except (ValueError, UnicodeError):
        raise InvalidArgument("page_token", "is not a token from an earlier page") from None
    if value <= 0:
        raise InvalidArgument("page_token", "is not a token from an earlier page")
    return value


class WalletStore:
    """The ledger and everything around it, over one :class:`Database`."""

    def __init__(self, database: Database, catalog: Catalog, clock: Clock, *, reservation_ttl: timedelta) -> None:
        self.db = database
        self._catalog = catalog
        self._clock = clock
        self._reservation_ttl = reservation_ttl
        self._log = RequestLog(request_log)
        self._holding = timedelta(days=catalog.diamonds.holding_days)
        self._bulk = Bulk(database.dialect)
        # Look-ups by account for Bulk.select_for_keys, built once so they compile once.
        self._rows_in_currency = sa.select(balances.c.account_id, balances.c.balance).where(
            balances.c.currency == sa.bindparam("currency")
        )
        self._balance_rows = sa.select(balances.c.account_id, balances.c.currency, balances.c.balance)
        self._received_since = (
            sa.select(history.c.account_id, sa.func.sum(history.c.diamonds_delta).label("diamonds"))
            .where(history.c.kind == Kind.GIFT_RECEIVED.value, history.c.created_at > sa.bindparam("since"))
            .group_by(history.c.account_id)
        )
        self._limit_rows = sa.select(spending_limits)
        self._answers = sa.select(request_log).where(request_log.c.method == sa.bindparam("method"))
        self._purchases_in_store = sa.select(purchases).where(purchases.c.store == sa.bindparam("store"))

    # ------------------------------------------------------------ plumbing

    def _idempotent(
        self,
        method: str,
        request_id: str,
        request: Message,
        response_type: type[M],
        work: Callable[[Connection, datetime], M | _Deferred],
    ) -> M:
        """One transaction: claim the request id, do the work, record the response."""

        def unit(conn: Connection) -> M | _Deferred:
            stored = self._log.claim(conn, method, request_id, request)
            if stored is not None:
                return response_type.FromString(stored)
            result = work(conn, self._clock.now())
            if isinstance(result, _Deferred):
                conn.execute(
                    request_log.delete().where(request_log.c.method == method, request_log.c.request_id == request_id)
                )
                return result
            self._log.record(conn, method, request_id, result)
            return result

        outcome = self.db.transaction(unit)
        if isinstance(outcome, _Deferred):
            raise outcome.error
        return outcome

    def _post(
        self,
        conn: Connection,
        *,
        kind: str,
        reference: str,
        sandbox: bool,
        postings: Iterable[Posting],
        rows: Sequence[_HistoryRow],
        now: datetime,
    ) -> None:
        """Write one balanced ledger transaction and apply it to the balance rows."""
        checked = balanced(postings)
        txn_id = new_txn_id()
        deltas: dict[tuple[str, Currency], int] = defaultdict(int)
        for p in checked:
            if not is_system(p.account_id):
                deltas[(p.account_id, p.currency)] += p.amount
        self._write_many(
            conn,
            [{"txn_id": txn_id, "kind": kind, "created_at": now, "reference": reference, "sandbox": sandbox}],
            [
                {"txn_id": txn_id, "account_id": p.account_id, "currency": p.currency.value, "amount": p.amount}
                for p in checked
            ],
            [
                {
                    "account_id": r.account_id,
                    "txn_id": txn_id,
                    "kind": r.kind.value,
                    "created_at": now,
                    "coins_delta": r.coins_delta,
                    "diamonds_delta": r.diamonds_delta,
                    "reference": reference,
                    "counterparty": "",
                }
                for r in rows
            ],
            deltas,
        )

    def _lock_balances(self, conn: Connection, currency: Currency, accounts: Iterable[str]) -> dict[str, int]:
        """Lock the balance rows of ``accounts`` in one currency (sorted: no deadlocks)."""
        ids = sorted(set(accounts))
        found = {
            row.account_id: int(row.balance)
            for row in self._bulk.select_for_keys(
                conn, balances.c.account_id, ids, self._rows_in_currency, {"currency": currency.value}, for_update=True
            )
        }
        return {account_id: found.get(account_id, 0) for account_id in ids}

    def _views(self, conn: Connection, accounts: Iterable[str], now: datetime) -> dict[str, BalanceView]:
        ids = sorted(set(accounts))
        if not ids:
            return {}
        amounts: dict[tuple[str, str], int] = {}
        wanted = ids + [hold_account(a) for a in ids]
        for row in self._bulk.select_for_keys(conn, balances.c.account_id, wanted, self._balance_rows):
            amounts[(row.account_id, row.currency)] = int(row.balance)
        immature: dict[str, int] = {}
        if self._holding > timedelta(0):
            since = {"since": now - self._holding}
            for row in self._bulk.select_for_keys(conn, history.c.account_id, ids, self._received_since, since):
                immature[row.account_id] = int(row.diamonds)
        coin, diamond = Currency.COIN.value, Currency.DIAMOND.value
        return {
            a: BalanceView(
                account_id=a,
                coin_balance=amounts.get((a, coin), 0),
                diamonds=amounts.get((a, diamond), 0),
                diamonds_reserved=amounts.get((hold_account(a), diamond), 0),
                diamonds_immature=immature.get(a, 0),
            )
            for a in ids
        }

    def _view(self, conn: Connection, account_id: str, now: datetime) -> BalanceView:
        return self._views(conn, [account_id], now)[account_id]

    # ------------------------------------------------------------ purchases

    def _purchase_for_update(self, conn: Connection, store: Store, store_transaction_id: str) -> Any:
        query = sa.select(purchases).where(
            purchases.c.store == store.value, purchases.c.store_transaction_id == store_transaction_id
        )
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).one_or_none()
        if row is None:
            raise NotFound("PURCHASE_NOT_FOUND", "no credited purchase has this store transaction id")
        return row

    def reverse_purchase(
        self,
        *,
        request_id: str,
        request: Message,
        response_type: type[M],
        build: Callable[[ReversalResult], M],
        store: Store,
        store_transaction_id: str,
        refunded_quantity: int,
        refunded_percentage_milli: int,
        reason: str,
    ) -> M:
        def work(conn: Connection, now: datetime) -> M:
            row = self._purchase_for_update(conn, store, store_transaction_id)
            target = clawback_target(int(row.coins), int(row.quantity), refunded_quantity, refunded_percentage_milli)
            delta = target - int(row.clawed_back)
            account_id = row.account_id
            if delta <= 0:
                return build(ReversalResult(False, 0, account_id, self._view(conn, account_id, now)))
            environment = Environment(row.environment)
            self._post(
                conn,
                kind=Kind.PURCHASE_REVERSAL.value,
                reference=store_transaction_id,
                sandbox=environment is Environment.SANDBOX,
                postings=[
                    Posting(account_id, Currency.COIN, -delta),
                    Posting(_clawback(environment), Currency.COIN, delta),
                ],
                rows=[_HistoryRow(account_id, Kind.PURCHASE_REVERSAL, coins_delta=-delta)],
                now=now,
            )
            conn.execute(
                purchases.update()
                .where(purchases.c.store == store.value, purchases.c.store_transaction_id == store_transaction_id)
                .values(clawed_back=target)
            )
            return build(ReversalResult(True, delta, account_id, self._view(conn, account_id, now)))

        return self._idempotent("ReversePurchase", request_id, request, response_type, work)

    def restore_purchase(
        self,
        *,
        request_id: str,
        request: Message,
        response_type: type[M],
        build: Callable[[ReversalResult], M],
        store: Store,
        store_transaction_id: str,
    ) -> M:
        def work(conn: Connection, now: datetime) -> M:
            row = self._purchase_for_update(conn, store, store_transaction_id)
            clawed = int(row.clawed_back)
            account_id = row.account_id
            if clawed == 0:
                return build(ReversalResult(False, 0, account_id, self._view(conn, account_id, now)))
            environment = Environment(row.environment)
            self._post(
                conn,
                kind=Kind.PURCHASE_RESTORE.value,
                reference=store_transaction_id,
                sandbox=environment is Environment.SANDBOX,
                postings=[
                    Posting(_clawback(environment), Currency.COIN, -clawed),
                    Posting(account_id, Currency.COIN, clawed),
                ],
                rows=[_HistoryRow(account_id, Kind.PURCHASE_RESTORE, coins_delta=clawed)],
                now=now,
            )
            conn.execute(
                purchases.update()
                .where(purchases.c.store == store.value, purchases.c.store_transaction_id == store_transaction_id)
                .values(clawed_back=0)
            )
            return build(ReversalResult(True, clawed, account_id, self._view(conn, account_id, now)))

        return self._idempotent("RestorePurchase", request_id, request, response_type, work)

    # ------------------------------------------------------------ balances and history

    def balance(self, account_id: str) -> BalanceView:
        def unit(conn: Connection) -> BalanceView:
            now = self._clock.now()
            self._expire_due(conn, account_id, now)
            return self._view(conn, account_id, now)

        return self.db.transaction(unit)

    def history(
        self,
        account_id: str,
        *,
        page_size: int,
        page_token: str,
        kinds: Sequence[Kind],
        start: datetime | None,
        end: datetime | None,
    ) -> tuple[list[HistoryItem], str]:
        """Newest first; the page token is the last history id seen, so rows written
        meanwhile never shift a later page (ids only grow)."""
        before = decode_page_token(page_token)
        query = sa.select(history).where(history.c.account_id == account_id)
        if before is not None:
            query = query.where(history.c.id < before)
        if kinds:
            query = query.where(history.c.kind.in_([k.value for k in kinds]))
        if start is not None:
            query = query.where(history.c.created_at >= start)
        if end is not None:
            query = query.where(history.c.created_at < end)
        query = query.order_by(history.c.id.desc()).limit(page_size + 1)
        with self.db.connect() as conn:
            rows = conn.execute(query).all()
        items = [
            HistoryItem(
                row.txn_id,
                Kind(row.kind),
                utc(row.created_at),
                int(row.coins_delta),
                int(row.diamonds_delta),
                row.reference,
                row.counterparty,
            )
            for row in rows[:page_size]
        ]
        token = encode_page_token(int(rows[page_size - 1].id)) if len(rows) > page_size else ""
        return items, token

    def _claim_batch(
        self, conn: Connection, keys: Sequence[tuple[str, str]], requests: Sequence[Message], now: datetime
    ) -> _Batch:
        """Claim every request id of a batch in one statement (sorted: a fixed lock order).

        The first occurrence of a (method, request_id) in the batch is its leader;
        later ones follow it. Replays of committed requests get their stored bytes.
        """
        batch = _Batch([None] * len(keys), [fingerprint(r) for r in requests])
        for index, key in enumerate(keys):
            if key in batch.first:
                batch.followers.append(index)
            else:
                batch.first[key] = index
        claims = sorted(batch.first)
        rows = [
            {"method": m, "request_id": r, "request_hash": batch.digests[batch.first[(m, r)]], "created_at": now}
            for m, r in claims
        ]
        claimed = self._bulk.insert(
            conn, request_log, rows, ignore=True, returning=(request_log.c.method, request_log.c.request_id)
        )
        inserted = {(row.method, row.request_id) for row in claimed}
        replays = [key for key in claims if key not in inserted]
        if replays:
            stored = {
                (row.method, row.request_id): row
                for method in {m for m, _ in replays}
                for row in self._bulk.select_for_keys(
                    conn,
                    request_log.c.request_id,
                    [r for m, r in replays if m == method],
                    self._answers,
                    {"method": method},
                )
            }
            for key in replays:
                index = batch.first[key]
                row = stored[key]
                if row.request_hash != batch.digests[index] or row.response is None:
                    batch.results[index] = RequestIdReused(key[1])
                else:
                    batch.results[index] = bytes(row.response)
        batch.live = sorted(i for i in batch.first.values() if batch.results[i] is None)
        return batch

    def _finish_batch(
        self, conn: Connection, batch: _Batch, keys: Sequence[tuple[str, str]], now: datetime
    ) -> list[Message | bytes | DomainError]:
        """Record the answers of the batch's new requests; drop the claims of refused ones."""
        recorded = [
            {
                "method": keys[i][0],
                "request_id": keys[i][1],
                "request_hash": batch.digests[i],
                "created_at": now,
                "response": result.SerializeToString(deterministic=True),
            }
            for i in batch.live
            if isinstance(result := batch.results[i], Message)
        ]
        # The claims exist (this transaction made them): the upsert only sets their answers.
        self._bulk.insert(conn, request_log, recorded, replace_on_conflict=("response",))
        dropped = [{"m": keys[i][0], "r": keys[i][1]} for i in batch.live if isinstance(batch.results[i], DomainError)]
        if dropped:
            conn.execute(
                request_log.delete().where(
                    request_log.c.method == sa.bindparam("m"), request_log.c.request_id == sa.bindparam("r")
                ),
                dropped,
            )
        for index in batch.followers:
            leader = batch.first[keys[index]]
            same = batch.digests[leader] == batch.digests[index]
            batch.results[index] = batch.results[leader] if same else RequestIdReused(keys[index][1])
        return [r for r in batch.results if r is not None]

    def _write_many(
        self,
        conn: Connection,
        txn_rows: list[dict[str, Any]],
        entry_rows: list[dict[str, Any]],
        history_rows: list[dict[str, Any]],
        deltas: dict[tuple[str, Currency], int],
    ) -> None:
        """Bulk-write ledger transactions and add ``deltas`` to the balance rows (sorted
        order), in one round trip on PostgreSQL."""
        rows = [
            {"account_id": a, "currency": c.value, "balance": d}
            for (a, c), d in sorted(deltas.items(), key=lambda kv: (kv[0][1].value, kv[0][0]))
            if d
        ]
        self._bulk.insert_all(
            conn,
            [
                Rows(transactions, txn_rows),
                Rows(entries, entry_rows),
                Rows(history, history_rows),
                # Last: the only part that locks existing rows, so its order is the lock order.
                Rows(balances, rows, add_on_conflict=(balances.c.account_id, balances.c.currency)),
            ],
        )

    # ------------------------------------------------------------ purchases, batched

    def credit_batch(
        self, items: Sequence[CreditItem], build: Callable[[CreditResult], Message]
    ) -> list[Message | bytes | DomainError]:
        """Credit many purchases in ONE database transaction (group commit); each keeps
        its own request-id claim, exactly-once purchase key, ledger transaction and answer."""
        return self.db.transaction(lambda conn: self._credit_batch(conn, items, build, self._clock.now()))

    def _credit_batch(
        self,
        conn: Connection,
        items: Sequence[CreditItem],
        build: Callable[[CreditResult], Message],
        now: datetime,
    ) -> list[Message | bytes | DomainError]:
        keys = [("CreditPurchase", item.request_id) for item in items]
        batch = self._claim_batch(conn, keys, [item.request for item in items], now)
        # The first live item per purchase key tries to insert it; the others see the winner.
        owner: dict[tuple[str, str], int] = {}
        for index in batch.live:
            owner.setdefault(items[index].key, index)
        txn_ids = {index: new_txn_id() for index in owner.values()}
        created: set[tuple[str, str]] = set()
        if owner:
            purchase_rows = [
                {
                    "store": items[i].store.value,
                    "store_transaction_id": items[i].store_transaction_id,
                    "account_id": items[i].account_id,
                    "product_id": items[i].product_id,
                    "coins": items[i].coins,
                    "bonus_coins": items[i].bonus_coins,
                    "quantity": items[i].quantity,
                    "environment": items[i].environment.value,
                    "storefront": items[i].storefront,
                    "price_minor": items[i].price_minor,
                    "price_currency": items[i].price_currency,
                    "purchase_time": items[i].purchase_time,
                    "flagged_for_review": items[i].flagged_for_review,
                    "credit_txn_id": txn_ids[i],
                    "clawed_back": 0,
                    "created_at": now,
                }
                for _, i in sorted(owner.items())
            ]
            returned = self._bulk.insert(
                conn,
                purchases,
                purchase_rows,
                ignore=True,
                returning=(purchases.c.store, purchases.c.store_transaction_id),
            )
            created = {(row.store, row.store_transaction_id) for row in returned}
        earlier = [key for key in owner if key not in created]
        existing: dict[tuple[str, str], tuple[str, str, int, int]] = {}
        for store in {s for s, _ in earlier}:
            ids = [t for s, t in earlier if s == store]
            for row in self._bulk.select_for_keys(
                conn, purchases.c.store_transaction_id, ids, self._purchases_in_store, {"store": store}
            ):
                existing[(row.store, row.store_transaction_id)] = (
                    row.account_id,
                    row.credit_txn_id,
                    int(row.coins),
                    int(row.bonus_coins),
                )
        for key in created:
            winner = items[owner[key]]
            existing[key] = (winner.account_id, txn_ids[owner[key]], winner.coins, winner.bonus_coins)
        txn_rows: list[dict[str, Any]] = []
        entry_rows: list[dict[str, Any]] = []
        history_rows: list[dict[str, Any]] = []
        deltas: dict[tuple[str, Currency], int] = defaultdict(int)
        outcomes: list[tuple[int, bool]] = []  # (item index, freshly credited) of the accepted items
        for index in batch.live:
            item = items[index]
            account_id, txn_id, _, _ = existing[item.key]
            if account_id != item.account_id:
                batch.results[index] = PermissionDenied(
                    "RECEIPT_BOUND_TO_OTHER_ACCOUNT", "this store transaction was already credited to another account"
                )
                continue
            fresh = item.key in created and owner[item.key] == index
            outcomes.append((index, fresh))
            if not fresh:
                continue
            deltas[(account_id, Currency.COIN)] += item.coins
            txn_rows.append(
                {
                    "txn_id": txn_id,
                    "kind": Kind.PURCHASE.value,
                    "created_at": now,
                    "reference": item.store_transaction_id,
                    "sandbox": item.environment is Environment.SANDBOX,
                }
            )
            postings = [
                Posting(account_id, Currency.COIN, item.coins),
                Posting(purchase_clearing(item.store, item.environment), Currency.COIN, item.bonus_coins - item.coins),
                Posting(promotions_expense(item.environment), Currency.COIN, -item.bonus_coins),
            ]
            entry_rows.extend(
                {"txn_id": txn_id, "account_id": p.account_id, "currency": p.currency.value, "amount": p.amount}
                for p in balanced(postings)
            )
            history_rows.append(
                {
                    "account_id": account_id,
                    "txn_id": txn_id,
                    "kind": Kind.PURCHASE.value,
                    "created_at": now,
                    "coins_delta": item.coins,
                    "diamonds_delta": 0,
                    "reference": item.store_transaction_id,
                    "counterparty": "",
                }
            )
        if txn_rows:
            self._write_many(conn, txn_rows, entry_rows, history_rows, deltas)
        # Read after writing (the credited rows are ours, locked): each answer shows the
        # balance just after its own credit, counting from the balance before the batch.
        views = self._views(conn, (items[i].account_id for i, _ in outcomes), now)
        running = {a: view.coin_balance - deltas.get((a, Currency.COIN), 0) for a, view in views.items()}
        for index, fresh in outcomes:
            item = items[index]
            account_id, txn_id, original_coins, original_bonus = existing[item.key]
            if fresh:
                running[account_id] += item.coins
            view = views[account_id]
            balance = BalanceView(
                account_id, running[account_id], view.diamonds, view.diamonds_reserved, view.diamonds_immature
            )
            batch.results[index] = build(CreditResult(not fresh, txn_id, original_coins, original_bonus, balance))
        return self._finish_batch(conn, batch, keys, now)

    # ------------------------------------------------------------ gifts and spending

    def debit_batch(
        self, items: Sequence[DebitItem], build: Callable[[DebitItem, DebitDone], Message]
    ) -> list[Message | bytes | DomainError]:
        """Apply gifts and spends in ONE database transaction (group commit).

        Each item keeps its own request-id claim, its own ledger transaction and
        its own answer: the stored response bytes for a replay, the new response,
        or the refusal. Refused items leave nothing behind.
        """
        return self.db.transaction(lambda conn: self._debit_batch(conn, items, build, self._clock.now()))

    def _debit_batch(
        self,
        conn: Connection,
        items: Sequence[DebitItem],
        build: Callable[[DebitItem, DebitDone], Message],
        now: datetime,
    ) -> list[Message | bytes | DomainError]:
        keys = [(item.method, item.request_id) for item in items]
        batch = self._claim_batch(conn, keys, [item.request for item in items], now)
        # Lock the senders' coin rows; read their limits.
        coins = self._lock_balances(conn, Currency.COIN, (items[i].sender for i in batch.live))
        gift_senders = {items[i].sender for i in batch.live if items[i].creator is not None}
        limits = self._limits_with_spent(conn, gift_senders, now)
        # Decide in arrival order.
        done: dict[int, tuple[str, int]] = {}
        for index in batch.live:
            item = items[index]
            balance = coins[item.sender]
            refusal = self._refusal(item, balance, limits.get(item.sender, []))
            if refusal is not None:
                batch.results[index] = refusal
                continue
            coins[item.sender] = balance - item.coins
            for limit in limits.get(item.sender, []):
                limit[1] += item.coins
            done[index] = (new_txn_id(), coins[item.sender])
        if done:
            self._write_debits(conn, items, done, now)
        views = self._views(conn, (items[i].sender for i in done), now)
        for index, (txn_id, coin_balance) in done.items():
            item = items[index]
            view = views[item.sender]
            balance_view = BalanceView(
                item.sender, coin_balance, view.diamonds, view.diamonds_reserved, view.diamonds_immature
            )
            batch.results[index] = build(item, DebitDone(txn_id, item.coins, item.diamonds, balance_view))
        return self._finish_batch(conn, batch, keys, now)

    def _refusal(self, item: DebitItem, balance: int, limits: list[list[Any]]) -> DomainError | None:
        if balance < 0:
            return FailedPrecondition("ACCOUNT_RESTRICTED", "the account owes coins from a refund")
        if balance < item.coins:
            return FailedPrecondition("INSUFFICIENT_COINS", f"{item.coins} coins needed, {balance} available")
        if item.creator is not None:
            for period, spent, cap in limits:
                if spent + item.coins > cap:
                    return FailedPrecondition(
                        "SPENDING_LIMIT_EXCEEDED",
                        f"the {period.value.lower()} gift budget of {cap} coins has {max(cap - spent, 0)} left",
                        {"period": period.value},
                    )
        return None

    def _write_debits(
        self, conn: Connection, items: Sequence[DebitItem], done: dict[int, tuple[str, int]], now: datetime
    ) -> None:
        txn_rows: list[dict[str, Any]] = []
        entry_rows: list[dict[str, Any]] = []
        history_rows: list[dict[str, Any]] = []
        sender_deltas: dict[str, int] = defaultdict(int)
        creator_deltas: dict[str, int] = defaultdict(int)
        for index, (txn_id, _) in done.items():
            item = items[index]
            if item.creator is None:
                kind = Kind.SPEND
                postings = [
                    Posting(item.sender, Currency.COIN, -item.coins),
                    Posting(SPEND_REVENUE, Currency.COIN, item.coins),
                ]
            else:
                kind = Kind.GIFT_SENT
                postings = [
                    Posting(item.sender, Currency.COIN, -item.coins),
                    Posting(GIFT_REVENUE, Currency.COIN, item.coins),
                    Posting(GIFT_REVENUE, Currency.DIAMOND, -item.diamonds),
                    Posting(item.creator, Currency.DIAMOND, item.diamonds),
                ]
                creator_deltas[item.creator] += item.diamonds
            sender_deltas[item.sender] -= item.coins
            txn_rows.append(
                {"txn_id": txn_id, "kind": kind.value, "created_at": now, "reference": item.reference, "sandbox": False}
            )
            entry_rows.extend(
                {"txn_id": txn_id, "account_id": p.account_id, "currency": p.currency.value, "amount": p.amount}
                for p in balanced(postings)
            )
            history_rows.append(
                {
                    "account_id": item.sender,
                    "txn_id": txn_id,
                    "kind": kind.value,
                    "created_at": now,
                    "coins_delta": -item.coins,
                    "diamonds_delta": 0,
                    "reference": item.reference,
                    "counterparty": item.creator or "",
                }
            )
            if item.creator is not None:
                history_rows.append(
                    {
                        "account_id": item.creator,
                        "txn_id": txn_id,
                        "kind": Kind.GIFT_RECEIVED.value,
                        "created_at": now,
                        "coins_delta": 0,
                        "diamonds_delta": item.diamonds,
                        "reference": item.reference,
                        "counterparty": item.sender,
                    }
                )
        # Senders' coin rows exist and are locked already; creators' diamond rows may be new.
        deltas = {(a, Currency.COIN): d for a, d in sender_deltas.items()}
        deltas.update({(c, Currency.DIAMOND): d for c, d in creator_deltas.items()})
        self._write_many(conn, txn_rows, entry_rows, history_rows, deltas)

    def _limits_with_spent(
        self, conn: Connection, accounts: Iterable[str], now: datetime
    ) -> dict[str, list[list[Any]]]:
        """Per account, the effective limits as [period, spent, cap] (only periods with a cap)."""
        ids = sorted(set(accounts))
        if not ids:
            return {}
        result: dict[str, list[list[Any]]] = {}
        for row in self._bulk.select_for_keys(conn, spending_limits.c.account_id, ids, self._limit_rows):
            state = _limit_state(row).effective(now)
            if state.limit_coins > 0:
                period = Period(row.period)
                spent = self._spent(conn, row.account_id, period, now)
                result.setdefault(row.account_id, []).append([period, spent, state.limit_coins])
        return result

    def _spent(self, conn: Connection, account_id: str, period: Period, now: datetime) -> int:
        total = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(-history.c.coins_delta), 0)).where(
                history.c.account_id == account_id,
                history.c.kind == Kind.GIFT_SENT.value,
                history.c.created_at >= period_start(period, now),
            )
        ).scalar_one()
        return int(total)

    # ------------------------------------------------------------ spending limits

    def set_limit(
        self,
        *,
        request_id: str,
        request: Message,
        response_type: type[M],
        build: Callable[[LimitView, bool, datetime], M],
        account_id: str,
        period: Period,
        limit_coins: int,
    ) -> M:
        def work(conn: Connection, now: datetime) -> M:
            query = sa.select(spending_limits).where(
                spending_limits.c.account_id == account_id, spending_limits.c.period == period.value
            )
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            row = conn.execute(query).one_or_none()
            current = _limit_state(row) if row is not None else LimitState(0, None, None)
            state, now_effective, effective_at = change_limit(current, limit_coins, now)
            values = {
                "limit_coins": state.limit_coins,
                "pending_limit_coins": state.pending_limit_coins,
                "pending_effective_at": state.pending_effective_at,
                "updated_at": now,
            }
            stmt = dialect_insert(conn, spending_limits).values(account_id=account_id, period=period.value, **values)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[spending_limits.c.account_id, spending_limits.c.period], set_=values
                )
            )
            view = LimitView(
                period,
                state.limit_coins,
                self._spent(conn, account_id, period, now),
                state.pending_limit_coins,
                state.pending_effective_at,
            )
            return build(view, now_effective, effective_at)

        return self._idempotent("SetSpendingLimit", request_id, request, response_type, work)

    def limits(self, account_id: str) -> list[LimitView]:
        now = self._clock.now()
        with self.db.connect() as conn:
            rows = {
                row.period: row
                for row in conn.execute(sa.select(spending_limits).where(spending_limits.c.account_id == account_id))
            }
            views = []
            for period in Period:
                row = rows.get(period.value)
                state = _limit_state(row).effective(now) if row is not None else LimitState(0, None, None)
                views.append(
                    LimitView(
                        period,
                        state.limit_coins,
                        self._spent(conn, account_id, period, now),
                        state.pending_limit_coins,
                        state.pending_effective_at,
                    )
                )
            return views

    # ------------------------------------------------------------ reservations

    def _reservation_for_update(self, conn: Connection, reservation_id: str) -> Any:
        query = sa.select(reservations).where(reservations.c.reservation_id == reservation_id)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        return conn.execute(query).one_or_none()

    def _resolve(self, conn: Connection, row: Any, state: ReservationState, now: datetime) -> None:
        """Move a held reservation's diamonds to payout clearing (commit) or back (release, expiry)."""
        account_id, diamonds = row.account_id, int(row.diamonds)
        hold = hold_account(account_id)
        self._lock_balances(conn, Currency.DIAMOND, [account_id, hold])
        if state is ReservationState.COMMITTED:
            destination, kind, delta = PAYOUT_CLEARING, Kind.RESERVATION_COMMIT, -diamonds
        else:
            destination, kind, delta = account_id, Kind.RESERVATION_RELEASE, 0
        self._post(
            conn,
            kind=kind.value,
            reference=row.reservation_id,
            sandbox=False,
            postings=[Posting(hold, Currency.DIAMOND, -diamonds), Posting(destination, Currency.DIAMOND, diamonds)],
            rows=[_HistoryRow(account_id, kind, diamonds_delta=delta)],
            now=now,
        )
        updated = conn.execute(
            reservations.update()
            .where(
                reservations.c.reservation_id == row.reservation_id,
                reservations.c.state == ReservationState.HELD.value,
            )
            .values(state=state.value, resolved_at=now)
        ).rowcount
        assert updated == 1, "a held reservation resolves exactly once"

    def _expire_due(self, conn: Connection, account_id: str | None, now: datetime) -> int:
        """Return the diamonds of held reservations past their expiry (lazily, or by the sweep)."""
        query = sa.select(reservations.c.reservation_id).where(
            reservations.c.state == ReservationState.HELD.value, reservations.c.expire_at <= now
        )
        if account_id is not None:
            query = query.where(reservations.c.account_id == account_id)
        due = list(conn.execute(query.order_by(reservations.c.reservation_id)).scalars())
        expired = 0
        for reservation_id in due:
            held = self._reservation_for_update(conn, reservation_id)
            if held is not None and held.state == ReservationState.HELD.value:
                self._resolve(conn, held, ReservationState.EXPIRED, now)
                expired += 1
        return expired

    def sweep_expired(self) -> int:
        return self.db.transaction(lambda conn: self._expire_due(conn, None, self._clock.now()))

    def reserve(
        self,
        *,
        request_id: str,
        request: Message,
        response_type: type[M],
        build: Callable[[ReservationView, BalanceView], M],
        account_id: str,
        diamonds: int,
        reservation_id: str,
        expire_at: datetime | None,
    ) -> M:
        def work(conn: Connection, now: datetime) -> M:
            if expire_at is not None and expire_at <= now:
                raise InvalidArgument("expire_time", "must be in the future")
            hold = hold_account(account_id)
            self._lock_balances(conn, Currency.COIN, [account_id])
            self._expire_due(conn, account_id, now)
            self._lock_balances(conn, Currency.DIAMOND, [account_id, hold])
            inserted = conn.execute(
                insert_ignore(conn, reservations)
                .values(
                    reservation_id=reservation_id,
                    account_id=account_id,
                    diamonds=diamonds,
                    state=ReservationState.HELD.value,
                    requested_expire_at=expire_at,
                    created_at=now,
                    expire_at=expire_at or now + self._reservation_ttl,
                )
                .returning(reservations.c.reservation_id)
            ).first()
            row = self._reservation_for_update(conn, reservation_id)
            if inserted is None:
                same = (
                    row.account_id == account_id
                    and int(row.diamonds) == diamonds
                    and (expire_at is None or (row.requested_expire_at and utc(row.requested_expire_at) == expire_at))
                )
                if not same:
                    raise FailedPrecondition(
                        "RESERVATION_ID_REUSED", "reservation_id was already used with different parameters"
                    )
                return build(_reservation_view(row), self._view(conn, account_id, now))
            view = self._view(conn, account_id, now)
            refuse_reservation(diamonds, view.diamonds_total, view.diamonds_withdrawable, view.restricted)
            self._post(
                conn,
                kind=Kind.RESERVATION.value,
                reference=reservation_id,
                sandbox=False,
                postings=[Posting(account_id, Currency.DIAMOND, -diamonds), Posting(hold, Currency.DIAMOND, diamonds)],
                rows=[_HistoryRow(account_id, Kind.RESERVATION)],
                now=now,
            )
            return build(_reservation_view(row), self._view(conn, account_id, now))

        return self._idempotent("ReserveDiamonds", request_id, request, response_type, work)

    def resolve(
        self,
        *,
        method: str,
        request_id: str,
        request: Message,
        response_type: type[M],
        build: Callable[[ReservationView], M],
        reservation_id: str,
        state: ReservationState,
    ) -> M:
        def work(conn: Connection, now: datetime) -> M | _Deferred:
            row = self._reservation_for_update(conn, reservation_id)
            if row is None:
                raise NotFound("RESERVATION_NOT_FOUND", "no reservation has this id")
            current = ReservationState(row.state)
            if current is ReservationState.HELD and utc(row.expire_at) <= now:
                self._resolve(conn, row, ReservationState.EXPIRED, now)
                return _Deferred(resolved_error(ReservationState.EXPIRED))
            if current is not ReservationState.HELD:
                raise resolved_error(current)
            self._resolve(conn, row, state, now)
            return build(_reservation_view(self._reservation_for_update(conn, reservation_id)))

        return self._idempotent(method, request_id, request, response_type, work)


def _clawback(environment: Environment) -> str:
    return CLAWBACK + ("/sandbox" if environment is Environment.SANDBOX else "")


def _limit_state(row: Any) -> LimitState:
    return LimitState(
        int(row.limit_coins),
        None if row.pending_limit_coins is None else int(row.pending_limit_coins),
        None if row.pending_effective_at is None else utc(row.pending_effective_at),
    )


def _reservation_view(row: Any) -> ReservationView:
    return ReservationView(
        row.reservation_id,
        row.account_id,
        int(row.diamonds),
        ReservationState(row.state),
        utc(row.created_at),
        utc(row.expire_at),
    )


def audit(database: Database) -> list[str]:
    """Rebuild every balance from the entries and check every invariant; returns the discrepancies.

    Runs in one repeatable-read snapshot on PostgreSQL (one transaction on SQLite).
    """
    return audit_engine(database.engine)


def audit_engine(engine: sa.Engine) -> list[str]:
    problems: list[str] = []

    def check(conn: Connection) -> None:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        unbalanced = conn.execute(
            sa.select(entries.c.txn_id, entries.c.currency, sa.func.sum(entries.c.amount))
            .group_by(entries.c.txn_id, entries.c.currency)
            .having(sa.func.sum(entries.c.amount) != 0)
        ).all()
        for txn_id, currency, total in unbalanced:
            problems.append(f"transaction {txn_id}: {currency} entries sum to {total}, not 0")
        empty = conn.execute(
            sa.select(transactions.c.txn_id).where(~sa.exists().where(entries.c.txn_id == transactions.c.txn_id))
        ).scalars()
        for txn_id in empty:
            problems.append(f"transaction {txn_id}: has no entries")
        orphans = conn.execute(
            sa.select(entries.c.txn_id).distinct().where(~sa.exists().where(transactions.c.txn_id == entries.c.txn_id))
        ).scalars()
        for txn_id in orphans:
            problems.append(f"entries of unknown transaction {txn_id}")
        rebuilt = {
            (row.account_id, row.currency): int(row.total)
            for row in conn.execute(
                sa.select(entries.c.account_id, entries.c.currency, sa.func.sum(entries.c.amount).label("total"))
                .where(~entries.c.account_id.startswith("#sys/"))
                .group_by(entries.c.account_id, entries.c.currency)
            )
        }
        kept = {
            (row.account_id, row.currency): int(row.balance)
            for row in conn.execute(sa.select(balances.c.account_id, balances.c.currency, balances.c.balance))
        }
        for key in sorted(set(rebuilt) | set(kept)):
            if rebuilt.get(key, 0) != kept.get(key, 0):
                problems.append(
                    f"account {key[0]} {key[1]}: balance row {kept.get(key, 0)}, entries sum to {rebuilt.get(key, 0)}"
                )
            if key[1] == Currency.DIAMOND.value and kept.get(key, 0) < 0:
                problems.append(f"account {key[0]}: negative diamonds {kept[key]}")
        for currency, total in conn.execute(
            sa.select(entries.c.currency, sa.func.sum(entries.c.amount)).group_by(entries.c.currency)
        ):
            if total != 0:
                problems.append(f"ledger: all {currency} entries sum to {total}, not 0")
        held: dict[str, int] = defaultdict(int)
        for row in conn.execute(
            sa.select(reservations.c.account_id, reservations.c.diamonds).where(
                reservations.c.state == ReservationState.HELD.value
            )
        ):
            held[hold_account(row.account_id)] += int(row.diamonds)
        for (account_id, _currency), amount in sorted(kept.items()):
            if account_id.startswith("#hold/") and amount != held.get(account_id, 0):
                problems.append(f"{account_id}: holds {amount} diamonds, held reservations total {held[account_id]}")
        for account_id, amount in sorted(held.items()):
            if kept.get((account_id, Currency.DIAMOND.value), 0) != amount:
                problems.append(f"{account_id}: held reservations total {amount}, hold balance differs")
        for row in conn.execute(sa.select(purchases)):
            if not 0 <= int(row.clawed_back) <= int(row.coins):
                problems.append(f"purchase {row.store}/{row.store_transaction_id}: clawed back {row.clawed_back}")

    with engine.begin() as conn:
        check(conn)
    return problems
