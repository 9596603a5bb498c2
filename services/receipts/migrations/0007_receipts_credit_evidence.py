"""receipts: the outbox row keeps what the sweep needs to credit it as the app path
would. ``evidence_sha256``: SHA-256 of the store evidence verified when the purchase
was first recorded (the wallet keeps it with the credit; '' when the path had none).
``credit_refused_reason``: the wallet's ErrorInfo reason when it refused the credit
for good (state ``refused``); the sweep no longer retries such a row.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "receipts_0007"
down_revision = "receipts_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("receipts_purchases") as batch:
        batch.add_column(sa.Column("evidence_sha256", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("credit_refused_reason", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("receipts_purchases") as batch:
        batch.drop_column("credit_refused_reason")
        batch.drop_column("evidence_sha256")
