"""payouts: a cash-out row before its hold, explicit hold expiry, and ambiguous submissions.

Cash-outs remember when their wallet hold lapses (``hold_expire_at``: the sweeper
expires them before it does, and a retried request asks the wallet for the same
hold); states RESERVING and EXPIRED are new values of ``state``. Submissions count
their provider attempts and ambiguous answers, and why they were parked.

Revision ID: payouts_0003
Revises: payouts_0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "payouts_0003"
down_revision = "payouts_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    zero = sa.text("0")
    with op.batch_alter_table("payouts_cashouts") as batch:
        batch.add_column(sa.Column("hold_expire_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("payouts_cashouts_hold_expiry", "payouts_cashouts", ["state", "hold_expire_at"])
    with op.batch_alter_table("payouts_chunks") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default=zero))
        batch.add_column(sa.Column("ambiguous", sa.Integer, nullable=False, server_default=zero))
        batch.add_column(sa.Column("park_reason", sa.String(512), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("payouts_chunks") as batch:
        for name in ("park_reason", "ambiguous", "attempts"):
            batch.drop_column(name)
    op.drop_index("payouts_cashouts_hold_expiry", table_name="payouts_cashouts")
    with op.batch_alter_table("payouts_cashouts") as batch:
        batch.drop_column("hold_expire_at")
