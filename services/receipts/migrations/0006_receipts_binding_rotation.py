"""receipts: an account may hold several bindings, one per binding secret.

After a binding-secret rotation GetPurchaseBinding hands out new values for an
account that already has a row; notifications carrying either must find the
account. The table is keyed by the appAccountToken instead of the account id
(rebuilt and copied, which SQLite and PostgreSQL both do the same way).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "receipts_0006"
down_revision = "receipts_0003"

_TABLE = "receipts_account_bindings"


def _copy_into(new: str, columns: list[sa.Column[object]], select: str) -> None:
    op.create_table(new, *columns)
    op.execute(f"INSERT INTO {new} (account_id, app_account_token, obfuscated_account_id, created_at) {select}")
    op.drop_table(_TABLE)
    op.rename_table(new, _TABLE)


def upgrade() -> None:
    _copy_into(
        f"{_TABLE}_by_token",
        [
            sa.Column("app_account_token", sa.String(36), primary_key=True),
            sa.Column("account_id", sa.String(128), nullable=False, index=True),
            sa.Column("obfuscated_account_id", sa.String(64), nullable=False, unique=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        ],
        f"SELECT account_id, app_account_token, obfuscated_account_id, created_at FROM {_TABLE}",
    )


def downgrade() -> None:
    """Back to one binding per account: each account keeps its oldest."""
    _copy_into(
        f"{_TABLE}_by_account",
        [
            sa.Column("account_id", sa.String(128), primary_key=True),
            sa.Column("app_account_token", sa.String(36), nullable=False, unique=True),
            sa.Column("obfuscated_account_id", sa.String(64), nullable=False, unique=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        ],
        f"SELECT b.account_id, b.app_account_token, b.obfuscated_account_id, b.created_at FROM {_TABLE} b"
        f" WHERE NOT EXISTS (SELECT 1 FROM {_TABLE} o WHERE o.account_id = b.account_id AND"
        " (o.created_at < b.created_at"
        " OR (o.created_at = b.created_at AND o.app_account_token < b.app_account_token)))",
    )
