"""Apple's CONSUMPTION_REQUEST: answered only for accounts whose consent the app
backend recorded (RecordConsumptionConsent), with the real consumption of the
purchase from the wallet (GetPurchaseConsumption: coin provenance).

``receipts_consumption_consents`` holds one row per account: consented or withdrawn,
and when. Sending consumption data without the customer's consent is not ours to
claim (Apple requires ``customerConsented`` to be true).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.catalog import StoreId
from services.common.clock import as_utc
from services.common.db import Database, dialect_insert
from services.common.loop import OnLoop
from services.receipts.purchases.model import Environment
from services.receipts.purchases.wallet import WalletClient


@dataclass(frozen=True)
class Consent:
    account_id: str
    consented: bool
    updated_at: datetime


class ConsentRepository:
    def __init__(self, database: Database) -> None:
        self.database = database
        self._consents = database.table("receipts_consumption_consents")

    def record(self, account_id: str, consented: bool, now: datetime) -> Consent:
        """The account's consent as of now (recorded or withdrawn); the latest call wins."""
        consents = self._consents

        def work(conn: Connection) -> Consent:
            latest = {"consented": consented, "updated_at": now}
            upsert = dialect_insert(conn, consents).values(account_id=account_id, **latest)
            conn.execute(upsert.on_conflict_do_update(index_elements=[consents.c.account_id], set_=latest))
            return Consent(account_id, consented, now)

        return self.database.transaction(work)

    def consented(self, account_id: str) -> bool:
        with self.database.connect() as conn:
            value = conn.execute(
                sa.select(self._consents.c.consented).where(self._consents.c.account_id == account_id)
            ).scalar_one_or_none()
        return bool(value)

    def get(self, account_id: str) -> Consent | None:
        with self.database.connect() as conn:
            row = conn.execute(sa.select(self._consents).where(self._consents.c.account_id == account_id)).one_or_none()
        return None if row is None else Consent(row.account_id, bool(row.consented), as_utc(row.updated_at))


@dataclass(eq=False)
class WalletConsumptionFacts:
    """Consent from ``consents``; consumption from the wallet's GetPurchaseConsumption,
    run on ``loop`` (the wallet client's event loop) while the worker thread waits."""

    consents: ConsentRepository
    wallet: WalletClient
    loop: OnLoop

    def consented(self, account_id: str) -> bool:
        return self.consents.consented(account_id)

    def consumed_percentage_milli(self, environment: Environment, store_transaction_id: str) -> int:
        read = self.wallet.consumed_percentage_milli(StoreId.APP_STORE, environment, store_transaction_id)
        return self.loop.run(read)
