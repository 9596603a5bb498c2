"""receipts: the purchases table is the crediting outbox. A verified purchase is
recorded (state ``recorded``, bound, its terms fixed) before the wallet is called;
the sweep finds the bound ones the wallet has not confirmed through this partial
index, which holds only those rows (a few at any time), so the sweep costs nothing
however large the table grows.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "receipts_0004"
down_revision = "receipts_0006"
branch_labels = None
depends_on = None

_UNCREDITED = sa.text("state = 'recorded' AND account_id IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_receipts_purchases_uncredited",
        "receipts_purchases",
        ["updated_at"],
        postgresql_where=_UNCREDITED,
        sqlite_where=_UNCREDITED,
    )


def downgrade() -> None:
    op.drop_index("ix_receipts_purchases_uncredited", table_name="receipts_purchases")
