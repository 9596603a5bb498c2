"""receipts (Google Play): purchases credited but not yet consumed at Google.

Revision ID: receipts_google_0001
Revises: receipts_0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "receipts_google_0001"
down_revision = "receipts_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "receipts_google_consumptions",
        sa.Column("purchase_token", sa.String(512), primary_key=True),
        sa.Column("package_name", sa.String(256), nullable=False),
        sa.Column("product_id", sa.String(256), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.String(512), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("consumed_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "ix_receipts_google_consumptions_state_created",
        "receipts_google_consumptions",
        ["state", "created_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_receipts_google_consumptions_state_created", "receipts_google_consumptions")
    op.drop_table("receipts_google_consumptions")
