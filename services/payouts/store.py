"""SQL of the payouts service (SQLAlchemy Core). Transactions live here."""

from __future__ import annotations

import sqlalchemy as sa

from services.common.idempotency import request_log_table

metadata = sa.MetaData()
request_log = request_log_table(metadata, "payouts")
