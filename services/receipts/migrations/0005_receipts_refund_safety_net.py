"""receipts: the refund safety net.

- ``receipts_refunds``: every refund a store reported, against the purchase key
  (store, store_transaction_id), cumulative, whether or not the purchase was known
  or credited then: a purchase reported after its refund is never credited.
- ``receipts_notifications.attempt_errors``: every failed attempt's error (JSON list).
- ``receipts_reconcile_cursors``: where each store's reconciliation is (its window,
  the store's pagination token), so a run that stops is resumed by the next.
- ``receipts_consumption_consents``: accounts whose consent to share consumption
  data with Apple the app backend recorded (and when it was withdrawn).

Revision ID: receipts_0005
Revises: receipts_0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "receipts_0005"
down_revision = "receipts_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "receipts_refunds",
        sa.Column("store", sa.String(16), primary_key=True),
        sa.Column("store_transaction_id", sa.String(512), primary_key=True),
        sa.Column("environment", sa.String(16), nullable=True),
        sa.Column("full_refund", sa.Boolean, nullable=False),
        sa.Column("refunded_quantity", sa.Integer, nullable=False, server_default="0"),
        sa.Column("refunded_percentage_milli", sa.Integer, nullable=False, server_default="0"),
        sa.Column("reason", sa.String(512), nullable=False, server_default=""),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.add_column("receipts_notifications", sa.Column("attempt_errors", sa.Text, nullable=True))
    op.create_table(
        "receipts_reconcile_cursors",
        sa.Column("source", sa.String(16), primary_key=True),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("page_token", sa.Text, nullable=True),
        sa.Column("checked_through", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "receipts_consumption_consents",
        sa.Column("account_id", sa.String(128), primary_key=True),
        sa.Column("consented", sa.Boolean, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("receipts_consumption_consents")
    op.drop_table("receipts_reconcile_cursors")
    op.drop_column("receipts_notifications", "attempt_errors")
    op.drop_table("receipts_refunds")
