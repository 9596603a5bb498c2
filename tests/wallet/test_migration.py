"""The provenance migration carries a ledger written before it over: lots in credit
order, unspent coins on the newest lots, earlier spending and clawbacks recorded so a
refund or a restore still works, Sandbox coins split into their own currency."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from coinstore.wallet.v1 import wallet_service_pb2 as pb
from services.common import migrate
from services.common.db import create_engine
from services.wallet import tables
from services.wallet.audit import audit
from tests.support.tokens import Keys
from tests.wallet.support import running_wallet, unique

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def legacy_ledger(url: str) -> None:
    """What the wallet before provenance wrote: coins and sandbox coins in one COIN row."""
    engine = create_engine(url, 1)
    meta = sa.MetaData()
    with engine.begin() as conn:
        meta.reflect(conn)
        txns, entries, balances, purchases = (
            meta.tables[n] for n in ("wallet_transactions", "wallet_entries", "wallet_balances", "wallet_purchases")
        )

        def post(txn: str, kind: str, when: datetime, *legs: tuple[str, str, int]) -> None:
            conn.execute(txns.insert().values(txn_id=txn, kind=kind, created_at=when, reference=txn, sandbox=False))
            for account, currency, amount in legs:
                conn.execute(entries.insert().values(txn_id=txn, account_id=account, currency=currency, amount=amount))

        def bought(stx: str, coins: int, environment: str, when: datetime, clawed: int = 0) -> None:
            conn.execute(
                purchases.insert().values(
                    store="APP_STORE",
                    store_transaction_id=stx,
                    account_id="fan",
                    product_id="coins_100",
                    coins=coins,
                    bonus_coins=0,
                    quantity=1,
                    environment=environment,
                    storefront="USA",
                    price_minor=199,
                    price_currency="USD",
                    purchase_time=when,
                    flagged_for_review=False,
                    credit_txn_id=f"credit-{stx}",
                    clawed_back=clawed,
                    created_at=when,
                )
            )

        sandbox_clearing = "#sys/purchase_clearing/app_store/sandbox"
        post("credit-t1", "PURCHASE", T0, ("fan", "COIN", 100), ("#sys/purchase_clearing/app_store", "COIN", -100))
        bought("t1", 100, "PRODUCTION", T0, clawed=30)
        post("credit-t2", "PURCHASE", T0 + timedelta(hours=1), ("fan", "COIN", 50), (sandbox_clearing, "COIN", -50))
        bought("t2", 50, "SANDBOX", T0 + timedelta(hours=1))
        post(
            "gift",
            "GIFT_SENT",
            T0 + timedelta(hours=2),
            ("fan", "COIN", -80),
            ("#sys/gift_revenue", "COIN", 80),
            ("#sys/gift_revenue", "DIAMOND", -80),
            ("star", "DIAMOND", 80),
        )
        post(
            "refund", "PURCHASE_REVERSAL", T0 + timedelta(hours=3), ("fan", "COIN", -30), ("#sys/clawback", "COIN", 30)
        )
        for account, currency, amount in (("fan", "COIN", 40), ("star", "DIAMOND", 80)):
            conn.execute(balances.insert().values(account_id=account, currency=currency, balance=amount))
    engine.dispose()


async def test_a_ledger_from_before_provenance_is_carried_over(database_url: str, keys: Keys, tmp_path: Path) -> None:
    migrate.upgrade("wallet", database_url, "wallet_0002")
    legacy_ledger(database_url)
    async with running_wallet(database_url, keys, tmp_path) as wallet:  # migrates to the head
        with wallet.database.connect() as conn:
            lots = {
                r.store_transaction_id: (r.lot_id, r.environment, r.open_coins)
                for r in conn.execute(sa.select(tables.purchases))
            }
        # Credit order; the 40 unspent coins are the newest lot's (spending took the oldest first).
        assert lots == {"t1": (1, "PRODUCTION", 0), "t2": (2, "SANDBOX", 40)}
        fan = await wallet.balance("fan")
        assert (fan.coins, fan.sandbox_coins, fan.debt_coins) == (0, 40, 0)
        assert audit(wallet.database) == []
        # The earlier clawback can still be restored, and a new refund of what was spent becomes debt.
        restored = await wallet.stub.RestorePurchase(
            pb.RestorePurchaseRequest(
                request_id=unique("rs"),
                store=pb.STORE_APP_STORE,
                environment=pb.STORE_ENVIRONMENT_PRODUCTION,
                store_transaction_id="t1",
            ),
            metadata=wallet.md(),
        )
        assert (restored.coins_restored, restored.balance.coins) == (30, 30)
        refunded = await wallet.stub.ReversePurchase(
            pb.ReversePurchaseRequest(
                request_id=unique("rv"),
                store=pb.STORE_APP_STORE,
                environment=pb.STORE_ENVIRONMENT_PRODUCTION,
                store_transaction_id="t1",
                full_refund=True,
            ),
            metadata=wallet.md(),
        )
        assert (refunded.balance.coins, refunded.balance.debt_coins) == (0, 70)
        assert (await wallet.balance("star")).diamonds == 80  # pre-provenance gifts have no attribution
        assert audit(wallet.database) == []
