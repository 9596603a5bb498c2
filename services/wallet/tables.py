"""The wallet's tables (SQLAlchemy Core). The migrations in ``migrations/`` create them.

- ``wallet_transactions`` / ``wallet_entries``: the double-entry ledger (immutable);
  each transaction names who moved the value (``actor_*``: caller, key, ``act``, request id);
- ``wallet_balances``: every user and hold account's balance per currency, kept in
  the same database transaction as the entries and rebuildable from them;
- ``wallet_history``: one row per user account and transaction, for ListTransactions;
- ``wallet_purchases``: one row per credited purchase, which is also its **lot**:
  ``lot_id`` is the credit sequence (ascending with every credit), ``open_coins``
  what is still unspent;
- ``wallet_consumptions``: coins of one lot used by one movement (a gift, a spend or a
  debt repayment), with the diamonds a gift attributed to that lot;
- ``wallet_clawback_legs``: every part of every refund clawback, so a restore can
  reverse it leg by leg;
- ``wallet_reservations``: diamond holds for cash-outs (HELD → SUBMITTED → COMMITTED | RELEASED;
  HELD → EXPIRED), with what a paid commit took beyond its hold and why it needs review;
- ``wallet_spending_limits``; ``wallet_request_log`` (AIP-155).
"""

from __future__ import annotations

import sqlalchemy as sa

from services.common.actor import FIELDS, actor_columns
from services.common.idempotency import request_log_table

metadata = sa.MetaData()
request_log = request_log_table(metadata, "wallet")
TZ = sa.DateTime(timezone=True)
ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")
CURRENCY = sa.String(16)

transactions = sa.Table(
    "wallet_transactions",
    metadata,
    sa.Column("txn_id", sa.String(40), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("reference", sa.String(512), nullable=False),
    sa.Column("sandbox", sa.Boolean, nullable=False),
    # Who moved the value (services.common.actor.Actor); NULL on rows from before wallet_0005.
    *actor_columns(),
)
# The columns that say who moved a transaction's value, in Actor's order.
MOVED_BY = tuple(transactions.c[f"actor_{name}"] for name in FIELDS)
entries = sa.Table(
    "wallet_entries",
    metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    sa.Column("txn_id", sa.String(40), nullable=False),
    sa.Column("account_id", sa.String(160), nullable=False),
    sa.Column("currency", CURRENCY, nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
)
balances = sa.Table(
    "wallet_balances",
    metadata,
    sa.Column("account_id", sa.String(160), primary_key=True),
    sa.Column("currency", CURRENCY, primary_key=True),
    sa.Column("balance", sa.BigInteger, nullable=False),
)
history = sa.Table(
    "wallet_history",
    metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    sa.Column("account_id", sa.String(160), nullable=False),
    sa.Column("txn_id", sa.String(40), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("coins_delta", sa.BigInteger, nullable=False),
    sa.Column("diamonds_delta", sa.BigInteger, nullable=False),
    sa.Column("reference", sa.String(512), nullable=False),
    sa.Column("counterparty", sa.String(160), nullable=False),
    sa.Column("sandbox_coins_delta", sa.BigInteger, nullable=False),
    sa.Column("sandbox_diamonds_delta", sa.BigInteger, nullable=False),
)
purchases = sa.Table(
    "wallet_purchases",
    metadata,
    sa.Column("store", sa.String(16), primary_key=True),
    sa.Column("environment", sa.String(16), primary_key=True),
    sa.Column("store_transaction_id", sa.String(512), primary_key=True),
    sa.Column("account_id", sa.String(160), nullable=False),
    sa.Column("product_id", sa.String(128), nullable=False),
    sa.Column("coins", sa.BigInteger, nullable=False),
    sa.Column("bonus_coins", sa.BigInteger, nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("storefront", sa.String(16), nullable=False),
    sa.Column("price_minor", sa.BigInteger, nullable=False),
    sa.Column("price_currency", sa.String(3), nullable=False),
    sa.Column("purchase_time", TZ, nullable=True),
    sa.Column("flagged_for_review", sa.Boolean, nullable=False),
    sa.Column("credit_txn_id", sa.String(40), nullable=False),
    sa.Column("clawed_back", sa.BigInteger, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    # PostgreSQL numbers lots from the sequence wallet_lot_ids; SQLite's writers are
    # serialized, so the store numbers them max + 1.
    sa.Column("lot_id", sa.BigInteger, nullable=False, unique=True),
    sa.Column("open_coins", sa.BigInteger, nullable=False),
    # SHA-256 (hex) of the store evidence the crediting service verified; NULL: none given.
    sa.Column("evidence_sha256", sa.String(64), nullable=True),
)
OPEN_LOTS_INDEX = "wallet_purchases_open_lots"
sa.Index(
    OPEN_LOTS_INDEX,
    purchases.c.account_id,
    purchases.c.lot_id,
    postgresql_where=purchases.c.open_coins > 0,
    sqlite_where=purchases.c.open_coins > 0,
)
consumptions = sa.Table(
    "wallet_consumptions",
    metadata,
    sa.Column("consumption_id", ID, primary_key=True, autoincrement=True),
    sa.Column("lot_id", sa.BigInteger, nullable=False),
    sa.Column("txn_id", sa.String(40), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("account_id", sa.String(160), nullable=False),
    sa.Column("environment", sa.String(16), nullable=False),
    sa.Column("creator_account_id", sa.String(160), nullable=False),
    sa.Column("coins", sa.BigInteger, nullable=False),
    sa.Column("diamonds", sa.BigInteger, nullable=False),
    sa.Column("clawed_coins", sa.BigInteger, nullable=False),
    sa.Column("clawed_diamonds", sa.BigInteger, nullable=False),
    sa.Column("undone_coins", sa.BigInteger, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
)
sa.Index("wallet_consumptions_lot", consumptions.c.lot_id, consumptions.c.consumption_id)
# Restores look up an account's debt repayments; gifts, the bulk of the rows, skip this index.
sa.Index(
    "wallet_consumptions_repayments",
    consumptions.c.account_id,
    consumptions.c.consumption_id,
    postgresql_where=consumptions.c.kind == "DEBT_REPAYMENT",
    sqlite_where=consumptions.c.kind == "DEBT_REPAYMENT",
)
clawback_legs = sa.Table(
    "wallet_clawback_legs",
    metadata,
    sa.Column("leg_id", ID, primary_key=True, autoincrement=True),
    sa.Column("lot_id", sa.BigInteger, nullable=False),
    sa.Column("reversal_txn_id", sa.String(40), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("consumption_id", sa.BigInteger, nullable=True),
    sa.Column("creator_account_id", sa.String(160), nullable=False),
    sa.Column("coins", sa.BigInteger, nullable=False),
    sa.Column("diamonds", sa.BigInteger, nullable=False),
    sa.Column("from_balance", sa.BigInteger, nullable=False),
    sa.Column("from_holds", sa.Text, nullable=False),  # JSON [[reservation_id, diamonds], …]
    sa.Column("diamond_debt", sa.BigInteger, nullable=False),
    sa.Column("restored_txn_id", sa.String(40), nullable=True),
    sa.Column("created_at", TZ, nullable=False),
)
sa.Index("wallet_clawback_legs_lot", clawback_legs.c.lot_id, clawback_legs.c.leg_id)
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
    sa.Column("clawed_diamonds", sa.BigInteger, nullable=False),
    sa.Column("submitted_at", TZ, nullable=True),
    # Taken by other paid cash-outs whose holds were gone.
    sa.Column("taken_diamonds", sa.BigInteger, nullable=False, server_default="0"),
    # What this hold's commit took beyond the hold, and the part that became diamond debt.
    sa.Column("shortfall_diamonds", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("shortfall_debt", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("debt_repaid", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("review_reason", sa.String(64), nullable=False, server_default=""),
)
sa.Index(
    "wallet_reservations_review",
    reservations.c.account_id,
    postgresql_where=reservations.c.review_reason != "",
    sqlite_where=reservations.c.review_reason != "",
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
