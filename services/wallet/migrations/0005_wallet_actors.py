"""wallet: who moved value, and the evidence of each credit.

Every ledger transaction records the authenticated caller (token ``sub`` and key id),
whom it acted for (``act``) and the request id; every credited purchase the SHA-256
of the store evidence the crediting service verified. Rows from before read as empty
(a transaction by the service itself, a credit without evidence).

Revision ID: wallet_0005
Revises: wallet_0004
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "wallet_0005"
down_revision = "wallet_0004"
branch_labels = None
depends_on = None

ACTOR_COLUMNS = ("actor_subject", "actor_key_id", "actor_acting_for", "actor_request_id")


def upgrade() -> None:
    for name in ACTOR_COLUMNS:
        op.add_column("wallet_transactions", sa.Column(name, sa.Text, nullable=True))
    op.add_column("wallet_purchases", sa.Column("evidence_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("wallet_purchases", "evidence_sha256")
    for name in reversed(ACTOR_COLUMNS):
        op.drop_column("wallet_transactions", name)
