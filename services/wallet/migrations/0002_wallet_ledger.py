"""wallet: the double-entry ledger, purchases, reservations and spending limits.

Revision ID: wallet_0002
Revises: wallet_0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "wallet_0002"
down_revision = "wallet_0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "wallet_transactions",
        sa.Column("txn_id", sa.String(40), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("reference", sa.String(256), nullable=False),
        sa.Column("sandbox", sa.Boolean, nullable=False),
    )
    op.create_table(
        "wallet_entries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("txn_id", sa.String(40), sa.ForeignKey("wallet_transactions.txn_id"), nullable=False),
        sa.Column("account_id", sa.String(160), nullable=False),
        sa.Column("currency", sa.String(8), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
    )
    op.create_index("wallet_entries_txn", "wallet_entries", ["txn_id"])
    op.create_index("wallet_entries_account", "wallet_entries", ["account_id", "currency"])
    op.create_table(
        "wallet_balances",
        sa.Column("account_id", sa.String(160), primary_key=True),
        sa.Column("currency", sa.String(8), primary_key=True),
        sa.Column("balance", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "wallet_history",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("account_id", sa.String(160), nullable=False),
        sa.Column("txn_id", sa.String(40), sa.ForeignKey("wallet_transactions.txn_id"), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("coins_delta", sa.BigInteger, nullable=False),
        sa.Column("diamonds_delta", sa.BigInteger, nullable=False),
        sa.Column("reference", sa.String(256), nullable=False),
        sa.Column("counterparty", sa.String(160), nullable=False),
    )
    op.create_index("wallet_history_account", "wallet_history", ["account_id", "id"])
    op.create_index("wallet_history_account_kind_time", "wallet_history", ["account_id", "kind", "created_at"])
    op.create_table(
        "wallet_purchases",
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
    op.create_table(
        "wallet_reservations",
        sa.Column("reservation_id", sa.String(128), primary_key=True),
        sa.Column("account_id", sa.String(160), nullable=False),
        sa.Column("diamonds", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("requested_expire_at", TZ, nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("expire_at", TZ, nullable=False),
        sa.Column("resolved_at", TZ, nullable=True),
    )
    op.create_index("wallet_reservations_account_state", "wallet_reservations", ["account_id", "state"])
    op.create_table(
        "wallet_spending_limits",
        sa.Column("account_id", sa.String(160), primary_key=True),
        sa.Column("period", sa.String(16), primary_key=True),
        sa.Column("limit_coins", sa.BigInteger, nullable=False),
        sa.Column("pending_limit_coins", sa.BigInteger, nullable=True),
        sa.Column("pending_effective_at", TZ, nullable=True),
        sa.Column("updated_at", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("wallet_spending_limits")
    op.drop_table("wallet_reservations")
    op.drop_table("wallet_purchases")
    op.drop_table("wallet_history")
    op.drop_table("wallet_balances")
    op.drop_table("wallet_entries")
    op.drop_table("wallet_transactions")
