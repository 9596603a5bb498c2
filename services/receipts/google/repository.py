"""SQL of the Google Play consumption queue (SQLAlchemy Core).

A row in ``receipts_google_consumptions`` says "credited, not yet consumed at
Google". It is written only after the wallet's credit committed and the
purchase row says CREDITED, so a consume can never precede its credit. The
Celery task moves it to ``consumed`` (or ``abandoned`` when Google says the
purchase can no longer be consumed); the sweep finds rows still ``unconsumed``
after the overdue age, and adopts credited Play purchases that never got a row
(the wallet's list of what it credited, so a lost receipts row cannot hide one).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.clock import as_utc
from services.common.db import Database
from services.common.idempotency import insert_ignore
from services.receipts.purchases.repository import CreditHook, RowHook


class ConsumeState(enum.Enum):
    UNCONSUMED = "unconsumed"
    CONSUMED = "consumed"
    # Google says it can no longer be consumed (refunded, cancelled, token gone).
    ABANDONED = "abandoned"


@dataclass(frozen=True)
class Consumption:
    purchase_token: str
    package_name: str
    product_id: str
    state: ConsumeState
    attempts: int
    last_error: str
    created_at: datetime


@dataclass(frozen=True)
class CreditedPlayPurchase:
    """A Play purchase the wallet credited (ListCreditedPurchases)."""

    token: str
    product_id: str
    credited_at: datetime


class ConsumptionRepository:
    def __init__(self, database: Database) -> None:
        self.database = database
        self._consumptions = database.table("receipts_google_consumptions")

    def row(
        self, token: str, package_name: str, product_id: str, created_at: datetime, now: datetime
    ) -> dict[str, Any]:
        """An unconsumed row of ``token``."""
        return {
            "purchase_token": token,
            "package_name": package_name,
            "product_id": product_id,
            "state": ConsumeState.UNCONSUMED.value,
            "attempts": 0,
            "created_at": created_at,
            "updated_at": now,
        }

    def _unconsumed(
        self, conn: Connection, token: str, package_name: str, product_id: str, created_at: datetime, now: datetime
    ) -> Any:
        """Insert an unconsumed row unless the token has one; RETURNING says whether it did."""
        consumptions = self._consumptions
        return conn.execute(
            insert_ignore(conn, consumptions)
            .values(**self.row(token, package_name, product_id, created_at, now))
            .returning(consumptions.c.purchase_token)
        ).first()

    def after_credit(
        self, inner: CreditHook | None, token: str, package_name: str, product_id: str, now: datetime
    ) -> RowHook:
        """A hook recording "credited, not yet consumed" in the crediting transaction, then
        running ``inner`` (the AIP-155 answer); a group commit inserts its batch's rows at once."""
        return RowHook(self._consumptions, "purchase_token", self.row(token, package_name, product_id, now, now), inner)

    def add(self, token: str, package_name: str, product_id: str, now: datetime) -> bool:
        """Record "credited, not yet consumed" once per token; True when this call added it."""
        return self.database.transaction(lambda conn: self.add_in(conn, token, package_name, product_id, now))

    def add_in(self, conn: Connection, token: str, package_name: str, product_id: str, now: datetime) -> bool:
        """:meth:`add` inside the caller's transaction (the one that marks the purchase CREDITED)."""
        # RETURNING tells a skipped insert apart on every dialect (rowcount does not on psycopg).
        return self._unconsumed(conn, token, package_name, product_id, now, now) is not None

    def get(self, token: str) -> Consumption | None:
        def work(conn: Connection) -> Consumption | None:
            consumptions = self._consumptions
            row = conn.execute(sa.select(consumptions).where(consumptions.c.purchase_token == token)).one_or_none()
            if row is None:
                return None
            return Consumption(
                row.purchase_token,
                row.package_name,
                row.product_id,
                ConsumeState(row.state),
                int(row.attempts),
                row.last_error or "",
                as_utc(row.created_at),
            )

        return self.database.transaction(work)

    def attempt(self, token: str, error: str, now: datetime) -> None:
        """Count a failed attempt and remember why."""

        def work(conn: Connection) -> None:
            consumptions = self._consumptions
            conn.execute(
                consumptions.update()
                .where(consumptions.c.purchase_token == token)
                .values(attempts=consumptions.c.attempts + 1, last_error=error[:512], updated_at=now)
            )

        self.database.transaction(work)

    def finish(self, token: str, state: ConsumeState, now: datetime, note: str = "") -> bool:
        """unconsumed → consumed/abandoned; False when another worker finished it first."""

        def work(conn: Connection) -> bool:
            consumptions = self._consumptions
            values: dict[str, object] = {"state": state.value, "updated_at": now}
            if state is ConsumeState.CONSUMED:
                values["consumed_at"] = now
            if note:
                values["last_error"] = note[:512]
            changed = conn.execute(
                consumptions.update()
                .where(
                    consumptions.c.purchase_token == token,
                    consumptions.c.state == ConsumeState.UNCONSUMED.value,
                )
                .values(**values)
            ).rowcount
            return bool(changed)

        return self.database.transaction(work)

    def overdue(
        self,
        package_name: str,
        now: datetime,
        older_than: timedelta,
        credited: Sequence[CreditedPlayPurchase] = (),
        limit: int = 500,
    ) -> list[str]:
        """Tokens credited before ``now - older_than`` and still not consumed.

        First adopts the ``credited`` purchases (the wallet's list: the truth of what was
        credited) that have no row — a crash between the credit and the row, or a row
        never written — so every credited purchase gets consumed.
        """
        cutoff = now - older_than

        def work(conn: Connection) -> list[str]:
            consumptions = self._consumptions
            for purchase in credited:
                self._unconsumed(conn, purchase.token, package_name, purchase.product_id, purchase.credited_at, now)
            rows = conn.execute(
                sa.select(consumptions.c.purchase_token)
                .where(
                    consumptions.c.state == ConsumeState.UNCONSUMED.value,
                    consumptions.c.created_at <= cutoff,
                )
                .order_by(consumptions.c.created_at)
                .limit(limit)
            ).all()
            return [r.purchase_token for r in rows]

        return self.database.transaction(work)

    def count_overdue(self, now: datetime, older_than: timedelta) -> int:
        def work(conn: Connection) -> int:
            consumptions = self._consumptions
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(consumptions)
                    .where(
                        consumptions.c.state == ConsumeState.UNCONSUMED.value,
                        consumptions.c.created_at <= now - older_than,
                    )
                ).scalar_one()
            )

        return self.database.transaction(work)
