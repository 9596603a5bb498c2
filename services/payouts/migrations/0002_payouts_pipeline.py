"""payouts: destinations, cash-outs, batches, provider submissions, daily totals.

Revision ID: payouts_0002
Revises: payouts_0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "payouts_0002"
down_revision = "payouts_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "payouts_destinations",
        sa.Column("creator_account_id", sa.String(128), primary_key=True),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("receiver", sa.String(254), nullable=False),
        sa.Column("verified", sa.Boolean, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "payouts_batches",
        sa.Column("batch_id", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("cutoff_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("item_count", sa.BigInteger, nullable=False),
        sa.Column("diamonds", sa.BigInteger, nullable=False),
        sa.Column("amount_minor", sa.BigInteger, nullable=False),
        sa.Column("chunk_seq", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("payouts_batches_created", "payouts_batches", ["created_at"])
    op.create_index("payouts_batches_due", "payouts_batches", ["state", "due_at"])
    op.create_table(
        "payouts_chunks",
        sa.Column("chunk_id", sa.String(96), primary_key=True),
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("provider_batch_id", sa.String(64), nullable=False),
        sa.Column("item_count", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("payouts_chunks_batch", "payouts_chunks", ["batch_id"])
    op.create_index("payouts_chunks_due", "payouts_chunks", ["state", "due_at"])
    op.create_table(
        "payouts_cashouts",
        sa.Column("cashout_id", sa.String(64), primary_key=True),
        sa.Column("creator_account_id", sa.String(128), nullable=False),
        sa.Column("diamonds", sa.BigInteger, nullable=False),
        sa.Column("amount_minor", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("rate", sa.String(40), nullable=False),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("receiver", sa.String(254), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("batch_id", sa.String(64), nullable=True),
        sa.Column("chunk_id", sa.String(96), nullable=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("reservation_id", sa.String(96), nullable=False),
        sa.Column("failure_reason", sa.String(256), nullable=False),
        sa.Column("provider_item_id", sa.String(64), nullable=False),
        sa.Column("provider_transaction_id", sa.String(64), nullable=False),
        sa.Column("provider_status", sa.String(32), nullable=False),
        sa.Column("wallet_action", sa.String(8), nullable=True),
        sa.Column("wallet_done", sa.Boolean, nullable=False),
        sa.Column("request_day", sa.String(10), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("payouts_cashouts_eligible", "payouts_cashouts", ["state", "currency", "created_at"])
    op.create_index("payouts_cashouts_creator", "payouts_cashouts", ["creator_account_id", "created_at"])
    op.create_index("payouts_cashouts_batch", "payouts_cashouts", ["batch_id", "state"])
    op.create_index("payouts_cashouts_chunk", "payouts_cashouts", ["chunk_id", "state"])
    op.create_index("payouts_cashouts_plan", "payouts_cashouts", ["batch_id", "chunk_id", "cashout_id"])
    op.create_index("payouts_cashouts_wallet", "payouts_cashouts", ["wallet_done", "updated_at"])
    op.create_table(
        "payouts_daily_totals",
        sa.Column("creator_account_id", sa.String(128), primary_key=True),
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("currency", sa.String(3), primary_key=True),
        sa.Column("amount_minor", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("payouts_daily_totals")
    op.drop_table("payouts_cashouts")
    op.drop_table("payouts_chunks")
    op.drop_table("payouts_batches")
    op.drop_table("payouts_destinations")
