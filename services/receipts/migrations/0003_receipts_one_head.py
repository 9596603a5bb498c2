"""receipts: one head again. The purchases, Play consumption and notification inbox
tables were added on three branches off receipts_0001; this revision joins them
(no schema change), so every later revision follows one line.

Databases migrated before it are at the three heads (the migration Job runs
``coinstore migrate``, which upgrades to all heads): they move here without a
change; a new database applies the three branches, then this.
"""

from __future__ import annotations

revision = "receipts_0003"
down_revision = ("receipts_0002", "receipts_google_0001", "receipts_inbox_0001")


def upgrade() -> None:
    """The branches' tables are independent of each other: nothing to change."""


def downgrade() -> None:
    """Back to the three heads: nothing to change."""
