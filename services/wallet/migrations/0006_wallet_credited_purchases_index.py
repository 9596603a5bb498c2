"""wallet: credited purchases by store and credit time, for ListCreditedPurchases (the
receipts service's sweeps read the last few days of a store's credits).

Revision ID: wallet_0006
Revises: wallet_0005
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "wallet_0006"
down_revision = "wallet_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("wallet_purchases_store_credited", "wallet_purchases", ["store", "created_at"])


def downgrade() -> None:
    op.drop_index("wallet_purchases_store_credited", table_name="wallet_purchases")
