"""payouts: who moved value.

Cash-outs record who asked for them, batches who created them, destinations who set
and who verified them (the authenticated caller's ``sub`` and key id, the ``act`` it
acted for, and the request id), and every destination change is kept in
``payouts_destination_changes``. Rows from before read as empty.

Revision ID: payouts_0004
Revises: payouts_0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "payouts_0004"
down_revision = "payouts_0003"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")
FIELDS = ("subject", "key_id", "acting_for", "request_id")
PREFIXES = {
    "payouts_cashouts": ("actor_",),
    "payouts_batches": ("actor_",),
    "payouts_destinations": ("changed_by_", "verified_by_"),
}


def upgrade() -> None:
    for table, prefixes in PREFIXES.items():
        for prefix in prefixes:
            for name in FIELDS:
                op.add_column(table, sa.Column(f"{prefix}{name}", sa.Text, nullable=True))
    op.create_table(
        "payouts_destination_changes",
        sa.Column(
            "change_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("creator_account_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("receiver", sa.String(254), nullable=False),
        *(sa.Column(f"actor_{name}", sa.Text, nullable=False) for name in FIELDS),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "payouts_destination_changes_creator", "payouts_destination_changes", ["creator_account_id", "change_id"]
    )


def downgrade() -> None:
    op.drop_index("payouts_destination_changes_creator", "payouts_destination_changes")
    op.drop_table("payouts_destination_changes")
    for table, prefixes in PREFIXES.items():
        for prefix in prefixes:
            for name in FIELDS:
                op.drop_column(table, f"{prefix}{name}")
