"""wallet: holds a payout provider may be paying against (SUBMITTED), and what a paid
cash-out took beyond its hold.

``state`` gains the value SUBMITTED (no schema change: it is a string). A reservation
records when it was submitted, what other payouts took from it (``taken_diamonds``),
what its own commit took beyond it (``shortfall_diamonds``, of which
``shortfall_debt`` became the creator's diamond debt), the diamond debt its release
repaid, and why it needs a review.

Revision ID: wallet_0004
Revises: wallet_0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "wallet_0004"
down_revision = "wallet_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    zero = sa.text("0")
    with op.batch_alter_table("wallet_reservations") as batch:
        batch.add_column(sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True))
        for name in ("taken_diamonds", "shortfall_diamonds", "shortfall_debt", "debt_repaid"):
            batch.add_column(sa.Column(name, sa.BigInteger, nullable=False, server_default=zero))
        batch.add_column(sa.Column("review_reason", sa.String(64), nullable=False, server_default=""))
    op.create_index(
        "wallet_reservations_review",
        "wallet_reservations",
        ["account_id"],
        postgresql_where=sa.text("review_reason <> ''"),
        sqlite_where=sa.text("review_reason <> ''"),
    )


def downgrade() -> None:
    op.drop_index("wallet_reservations_review", table_name="wallet_reservations")
    with op.batch_alter_table("wallet_reservations") as batch:
        for name in (
            "review_reason",
            "debt_repaid",
            "shortfall_debt",
            "shortfall_diamonds",
            "taken_diamonds",
            "submitted_at",
        ):
            batch.drop_column(name)
