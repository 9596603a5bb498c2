"""`coinstore wallet audit`: rebuild every balance from the entries and check every
invariant of the ledger and of coin provenance. Returns the discrepancies (none: clean).

Runs in one repeatable-read snapshot on PostgreSQL (one transaction on SQLite).

Checked:

- every transaction sums to zero per currency, has entries, and every entry a transaction;
  the whole ledger sums to zero per currency;
- every balance row equals the sum of its account's entries;
- hold accounts equal their open (held and submitted) reservations; Sandbox value never reached a hold or
  payout clearing;
- every lot: coins = open + consumed (net of undone repayments) + unrestored unspent
  legs; clawed back = its unrestored legs; every consumption's clawed coins and
  diamonds = its unrestored legs;
- every account, per coin currency: its open lots = its coins, and no open lot while it
  owes; its debt = unrestored debt legs − debt repayments (accounts with coins spent
  before provenance are checked by the first two only);
- every consumption matches its movement: the coins one transaction took from a spender's
  lots are the spender's entries in it, and the diamonds attributed are the creator's;
- a negative diamond row (creator diamond debt) is covered by the diamond debt of
  unrestored clawback legs and of paid cash-outs whose holds fell short.

Apart from those: :func:`credits_without_evidence` lists the credited purchases that
came with no evidence hash (CreditPurchaseRequest.evidence_sha256), which a stolen
``wallet:credit`` key would leave; the ledger itself is consistent either way. Holds
flagged for review are listed by :func:`holds_to_review` (``coinstore wallet
review-holds``), not counted as discrepancies.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.actor import Actor
from services.common.db import Database
from services.wallet.domain.ledger import (
    COIN_CURRENCIES,
    HOLD_PREFIX,
    PAYOUT_CLEARING,
    SYSTEM_PREFIX,
    Currency,
    Environment,
    coin_currency,
    diamond_currency,
    hold_account,
)
from services.wallet.domain.provenance import ConsumptionKind, LegKind
from services.wallet.domain.rules import OPEN_HOLDS
from services.wallet.tables import (
    MOVED_BY,
    balances,
    clawback_legs,
    consumptions,
    entries,
    purchases,
    reservations,
    transactions,
)

PRE_PROVENANCE = "pre-provenance"
SANDBOX = (Currency.SANDBOX_COIN.value, Currency.SANDBOX_DIAMOND.value)


def audit(database: Database) -> list[str]:
    return audit_engine(database.engine)


def audit_engine(engine: sa.Engine) -> list[str]:
    problems: list[str] = []
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        kept = _ledger(conn, problems)
        _holds(conn, kept, problems)
        _provenance(conn, kept, problems)
    return problems


def credits_without_evidence(database: Database, most: int = 100) -> tuple[int, list[str]]:
    """How many credited purchases carry no evidence hash, and the first ``most`` of them
    (credit order) with the caller that credited each."""
    missing = (purchases.c.evidence_sha256.is_(None)) | (purchases.c.evidence_sha256 == "")
    with database.engine.connect() as conn:
        count = int(conn.execute(sa.select(sa.func.count()).where(missing)).scalar_one())
        rows = conn.execute(
            sa.select(purchases, *MOVED_BY)
            .select_from(purchases.outerjoin(transactions, transactions.c.txn_id == purchases.c.credit_txn_id))
            .where(missing)
            .order_by(purchases.c.lot_id)
            .limit(most)
        ).all()
    return count, [
        f"credit without evidence: {r.store}/{r.environment}/{r.store_transaction_id} to {r.account_id},"
        f" {r.coins} coins, by {Actor.of_row(r).describe()}"
        for r in rows
    ]


def _ledger(conn: Connection, problems: list[str]) -> dict[tuple[str, str], int]:
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
            .where(~entries.c.account_id.startswith(SYSTEM_PREFIX))
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
    for currency, total in conn.execute(
        sa.select(entries.c.currency, sa.func.sum(entries.c.amount)).group_by(entries.c.currency)
    ):
        if total != 0:
            problems.append(f"ledger: all {currency} entries sum to {total}, not 0")
    leaked = conn.execute(
        sa.select(entries.c.account_id, entries.c.currency)
        .distinct()
        .where(
            entries.c.currency.in_(SANDBOX),
            entries.c.account_id.startswith(HOLD_PREFIX) | (entries.c.account_id == PAYOUT_CLEARING),
        )
    ).all()
    for account_id, currency in leaked:
        problems.append(f"{account_id}: Sandbox value ({currency}) reached a hold or payout clearing")
    return kept


def _holds(conn: Connection, kept: dict[tuple[str, str], int], problems: list[str]) -> None:
    held: dict[str, int] = defaultdict(int)
    for row in conn.execute(
        sa.select(reservations.c.account_id, reservations.c.diamonds).where(
            reservations.c.state.in_([state.value for state in OPEN_HOLDS])
        )
    ):
        held[hold_account(row.account_id)] += int(row.diamonds)
    for (account_id, currency), amount in sorted(kept.items()):
        if (
            account_id.startswith(HOLD_PREFIX)
            and currency == Currency.DIAMOND.value
            and amount != held.get(account_id, 0)
        ):
            problems.append(f"{account_id}: holds {amount} diamonds, held reservations total {held[account_id]}")
    for account_id, amount in sorted(held.items()):
        if kept.get((account_id, Currency.DIAMOND.value), 0) != amount:
            problems.append(f"{account_id}: held reservations total {amount}, hold balance differs")


def _provenance(conn: Connection, kept: dict[tuple[str, str], int], problems: list[str]) -> None:
    lots = {int(r.lot_id): r for r in conn.execute(sa.select(purchases))}
    used = list(conn.execute(sa.select(consumptions)))
    legs = list(conn.execute(sa.select(clawback_legs).where(clawback_legs.c.restored_txn_id.is_(None))))
    consumed: dict[int, int] = defaultdict(int)
    for c in used:
        consumed[int(c.lot_id)] += int(c.coins) - int(c.undone_coins)
    unspent_legs: dict[int, int] = defaultdict(int)
    leg_coins: dict[int, int] = defaultdict(int)
    by_consumption: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for leg in legs:
        leg_coins[int(leg.lot_id)] += int(leg.coins)
        if leg.kind == LegKind.UNSPENT.value:
            unspent_legs[int(leg.lot_id)] += int(leg.coins)
        if leg.consumption_id is not None:
            by_consumption[int(leg.consumption_id)][0] += int(leg.coins)
            by_consumption[int(leg.consumption_id)][1] += int(leg.diamonds)
    for lot_id, lot in sorted(lots.items()):
        name = f"lot {lot_id} ({lot.store}/{lot.environment}/{lot.store_transaction_id})"
        accounted = int(lot.open_coins) + consumed[lot_id] + unspent_legs[lot_id]
        if int(lot.open_coins) < 0 or accounted != int(lot.coins):
            problems.append(
                f"{name}: {lot.coins} coins, but open {lot.open_coins} + consumed {consumed[lot_id]}"
                f" + clawed unspent {unspent_legs[lot_id]} = {accounted}"
            )
        if int(lot.clawed_back) != leg_coins[lot_id] or not 0 <= int(lot.clawed_back) <= int(lot.coins):
            problems.append(f"{name}: clawed back {lot.clawed_back}, its legs total {leg_coins[lot_id]}")
    for c in used:
        active = int(c.coins) - int(c.undone_coins)
        coins, diamonds = by_consumption.get(int(c.consumption_id), [0, 0])
        if (int(c.clawed_coins), int(c.clawed_diamonds)) != (coins, diamonds) or not 0 <= coins <= active:
            problems.append(
                f"consumption {c.consumption_id}: clawed {c.clawed_coins} coins / {c.clawed_diamonds} diamonds,"
                f" its legs {coins} / {diamonds}, active coins {active}"
            )
    _accounts(lots, used, legs, kept, problems)
    _movements(conn, used, problems)
    debt_legs: dict[str, int] = defaultdict(int)
    for leg in legs:
        if leg.kind == LegKind.GIFT.value and int(leg.lot_id) in lots:
            currency = diamond_currency(Environment(lots[int(leg.lot_id)].environment)).value
            debt_legs[f"{leg.creator_account_id}|{currency}"] += int(leg.diamond_debt)
    # Paid cash-outs whose holds were gone made diamond debt too.
    for row in conn.execute(
        sa.select(reservations.c.account_id, sa.func.sum(reservations.c.shortfall_debt).label("debt"))
        .where(reservations.c.shortfall_debt > 0)
        .group_by(reservations.c.account_id)
    ):
        debt_legs[f"{row.account_id}|{Currency.DIAMOND.value}"] += int(row.debt)
    for (account_id, currency), amount in sorted(kept.items()):
        if currency in (Currency.DIAMOND.value, Currency.SANDBOX_DIAMOND.value) and amount < 0:
            covered = debt_legs.get(f"{account_id}|{currency}", 0)
            if -amount > covered:
                problems.append(
                    f"account {account_id}: owes {-amount} {currency}, clawbacks and paid shortfalls explain {covered}"
                )


def holds_to_review(database: Database) -> list[str]:
    """Settled holds flagged for a person's look (e.g. a paid cash-out whose hold was gone), one line each."""
    query = (
        sa.select(reservations)
        .where(reservations.c.review_reason != "")
        .order_by(reservations.c.account_id, reservations.c.reservation_id)
    )
    with database.connect() as conn:
        return [
            f"{r.account_id} reservation {r.reservation_id} {r.state}: {r.review_reason}"
            f" (shortfall {r.shortfall_diamonds}, of it diamond debt {r.shortfall_debt})"
            for r in conn.execute(query)
        ]


def _accounts(
    lots: dict[int, Any],
    used: list[Any],
    legs: list[Any],
    kept: dict[tuple[str, str], int],
    problems: list[str],
) -> None:
    open_by: dict[tuple[str, str], int] = defaultdict(int)
    owed: dict[tuple[str, str], int] = defaultdict(int)
    legacy: set[str] = set()
    for lot in lots.values():
        currency = coin_currency(Environment(lot.environment)).value
        open_by[(lot.account_id, currency)] += int(lot.open_coins)
    for leg in legs:
        lot = lots.get(int(leg.lot_id))
        if lot is None:
            problems.append(f"clawback leg {leg.leg_id}: unknown lot {leg.lot_id}")
            continue
        key = (lot.account_id, coin_currency(Environment(lot.environment)).value)
        if leg.kind == LegKind.DEBT.value:
            owed[key] += int(leg.coins)
        if leg.reversal_txn_id == PRE_PROVENANCE:
            legacy.add(key[0])
    for c in used:
        key = (c.account_id, coin_currency(Environment(c.environment)).value)
        if c.kind == ConsumptionKind.DEBT_REPAYMENT.value:
            owed[key] -= int(c.coins) - int(c.undone_coins)
        if c.kind == ConsumptionKind.UNTRACKED.value:
            legacy.add(key[0])
    accounts = {a for a, _ in open_by} | {a for a, c in kept if c in {x.value for x in COIN_CURRENCIES}}
    for account_id in sorted(accounts):
        for currency in (c.value for c in COIN_CURRENCIES):
            balance = kept.get((account_id, currency), 0)
            opened = open_by.get((account_id, currency), 0)
            if opened != max(balance, 0) or (balance < 0 and opened):
                problems.append(f"account {account_id} {currency}: balance {balance}, open lots hold {opened}")
            debt = owed.get((account_id, currency), 0)
            if account_id not in legacy and debt != max(-balance, 0):
                problems.append(
                    f"account {account_id} {currency}: owes {max(-balance, 0)}, debt legs less repayments {debt}"
                )


def _movements(conn: Connection, used: list[Any], problems: list[str]) -> None:
    """The coins (and diamonds) consumptions record per transaction match its entries."""
    lots_env = {
        int(r.lot_id): Environment(r.environment)
        for r in conn.execute(sa.select(purchases.c.lot_id, purchases.c.environment))
    }
    taken: dict[tuple[str, str, str], int] = defaultdict(int)
    given: dict[tuple[str, str, str], int] = defaultdict(int)
    for c in used:
        if c.kind not in (ConsumptionKind.GIFT.value, ConsumptionKind.SPEND.value):
            continue
        environment = lots_env[int(c.lot_id)]
        taken[(c.txn_id, c.account_id, coin_currency(environment).value)] += int(c.coins)
        if c.kind == ConsumptionKind.GIFT.value:
            key = (c.txn_id, c.creator_account_id, diamond_currency(environment).value)
            given[key] += int(c.diamonds)
    txn_ids = sorted({key[0] for key in taken})
    posted: dict[tuple[str, str, str], int] = defaultdict(int)
    for start in range(0, len(txn_ids), 500):
        for row in conn.execute(
            sa.select(entries.c.txn_id, entries.c.account_id, entries.c.currency, entries.c.amount).where(
                entries.c.txn_id.in_(txn_ids[start : start + 500])
            )
        ):
            posted[(row.txn_id, row.account_id, row.currency)] += int(row.amount)
    for key, coins in sorted(taken.items()):
        if posted.get(key, 0) != -coins:
            problems.append(
                f"transaction {key[0]}: {key[1]} paid {-posted.get(key, 0)} {key[2]}, its lots gave {coins}"
            )
    for key, diamonds in sorted(given.items()):
        if posted.get(key, 0) != diamonds:
            problems.append(
                f"transaction {key[0]}: {key[1]} received {posted.get(key, 0)} {key[2]}, attributed {diamonds}"
            )
