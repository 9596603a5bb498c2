"""receipts: durable inbox of store notifications, account bindings for reverse
lookups, reconciliation cursors.

Revision ID: receipts_inbox_0001
Revises: receipts_0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "receipts_inbox_0001"
down_revision = "receipts_0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "receipts_notifications",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("external_id", sa.String(128), nullable=False),
        sa.Column("notification_type", sa.String(64), nullable=False),
        sa.Column("store_transaction_id", sa.String(512), nullable=True),
        sa.Column("environment", sa.String(16), nullable=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(64), nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("source", "external_id", name="uq_receipts_notifications_source_external_id"),
    )
    op.create_index("ix_receipts_notifications_due", "receipts_notifications", ["state", "next_attempt_at"])
    op.create_index("ix_receipts_notifications_txn", "receipts_notifications", ["store_transaction_id"])
    op.create_table(
        "receipts_account_bindings",
        sa.Column("account_id", sa.String(128), primary_key=True),
        sa.Column("app_account_token", sa.String(36), nullable=False, unique=True),
        sa.Column("obfuscated_account_id", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "receipts_reconcile_runs",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("examined", sa.Integer, nullable=False, server_default="0"),
        sa.Column("applied", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("receipts_reconcile_runs")
    op.drop_table("receipts_account_bindings")
    op.drop_index("ix_receipts_notifications_txn", "receipts_notifications")
    op.drop_index("ix_receipts_notifications_due", "receipts_notifications")
    op.drop_table("receipts_notifications")
