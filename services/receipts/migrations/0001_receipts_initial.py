"""receipts: request log for AIP-155 request ids.

Revision ID: receipts_0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "receipts_0001"
down_revision = None
branch_labels = ("receipts",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "receipts_request_log",
        sa.Column("method", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("response", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("receipts_request_log")
