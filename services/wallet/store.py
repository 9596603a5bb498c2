"""SQL of the wallet service (SQLAlchemy Core). Transactions live here.

Every method that moves value runs as ONE database transaction holding the
AIP-155 request-id claim, the exactly-once key (purchase, reservation), the
immutable ledger entries, the balance rows and the provenance records (lots,
consumptions, clawback legs), so a crash or a concurrent duplicate can never
apply anything twice or half. The rules themselves (which lots pay, how diamonds
are attributed, how a refund is clawed back, the postings of each movement) are
pure functions in ``domain/``; this module reads, locks and writes.

Lock order, kept by every path so our own transactions never deadlock:

1. request-log claims, sorted by (method, request_id);
2. the accounts' spendable rows (their COIN and SANDBOX_COIN balance rows), sorted;
3. their lots (``wallet_purchases`` rows), by lot id;
4. diamond rows, sorted: creators first, then holds (``#hold/…``);
5. reservations, by id, in one statement (``SubmitReservations`` locks only these; a
   settle batch locks with its own the other holds a paid commit may take).

System accounts keep no balance rows (their balance is the sum of their entries),
so they are never a hot row.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.engine import Connection

from services.common.actor import SYSTEM, Actor
from services.common.bulk import Bulk, Changes, Rows
from services.common.catalog import Catalog
from services.common.clock import Clock
from services.common.db import Database, dialect_insert
from services.common.errors import RequestIdReused
from services.common.failpoints import Failpoints
from services.common.idempotency import RequestLog, fingerprint, insert_ignore
from services.wallet.domain import postings as recipes
from services.wallet.domain.holds import PAID_BEYOND_HOLD, debt_repaid, plan_commit
from services.wallet.domain.ledger import (
    COIN_CURRENCIES,
    BalanceView,
    Currency,
    Environment,
    Kind,
    Posting,
    Store,
    balanced,
    coin_currency,
    diamond_currency,
    diamond_lock_order,
    hold_account,
    is_system,
)
from services.wallet.domain.provenance import Consumption as ConsumptionState
from services.wallet.domain.provenance import (
    ConsumptionKind,
    CreatorDiamonds,
    Hold,
    Leg,
    LegKind,
    OpenLot,
    Take,
    attribute,
    clawback_target,
    plan_clawback,
    restore_repayments,
    take_coins,
    take_in_order,
)
from services.wallet.domain.rules import (
    OPEN_HOLDS,
    LimitState,
    Period,
    ReservationState,
    change_limit,
    period_start,
    refuse_reservation,
    resolved_error,
)
from services.wallet.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.wallet.tables import (
    MOVED_BY,
    balances,
    clawback_legs,
    consumptions,
    entries,
    history,
    purchases,
    request_log,
    reservations,
    spending_limits,
    transactions,
)

M = TypeVar("M", bound=Message)


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


class ReversalState:
    APPLIED = "APPLIED"
    ALREADY_APPLIED = "ALREADY_APPLIED"  # the purchase is already in the reported state
    NOTHING_REFUNDED = "NOTHING_REFUNDED"  # the reported refund computes to no coins yet


@dataclass(frozen=True)
class ReversalResult:
    state: str
    coins: int  # coins clawed back (or restored) by this call, all legs together
    account_id: str
    balance: BalanceView
    legs: tuple[Leg, ...] = ()

    @property
    def applied(self) -> bool:
        return self.state == ReversalState.APPLIED


@dataclass(frozen=True)
class ReservationView:
    reservation_id: str
    account_id: str
    diamonds: int
    state: ReservationState
    created_at: datetime
    expire_at: datetime
    clawed_diamonds: int = 0
    taken_diamonds: int = 0
    shortfall_diamonds: int = 0
    shortfall_debt: int = 0
    review_reason: str = ""
    debt_repaid: int = 0


@dataclass(frozen=True)
class SubmitHold:
    reservation_id: str
    diamonds: int


@dataclass(frozen=True)
class SettleHold:
    """One commit or release of a batch; ``request`` is the equivalent single-call request
    (its fingerprint and method key the item's exactly-once claim)."""

    request_id: str
    reservation_id: str
    commit: bool
    diamonds: int
    request: Message
    actor: Actor = SYSTEM  # who asked for it (recorded on the ledger transaction)

    @property
    def method(self) -> str:
        return "CommitReservation" if self.commit else "ReleaseReservation"


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
    sandbox_coins_delta: int = 0
    sandbox_diamonds_delta: int = 0
    moved_by: Actor = SYSTEM


@dataclass(frozen=True)
class CreatorShare:
    creator: str
    coins: int
    diamonds: int
    clawed_diamonds: int


@dataclass(frozen=True)
class ConsumptionView:
    """How much of one purchase was used, and for what (GetPurchaseConsumption)."""

    store: Store
    environment: Environment
    store_transaction_id: str
    account_id: str
    lot_id: int
    coins: int
    bonus_coins: int
    open_coins: int
    gift_coins: int
    spend_coins: int
    debt_repayment_coins: int
    untracked_coins: int
    clawed_back: int
    creators: tuple[CreatorShare, ...]
    created_at: datetime
    evidence_sha256: str = ""
    credited_by: Actor = SYSTEM

    @property
    def consumed_coins(self) -> int:
        return self.gift_coins + self.spend_coins + self.debt_repayment_coins + self.untracked_coins

    @property
    def consumed_percentage_milli(self) -> int:
        """Consumed share of the purchase in milliunits (Apple's consumptionPercentage), rounded down."""
        return min(self.consumed_coins * 100_000 // self.coins, 100_000) if self.coins else 0


@dataclass(frozen=True)
class CreditedPurchase:
    """One credited purchase (a lot), as ListCreditedPurchases shows it."""

    store: Store
    environment: Environment
    store_transaction_id: str
    account_id: str
    product_id: str
    quantity: int
    lot_id: int
    created_at: datetime


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
    actor: Actor = SYSTEM


@dataclass(frozen=True)
class DebitDone:
    txn_id: str
    coins: int
    diamonds: int
    balance: BalanceView
    sandbox_coins: int = 0
    sandbox_diamonds: int = 0


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
    evidence_sha256: str = ""
    actor: Actor = SYSTEM

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.store.value, self.environment.value, self.store_transaction_id)


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
class _Writes:
    """Everything one database transaction adds: ledger transactions, entries, history,
    consumptions, and the balance deltas of user and hold accounts."""

    now: datetime
    actor: Actor = SYSTEM  # who moves the value of this unit of work (a batch item names its own)
    stamp: object = None  # ``now`` as the rows carry it (Bulk.cell); ``now`` itself if not given
    txns: list[dict[str, Any]] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    consumptions: list[dict[str, Any]] = field(default_factory=list)
    deltas: dict[tuple[str, Currency], int] = field(default_factory=lambda: defaultdict(int))
    open_coins: dict[int, int] = field(default_factory=dict)  # lot id -> its open coins now (locked lots)

    def __post_init__(self) -> None:
        if self.stamp is None:
            self.stamp = self.now

    def transaction(
        self,
        kind: Kind | str,
        reference: str,
        postings: Iterable[Posting],
        txn_id: str = "",
        actor: Actor | None = None,
    ) -> str:
        txn_id = txn_id or new_txn_id()
        sandbox = False
        entries, deltas = self.entries, self.deltas
        for p in balanced(postings):
            currency = p.currency
            sandbox = sandbox or currency in _SANDBOX_CURRENCIES
            entries.append(
                {"txn_id": txn_id, "account_id": p.account_id, "currency": currency.value, "amount": p.amount}
            )
            if not is_system(p.account_id):
                deltas[(p.account_id, currency)] += p.amount
        self.txns.append(
            {
                "txn_id": txn_id,
                "kind": kind.value if isinstance(kind, Kind) else kind,
                "created_at": self.stamp,
                "reference": reference,
                "sandbox": sandbox,
                **(actor or self.actor).columns(),
            }
        )
        return txn_id

    def seen_by(
        self,
        account_id: str,
        txn_id: str,
        kind: Kind,
        reference: str,
        changes: Mapping[Currency, int],
        counterparty: str = "",
    ) -> None:
        """One history row: the transaction as ``account_id`` sees it."""
        self.history.append(
            {
                "account_id": account_id,
                "txn_id": txn_id,
                "kind": kind.value,
                "created_at": self.stamp,
                "coins_delta": changes.get(Currency.COIN, 0),
                "diamonds_delta": changes.get(Currency.DIAMOND, 0),
                "sandbox_coins_delta": changes.get(Currency.SANDBOX_COIN, 0),
                "sandbox_diamonds_delta": changes.get(Currency.SANDBOX_DIAMOND, 0),
                "reference": reference,
                "counterparty": counterparty,
            }
        )

    def consumed(
        self,
        lot: OpenLot | Take,
        txn_id: str,
        kind: ConsumptionKind,
        account_id: str,
        coins: int,
        creator: str = "",
        diamonds: int = 0,
    ) -> None:
        self.consumptions.append(
            {
                "lot_id": lot.lot_id,
                "txn_id": txn_id,
                "kind": kind.value,
                "account_id": account_id,
                "environment": lot.environment.value,
                "creator_account_id": creator,
                "coins": coins,
                "diamonds": diamonds,
                "clawed_coins": 0,
                "clawed_diamonds": 0,
                "undone_coins": 0,
                "created_at": self.stamp,
            }
        )


_SANDBOX_CURRENCIES = frozenset((Currency.SANDBOX_COIN, Currency.SANDBOX_DIAMOND))

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


def _key_filter(store: Store, environment: Environment, store_transaction_id: str) -> Any:
    return (
        (purchases.c.store == store.value)
        & (purchases.c.environment == environment.value)
        & (purchases.c.store_transaction_id == store_transaction_id)
    )


class WalletStore:
    """The ledger and everything around it, over one :class:`Database`."""

    def __init__(
        self,
        database: Database,
        catalog: Catalog,
        clock: Clock,
        *,
        reservation_ttl: timedelta,
        failpoints: Failpoints | None = None,
    ) -> None:
        self.db = database
        self._catalog = catalog
        self._clock = clock
        self._reservation_ttl = reservation_ttl
        self._failpoints = failpoints or Failpoints()
        self._log = RequestLog(request_log)
        self._holding = timedelta(days=catalog.diamonds.holding_days)
        self._bulk = Bulk(database.dialect)
        self._postgres = database.dialect == "postgresql"
        # Look-ups by account for Bulk.select_for_keys, built once so they compile once.
        # The spendable rows and the open lots are locked in one statement
        # (Bulk.select_parts_for_keys), so their columns line up: account, currency or
        # environment, coins, and the lot id (none for a balance row).
        self._spendable_rows = (
            sa.select(
                balances.c.account_id,
                balances.c.currency.label("name"),
                balances.c.balance.label("coins"),
                sa.cast(sa.null(), sa.BigInteger).label("lot_id"),
            )
            .where(balances.c.currency.in_([c.value for c in COIN_CURRENCIES]))
            .order_by(balances.c.currency)
        )
        self._rows_in_currency = sa.select(balances.c.account_id, balances.c.balance).where(
            balances.c.currency == sa.bindparam("currency")
        )
        self._open_lots = (
            sa.select(
                purchases.c.account_id,
                purchases.c.environment.label("name"),
                purchases.c.open_coins.label("coins"),
                purchases.c.lot_id,
            )
            # A literal 0, not a bound parameter: only then can the planner use the partial index on open lots.
            .where(purchases.c.open_coins > sa.literal_column("0"))
            .order_by(purchases.c.lot_id)
        )
        self._balance_rows = sa.select(balances.c.account_id, balances.c.currency, balances.c.balance)
        self._received_since = (
            sa.select(history.c.account_id, sa.func.sum(history.c.diamonds_delta).label("diamonds"))
            .where(history.c.kind == Kind.GIFT_RECEIVED.value, history.c.created_at > sa.bindparam("since"))
            .group_by(history.c.account_id)
        )
        self._limit_rows = sa.select(spending_limits)
        self._answers = sa.select(request_log).where(request_log.c.method == sa.bindparam("method"))
        self._reservation_rows = sa.select(reservations)
        self._reservation_owners = sa.select(reservations.c.reservation_id, reservations.c.account_id)
        self._purchases_in = sa.select(purchases).where(
            purchases.c.store == sa.bindparam("store"), purchases.c.environment == sa.bindparam("environment")
        )

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

    def _writes(self, now: datetime, actor: Actor = SYSTEM) -> _Writes:
        return _Writes(now, actor, self._bulk.cell(now))

    def _flush(self, conn: Connection, writes: _Writes, path: str) -> None:
        """Bulk-write ledger transactions, entries, history and consumptions, set the lots'
        open coins and add the deltas to the balance rows (sorted: the lock order), in one
        round trip on PostgreSQL.

        Failpoint ``wallet.<path>.before_commit``: everything of the transaction is
        written, nothing committed (``path``: credit, debit, reversal, restore, reservation)."""
        rows = [
            {"account_id": a, "currency": c.value, "balance": d}
            for (a, c), d in sorted(writes.deltas.items(), key=lambda kv: (kv[0][1].value, kv[0][0]))
            if d
        ]
        self._bulk.insert_all(
            conn,
            [
                Rows(transactions, writes.txns),
                Rows(entries, writes.entries),
                Rows(history, writes.history),
                Rows(consumptions, writes.consumptions),
                # Last: the only part that locks existing rows, so its order is the lock order.
                Rows(balances, rows, add_on_conflict=(balances.c.account_id, balances.c.currency)),
            ],
            # The lots were locked before anything was decided.
            [Changes(purchases, "lot_id", self._open_coins_rows(writes.open_coins))],
        )
        self._failpoints.hit(f"wallet.{path}.before_commit")

    def _set_open_coins(self, conn: Connection, open_coins: Mapping[int, int]) -> None:
        self._bulk.update(conn, purchases, "lot_id", self._open_coins_rows(open_coins))

    @staticmethod
    def _open_coins_rows(open_coins: Mapping[int, int]) -> list[dict[str, Any]]:
        return [{"lot_id": lot, "open_coins": coins} for lot, coins in sorted(open_coins.items())]

    def _lock_spendable(self, conn: Connection, accounts: Iterable[str]) -> dict[tuple[str, Currency], int]:
        """Lock the COIN and SANDBOX_COIN rows of ``accounts`` (sorted); absent rows read as 0."""
        ids = sorted(set(accounts))
        rows = self._bulk.select_for_keys(conn, balances.c.account_id, ids, self._spendable_rows, for_update=True)
        by_currency = self._coins_of(ids, rows)
        return {(a, c): by_currency[c][a] for a in ids for c in COIN_CURRENCIES}

    @staticmethod
    def _coins_of(ids: Sequence[str], rows: Iterable[Any]) -> dict[Currency, dict[str, int]]:
        # Keyed by currency, then account: a batch keeps no tuple per account alive (less for the GC to scan).
        found: dict[Currency, dict[str, int]] = {c: dict.fromkeys(ids, 0) for c in COIN_CURRENCIES}
        for row in rows:
            found[Currency(row.name)][row.account_id] = int(row.coins)
        return found

    def _lock_spendable_and_lots(
        self, conn: Connection, accounts: Iterable[str]
    ) -> tuple[dict[Currency, dict[str, int]], dict[str, list[OpenLot]]]:
        """Lock the spendable rows of ``accounts`` (as :meth:`_lock_spendable`; per currency, then
        account), then their open lots, oldest credited first: the lock order, in one statement
        on PostgreSQL."""
        ids = sorted(set(accounts))
        rows, lot_rows = self._bulk.select_parts_for_keys(
            conn,
            ids,
            [(balances.c.account_id, self._spendable_rows), (purchases.c.account_id, self._open_lots)],
            for_update=True,
        )
        lots: dict[str, list[OpenLot]] = defaultdict(list)
        for row in lot_rows:
            lots[row.account_id].append(OpenLot(int(row.lot_id), Environment(row.name), int(row.coins)))
        return self._coins_of(ids, rows), lots

    def _lock_balances(self, conn: Connection, currency: Currency, accounts: Iterable[str]) -> dict[str, int]:
        """Lock the balance rows of ``accounts`` in one currency, in lock order (creators before holds)."""
        ids = sorted(set(accounts), key=diamond_lock_order)
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
        coin, diamond = Currency.COIN.value, Currency.DIAMOND.value
        immature: dict[str, int] = {}
        # Immature diamonds only lower what is withdrawable, which is 0 anyway without
        # unreserved diamonds: buyers and fans (most views) skip the history probe.
        earners = [a for a in ids if amounts.get((a, diamond), 0) > 0]
        if self._holding > timedelta(0) and earners:
            since = {"since": now - self._holding}
            for row in self._bulk.select_for_keys(conn, history.c.account_id, earners, self._received_since, since):
                immature[row.account_id] = int(row.diamonds)
        return {
            a: BalanceView(
                account_id=a,
                coin_balance=amounts.get((a, coin), 0),
                diamonds=amounts.get((a, diamond), 0),
                diamonds_reserved=amounts.get((hold_account(a), diamond), 0),
                diamonds_immature=immature.get(a, 0),
                sandbox_coin_balance=amounts.get((a, Currency.SANDBOX_COIN.value), 0),
                sandbox_diamonds=amounts.get((a, Currency.SANDBOX_DIAMOND.value), 0),
            )
            for a in ids
        }

    def _view(self, conn: Connection, account_id: str, now: datetime) -> BalanceView:
        return self._views(conn, [account_id], now)[account_id]

    def _repay_debt(
        self,
        writes: _Writes,
        debt: dict[tuple[str, Currency], int],
        account_id: str,
        lot: OpenLot,
        coins: int,
        txn_id: str,
    ) -> int:
        """Coins coming into ``lot`` repay its owner's debt in that currency first (a
        consumption of the lot); returns what stays open."""
        key = (account_id, coin_currency(lot.environment))
        repaid = min(coins, debt.get(key, 0))
        if repaid > 0:
            debt[key] -= repaid
            writes.consumed(lot, txn_id, ConsumptionKind.DEBT_REPAYMENT, account_id, repaid)
        return coins - repaid

    # ------------------------------------------------------------ purchases

    def _purchase(
        self,
        conn: Connection,
        store: Store,
        environment: Environment,
        store_transaction_id: str,
        *,
        lock: bool,
        credited_by: bool = False,
    ) -> Any:
        """The purchase row; with ``credited_by`` (never locked), also its credit's actor columns."""
        query = sa.select(purchases).where(_key_filter(store, environment, store_transaction_id))
        if credited_by:
            query = query.add_columns(*MOVED_BY).select_from(
                purchases.outerjoin(transactions, transactions.c.txn_id == purchases.c.credit_txn_id)
            )
        elif lock and self._postgres:
            query = query.with_for_update()
        row = conn.execute(query).one_or_none()
        if row is None:
            raise NotFound("PURCHASE_NOT_FOUND", "no credited purchase has this store, environment and transaction id")
        return row

    def _lock_purchase_owner(
        self, conn: Connection, store: Store, environment: Environment, store_transaction_id: str
    ) -> tuple[Any, dict[tuple[str, Currency], int], list[OpenLot]]:
        """The purchase row, with its buyer's spendable rows and open lots locked first (the lock order)."""
        account_id = self._purchase(conn, store, environment, store_transaction_id, lock=False).account_id
        coins, lots = self._lock_spendable_and_lots(conn, [account_id])
        spendable = {(account_id, c): coins[c][account_id] for c in COIN_CURRENCIES}
        return self._purchase(conn, store, environment, store_transaction_id, lock=True), spendable, lots[account_id]

    def _consumptions_of(self, conn: Connection, lot_id: int) -> list[Any]:
        query = sa.select(consumptions).where(consumptions.c.lot_id == lot_id).order_by(consumptions.c.consumption_id)
        if self._postgres:
            query = query.with_for_update()
        return list(conn.execute(query).all())

    def _creator_diamonds(
        self, conn: Connection, environment: Environment, creators: Iterable[str]
    ) -> dict[str, CreatorDiamonds]:
        """Creators' diamond rows, then their hold rows, then their held reservations (newest first), locked."""
        names = sorted(set(creators))
        if not names:
            return {}
        currency = diamond_currency(environment)
        rows = self._lock_balances(conn, currency, names)
        held: dict[str, list[Hold]] = defaultdict(list)
        if environment is Environment.PRODUCTION:
            self._lock_balances(conn, Currency.DIAMOND, [hold_account(c) for c in names])
            query = (
                sa.select(
                    reservations.c.reservation_id,
                    reservations.c.account_id,
                    reservations.c.diamonds,
                    reservations.c.created_at,
                )
                .where(
                    reservations.c.account_id.in_(names),
                    reservations.c.state == ReservationState.HELD.value,
                    reservations.c.diamonds > 0,
                )
                # Locked in id order, the order every path locks reservations in (as Python sorts
                # the ids: PostgreSQL's "C" collation, not the database's, which under ICU or en_US
                # puts "a" before "Z"); taken newest first.
                .order_by(
                    reservations.c.reservation_id.collate("C") if self._postgres else reservations.c.reservation_id
                )
            )
            if self._postgres:
                query = query.with_for_update()
            for row in _newest_first(conn.execute(query)):
                held[row.account_id].append(Hold(row.reservation_id, int(row.diamonds)))
        return {c: CreatorDiamonds(rows[c], tuple(held[c])) for c in names}

    def reverse_purchase(
        self,
        *,
        request_id: str,
        request: Message,
        response_type: type[M],
        build: Callable[[ReversalResult], M],
        store: Store,
        environment: Environment,
        store_transaction_id: str,
        refunded_quantity: int,
        refunded_percentage_milli: int,
        full_refund: bool,
        actor: Actor = SYSTEM,
    ) -> M:
        def work(conn: Connection, now: datetime) -> M:
            row, _spendable, open_lots = self._lock_purchase_owner(conn, store, environment, store_transaction_id)
            account_id, lot_id = row.account_id, int(row.lot_id)
            target = clawback_target(
                int(row.coins), int(row.quantity), refunded_quantity, refunded_percentage_milli, full_refund
            )
            delta = target - int(row.clawed_back)
            if delta <= 0:
                state = ReversalState.NOTHING_REFUNDED if target == 0 else ReversalState.ALREADY_APPLIED
                return build(ReversalResult(state, 0, account_id, self._view(conn, account_id, now)))
            used = [
                ConsumptionState(
                    int(c.consumption_id),
                    ConsumptionKind(c.kind),
                    int(c.coins) - int(c.undone_coins),
                    int(c.clawed_coins),
                    c.creator_account_id or None,
                    int(c.diamonds),
                    int(c.clawed_diamonds),
                )
                for c in self._consumptions_of(conn, lot_id)
            ]
            creators = self._creator_diamonds(
                conn, environment, (c.creator for c in used if c.kind is ConsumptionKind.GIFT and c.creator)
            )
            plan = plan_clawback(delta, int(row.open_coins), used, creators)
            writes = self._writes(now, actor)
            txn_id = writes.transaction(
                Kind.PURCHASE_REVERSAL, store_transaction_id, recipes.clawback(account_id, environment, plan.legs)
            )
            self._apply_legs(conn, writes, row, plan.legs, txn_id, open_lots)
            conn.execute(purchases.update().where(purchases.c.lot_id == lot_id).values(clawed_back=target))
            self._flush(conn, writes, "reversal")
            return build(
                ReversalResult(
                    ReversalState.APPLIED, plan.coins, account_id, self._view(conn, account_id, now), tuple(plan.legs)
                )
            )

        return self._idempotent("ReversePurchase", request_id, request, response_type, work)

    def _apply_legs(
        self,
        conn: Connection,
        writes: _Writes,
        row: Any,
        legs: Sequence[Leg],
        txn_id: str,
        open_lots: Sequence[OpenLot],
    ) -> None:
        """Record a clawback's legs and their effects on lots, consumptions, holds and history."""
        account_id, lot_id, environment = row.account_id, int(row.lot_id), Environment(row.environment)
        coin, diamond = coin_currency(environment), diamond_currency(environment)
        reference = row.store_transaction_id
        open_coins: dict[int, int] = {}
        leg_rows = []
        for leg in legs:
            leg_rows.append(
                {
                    "lot_id": lot_id,
                    "reversal_txn_id": txn_id,
                    "kind": leg.kind.value,
                    "consumption_id": leg.consumption_id,
                    "creator_account_id": leg.creator or "",
                    "coins": leg.coins,
                    "diamonds": leg.diamonds,
                    "from_balance": leg.from_balance,
                    "from_holds": json.dumps([list(h) for h in leg.from_holds]),
                    "diamond_debt": leg.debt,
                    "restored_txn_id": None,
                    "created_at": writes.now,
                }
            )
            if leg.kind is LegKind.UNSPENT:
                open_coins[lot_id] = int(row.open_coins) - leg.coins
            if leg.consumption_id is not None:
                conn.execute(
                    consumptions.update()
                    .where(consumptions.c.consumption_id == leg.consumption_id)
                    .values(
                        clawed_coins=consumptions.c.clawed_coins + leg.coins,
                        clawed_diamonds=consumptions.c.clawed_diamonds + leg.diamonds,
                    )
                )
            for reservation_id, taken in leg.from_holds:
                conn.execute(
                    reservations.update()
                    .where(reservations.c.reservation_id == reservation_id)
                    .values(
                        diamonds=reservations.c.diamonds - taken,
                        clawed_diamonds=reservations.c.clawed_diamonds + taken,
                    )
                )
            if leg.kind is LegKind.GIFT and leg.creator is not None:
                writes.seen_by(leg.creator, txn_id, Kind.GIFT_REVERSAL, reference, {diamond: -leg.diamonds}, account_id)
        conn.execute(clawback_legs.insert(), leg_rows)
        # Coins spent on services become the buyer's debt, which their other open lots repay at once.
        owed = sum(leg.coins for leg in legs if leg.kind is LegKind.DEBT)
        others = {
            lot.lot_id: lot for lot in open_lots if lot.lot_id != lot_id and coin_currency(lot.environment) is coin
        }
        netted = min(owed, sum(lot.open_coins for lot in others.values()))
        for take in take_coins(list(others.values()), netted) if netted else []:
            writes.consumed(take, txn_id, ConsumptionKind.DEBT_REPAYMENT, account_id, take.coins)
            open_coins[take.lot_id] = others[take.lot_id].open_coins - take.coins
        self._set_open_coins(conn, open_coins)
        taken = sum(leg.coins for leg in legs if leg.kind is not LegKind.GIFT)
        if taken:
            writes.seen_by(account_id, txn_id, Kind.PURCHASE_REVERSAL, reference, {coin: -taken})

    @staticmethod
    def _unspent_of(legs: Sequence[Leg]) -> int:
        return sum(leg.coins for leg in legs if leg.kind is LegKind.UNSPENT)

    def restore_purchase(
        self,
        *,
        request_id: str,
        request: Message,
        response_type: type[M],
        build: Callable[[ReversalResult], M],
        store: Store,
        environment: Environment,
        store_transaction_id: str,
        actor: Actor = SYSTEM,
    ) -> M:
        def work(conn: Connection, now: datetime) -> M:
            row, spendable, _open_lots = self._lock_purchase_owner(conn, store, environment, store_transaction_id)
            account_id, lot_id = row.account_id, int(row.lot_id)
            leg_rows = list(
                conn.execute(
                    sa.select(clawback_legs)
                    .where(clawback_legs.c.lot_id == lot_id, clawback_legs.c.restored_txn_id.is_(None))
                    .order_by(clawback_legs.c.leg_id)
                )
            )
            if not leg_rows:
                return build(
                    ReversalResult(ReversalState.ALREADY_APPLIED, 0, account_id, self._view(conn, account_id, now))
                )
            legs = [
                Leg(
                    LegKind(r.kind),
                    int(r.coins),
                    None if r.consumption_id is None else int(r.consumption_id),
                    r.creator_account_id or None,
                    int(r.diamonds),
                )
                for r in leg_rows
            ]
            self._lock_balances(conn, diamond_currency(environment), (leg.creator for leg in legs if leg.creator))
            writes = self._writes(now, actor)
            txn_id = writes.transaction(
                Kind.PURCHASE_RESTORE,
                store_transaction_id,
                recipes.clawback(account_id, environment, legs, restore=True),
            )
            self._undo_legs(conn, writes, row, legs, txn_id, spendable)
            conn.execute(
                clawback_legs.update()
                .where(clawback_legs.c.lot_id == lot_id, clawback_legs.c.restored_txn_id.is_(None))
                .values(restored_txn_id=txn_id)
            )
            conn.execute(purchases.update().where(purchases.c.lot_id == lot_id).values(clawed_back=0))
            self._flush(conn, writes, "restore")
            coins = sum(leg.coins for leg in legs)
            return build(
                ReversalResult(ReversalState.APPLIED, coins, account_id, self._view(conn, account_id, now), tuple(legs))
            )

        return self._idempotent("RestorePurchase", request_id, request, response_type, work)

    def _undo_legs(
        self,
        conn: Connection,
        writes: _Writes,
        row: Any,
        legs: Sequence[Leg],
        txn_id: str,
        spendable: Mapping[tuple[str, Currency], int],
    ) -> None:
        """A restore's effects on lots and consumptions: the debt its DEBT legs made goes
        first (debt repayments made since are undone where the debt is already gone),
        then the UNSPENT coins return to the lot, repaying any debt left."""
        account_id, lot_id, environment = row.account_id, int(row.lot_id), Environment(row.environment)
        coin, diamond = coin_currency(environment), diamond_currency(environment)
        reference = row.store_transaction_id
        debt = {(account_id, coin): max(-spendable[(account_id, coin)], 0)}
        open_coins: dict[int, int] = {}
        owed = sum(leg.coins for leg in legs if leg.kind is LegKind.DEBT)
        cancelled = min(owed, debt[(account_id, coin)])
        debt[(account_id, coin)] -= cancelled
        if owed > cancelled:
            repayments = conn.execute(
                sa.select(consumptions).where(
                    consumptions.c.account_id == account_id,
                    # A literal, so the partial index on repayments applies.
                    consumptions.c.kind == sa.literal_column(f"'{ConsumptionKind.DEBT_REPAYMENT.value}'"),
                    consumptions.c.environment == environment.value,
                    consumptions.c.coins - consumptions.c.undone_coins - consumptions.c.clawed_coins > 0,
                )
            ).all()
            available = {
                int(r.consumption_id): int(r.coins) - int(r.undone_coins) - int(r.clawed_coins) for r in repayments
            }
            lots_of = {int(r.consumption_id): int(r.lot_id) for r in repayments}
            for consumption_id, coins in restore_repayments(owed - cancelled, list(available.items())):
                conn.execute(
                    consumptions.update()
                    .where(consumptions.c.consumption_id == consumption_id)
                    .values(undone_coins=consumptions.c.undone_coins + coins)
                )
                repaid_from = lots_of[consumption_id]
                open_coins[repaid_from] = open_coins.get(repaid_from, self._open_of(conn, repaid_from)) + coins
        unspent = self._unspent_of(legs)
        if unspent:
            kept = self._repay_debt(
                writes, debt, account_id, OpenLot(lot_id, environment, int(row.open_coins)), unspent, txn_id
            )
            open_coins[lot_id] = open_coins.get(lot_id, int(row.open_coins)) + kept
        for leg in legs:
            if leg.consumption_id is not None:
                conn.execute(
                    consumptions.update()
                    .where(consumptions.c.consumption_id == leg.consumption_id)
                    .values(
                        clawed_coins=consumptions.c.clawed_coins - leg.coins,
                        clawed_diamonds=consumptions.c.clawed_diamonds - leg.diamonds,
                    )
                )
            if leg.kind is LegKind.GIFT and leg.creator is not None:
                writes.seen_by(leg.creator, txn_id, Kind.GIFT_RESTORE, reference, {diamond: leg.diamonds}, account_id)
        self._set_open_coins(conn, open_coins)
        given = sum(leg.coins for leg in legs if leg.kind is not LegKind.GIFT)
        if given:
            writes.seen_by(account_id, txn_id, Kind.PURCHASE_RESTORE, reference, {coin: given})

    def _open_of(self, conn: Connection, lot_id: int) -> int:
        return int(conn.execute(sa.select(purchases.c.open_coins).where(purchases.c.lot_id == lot_id)).scalar_one())

    def credited_purchases(
        self, store: Store, since: datetime | None, before: datetime | None, after_lot: int, limit: int
    ) -> list[CreditedPurchase]:
        """Credited purchases of ``store`` in credit order, after lot ``after_lot``."""
        where = [purchases.c.store == store.value, purchases.c.lot_id > after_lot]
        if since is not None:
            where.append(purchases.c.created_at >= since)
        if before is not None:
            where.append(purchases.c.created_at < before)
        with self.db.connect() as conn:
            rows = conn.execute(sa.select(purchases).where(*where).order_by(purchases.c.lot_id).limit(limit)).all()
        return [
            CreditedPurchase(
                store=Store(row.store),
                environment=Environment(row.environment),
                store_transaction_id=row.store_transaction_id,
                account_id=row.account_id,
                product_id=row.product_id,
                quantity=int(row.quantity),
                lot_id=int(row.lot_id),
                created_at=utc(row.created_at),
            )
            for row in rows
        ]

    def consumption(self, store: Store, environment: Environment, store_transaction_id: str) -> ConsumptionView:
        with self.db.connect() as conn:
            row = self._purchase(conn, store, environment, store_transaction_id, lock=False, credited_by=True)
            used: dict[str, int] = defaultdict(int)
            shares: dict[str, list[int]] = {}
            for c in conn.execute(sa.select(consumptions).where(consumptions.c.lot_id == row.lot_id)):
                coins = int(c.coins) - int(c.undone_coins)
                used[c.kind] += coins
                if c.kind == ConsumptionKind.GIFT.value:
                    share = shares.setdefault(c.creator_account_id, [0, 0, 0])
                    share[0] += coins
                    share[1] += int(c.diamonds)
                    share[2] += int(c.clawed_diamonds)
        return ConsumptionView(
            store=store,
            environment=environment,
            store_transaction_id=store_transaction_id,
            account_id=row.account_id,
            lot_id=int(row.lot_id),
            coins=int(row.coins),
            bonus_coins=int(row.bonus_coins),
            open_coins=int(row.open_coins),
            gift_coins=used[ConsumptionKind.GIFT.value],
            spend_coins=used[ConsumptionKind.SPEND.value],
            debt_repayment_coins=used[ConsumptionKind.DEBT_REPAYMENT.value],
            untracked_coins=used[ConsumptionKind.UNTRACKED.value],
            clawed_back=int(row.clawed_back),
            creators=tuple(CreatorShare(k, *v) for k, v in sorted(shares.items())),
            created_at=utc(row.created_at),
            evidence_sha256=row.evidence_sha256 or "",
            credited_by=Actor.of_row(row),
        )

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
        query = (
            sa.select(history, *MOVED_BY)
            .select_from(history.outerjoin(transactions, transactions.c.txn_id == history.c.txn_id))
            .where(history.c.account_id == account_id)
        )
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
                int(row.sandbox_coins_delta),
                int(row.sandbox_diamonds_delta),
                Actor.of_row(row),
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
        stamp = self._bulk.cell(now)
        rows = [
            {"method": m, "request_id": r, "request_hash": batch.digests[batch.first[(m, r)]], "created_at": stamp}
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
        stamp, cell = self._bulk.cell(now), self._bulk.cell
        recorded = [
            {
                "method": keys[i][0],
                "request_id": keys[i][1],
                "request_hash": batch.digests[i],
                "created_at": stamp,
                "response": cell(result.SerializeToString(deterministic=True)),
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

    # ------------------------------------------------------------ purchases, batched

    def credit_batch(
        self, items: Sequence[CreditItem], build: Callable[[CreditResult], Message]
    ) -> list[Message | bytes | DomainError]:
        """Credit many purchases in ONE database transaction (group commit); each keeps
        its own request-id claim, exactly-once purchase key, lot, ledger transaction and answer."""
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
        owner: dict[tuple[str, str, str], int] = {}
        for index in batch.live:
            owner.setdefault(items[index].key, index)
        txn_ids = {index: new_txn_id() for index in owner.values()}
        lots: dict[tuple[str, str, str], int] = {}
        if owner:
            ordered = [i for _, i in sorted(owner.items())]
            # PostgreSQL numbers the lots from its sequence; SQLite's one writer numbers them here.
            first_lot = 0 if self._postgres else self._next_lot_id(conn)
            stamp = self._bulk.cell(now)
            purchase_rows = [
                {
                    "store": items[i].store.value,
                    "environment": items[i].environment.value,
                    "store_transaction_id": items[i].store_transaction_id,
                    "account_id": items[i].account_id,
                    "product_id": items[i].product_id,
                    "coins": items[i].coins,
                    "bonus_coins": items[i].bonus_coins,
                    "quantity": items[i].quantity,
                    "storefront": items[i].storefront,
                    "price_minor": items[i].price_minor,
                    "price_currency": items[i].price_currency,
                    "purchase_time": items[i].purchase_time,
                    "flagged_for_review": items[i].flagged_for_review,
                    "credit_txn_id": txn_ids[i],
                    "clawed_back": 0,
                    "created_at": stamp,
                    "open_coins": items[i].coins,
                    "evidence_sha256": items[i].evidence_sha256 or None,
                    **({} if self._postgres else {"lot_id": first_lot + n}),
                }
                for n, i in enumerate(ordered)
            ]
            returned = self._bulk.insert(
                conn,
                purchases,
                purchase_rows,
                ignore=True,
                returning=(
                    purchases.c.store,
                    purchases.c.environment,
                    purchases.c.store_transaction_id,
                    purchases.c.lot_id,
                ),
            )
            lots = {(row.store, row.environment, row.store_transaction_id): int(row.lot_id) for row in returned}
        created = set(lots)
        earlier = [key for key in owner if key not in created]
        existing: dict[tuple[str, str, str], tuple[str, str, int, int]] = {}
        for store, environment in {(s, e) for s, e, _ in earlier}:
            ids = [t for s, e, t in earlier if (s, e) == (store, environment)]
            for row in self._bulk.select_for_keys(
                conn,
                purchases.c.store_transaction_id,
                ids,
                self._purchases_in,
                {"store": store, "environment": environment},
            ):
                existing[(row.store, row.environment, row.store_transaction_id)] = (
                    row.account_id,
                    row.credit_txn_id,
                    int(row.coins),
                    int(row.bonus_coins),
                )
        for key in created:
            winner = items[owner[key]]
            existing[key] = (winner.account_id, txn_ids[owner[key]], winner.coins, winner.bonus_coins)
        writes = self._writes(now)
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
            postings = recipes.purchase(account_id, item.store, item.environment, item.coins, item.bonus_coins)
            writes.transaction(Kind.PURCHASE, item.store_transaction_id, postings, txn_id, item.actor)
            writes.seen_by(
                account_id,
                txn_id,
                Kind.PURCHASE,
                item.store_transaction_id,
                {coin_currency(item.environment): item.coins},
            )
        if writes.txns:
            self._flush(conn, writes, "credit")
        # Read after writing (the credited rows are ours, locked): each answer shows the
        # balance just after its own credit, counting from the balance before the batch.
        views = self._views(conn, (items[i].account_id for i, _ in outcomes), now)
        running: dict[tuple[str, Currency], int] = {}
        for a, view in views.items():
            running[(a, Currency.COIN)] = view.coin_balance - writes.deltas.get((a, Currency.COIN), 0)
            running[(a, Currency.SANDBOX_COIN)] = view.sandbox_coin_balance - writes.deltas.get(
                (a, Currency.SANDBOX_COIN), 0
            )
        self._repay_debts_from_credits(conn, items, outcomes, lots, txn_ids, owner, running, now)
        for index, fresh in outcomes:
            item = items[index]
            account_id, txn_id, original_coins, original_bonus = existing[item.key]
            currency = coin_currency(item.environment)
            if fresh:
                running[(account_id, currency)] += item.coins
            view = views[account_id]
            balance = BalanceView(
                account_id,
                running[(account_id, Currency.COIN)],
                view.diamonds,
                view.diamonds_reserved,
                view.diamonds_immature,
                running[(account_id, Currency.SANDBOX_COIN)],
                view.sandbox_diamonds,
            )
            batch.results[index] = build(CreditResult(not fresh, txn_id, original_coins, original_bonus, balance))
        return self._finish_batch(conn, batch, keys, now)

    def _next_lot_id(self, conn: Connection) -> int:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(purchases.c.lot_id), 0) + 1)).scalar_one())

    def _repay_debts_from_credits(
        self,
        conn: Connection,
        items: Sequence[CreditItem],
        outcomes: Sequence[tuple[int, bool]],
        lots: Mapping[tuple[str, str, str], int],
        txn_ids: Mapping[int, str],
        owner: Mapping[tuple[str, str, str], int],
        balance_before: Mapping[tuple[str, Currency], int],
        now: datetime,
    ) -> None:
        """A purchase credited to an account in debt repays the debt first: a consumption of
        its new lot. Only accounts that were in debt cost anything here (their rows are
        locked by the balance update, so the debt cannot change under us)."""
        debt = {key: -balance for key, balance in balance_before.items() if balance < 0}
        if not debt:
            return
        writes = self._writes(now)
        open_coins: dict[int, int] = {}
        for index, fresh in outcomes:
            item = items[index]
            if not fresh or (item.account_id, coin_currency(item.environment)) not in debt:
                continue
            lot = OpenLot(lots[item.key], item.environment, item.coins)
            kept = self._repay_debt(writes, debt, item.account_id, lot, item.coins, txn_ids[owner[item.key]])
            if kept != item.coins:
                open_coins[lot.lot_id] = kept
        if writes.consumptions:
            self._bulk.insert(conn, consumptions, writes.consumptions)
        self._set_open_coins(conn, open_coins)

    # ------------------------------------------------------------ gifts and spending

    def debit_batch(
        self, items: Sequence[DebitItem], build: Callable[[DebitItem, DebitDone], Message]
    ) -> list[Message | bytes | DomainError]:
        """Apply gifts and spends in ONE database transaction (group commit).

        Each item keeps its own request-id claim, its own ledger transaction, its own
        consumptions and its own answer: the stored response bytes for a replay, the
        new response, or the refusal. Refused items leave nothing behind.
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
        senders = [items[i].sender for i in batch.live]
        coins_of, lots = self._lock_spendable_and_lots(conn, senders)
        real_of, sandbox_of = coins_of[Currency.COIN], coins_of[Currency.SANDBOX_COIN]
        gift_senders = {items[i].sender for i in batch.live if items[i].creator is not None}
        limits = self._limits_with_spent(conn, gift_senders, now)
        writes = self._writes(now)
        open_coins = writes.open_coins  # written by _flush
        # Per item: its transaction id, coins and diamonds (real, Sandbox), and the sender's
        # coins and Sandbox coins just after it (its answer shows the balance then). Plain
        # values: what a batch keeps alive, the GC scans again and again.
        done: dict[int, tuple[str, int, int, int, int, int, int]] = {}
        # Decide in arrival order: each item pays from what the earlier ones left.
        for index in batch.live:
            item = items[index]
            sender = item.sender
            real, sandbox = real_of[sender], sandbox_of[sender]
            refusal = self._refusal(item, real, max(real, 0) + max(sandbox, 0), limits.get(sender, []))
            if refusal is not None:
                batch.results[index] = refusal
                continue
            takes, left = take_in_order(lots[sender], item.coins)
            lots[sender] = left
            # Every lot taken from is emptied but maybe the last, which then leads what stays open.
            for take in takes:
                open_coins[take.lot_id] = 0
                if take.environment is Environment.SANDBOX:
                    sandbox -= take.coins
                else:
                    real -= take.coins
            if takes and left and left[0].lot_id == takes[-1].lot_id:
                open_coins[left[0].lot_id] = left[0].open_coins
            real_of[sender], sandbox_of[sender] = real, sandbox
            for limit in limits.get(sender, []):
                limit[1] += item.coins
            txn_id, coins, diamonds = self._write_debit(writes, item, takes)
            done[index] = (
                txn_id,
                coins.get(Currency.COIN, 0),
                coins.get(Currency.SANDBOX_COIN, 0),
                diamonds.get(Currency.DIAMOND, 0),
                diamonds.get(Currency.SANDBOX_DIAMOND, 0),
                real,
                sandbox,
            )
        if done:
            self._flush(conn, writes, "debit")
        views = self._views(conn, (items[i].sender for i in done), now)
        for index, (txn_id, spent, sandbox_spent, diamonds_given, sandbox_given, real, sandbox) in done.items():
            item = items[index]
            view = views[item.sender]
            balance = BalanceView(
                item.sender,
                real,
                view.diamonds,
                view.diamonds_reserved,
                view.diamonds_immature,
                sandbox,
                view.sandbox_diamonds,
            )
            debit = DebitDone(txn_id, spent, diamonds_given, balance, sandbox_spent, sandbox_given)
            batch.results[index] = build(item, debit)
        return self._finish_batch(conn, batch, keys, now)

    def _write_debit(
        self, writes: _Writes, item: DebitItem, takes: Sequence[Take]
    ) -> tuple[str, Mapping[Currency, int], Mapping[Currency, int]]:
        """Record one gift or spend; returns its transaction id and its coins and diamonds per currency."""
        txn_id = new_txn_id()
        coins = recipes.coins_by_currency(takes)
        spent = {currency: -n for currency, n in coins.items()}
        if item.creator is None:
            writes.transaction(Kind.SPEND, item.reference, recipes.spend(item.sender, takes), txn_id, item.actor)
            for take in takes:
                writes.consumed(take, txn_id, ConsumptionKind.SPEND, item.sender, take.coins)
            writes.seen_by(item.sender, txn_id, Kind.SPEND, item.reference, spent)
            return txn_id, coins, {}
        parts = attribute(item.diamonds, takes)
        diamonds = recipes.diamonds_by_currency(takes, parts)
        postings = recipes.gift_totals(item.sender, item.creator, coins, diamonds)
        writes.transaction(Kind.GIFT_SENT, item.reference, postings, txn_id, item.actor)
        for take, part in zip(takes, parts, strict=True):
            writes.consumed(take, txn_id, ConsumptionKind.GIFT, item.sender, take.coins, item.creator, part)
        writes.seen_by(item.sender, txn_id, Kind.GIFT_SENT, item.reference, spent, item.creator)
        writes.seen_by(item.creator, txn_id, Kind.GIFT_RECEIVED, item.reference, diamonds, item.sender)
        return txn_id, coins, diamonds

    def _refusal(self, item: DebitItem, real: int, spendable: int, limits: list[list[Any]]) -> DomainError | None:
        if real < 0:
            return FailedPrecondition("ACCOUNT_RESTRICTED", "the account owes coins from a refund")
        if spendable < item.coins:
            return FailedPrecondition("INSUFFICIENT_COINS", f"{item.coins} coins needed, {spendable} available")
        if item.creator is not None:
            for period, spent, cap in limits:
                if spent + item.coins > cap:
                    return FailedPrecondition(
                        "SPENDING_LIMIT_EXCEEDED",
                        f"the {period.value.lower()} gift budget of {cap} coins has {max(cap - spent, 0)} left",
                        {"period": period.value},
                    )
        return None

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
        """Coins sent as gifts in the period, real and Sandbox alike (the budget caps coins sent)."""
        total = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(-history.c.coins_delta - history.c.sandbox_coins_delta), 0)).where(
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
            if self._postgres:
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

    def _reservation(self, conn: Connection, reservation_id: str, *, lock: bool) -> Any:
        query = sa.select(reservations).where(reservations.c.reservation_id == reservation_id)
        if lock and self._postgres:
            query = query.with_for_update()
        return conn.execute(query).one_or_none()

    def _resolve(
        self, conn: Connection, row: Any, state: ReservationState, now: datetime, actor: Actor = SYSTEM
    ) -> None:
        """Move a held reservation's diamonds to payout clearing (commit) or back (release,
        expiry). The caller holds the diamond rows and then the reservation row (lock order)."""
        account_id, diamonds = row.account_id, int(row.diamonds)
        if state is ReservationState.COMMITTED:
            kind, delta = Kind.RESERVATION_COMMIT, -diamonds
        else:
            kind, delta = Kind.RESERVATION_RELEASE, 0
        if diamonds:  # a hold a clawback took entirely moves nothing
            writes = self._writes(now, actor)
            txn_id = writes.transaction(
                kind, row.reservation_id, recipes.resolve(account_id, diamonds, state is ReservationState.COMMITTED)
            )
            writes.seen_by(account_id, txn_id, kind, row.reservation_id, {Currency.DIAMOND: delta})
            self._flush(conn, writes, "reservation")
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
        query = sa.select(reservations.c.reservation_id, reservations.c.account_id).where(
            reservations.c.state == ReservationState.HELD.value, reservations.c.expire_at <= now
        )
        if account_id is not None:
            query = query.where(reservations.c.account_id == account_id)
        # Each owner's rows are locked as it comes: owners in the order every path locks accounts
        # in, Python's (the database's collation may differ).
        due = sorted(conn.execute(query), key=lambda row: (row.account_id, row.reservation_id))
        expired = 0
        for reservation_id, owner in due:
            self._lock_balances(conn, Currency.DIAMOND, [owner, hold_account(owner)])
            held = self._reservation(conn, reservation_id, lock=True)
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
        actor: Actor = SYSTEM,
    ) -> M:
        def work(conn: Connection, now: datetime) -> M:
            if expire_at is not None and expire_at <= now:
                raise InvalidArgument("expire_time", "must be in the future")
            self._lock_spendable(conn, [account_id])
            self._expire_due(conn, account_id, now)
            self._lock_balances(conn, Currency.DIAMOND, [account_id, hold_account(account_id)])
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
                    clawed_diamonds=0,
                )
                .returning(reservations.c.reservation_id)
            ).first()
            row = self._reservation(conn, reservation_id, lock=True)
            if inserted is None:
                same = (
                    row.account_id == account_id
                    and int(row.diamonds) + int(row.clawed_diamonds) + int(row.taken_diamonds) == diamonds
                    and (expire_at is None or (row.requested_expire_at and utc(row.requested_expire_at) == expire_at))
                )
                if not same:
                    raise FailedPrecondition(
                        "RESERVATION_ID_REUSED", "reservation_id was already used with different parameters"
                    )
                return build(_reservation_view(row), self._view(conn, account_id, now))
            refuse_reservation(diamonds, self._view(conn, account_id, now))
            writes = self._writes(now, actor)
            txn_id = writes.transaction(Kind.RESERVATION, reservation_id, recipes.reserve(account_id, diamonds))
            writes.seen_by(account_id, txn_id, Kind.RESERVATION, reservation_id, {})
            self._flush(conn, writes, "reservation")
            return build(_reservation_view(row), self._view(conn, account_id, now))

        return self._idempotent("ReserveDiamonds", request_id, request, response_type, work)

    def submit_holds(self, items: Sequence[SubmitHold]) -> list[tuple[ReservationView | None, DomainError | None]]:
        """Mark the holds of one provider submission SUBMITTED, in one transaction.

        State-based: a submitted hold answers submitted again. A HELD hold is submitted
        only while it has not expired and still holds at least the item's diamonds
        (RESERVATION_SHRUNK otherwise). Only reservation rows are locked: a clawback
        locks them too, so each sees the other's outcome."""

        def work(conn: Connection) -> list[tuple[ReservationView | None, DomainError | None]]:
            now = self._clock.now()
            ids = sorted({item.reservation_id for item in items})
            rows = {
                row.reservation_id: row._asdict()
                for row in self._bulk.select_for_keys(
                    conn, reservations.c.reservation_id, ids, self._reservation_rows, for_update=True
                )
            }
            answers: list[tuple[ReservationView | None, DomainError | None]] = []
            submitted: dict[str, dict[str, Any]] = {}
            for item in items:
                row = rows.get(item.reservation_id)
                if row is None:
                    answers.append((None, NotFound("RESERVATION_NOT_FOUND", "no reservation has this id")))
                    continue
                error = self._submit_refusal(row, item.diamonds, now)
                if error is None and row["state"] == ReservationState.HELD.value:
                    row.update(state=ReservationState.SUBMITTED.value, submitted_at=now)
                    submitted[item.reservation_id] = {
                        "reservation_id": item.reservation_id,
                        "state": row["state"],
                        "submitted_at": now,
                    }
                answers.append((_view_of(row), error))
            self._bulk.update(conn, reservations, "reservation_id", list(submitted.values()))
            return answers

        return self.db.transaction(work)

    @staticmethod
    def _submit_refusal(row: Mapping[str, Any], diamonds: int, now: datetime) -> DomainError | None:
        state = ReservationState(row["state"])
        if state is ReservationState.SUBMITTED:
            return None
        if state is not ReservationState.HELD:
            return resolved_error(state)
        if utc(row["expire_at"]) <= now:
            return resolved_error(ReservationState.EXPIRED)
        if int(row["diamonds"]) < diamonds:
            return FailedPrecondition(
                "RESERVATION_SHRUNK",
                f"a refund clawback left {row['diamonds']} of the hold's diamonds, {diamonds} to be paid",
            )
        return None

    def settle_holds(
        self, items: Sequence[SettleHold], build: Callable[[SettleHold, ReservationView], Message]
    ) -> list[Message | bytes | DomainError]:
        """Commit or release many holds in ONE transaction; each item keeps its own request-id
        claim (the single calls' key space), ledger transaction and answer (a Message; bytes
        for a replay; a DomainError for a refusal, whose claim is dropped)."""
        return self.db.transaction(lambda conn: self._settle_holds(conn, items, build, self._clock.now()))

    def _settle_holds(
        self,
        conn: Connection,
        items: Sequence[SettleHold],
        build: Callable[[SettleHold, ReservationView], Message],
        now: datetime,
    ) -> list[Message | bytes | DomainError]:
        keys = [(item.method, item.request_id) for item in items]
        batch = self._claim_batch(conn, keys, [item.request for item in items], now)
        live = [items[i] for i in batch.live]
        ids = sorted({item.reservation_id for item in live})
        owners = {
            row.reservation_id: row.account_id
            for row in self._bulk.select_for_keys(conn, reservations.c.reservation_id, ids, self._reservation_owners)
        }
        creators = sorted(set(owners.values()))
        diamond_rows = self._lock_balances(conn, Currency.DIAMOND, [*creators, *(hold_account(c) for c in creators)])
        # All reservations in ONE sorted lock (lock order 5): the batch's own and, for creators a
        # paid commit may take beyond its hold, their other unsubmitted holds. Locking those after
        # the batch's own could deadlock with SubmitReservations, which locks only reservations.
        paying = sorted(
            {owners[i.reservation_id] for i in live if i.commit and i.diamonds > 0 and i.reservation_id in owners}
        )
        locked = {
            row.reservation_id: row._asdict()
            for row in self._bulk.select_for_keys(
                conn,
                reservations.c.reservation_id,
                sorted({*owners, *self._held_elsewhere(conn, paying, owners)}),
                self._reservation_rows,
                for_update=True,
            )
        }
        rows = {k: v for k, v in locked.items() if k in owners}
        others = self._other_holds(live, rows, locked)
        writes = self._writes(now)
        changed: dict[str, dict[str, Any]] = {}
        for index, item in zip(batch.live, live, strict=True):
            row = rows.get(item.reservation_id)
            if row is None:
                batch.results[index] = NotFound("RESERVATION_NOT_FOUND", "no reservation has this id")
                continue
            outcome = self._settle_one(writes, item, row, diamond_rows, others, changed, now)
            batch.results[index] = outcome if isinstance(outcome, DomainError) else build(item, outcome)
        if changed:
            self._bulk.update(conn, reservations, "reservation_id", [changed[k] for k in sorted(changed)])
        self._flush(conn, writes, "reservation")
        return self._finish_batch(conn, batch, keys, now)

    def _held_elsewhere(self, conn: Connection, creators: Sequence[str], batch: Iterable[str]) -> list[str]:
        """The ids of ``creators``' unsubmitted holds outside the batch, read unlocked: with the
        creators' diamond rows locked no hold of theirs can appear, and the caller locks these."""
        if not creators:
            return []
        query = sa.select(reservations.c.reservation_id).where(
            reservations.c.account_id.in_(creators),
            reservations.c.state == ReservationState.HELD.value,
            reservations.c.diamonds > 0,
            reservations.c.reservation_id.not_in(sorted(batch)),
        )
        return list(conn.execute(query).scalars())

    def _other_holds(
        self,
        live: Sequence[SettleHold],
        rows: Mapping[str, dict[str, Any]],
        locked: Mapping[str, dict[str, Any]],
    ) -> dict[str, list[dict[str, Any]]]:
        """Creators whose paid commits exceed their holds: their other unsubmitted holds (among
        ``locked``), newest first (they may have to cover the shortfall)."""
        short = {
            rows[item.reservation_id]["account_id"]
            for item in live
            if item.commit
            and item.reservation_id in rows
            and item.diamonds > self._open_diamonds(rows[item.reservation_id])
        }
        found: dict[str, list[dict[str, Any]]] = defaultdict(list)
        pool = [
            row
            for key, row in locked.items()
            if key not in rows
            and row["account_id"] in short
            and row["state"] == ReservationState.HELD.value
            and int(row["diamonds"]) > 0
        ]
        for row in sorted(pool, key=lambda r: (utc(r["created_at"]), r["reservation_id"]), reverse=True):
            found[row["account_id"]].append(row)
        return found

    @staticmethod
    def _open_diamonds(row: Mapping[str, Any]) -> int:
        return int(row["diamonds"]) if ReservationState(row["state"]) in OPEN_HOLDS else 0

    def _settle_one(
        self,
        writes: _Writes,
        item: SettleHold,
        row: dict[str, Any],
        diamond_rows: dict[str, int],
        others: Mapping[str, list[dict[str, Any]]],
        changed: dict[str, dict[str, Any]],
        now: datetime,
    ) -> ReservationView | DomainError:
        account_id, reservation_id = row["account_id"], row["reservation_id"]
        state = ReservationState(row["state"])
        hold = hold_account(account_id)
        lapsed = state is ReservationState.HELD and utc(row["expire_at"]) <= now
        paid_anyway = item.commit and item.diamonds > 0
        if state is ReservationState.COMMITTED or (state not in OPEN_HOLDS and not paid_anyway):
            return resolved_error(state)
        if lapsed and not paid_anyway:
            released = recipes.resolve(account_id, int(row["diamonds"]), False)
            self._ledger_resolve(writes, row, Kind.RESERVATION_RELEASE, released, 0, item.actor)
            diamond_rows[account_id] = diamond_rows.get(account_id, 0) + int(row["diamonds"])
            diamond_rows[hold] = diamond_rows.get(hold, 0) - int(row["diamonds"])
            row.update(state=ReservationState.EXPIRED.value, resolved_at=now)
            changed[reservation_id] = _changes(row)
            return resolved_error(ReservationState.EXPIRED)
        held = self._open_diamonds(row)
        if item.commit:
            paid = item.diamonds or held
            balance = diamond_rows.get(account_id, 0)
            pool = [Hold(h["reservation_id"], int(h["diamonds"])) for h in others.get(account_id, [])]
            plan = plan_commit(paid, held, balance, pool)
            self._ledger_resolve(
                writes, row, Kind.RESERVATION_COMMIT, recipes.commit(account_id, plan), -paid, item.actor
            )
            taken = dict(plan.from_holds)
            for other in others.get(account_id, []):
                part = taken.get(other["reservation_id"], 0)
                if part:
                    other.update(
                        diamonds=int(other["diamonds"]) - part, taken_diamonds=int(other["taken_diamonds"]) + part
                    )
                    changed[other["reservation_id"]] = _changes(other)
            diamond_rows[account_id] = balance + plan.returned - plan.from_balance - plan.debt
            diamond_rows[hold] = diamond_rows.get(hold, 0) - plan.from_hold - plan.returned - sum(taken.values())
            row.update(
                state=ReservationState.COMMITTED.value,
                resolved_at=now,
                shortfall_diamonds=plan.shortfall,
                shortfall_debt=plan.debt,
                review_reason=PAID_BEYOND_HOLD if plan.shortfall else "",
            )
            changed[reservation_id] = _changes(row)
            return _view_of(row)
        balance = diamond_rows.get(account_id, 0)
        self._ledger_resolve(
            writes, row, Kind.RESERVATION_RELEASE, recipes.resolve(account_id, held, False), 0, item.actor
        )
        diamond_rows[account_id] = balance + held
        diamond_rows[hold] = diamond_rows.get(hold, 0) - held
        row.update(state=ReservationState.RELEASED.value, resolved_at=now, debt_repaid=debt_repaid(held, balance))
        changed[reservation_id] = _changes(row)
        return _view_of(row)

    @staticmethod
    def _ledger_resolve(
        writes: _Writes,
        row: Mapping[str, Any],
        kind: Kind,
        postings: list[Posting],
        delta: int,
        actor: Actor | None = None,
    ) -> None:
        """One ledger transaction resolving a hold (none when nothing moves: a hold a clawback took entirely)."""
        if not any(p.amount for p in postings):
            return
        txn_id = writes.transaction(kind, row["reservation_id"], postings, actor=actor)
        writes.seen_by(row["account_id"], txn_id, kind, row["reservation_id"], {Currency.DIAMOND: delta})


def _newest_first(rows: Iterable[Any]) -> list[Any]:
    return sorted(rows, key=lambda r: (utc(r.created_at), r.reservation_id), reverse=True)


def _limit_state(row: Any) -> LimitState:
    return LimitState(
        int(row.limit_coins),
        None if row.pending_limit_coins is None else int(row.pending_limit_coins),
        None if row.pending_effective_at is None else utc(row.pending_effective_at),
    )


_MUTABLE = (
    "state",
    "diamonds",
    "resolved_at",
    "submitted_at",
    "taken_diamonds",
    "shortfall_diamonds",
    "shortfall_debt",
    "debt_repaid",
    "review_reason",
)


def _changes(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"reservation_id": row["reservation_id"], **{c: row[c] for c in _MUTABLE}}


def _reservation_view(row: Any) -> ReservationView:
    return _view_of(row._asdict())


def _view_of(row: Mapping[str, Any]) -> ReservationView:
    return ReservationView(
        row["reservation_id"],
        row["account_id"],
        int(row["diamonds"]),
        ReservationState(row["state"]),
        utc(row["created_at"]),
        utc(row["expire_at"]),
        int(row["clawed_diamonds"]),
        int(row["taken_diamonds"]),
        int(row["shortfall_diamonds"]),
        int(row["shortfall_debt"]),
        row["review_reason"],
        int(row["debt_repaid"]),
    )
