"""receipts: store purchases (both stores), bound to the first account that claims them.

Revision ID: receipts_0002
Revises: receipts_0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "receipts_0002"
down_revision = "receipts_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "receipts_purchases",
        sa.Column("store", sa.String(16), primary_key=True),
        sa.Column("store_transaction_id", sa.String(512), primary_key=True),
        sa.Column("account_id", sa.String(128), nullable=True),
        sa.Column("product_id", sa.String(256), nullable=False),
        sa.Column("quantity", sa.Integer, nullable=False),
        sa.Column("coins", sa.BigInteger, nullable=False),
        sa.Column("bonus_coins", sa.BigInteger, nullable=False),
        sa.Column("environment", sa.String(16), nullable=False),
        sa.Column("storefront", sa.String(16), nullable=False),
        sa.Column("price_minor", sa.BigInteger, nullable=True),
        sa.Column("currency", sa.String(3), nullable=True),
        sa.Column("purchase_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("order_id", sa.String(256), nullable=True),
        sa.Column("original_transaction_id", sa.String(256), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("flagged_for_review", sa.Boolean, nullable=False),
        sa.Column("wallet_transaction_id", sa.String(128), nullable=True),
        sa.Column("refunded_quantity", sa.Integer, nullable=False, server_default="0"),
        sa.Column("refunded_percentage_milli", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_receipts_purchases_account", "receipts_purchases", ["account_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_receipts_purchases_account", table_name="receipts_purchases")
    op.drop_table("receipts_purchases")
